"""Steps that several strategies share: optimizer parameter groups, activation checkpointing, and the torch
optimizer, accumulation and clipping that DDP, FSDP2 and HSDP have in common."""

import contextlib

import torch
from torch import nn

from conf.schema import Precision, StrategyConfig
from trainers.strategies import OptimizerFactory, SchedulerFactory


def parameter_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, vectors (norm scales, biases) do not, as in GPT-2 and Llama."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def apply_activation_checkpointing(blocks: nn.ModuleList, *, selective: bool = False) -> None:
    """Recompute each block's activations in backward instead of storing them (trades compute for memory).

    Full: a block keeps only its input and runs its whole forward again in backward. Selective: a block also
    keeps what its matmuls and attention produce, the costly part to recompute, and recomputes only the cheap
    rest (RMSNorm, RoPE, SwiGLU's SiLU and product, casts): more memory than full, a fraction of its
    recomputation."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    policy = {"context_fn": _keep_matmul_outputs_context} if selective else {}
    for index, block in enumerate(blocks):
        blocks[index] = checkpoint_wrapper(block, **policy)


# What selective checkpointing keeps: matmul and attention outputs (each attention kernel, including the
# logsumexp it saves for backward). Everything else a block computes is recomputed.
_KEPT_OPS = frozenset(getattr(torch.ops.aten, name) for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
) if hasattr(torch.ops.aten, name))


def _keep_matmul_outputs(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    kept = getattr(op, "overloadpacket", op) in _KEPT_OPS
    return CheckpointPolicy.MUST_SAVE if kept else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_matmul_outputs_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_keep_matmul_outputs)


def compile_blocks(blocks: nn.ModuleList) -> None:
    """torch.compile (Inductor) each block in place, so parameter and state-dict names stay as they are and a
    strategy wraps the blocks afterwards exactly as it would eager ones. Per block rather than the whole model:
    the blocks share one shape, so they share one compiled graph, and the strategies' per-block work stays
    between them. FSDP2 marks its hooks compiler-disabled, and they cost no graph break: under DDP, FSDP2 and
    ZeRO-2 a 2-block model compiled one graph, run by both blocks, with no break (CPU, measured; the tests
    check it)."""
    for block in blocks:
        block.compile()


def block_preparer(*, checkpointing: bool, selective: bool, compile: bool):
    """What a strategy does to the blocks before it wraps the model: activation checkpointing first, then
    compiling, so that the compiled graph holds the recomputation (torchtitan applies them in this order)."""

    def prepare(blocks: nn.ModuleList) -> None:
        if checkpointing:
            apply_activation_checkpointing(blocks, selective=selective)
        if compile:
            compile_blocks(blocks)

    return prepare


def is_on_meta(model: nn.Module) -> bool:
    return any(param.is_meta for param in model.parameters())


def ring_share(world: int) -> float:
    """The share of a payload each worker sends in a ring collective: (N - 1) / N."""
    return (world - 1) / world


class TorchStrategy:
    """Shared by DDP, FSDP2 and HSDP: a torch optimizer, loss scaling for accumulation, clipping by hand."""

    def __init__(self, cfg: StrategyConfig, *, device: torch.device, precision: Precision, accum_steps: int,
                 grad_clip: float, micro_batch_size: int):
        self.cfg, self.device, self.precision = cfg, device, precision
        self.accum_steps, self.grad_clip = accum_steps, grad_clip
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    def init_context(self, *, pretrained: bool):
        return contextlib.nullcontext()

    def _finish_setup(self, *, build_optimizer: OptimizerFactory, build_scheduler: SchedulerFactory,
                      weight_decay: float) -> None:
        self.optimizer = build_optimizer(parameter_groups(self.model, weight_decay=weight_decay))
        self.scheduler = build_scheduler(self.optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum_steps).backward()

    def step(self) -> torch.Tensor:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")  # 0 turns clipping off, as in DeepSpeed
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor holding the global norm
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm.detach()  # stays on the device: reading it would stall the GPU every step

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def autocast(self):
        # FSDP2 and DeepSpeed cast by themselves; DDP needs autocast for bf16 compute over fp32 weights.
        return contextlib.nullcontext()
