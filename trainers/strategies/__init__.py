"""Data-parallel strategies: one module each, one record (StrategySpec) per strategy, looked up by name.

A strategy is everything that differs between DDP, FSDP2, HSDP and DeepSpeed ZeRO: how it wraps a model and
steps, how it saves and loads training state, how a checkpoint it wrote becomes full tensors for export, and
what it costs in memory and traffic. Every model family goes through the same calls, so a family never imports
strategy code:

    strategy = build_strategy(cfg.strategy, device=..., precision=..., accum_steps=..., ...)
    strategy.setup(model, blocks=family.blocks(model), build_optimizer=..., build_scheduler=...)
    for each micro-batch:
        with strategy.micro_step(is_last=...):
            loss = family.loss(strategy.model, batch)
            strategy.backward(loss)      # the micro-batch's mean loss; scaling for accumulation happens here
    grad_norm = strategy.step()          # clip, optimizer and schedule step; norm (a tensor) before clipping

Adding a strategy is one module in this package that declares `SPECS`, its YAML in conf/strategy/ (which is
what makes `strategy=NAME` and `strategy.name=NAME` valid) and its tests. Nothing outside this package
switches on a strategy's name: the checkpoint manager (trainers/checkpointing.py), export, the memory model
and the launch plan (cluster/) and the run's checks read the record.
"""

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from cluster.memory import ModelShape, ModelStates
from conf.schema import Precision, StrategyConfig
from trainers.discovery import Registry

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
WeightLoader = Callable[[nn.Module], None]
BlockPreparer = Callable[[nn.ModuleList], None]


class Strategy(Protocol):
    """What the training loop and the checkpoint manager call on a strategy object."""

    model: nn.Module  # the wrapped model: what forward runs on

    def init_context(self, *, pretrained: bool) -> AbstractContextManager:
        """Where the model is built: DeepSpeed ZeRO-3 partitions a pretrained model's parameters as they are
        created, so no rank ever holds the whole model; the others build as asked (the meta device included)."""

    def setup(self, model: nn.Module, *, blocks: nn.ModuleList, build_optimizer: OptimizerFactory,
              build_scheduler: SchedulerFactory, weight_decay: float,
              prepare_blocks: BlockPreparer | None = None, load_weights: WeightLoader | None = None) -> None:
        """Wrap `model` and build its optimizer. `prepare_blocks(blocks)`, when given, is called on the blocks
        before anything wraps them (activation checkpointing, compiling: trainers/strategies/common.py).
        `load_weights(model)` (pretrained weights), when given, is called once the parameters this rank holds
        are on its device and before anything copies them (an optimizer's master weights, DDP's broadcast); a
        model built on the meta device is materialized first."""

    def micro_step(self, *, is_last: bool) -> AbstractContextManager: ...

    def autocast(self) -> AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> torch.Tensor: ...

    def current_lr(self) -> float: ...

    def unwrapped_model(self) -> nn.Module: ...

    def save_state(self, directory: Path, *, rank: int) -> None:
        """Write this rank's part of the model, optimizer and schedule state into `directory`."""

    def load_state(self, directory: Path) -> None:
        """Load them from a checkpoint directory that every rank's part was merged into."""


@dataclass(frozen=True)
class CheckpointFormat:
    """How a strategy's part of a checkpoint is laid out, and how to read it back whole without any process
    group (export).

    Reading streams: `consolidate_groups(checkpoint_dir, template, groups=[[name, ...], ...])` yields one
    {name: full tensor} per group, in order, reading no more of the checkpoint than that group, so an export
    holds one group (one output file) at a time rather than the whole model (an 8B model is 32 GB in fp32).
    Before the first group it checks that the checkpoint holds exactly the template's names and shapes
    (check_stored).
    A consumer that drops each tensor as it writes it (pops it from the group) frees it: the formats keep no
    reference to a group once it is yielded and the next one is asked for."""

    name: str  # recorded in export.json: ddp, fsdp (DCP) or deepspeed
    marker: str  # the file or directory it writes: how a checkpoint that does not name its strategy is read
    # (checkpoint directory, {name: tensor shaped like the plain model's}, *, groups: lists of those names)
    # -> an iterator of {name: full tensor}, one per group, tensors in fp32 or the dtype they were stored in
    consolidate_groups: Callable[..., Iterator[dict[str, torch.Tensor]]]

    def consolidate(self, checkpoint_dir: Path, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every tensor of the template, full, at once: one group of everything (small models, tests)."""
        state: dict[str, torch.Tensor] = {}
        for group in self.consolidate_groups(checkpoint_dir, template, groups=[list(template)]):
            state.update(group)
        return state


def check_stored(stored: Mapping[str, object], template: dict, *, source: Path) -> None:
    """The checkpoint at `source` holds exactly the tensors of the plain model its model_config.json describes:
    `stored` maps each name it holds to its full shape (a tuple, or anything with a .shape)."""
    missing, unexpected = sorted(template.keys() - stored.keys()), sorted(stored.keys() - template.keys())
    if missing or unexpected:
        raise ValueError(f"{source} does not match its model_config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, tensor in template.items():
        shape = tuple(getattr(stored[name], "shape", stored[name]))
        if shape != tuple(tensor.shape):
            raise ValueError(f"{source}: {name} has shape {shape}, the model config says {tuple(tensor.shape)}")


@dataclass(frozen=True)
class StrategySpec:
    """Everything Slipway knows about one strategy."""

    name: str
    summary: str  # one line, for listings and errors
    schema: type[StrategyConfig]  # its options (conf/strategy/NAME.yaml names it first in its defaults)
    build: Callable[..., Strategy]  # (cfg, *, device, precision, accum_steps, grad_clip, micro_batch_size)
    checkpoint: CheckpointFormat
    meta_init: bool  # can build the model on the meta device and materialize only its shards
    elastic: bool  # its checkpoints load at another world size (Ray Train V2 elastic runs)
    # Per-GPU bytes of what training keeps besides activations; see cluster/memory.py for the parts.
    # (cfg, *, shape, world, precision, accum_steps, checkpointing) -> ModelStates
    model_states: Callable[..., ModelStates]
    # Bytes each worker sends per optimizer step: (cfg, *, params, world, accum_steps, precision) -> bytes
    communication_bytes: Callable[..., float]
    # Of those, what crosses nodes when a run spans several: (cfg, *, params, world, accum_steps, precision,
    # workers_per_node) -> bytes. None: all of it (a ring over every worker runs at its slowest link).
    network_bytes: Callable[..., float] | None = None
    # bf16 compute under autocast over fp32 weights (DDP): what comes from the embeddings stays fp32
    autocast_over_fp32: bool = False
    # trainer.compile can torch.compile its blocks (false: its own hooks run inside the blocks and break the graph)
    compiles_blocks: bool = True
    startup_note: str = "peak: the whole fp32 model, built on each worker"  # the plan's start-up row
    # The plan's note when start-up is the peak of the whole run.
    startup_peak_note: str = "start-up is the peak: the whole fp32 model is built on each worker before it is wrapped"
    plan_notes: Callable[[StrategyConfig], list[str]] = lambda cfg: []  # caveats the plan prints
    # (cfg, world): raises ValueError when the strategy cannot train on `world` workers with these options
    check_world: Callable[[StrategyConfig, int], None] = lambda cfg, world: None


_REGISTRY = Registry(__name__, key="strategy.name")


def all_strategies() -> dict[str, StrategySpec]:
    return dict(_REGISTRY.records)


def get_strategy(name: str) -> StrategySpec:
    return _REGISTRY.get(name)


def checkpoint_formats() -> dict[str, CheckpointFormat]:
    return {spec.checkpoint.name: spec.checkpoint for spec in all_strategies().values()}


def build_strategy(cfg: StrategyConfig, *, device: torch.device, precision: Precision, accum_steps: int,
                   grad_clip: float, micro_batch_size: int) -> Strategy:
    """The strategy object that `cfg.name` names, with `cfg`'s options."""
    return get_strategy(cfg.name).build(cfg, device=device, precision=precision, accum_steps=accum_steps,
                                        grad_clip=grad_clip, micro_batch_size=micro_batch_size)


def default_options(name: str) -> StrategyConfig:
    """A strategy's options at their defaults (what the plan assumes for a strategy it suggests)."""
    return get_strategy(name).schema(name=name)


def model_states(name: str, *, shape: ModelShape, world: int, precision: str = "bf16", accum_steps: int = 1,
                 checkpointing: bool = False, **options) -> ModelStates:
    """Per-GPU model-state bytes of strategy `name` with `options` (its schema's fields) set."""
    spec = get_strategy(name)
    known = {field.name for field in fields(spec.schema)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"strategy {name} has no option {', '.join(unknown)}; it has {', '.join(sorted(known))}")
    return spec.model_states(spec.schema(name=name, **options), shape=shape, world=world,
                             precision=Precision(precision), accum_steps=accum_steps, checkpointing=checkpointing)
