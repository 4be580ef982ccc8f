"""A plain Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention over torch SDPA.

The model knows nothing about parallelism (torchtitan's split): strategies shard or wrap it from outside, and
`init_weights` lets a model built on the meta device be materialized after sharding.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from conf.schema import LLMConfig


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


def rope_tables(head_dim: int, max_seq_len: int, *, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim // 2) for rotating query/key pairs."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :half], x[..., half:]) of x (batch, heads, seq, head_dim) by position."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
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
        # Rotary tables are derived state, not weights: non-persistent so checkpoints carry only parameters.
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, theta=cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        return self.output(self.norm(h))

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter and buffer in place; used after materializing from the meta device.

        Output projections of each residual branch get std scaled by 1/sqrt(2 * n_layers) (GPT-2's rule) so
        the residual stream does not grow with depth.
        """
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
        nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)
        cos, sin = rope_tables(self.cfg.dim // self.cfg.n_heads, self.cfg.max_seq_len, theta=self.cfg.rope_theta,
                               device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)


def build_llm(cfg: LLMConfig, *, vocab_size: int, device: str | torch.device = "cpu") -> Transformer:
    """A new decoder on `device`; on "meta" no memory is allocated and `init_weights` runs after sharding."""
    with torch.device(device):
        model = Transformer(cfg, vocab_size=vocab_size)
    if str(device) != "meta":
        model.init_weights()
    return model


def count_parameters(cfg: LLMConfig, *, vocab_size: int) -> dict[str, int]:
    """Parameter counts computed from the config (no model needed): total and without the embedding table."""
    head_dim = cfg.dim // cfg.n_heads
    attention = cfg.dim * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    block = attention + 3 * cfg.dim * cfg.ffn_hidden + 2 * cfg.dim
    embedding = vocab_size * cfg.dim
    total = embedding + cfg.n_layers * block + cfg.dim + cfg.dim * vocab_size
    return {"total": total, "non_embedding": total - embedding}


def training_flops_per_token(cfg: LLMConfig, *, vocab_size: int, seq_len: int) -> float:
    """Model FLOPs for one trained token (forward + backward), the usual MFU convention.

    6N + 12 * n_layers * dim * seq_len, from the PaLM paper (Chowdhery et al. 2022, appendix B): N counts the
    weights used in matmuls (the embedding lookup is excluded, the output projection included).
    """
    matmul_params = count_parameters(cfg, vocab_size=vocab_size)["non_embedding"] + cfg.dim * vocab_size
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.dim * seq_len
