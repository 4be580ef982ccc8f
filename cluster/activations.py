"""Activation memory of one micro batch on one worker, from the config alone: the part of the launch plan's
per-GPU memory that grows with trainer.micro_batch_size (cluster/memory.py holds the rest).

LLM. The starting point is Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (arXiv:2205.05198), section 4.1: a GPT layer stores sbh(34 + 5as/h) bytes in 16-bit without
recomputation (s sequence, b micro batch, h hidden, a heads), and with full recomputation only its 2sbh input.
Their 34 is 11 (attention) + 19 (4h GeLU MLP) + 4 (two LayerNorms), including dropout masks; 5as/h is the
materialized attention matrix. Adapted here to trainers/llm.py, per token and layer, with p the bytes of
matmul activations and r those of the residual stream:
  - no dropout, and SDPA's flash kernel: no s^2 terms; it saves q, k, v, its output and an fp32 logsumexp
    per head (4a). With GQA, k and v are g = n_kv_heads x head_dim wide and are not expanded (measured);
  - RoPE saves nothing: x * cos does not keep x when cos needs no gradient; SDPA keeps the rotated q, k;
  - the attention output is reshaped (a copy) before wo, so it is held twice: 3ph + 2pg + 4a in all;
  - RMSNorm upcasts to fp32 and keeps that copy (4h), its normalized output in the residual dtype (rh) and
    the scaled output the next matmul keeps (ph): 2 x (4h + rh + ph + 4) for the two norms. It calls
    x.float() twice, so a 16-bit residual stream gets two fp32 copies (8h), both kept (measured);
  - under autocast (DDP in bf16: fp32 weights, so an fp32 residual stream) every matmul casts its fp32 input
    to bf16 itself, and autocast caches only casts of leaf tensors: wq, wk and wv keep three bf16 copies of
    the normed input, w1 and w3 two (measured). The bf16 copies of the weights are counted as parameters;
  - SwiGLU keeps w1's output, its SiLU, w3's output and their product: 4pf instead of GeLU's 2 x 4h.
The loss keeps the fp32 log-softmax over the vocabulary (4V per token) from forward to backward, and at the
start of backward also the gradients of the log-probabilities and the logits (8V more): with a 128k
vocabulary that is 1.5 MB per token, more than a whole layer.

Checkpointing (trainers/strategies/common.py wraps each block) keeps per layer the block's input (rh) and,
in full, nothing else. Selective checkpointing also keeps every output of the ops its policy saves, whether
backward reads it or not (measured): the seven matmuls' (q ph, k and v 2pg, wo ph, w1 and w3 2pf, w2 ph) and
the attention kernel's (its output ph and the fp32 logsumexp 4a), so rh + p(4h + 2g + 2f) + 4a. wo's and
w2's outputs only feed residual adds, which keep nothing, but the policy saves by op, not by need. Everything
else is recomputed: the norms with their fp32 upcasts, RoPE, SwiGLU's SiLU and product, the attention output's
reshape, and under autocast every bf16 cast, of activations and of weights alike. So, as in full, the weight
casts exist only while a block runs backward (measured). tests/cluster/test_memory.py checks these formulas
against the bytes a CPU forward really keeps, in fp32, bf16 and autocast, without and with either policy.

Rankers keep little per sample (a few thousand numbers: the MLP outputs, DLRM's stacked embeddings, DCN's
cross-layer inputs) next to their embedding tables, which are parameters, not activations.
"""

from dataclasses import dataclass

from conf.schema import LLMConfig, RankerConfig

FP32 = 4
LOG_SOFTMAX_BYTES = 4  # per token and vocabulary entry: the fp32 log-probabilities cross_entropy keeps
LOSS_BACKWARD_BYTES = 8  # per token and vocabulary entry: fp32 gradients of the log-probabilities and logits
NORM_STAT_BYTES = 4  # RMSNorm's fp32 rsqrt per token
EMBEDDING_BAG_INDEX_BYTES = 32  # per sample and table: the int64 index buffers nn.EmbeddingBag keeps (measured)


@dataclass(frozen=True)
class Activations:
    """Bytes of one micro batch's activations on one worker."""

    stored: float  # kept from forward until backward
    working: float  # transient on top of `stored` at the worst moment of backward

    @property
    def peak(self) -> float:
        return self.stored + self.working


def llm_layer_bytes_per_token(cfg: LLMConfig, *, compute_bytes: int, residual_bytes: int) -> float:
    """What one transformer layer keeps for backward, per token (see the module docstring for each term)."""
    h, f, heads, g = cfg.dim, cfg.ffn_hidden, cfg.n_heads, _kv_width(cfg)
    p, r = compute_bytes, residual_bytes
    autocast = p != r
    norms = (_norm_bytes_per_token(h, compute_bytes=p, residual_bytes=r, consumers=3 if autocast else 1)
             + _norm_bytes_per_token(h, compute_bytes=p, residual_bytes=r, consumers=2 if autocast else 1))
    attention = 3 * p * h + 2 * p * g + FP32 * heads
    return norms + attention + 4 * p * f


def llm_selective_layer_bytes_per_token(cfg: LLMConfig, *, compute_bytes: int, residual_bytes: int) -> float:
    """What one selectively checkpointed layer keeps, per token: its input, its matmuls' outputs and its
    attention kernel's (see the module docstring)."""
    h, f, g = cfg.dim, cfg.ffn_hidden, _kv_width(cfg)
    matmul_outputs = 3 * h + 2 * g + 2 * f  # wq, wo, w2; wk, wv; w1, w3
    attention_outputs = compute_bytes * h + FP32 * cfg.n_heads  # and its logsumexp
    return residual_bytes * h + compute_bytes * matmul_outputs + attention_outputs


def _kv_width(cfg: LLMConfig) -> int:
    """Width of keys and values: n_kv_heads x head_dim (narrower than dim under GQA)."""
    return cfg.n_kv_heads * (cfg.dim // cfg.n_heads)


def _norm_bytes_per_token(h: int, *, compute_bytes: int, residual_bytes: int, consumers: int = 1) -> float:
    """An RMSNorm and the input its `consumers` matmuls keep (one shared tensor, or one cast each)."""
    upcasts = 1 if residual_bytes == FP32 else 2  # x.float() of an fp32 stream is x itself
    return upcasts * FP32 * h + residual_bytes * h + consumers * compute_bytes * h + NORM_STAT_BYTES


def llm_activations(cfg: LLMConfig, *, vocab_size: int, seq_len: int, micro_batch: int, compute_bytes: int,
                    residual_bytes: int, checkpointing: bool, selective: bool = False) -> Activations:
    """Activations of one micro batch of `micro_batch` sequences of `seq_len` tokens.

    compute_bytes: bytes of matmul inputs and outputs (2 in bf16, also under autocast); residual_bytes: bytes of
    the residual stream (4 under DDP's autocast, whose fp32 embedding output keeps the stream in fp32).
    With checkpointing a layer keeps only its input, or with `selective` also its matmul and attention outputs,
    and backward recomputes one layer at a time.
    """
    tokens = micro_batch * seq_len
    sizes = dict(compute_bytes=compute_bytes, residual_bytes=residual_bytes)
    layer = llm_layer_bytes_per_token(cfg, **sizes)
    if not checkpointing:
        kept_per_layer = layer
    elif selective:
        kept_per_layer = llm_selective_layer_bytes_per_token(cfg, **sizes)
    else:
        kept_per_layer = residual_bytes * cfg.dim
    final_norm = _norm_bytes_per_token(cfg.dim, **sizes)
    stored = cfg.n_layers * kept_per_layer + final_norm + LOG_SOFTMAX_BYTES * vocab_size
    # While one layer runs backward: the gradients of its FFN activations and of the residual stream (an
    # estimate, not measured), plus the recomputed layer itself under checkpointing. Selective recomputes
    # less (its saved outputs are already stored), but counting the whole layer keeps it simple and errs high.
    layer_backward = 4 * compute_bytes * cfg.ffn_hidden + 2 * residual_bytes * cfg.dim
    if checkpointing:
        layer_backward += layer
    working = max(LOSS_BACKWARD_BYTES * vocab_size, layer_backward)
    return Activations(stored=tokens * stored, working=tokens * working)


def ranker_activations(cfg: RankerConfig, *, num_dense: int, num_tables: int, micro_batch: int,
                       compute_bytes: int, residual_bytes: int) -> Activations:
    """Activations of one micro batch of DLRM or DCN-v2 (trainers/ranker.py), per the tensors autograd keeps.

    residual_bytes is the dtype of what is built from the embeddings (DLRM's stacked features, DCN's x0):
    fp32 under DDP's autocast, where embedding lookups are not cast.
    """
    dim = cfg.embedding_dim
    if cfg.arch == "dlrm":
        features = num_tables + 1  # the bottom MLP's output joins the embeddings
        top_input = dim + features * (features - 1) // 2
        mlp_outputs = sum(cfg.bottom_mlp) + top_input + sum(cfg.top_mlp)
        embedding_derived = features * dim  # the stacked features, kept by the pairwise bmm
        widest = max([top_input, *cfg.bottom_mlp, *cfg.top_mlp])
    else:
        width = num_dense + num_tables * dim
        # Each cross layer keeps its input (for W), the low-rank middle and W x (for x0 * W x).
        mlp_outputs = cfg.cross_layers * (2 * width + cfg.cross_rank) + sum(cfg.deep_mlp)
        embedding_derived = width  # x0
        widest = max([width, *cfg.deep_mlp])
    per_sample = (compute_bytes * mlp_outputs + residual_bytes * embedding_derived
                  + EMBEDDING_BAG_INDEX_BYTES * num_tables + 3 * FP32)  # + the logit, its copy and the label
    # Backward holds the gradients of about two of the widest activations at once (an estimate).
    working = 2 * compute_bytes * widest
    return Activations(stored=micro_batch * per_sample, working=micro_batch * working)
