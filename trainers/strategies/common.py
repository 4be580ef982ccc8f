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


def apply_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations in backward instead of storing them (trades compute for memory)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for index, block in enumerate(blocks):
        blocks[index] = checkpoint_wrapper(block)


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
