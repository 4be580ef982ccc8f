"""A plain Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention over torch SDPA.

The model knows nothing about parallelism (torchtitan's split): strategies shard or wrap it from outside, and
`init_weights` lets a model built on the meta device be materialized after sharding.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from conf.schema import Llama3RopeScaling, LLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32: bf16 squares lose too much precision over large dims.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(head_dim: int, max_seq_len: int, *, theta: float, scaling: Llama3RopeScaling | None = None,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim // 2) for rotating query/key pairs."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = llama3_scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def llama3_scaled_frequencies(inv_freq: torch.Tensor, scaling: Llama3RopeScaling) -> torch.Tensor:
    """Llama 3.1's frequency rescaling (Meta's reference `apply_scaling`, which HF's llama3 rope type follows):
    high frequencies (short wavelengths, local order) are kept, low ones are divided by `factor` so positions
    past the original context map into the range seen in pretraining, and the band between is blended."""
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, blended)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, start: int = 0,
               positions: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate pairs (x[..., :half], x[..., half:]) of x (batch, heads, seq, head_dim) by position.

    `start` is the position of x's first row: 0 in training, the cache length when decoding with a KV cache.
    `positions` (batch, seq), when given, is each token's own position instead (packed documents, whose
    positions restart at 0 where each document starts).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    if positions is None:
        cos, sin = cos[start : start + x.shape[-2]], sin[start : start + x.shape[-2]]
    else:  # one table row per token, shared by the heads: (batch, 1, seq, half)
        cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


@dataclass
class KVCache:
    """Keys and values of the positions already processed, per layer, for decoding one token at a time.

    Buffers are preallocated to (batch, n_kv_heads, max_len, head_dim) so a decoding step writes in place
    instead of concatenating (which would copy the whole cache every step). Meant for inference only.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0  # positions filled; the next token's position

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def update(self, layer_index: int, *, keys: torch.Tensor,
               values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `keys`/`values` at the positions after `length`; return those of every position up to them.

        `length` itself advances once per forward, after all layers, in `Transformer.forward`.
        """
        end = self.length + keys.shape[2]
        self.keys[layer_index][:, :, self.length : end] = keys
        self.values[layer_index][:, :, self.length : end] = values
        return self.keys[layer_index][:, :, :end], self.values[layer_index][:, :, :end]


@dataclass(frozen=True)
class SlotBatch:
    """One step of a serving engine: the new tokens of several sequences end to end, each sequence continuing the
    one a row ("slot") of a KV cache holds (a KVCache built with batch_size = slots; its `length` is unused, every
    slot has its own). Decoding sequences come first, one token each, then prefill chunks of any length.

    Linear layers see all T tokens as one (1, T) row, which is what makes batching pay; attention, which must
    not mix sequences, runs once for all decoding sequences (keys gathered from their slots, padding masked)
    and once per prefill chunk (Orca's selective batching).
    """

    slots: torch.Tensor  # (T,) each token's slot
    positions: torch.Tensor  # (T,) each token's position in its sequence
    decode_slots: torch.Tensor  # (D,) the decoding sequences' slots: tokens 0..D-1
    decode_mask: torch.Tensor  # (D, 1, 1, span): which of the first `span` cached positions each may see
    chunks: tuple[tuple[int, int, int], ...]  # (slot, start, length) per prefill chunk, in token order after D
    single_decode: tuple[int, int] | None  # (slot, span) when one sequence decodes: attended without a gather

    @classmethod
    def build(cls, *, decode: list[tuple[int, int]], chunks: list[tuple[int, int, int]],
              device: torch.device) -> "SlotBatch":
        """`decode`: (slot, position) of each decoding sequence's token; `chunks`: (slot, start, length)."""
        slots = [slot for slot, _ in decode] + [slot for slot, _, length in chunks for _ in range(length)]
        positions = [pos for _, pos in decode] + [pos for _, start, length in chunks
                                                   for pos in range(start, start + length)]
        seen = torch.tensor([pos for _, pos in decode], dtype=torch.long, device=device)
        span = int(seen.max()) + 1 if decode else 0
        mask = torch.arange(span, device=device)[None, :] <= seen[:, None]
        return cls(slots=torch.tensor(slots, dtype=torch.long, device=device),
                   positions=torch.tensor(positions, dtype=torch.long, device=device),
                   decode_slots=torch.tensor([slot for slot, _ in decode], dtype=torch.long, device=device),
                   decode_mask=mask[:, None, None, :], chunks=tuple(chunks),
                   single_decode=(decode[0][0], decode[0][1] + 1) if len(decode) == 1 else None)

    @property
    def decode_count(self) -> int:
        return len(self.decode_slots)


def causal_mask_after(start: int, *, seq: int, device: torch.device) -> torch.Tensor:
    """Boolean (seq, start + seq) mask letting query i (at position start + i) see keys at positions <= start + i.

    SDPA's is_causal aligns the mask to the top-left corner, which is only right when queries and keys start
    at the same position; a chunk appended to a non-empty cache needs the diagonal shifted by `start`.
    """
    query_positions = torch.arange(start, start + seq, device=device)
    key_positions = torch.arange(start + seq, device=device)
    return key_positions[None, :] <= query_positions[:, None]


def document_layout(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention mask and rotary positions of rows that pack several documents end to end.

    `document_ids` (batch, seq) holds equal ids in contiguous runs, one run per document. Returns a boolean
    (batch, 1, seq, seq) mask letting a query see keys of its own document at or before it (block-diagonal
    and causal) and positions (batch, seq) counting from each run's start. The mask is what keeps documents
    apart: rotary scores depend only on the distance between two positions, so in exact arithmetic it alone
    gives each document its logits alone. Restarting positions also gives each document the rotation angles it
    has alone and at inference (from 0) rather than angles thousands of positions on, which round differently
    in the fp32 tables and bf16 activations; and it keeps positions that a varlen attention kernel can use.
    """
    seq = document_ids.shape[1]
    index = torch.arange(seq, device=document_ids.device)
    causal = index[None, :] <= index[:, None]
    mask = (document_ids[:, :, None] == document_ids[:, None, :]) & causal
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    run_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return mask[:, None], index - run_start


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(
                f"model.dim ({cfg.dim}) must divide by model.n_heads ({cfg.n_heads}), and model.n_heads by "
                f"model.n_kv_heads ({cfg.n_kv_heads})"
            )
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, cache: KVCache | None = None,
                layer_index: int = 0, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                slots: SlotBatch | None = None) -> torch.Tensor:
        """`mask` and `positions` come together from `document_layout` for packed rows (never with a cache);
        `slots` with a cache of slots describes a serving engine's step (x is then one row of its tokens)."""
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # An engine step's cos/sin arrive as one row per token already (forward_slots), so they start at 0.
        start = 0 if cache is None or slots is not None else cache.length
        q = apply_rope(q, cos, sin, start=start, positions=positions)
        k = apply_rope(k, cos, sin, start=start, positions=positions)
        if slots is not None:
            out = self._attend_slots(q, k, v, cache=cache, slots=slots, layer_index=layer_index)
        elif mask is not None:
            # Key/value heads repeated by hand rather than enable_gqa: SDPA's GQA support does not cover every
            # masked kernel, and the math fallback would materialize (batch, heads, seq, seq) scores.
            groups = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
        else:
            out = self._attend_with_cache(q, k, v, cache=cache, layer_index=layer_index)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def _attend_with_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cache: KVCache,
                           layer_index: int) -> torch.Tensor:
        start, seq = cache.length, q.shape[2]
        keys, values = cache.update(layer_index, keys=k, values=v)
        gqa = self.n_heads != self.n_kv_heads
        if start == 0:  # prefill: queries and keys start together, exactly the training case
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
        if seq == 1:  # the newest token may see every cached position, so no mask at all
            return F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
        mask = causal_mask_after(start, seq=seq, device=q.device)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)


    def _attend_slots(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cache: KVCache, slots: SlotBatch,
                      layer_index: int) -> torch.Tensor:
        """Attention of an engine step's tokens (q, k, v: (1, heads, T, head_dim)), each over its own slot."""
        keys, values = cache.keys[layer_index], cache.values[layer_index]
        # Indexing dims 0 and 2 with a slice between puts the token dim first: (T, kv_heads, head_dim).
        keys[slots.slots, :, slots.positions] = k[0].transpose(0, 1)
        values[slots.slots, :, slots.positions] = v[0].transpose(0, 1)
        gqa = self.n_heads != self.n_kv_heads
        outs, decoding = [], slots.decode_count
        if decoding == 1:  # alone: its slot's span in place, no gather and no padding to mask
            slot, span = slots.single_decode
            out = F.scaled_dot_product_attention(q[:, :, :1], keys[slot : slot + 1, :, :span],
                                                 values[slot : slot + 1, :, :span], enable_gqa=gqa)
            outs.append(out[0])
        elif decoding:
            span = slots.decode_mask.shape[-1]
            queries = q[0, :, :decoding].transpose(0, 1).unsqueeze(2)  # (D, heads, 1, head_dim)
            out = F.scaled_dot_product_attention(queries, keys[slots.decode_slots, :, :span],
                                                 values[slots.decode_slots, :, :span], attn_mask=slots.decode_mask,
                                                 enable_gqa=gqa)
            outs.append(out[:, :, 0].transpose(0, 1))  # (heads, D, head_dim)
        offset = decoding
        for slot, start, length in slots.chunks:
            queries = q[:, :, offset : offset + length]
            end = start + length
            chunk_keys, chunk_values = keys[slot : slot + 1, :, :end], values[slot : slot + 1, :, :end]
            if start == 0:
                out = F.scaled_dot_product_attention(queries, chunk_keys, chunk_values, is_causal=True, enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(queries, chunk_keys, chunk_values, enable_gqa=gqa,
                                                     attn_mask=causal_mask_after(start, seq=length, device=q.device))
            outs.append(out[0])
            offset += length
        return torch.cat(outs, dim=1).unsqueeze(0)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, cache: KVCache | None = None,
                layer_index: int = 0, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                slots: SlotBatch | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache=cache, layer_index=layer_index, mask=mask,
                               positions=positions, slots=slots)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: LLMConfig, *, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, vocab_size, bias=False)
        self.tie_weights()
        # Rotary tables are derived state, not weights: non-persistent so checkpoints carry only parameters.
        cos, sin = self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, *, cache: KVCache | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) for `tokens` (batch, seq).

        With a `cache`, `tokens` continue the sequence the cache holds: their positions start at `cache.length`,
        they attend to every cached position, and their keys/values are added to the cache.

        With `document_ids` (batch, seq), each row packs several documents (equal ids in contiguous runs): a
        token attends only to its own document and its position counts from the document's start, so each
        document's logits are those it would get alone (see `document_layout`). Padding is a run of its own.
        """
        if cache is None and tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if cache is not None:
            self._check_cache_room(cache, tokens)
        h = self.tok_embeddings(tokens)
        if document_ids is not None:
            if cache is not None or document_ids.shape != tokens.shape:
                raise ValueError(f"document_ids of shape {tuple(document_ids.shape)} must match tokens "
                                 f"{tuple(tokens.shape)} and come without a KV cache (they are for training rows)")
            mask, positions = document_layout(document_ids)
            for layer in self.layers:
                h = layer(h, self.rope_cos, self.rope_sin, mask=mask, positions=positions)
        elif cache is None:
            # The training path: its calls stay exactly as they were before caching existed.
            for layer in self.layers:
                h = layer(h, self.rope_cos, self.rope_sin)
        else:
            for index, layer in enumerate(self.layers):
                h = layer(h, self.rope_cos, self.rope_sin, cache=cache, layer_index=index)
            cache.length += tokens.shape[1]
        return self.output(self.norm(h))

    def forward_slots(self, tokens: torch.Tensor, *, cache: KVCache, slots: SlotBatch,
                      rows: torch.Tensor) -> torch.Tensor:
        """A serving engine's step: `tokens` (T,) laid out by `slots` continue the sequences of a slotted KV
        cache (see SlotBatch), whose keys and values they add. Returns the logits of `rows` only (indices into
        the T tokens): the positions whose next token is sampled or scored, sparing the output projection the
        rest of a prefill chunk."""
        h = self.tok_embeddings(tokens[None])
        # Each token's rotary row, gathered once for every layer (apply_rope then reads them from row 0).
        cos, sin = self.rope_cos[slots.positions], self.rope_sin[slots.positions]
        for index, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache=cache, layer_index=index, slots=slots)
        return self.output(self.norm(h[0, rows]))

    def _check_cache_room(self, cache: KVCache, tokens: torch.Tensor) -> None:
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"tokens have batch size {tokens.shape[0]} but the KV cache was built for "
                             f"{cache.batch_size}")
        # Rotary tables end at max_seq_len, so that bounds a cache built by hand with longer buffers too.
        room = min(cache.max_len, self.cfg.max_seq_len)
        if cache.length + tokens.shape[1] > room:
            raise ValueError(
                f"KV cache holds {cache.length} positions; {tokens.shape[1]} more would exceed its {room} "
                f"(the cache's max_len={cache.max_len}, at most model.max_seq_len={self.cfg.max_seq_len})"
            )

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter and buffer in place; used after materializing from the meta device.

        Output projections of each residual branch get std scaled by 1/sqrt(2 * n_layers) (GPT-2's rule) so
        the residual stream does not grow with depth.
        """
        self.tie_weights()
        std, depth_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            for linear in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.feed_forward.w1,
                           layer.feed_forward.w3):
                nn.init.trunc_normal_(linear.weight, std=std, a=-3 * std, b=3 * std)
            for linear in (layer.attention.wo, layer.feed_forward.w2):
                nn.init.trunc_normal_(linear.weight, std=depth_std, a=-3 * depth_std, b=3 * depth_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.cfg.tie_embeddings:
            nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)
        self.reset_rope_tables()

    def tie_weights(self) -> None:
        """With model.tie_embeddings, make the output projection the embedding's Parameter: one Parameter under two
        names, so every strategy, checkpoint and export sees the sharing and the two stay equal through training
        and resume. Called again after materializing from the meta device (to_empty gives each name its own)."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def reset_rope_tables(self) -> None:
        """Recompute the rotary tables in place (after materializing from the meta device, which leaves them
        uninitialized, whether the weights are then initialized or loaded)."""
        cos, sin = self._rope_tables(device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def _rope_tables(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        return rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, theta=cfg.rope_theta, scaling=cfg.rope_scaling,
                           device=device)


def build_llm(cfg: LLMConfig, *, vocab_size: int, device: str | torch.device = "cpu") -> Transformer:
    """A new decoder on `device`; on "meta" no memory is allocated and `init_weights` runs after sharding."""
    with torch.device(device):
        model = Transformer(cfg, vocab_size=vocab_size)
    if str(device) != "meta":
        model.init_weights()
    return model


def build_kv_cache(model: Transformer, *, batch_size: int, max_len: int | None = None,
                   dtype: torch.dtype | None = None) -> KVCache:
    """An empty KV cache for `model` on its device, holding up to `max_len` positions (model.max_seq_len if None).

    `dtype` defaults to the model's weights' dtype.
    """
    cfg = model.cfg
    max_len = cfg.max_seq_len if max_len is None else max_len
    if not 0 < max_len <= cfg.max_seq_len:
        # The rotary tables stop at max_seq_len, so positions beyond it have no encoding.
        raise ValueError(f"KV cache max_len={max_len} must be in 1..model.max_seq_len={cfg.max_seq_len}")
    if batch_size < 1:
        raise ValueError(f"KV cache batch_size={batch_size} must be at least 1")
    weight = model.tok_embeddings.weight
    shape = (batch_size, cfg.n_kv_heads, max_len, cfg.dim // cfg.n_heads)
    dtype = weight.dtype if dtype is None else dtype

    def empty_layers() -> list[torch.Tensor]:
        return [torch.zeros(shape, dtype=dtype, device=weight.device) for _ in range(cfg.n_layers)]

    return KVCache(keys=empty_layers(), values=empty_layers())


def count_parameters(cfg: LLMConfig, *, vocab_size: int) -> dict[str, int]:
    """Parameter counts computed from the config (no model needed): total and without the embedding table."""
    head_dim = cfg.dim // cfg.n_heads
    attention = cfg.dim * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    block = attention + 3 * cfg.dim * cfg.ffn_hidden + 2 * cfg.dim
    embedding = vocab_size * cfg.dim
    output = 0 if cfg.tie_embeddings else cfg.dim * vocab_size
    total = embedding + cfg.n_layers * block + cfg.dim + output
    return {"total": total, "non_embedding": total - embedding}


def training_flops_per_token(cfg: LLMConfig, *, vocab_size: int, seq_len: int) -> float:
    """Model FLOPs for one trained token (forward + backward), the usual MFU convention.

    6N + 12 * n_layers * dim * seq_len, from the PaLM paper (Chowdhery et al. 2022, appendix B): N counts the
    weights used in matmuls: the embedding lookup is excluded and the output projection included, which
    "non_embedding" already counts unless it is tied to the embedding (the norms' few weights are noise).
    """
    matmul_params = count_parameters(cfg, vocab_size=vocab_size)["non_embedding"]
    if cfg.tie_embeddings:
        matmul_params += cfg.dim * vocab_size
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.dim * seq_len
