"""Data-parallel strategies behind one interface: DDP, FSDP2 and DeepSpeed ZeRO-1/2/3.

Every model family goes through the same calls, so a family never imports strategy code:

    strategy = build_strategy(cfg.strategy, device=..., precision=..., accum_steps=...)
    strategy.setup(model, blocks=family.blocks(model), build_optimizer=..., build_scheduler=...)
    for each micro-batch:
        with strategy.micro_step(is_last=...):
            loss = family.loss(strategy.model, batch)
            strategy.backward(loss)      # the micro-batch's mean loss; scaling for accumulation happens here
    grad_norm = strategy.step()          # clip, optimizer and schedule step; norm (a tensor) before clipping

Saving and loading their state is trainers/checkpointing.py's job (DESIGN.md 2.6).
"""

import contextlib
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from conf.schema import StrategyConfig

logger = logging.getLogger(__name__)

STRATEGY_NAMES = ("ddp", "fsdp", "zero1", "zero2", "zero3")

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


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


class TorchStrategy:
    """Shared by DDP and FSDP2: a torch optimizer, loss scaling for accumulation, clipping by hand."""

    kind = "torch"

    def __init__(self, cfg: StrategyConfig, *, device: torch.device, precision: str, accum_steps: int,
                 grad_clip: float):
        self.cfg, self.device, self.precision = cfg, device, precision
        self.accum_steps, self.grad_clip = accum_steps, grad_clip
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

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


class DDPStrategy(TorchStrategy):
    name = "ddp"
    supports_meta_init = False

    def setup(self, model: nn.Module, *, blocks: nn.ModuleList, build_optimizer: OptimizerFactory,
              build_scheduler: SchedulerFactory, weight_decay: float, activation_checkpointing: bool) -> None:
        from torch.nn.parallel import DistributedDataParallel

        if activation_checkpointing:
            apply_activation_checkpointing(blocks)
        model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Gradients live in DDP's communication buckets instead of being copied there after backward: on a small
        # ranker on 2 CPU workers that copy was a fifth of the step (scripts/bench_ranker.py).
        self.model = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        self._finish_setup(build_optimizer=build_optimizer, build_scheduler=build_scheduler,
                           weight_decay=weight_decay)

    def micro_step(self, *, is_last: bool):
        # Skip the gradient all-reduce on all but the last micro-batch of an accumulation window.
        return contextlib.nullcontext() if is_last else self.model.no_sync()

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def unwrapped_model(self) -> nn.Module:
        return self.model.module


class FSDPStrategy(TorchStrategy):
    name = "fsdp"
    supports_meta_init = True  # fully_shard first, then materialize and initialize only this rank's shards

    def setup(self, model: nn.Module, *, blocks: nn.ModuleList, build_optimizer: OptimizerFactory,
              build_scheduler: SchedulerFactory, weight_decay: float, activation_checkpointing: bool) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if activation_checkpointing:
            apply_activation_checkpointing(blocks)
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.precision == "bf16" else MixedPrecisionPolicy()
        # One FSDP unit per block: parameters are all-gathered block by block, so peak memory holds one block
        # in full, and the embedding/output projections stay in the root unit.
        for block in blocks:
            fully_shard(block, reshard_after_forward=self.cfg.fsdp_reshard_after_forward, mp_policy=mp_policy)
        fully_shard(model, reshard_after_forward=self.cfg.fsdp_reshard_after_forward, mp_policy=mp_policy)
        if _is_on_meta(model):
            # Materialize only this rank's shards, then initialize them in place.
            model.to_empty(device=self.device)
            model.init_weights()
        else:
            model.to(self.device)
        self.model = model
        self._finish_setup(build_optimizer=build_optimizer, build_scheduler=build_scheduler,
                           weight_decay=weight_decay)

    def micro_step(self, *, is_last: bool):
        self.model.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()

    def unwrapped_model(self) -> nn.Module:
        return self.model


class DeepSpeedStrategy:
    """ZeRO stages 1-3 through `deepspeed.initialize`, with a DeepSpeed config generated from ours."""

    kind = "deepspeed"
    # Built whole on each worker's device, then partitioned by deepspeed.initialize: fine while the full
    # fp32 model fits one device (an 8B model is 32 GB). Larger ZeRO-3 models need deepspeed.zero.Init.
    supports_meta_init = False

    def __init__(self, cfg: StrategyConfig, *, device: torch.device, precision: str, accum_steps: int,
                 grad_clip: float, micro_batch_size: int):
        self.cfg, self.device, self.precision = cfg, device, precision
        self.name = cfg.name
        self.stage = int(cfg.name[-1])
        self.accum_steps, self.grad_clip, self.micro_batch_size = accum_steps, grad_clip, micro_batch_size
        self.model = None  # the DeepSpeed engine
        self.scheduler = None
        self._last_grad_norm = torch.tensor(float("nan"))

    def deepspeed_config(self) -> dict:
        zero: dict = {"stage": self.stage}
        if self.cfg.zero_offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        if self.stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = False
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.accum_steps,
            "train_batch_size": self.micro_batch_size * self.accum_steps * dist.get_world_size(),
            "gradient_clipping": self.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision == "bf16"},
            "steps_per_print": 10**9,  # our progress line replaces DeepSpeed's
            "wall_clock_breakdown": False,
        }

    def setup(self, model: nn.Module, *, blocks: nn.ModuleList, build_optimizer: OptimizerFactory,
              build_scheduler: SchedulerFactory, weight_decay: float, activation_checkpointing: bool) -> None:
        import deepspeed

        if activation_checkpointing:
            apply_activation_checkpointing(blocks)
        model.to(self.device)
        optimizer = build_optimizer(parameter_groups(model, weight_decay=weight_decay))
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=build_scheduler, config=self.deepspeed_config(),
            dist_init_required=False,
        )

    def micro_step(self, *, is_last: bool):
        # DeepSpeed counts micro-batches itself and syncs gradients at the accumulation boundary.
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # engine.backward divides by gradient_accumulation_steps; engine.step only steps on the boundary,
        # and DeepSpeed expects it after every micro-batch.
        self.model.backward(loss)
        at_boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()
        if at_boundary:
            norm = self.model.get_global_grad_norm()
            self._last_grad_norm = torch.as_tensor(norm if norm is not None else float("nan"))

    def step(self) -> torch.Tensor:
        return self._last_grad_norm

    def current_lr(self) -> float:
        return self.model.get_lr()[0]

    def unwrapped_model(self) -> nn.Module:
        return self.model.module


def _is_on_meta(model: nn.Module) -> bool:
    return any(param.is_meta for param in model.parameters())


def build_strategy(cfg: StrategyConfig, *, device: torch.device, precision: str, accum_steps: int,
                   grad_clip: float, micro_batch_size: int):
    """The strategy object named by `strategy.name`."""
    common = dict(device=device, precision=precision, accum_steps=accum_steps, grad_clip=grad_clip)
    if cfg.name == "ddp":
        return DDPStrategy(cfg, **common)
    if cfg.name == "fsdp":
        return FSDPStrategy(cfg, **common)
    if cfg.name in ("zero1", "zero2", "zero3"):
        return DeepSpeedStrategy(cfg, micro_batch_size=micro_batch_size, **common)
    raise ValueError(f"strategy.name={cfg.name!r} is not one of {', '.join(STRATEGY_NAMES)}")
