"""DistributedDataParallel: every worker holds the whole model; gradients are all-reduced after backward."""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cluster.memory import ADAM_MOMENTS, BF16, FP32, ModelShape, ModelStates
from conf.schema import Precision, StrategyConfig, StrategyName
from trainers.safe_loading import load_tensors
from trainers.strategies import CheckpointFormat, StrategySpec, check_stored
from trainers.strategies.common import TorchStrategy, is_on_meta, ring_share


@dataclass
class DDPConfig(StrategyConfig):
    name: StrategyName = "ddp"


class DDPStrategy(TorchStrategy):
    def setup(self, model: nn.Module, *, blocks: nn.ModuleList, build_optimizer, build_scheduler,
              weight_decay: float, prepare_blocks=None, load_weights=None) -> None:
        from torch.nn.parallel import DistributedDataParallel

        if prepare_blocks is not None:
            prepare_blocks(blocks)
        if is_on_meta(model):  # built on meta only to be loaded: every replica reads the whole checkpoint
            model.to_empty(device=self.device)
        else:
            model.to(self.device)
        if load_weights is not None:
            load_weights(model)
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
        if self.precision == Precision.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def unwrapped_model(self) -> nn.Module:
        return self.model.module

    def save_state(self, directory: Path, *, rank: int) -> None:
        if rank != 0:  # replicas are identical
            return
        torch.save(self.unwrapped_model().state_dict(), directory / MODEL_FILE)
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")

    def load_state(self, directory: Path) -> None:
        self.unwrapped_model().load_state_dict(load_tensors(directory / MODEL_FILE))
        self.optimizer.load_state_dict(load_tensors(directory / "optimizer.pt"))
        self.scheduler.load_state_dict(load_tensors(directory / "scheduler.pt"))


MODEL_FILE = "model.pt"


def consolidate_groups(checkpoint_dir: Path, template: dict, *, groups: list[list[str]]) -> Iterator[dict]:
    """model.pt holds the whole model: map it (mmap) rather than read it, and hand out one group at a time.

    Memory: a mapped file's pages count in the process's RSS (ru_maxrss included) once touched, as clean
    file-backed pages the kernel may drop under pressure, and stay counted while the mapping lives, which is as
    long as any tensor of it does. So each group maps the file afresh and keeps nothing of it once the group
    is handed out: when the consumer has dropped the group's tensors (export casts and writes them one by one)
    the mapping goes and so do its pages, and RSS holds at most one group of the file at a time. Mapping again
    re-reads only the pickled index, not the tensors."""
    path = checkpoint_dir / MODEL_FILE
    check_stored(load_tensors(path, mmap=True), template, source=path)
    for names in groups:
        state = load_tensors(path, mmap=True)
        group = {name: state[name] for name in names}
        del state  # the rest of the file's tensors; the group's keep the mapping alive until they are dropped
        yield group
        del group


def model_states(cfg: DDPConfig, *, shape: ModelShape, world: int, precision: Precision, accum_steps: int,
                 checkpointing: bool) -> ModelStates:
    """fp32 weights 4 (the model is never cast: autocast does bf16 compute), fp32 grads 4 (DDP's buckets are
    the .grad tensors: gradient_as_bucket_view=True), Adam's moments 8; plus the bf16 copies of the matmul
    weights autocast makes, kept for backward by each matmul."""
    params = shape.total
    notes = {"params": "fp32, whole", "grads": "fp32, whole", "optimizer": "Adam moments, fp32, whole",
             "step": "AdamW temporary"}
    casts = 0.0
    if precision == Precision.bf16:
        held = shape.matmul
        if checkpointing:  # recomputed blocks cast again in backward, one block at a time (measured)
            held = shape.matmul - shape.matmul_in_blocks + shape.matmul_in_blocks / max(shape.blocks, 1)
        casts = BF16 * held
        notes["params"] = "fp32, whole, + bf16 autocast copies of matmul weights"
    return ModelStates(params=FP32 * params + casts, grads=FP32 * params, optimizer=ADAM_MOMENTS * params,
                       step_temp=FP32 * params, notes=notes)


def communication_bytes(cfg: DDPConfig, *, params: int, world: int, accum_steps: int,
                        precision: Precision) -> float:
    """One ring all-reduce of the fp32 gradients per step (a reduce-scatter and an all-gather: 2 payloads)."""
    return 2 * FP32 * params * ring_share(world)


SPECS = (StrategySpec(
    name="ddp", summary="DistributedDataParallel: full replicas, gradients all-reduced", schema=DDPConfig,
    build=DDPStrategy,
    checkpoint=CheckpointFormat(name="ddp", marker=MODEL_FILE, consolidate_groups=consolidate_groups),
    meta_init=False, elastic=True,  # the checkpoint holds the whole model: any world size loads it
    model_states=model_states, communication_bytes=communication_bytes, autocast_over_fp32=True,
),)
