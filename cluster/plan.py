"""The launch plan (`python launch.py +exp=NAME cluster=... plan=true`): per-GPU memory, FLOPs, time and cost of
a training run, and whether it fits, computed from the config alone. Nothing is started, no data is prepared
and no model is allocated (the model is built on the meta device to count its parts).

A run that does not fit is searched for the nearest setups that would: another strategy, activation
checkpointing, a smaller micro batch (keeping the global batch), or more workers within cluster.max_nodes.
Memory comes from the strategies' formulas (model states) and the model family's (activations), FLOPs from
the family, so the plan and the training run's MFU agree. The plan sits below trainers/ in the layers, so it
is handed the family and the strategies (trainers/recipe.py: plan) and reads them through the two protocols
below; it never switches on a family's or a strategy's name.
"""

import math
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from operator import itemgetter
from typing import Protocol

from cluster.activations import Activations
from cluster.memory import (
    GB,
    META_INIT_THRESHOLD,
    MemoryEstimate,
    ModelShape,
    ModelStates,
    build_bytes,
    count_shape,
    human_count,
    worker_overhead,
)
from conf.derived import resolve_address, resolve_precision, worker_range
from conf.schema import CheckpointingPolicy, InitDevice, Precision, RootConfig, StrategyConfig


class PlanFamily(Protocol):
    """What the plan reads of a model family (trainers/families/)."""

    name: str
    item: str  # "tokens" or "samples"
    row: str  # "sequences" or "samples"
    supports_activation_checkpointing: bool
    plan_data: Callable[..., dict]
    build_model: Callable
    blocks: Callable
    items_per_row: Callable[[dict], int]
    flops_per_item: Callable[..., float]
    activations: Callable[..., Activations]


class PlanStrategy(Protocol):
    """What the plan reads of a strategy (trainers/strategies/)."""

    name: str
    schema: type[StrategyConfig]
    meta_init: bool
    autocast_over_fp32: bool
    startup_note: str
    startup_peak_note: str
    model_states: Callable[..., ModelStates]
    communication_bytes: Callable[..., float]
    network_bytes: Callable[..., float] | None
    plan_notes: Callable[[StrategyConfig], list[str]]
    check_world: Callable[[StrategyConfig, int], None]


@dataclass(frozen=True)
class Setup:
    """The knobs the plan varies when it looks for a setup that fits."""

    strategy: str
    workers: int
    micro_batch: int
    checkpointing: bool


@dataclass(frozen=True)
class Hardware:
    """Where the workers run, from cluster.* and cluster.node.*."""

    on_gpu: bool
    device_memory: float  # bytes per GPU, or per node for CPU workers; 0 = not described
    workers_per_device: int  # workers sharing one GPU, or the workers on one CPU node
    workers_per_node: int
    max_workers: int
    label: str  # e.g. "H100-SXM-80GB"
    bandwidth: float = 0.0  # bytes/s per worker for collectives within a node; 0 = not described
    network: float = 0.0  # bytes/s per worker across nodes; 0 = not described


@dataclass(frozen=True)
class Throughput:
    flops: float  # per step
    compute_s: float | None
    comm_bytes: float  # sent per worker per step
    comm_s: float | None

    @property
    def step_s(self) -> float | None:
        # Collectives overlap compute in all five strategies, so the slower of the two sets the pace.
        return None if self.compute_s is None else max(self.compute_s, self.comm_s or 0.0)


@dataclass(frozen=True)
class Plan:
    family: str
    preset: str
    row: str  # what the global batch counts: "sequences" or "samples"
    shape: ModelShape
    setup: Setup
    precision: str
    hardware: Hardware
    nodes: int
    memory: MemoryEstimate
    items_per_step: int
    item: str  # "tokens" or "samples"
    checkpointing_applies: bool  # the family has blocks worth recomputing
    checkpointing_policy: str  # what a checkpointed block keeps: "full" or "selective"
    startup_note: str
    throughput: Throughput
    accum_steps: int
    max_steps: int
    mfu: float
    peak_tflops: float
    price_per_hour: float  # per node
    price_source: str | None
    problems: tuple[str, ...]  # why it does not fit; empty when it fits
    suggestions: tuple[str, ...]  # overrides that would fit
    notes: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def needed(self) -> float:
        return self.memory.peak * self.hardware.workers_per_device

    @property
    def verdict(self) -> str:
        if self.fits:
            return (f"fits: {self.needed / GB:.1f} of {_gb(self.hardware.device_memory)} GB per "
                    f"{'GPU' if self.hardware.on_gpu else 'node'} ({self.setup.strategy}, {_fleet(self)})")
        found = ", or ".join(self.suggestions) if self.suggestions else "no setup the plan searched"
        return f"does not fit: {'; '.join(self.problems)}; would fit: {found}"


# ---------------------------------------------------------------------------------------- the hardware


def describe_hardware(cfg: RootConfig) -> Hardware:
    cluster, node = cfg.cluster, cfg.cluster.node
    if cluster.use_gpu:
        per_worker = cluster.gpus_per_worker
        sharing = max(1, math.floor(1 / per_worker)) if 0 < per_worker < 1 else 1
        per_node = int(node.gpus * sharing // max(per_worker, 1))
        # Across nodes each worker gets its share of the node's network (one NIC per GPU on H100 machines).
        return Hardware(on_gpu=True, device_memory=node.gpu_memory_gb * GB, workers_per_device=sharing,
                        workers_per_node=per_node, max_workers=cluster.max_nodes * per_node,
                        label=node.gpu_type or "GPU", bandwidth=node.nvlink_gb_per_s * GB,
                        network=node.network_gbit_per_s / 8 * GB / max(per_node, 1))
    memory = node.memory_gb * GB
    if not memory and resolve_address(cluster) is None:  # the embedded local Ray: this machine
        import psutil

        memory = float(psutil.virtual_memory().total)
    workers = _workers(cfg)
    per_node = max(int(node.cpus // cluster.cpus_per_worker), 1) if node.cpus else workers
    return Hardware(on_gpu=False, device_memory=memory, workers_per_device=min(per_node, workers),
                    workers_per_node=per_node, max_workers=cluster.max_nodes * per_node, label="CPU")


def _workers(cfg: RootConfig) -> int:
    """The workers to plan for: an elastic run ([min, max]) may grow to its max."""
    return worker_range(cfg.cluster)[1]


def _nodes(setup: Setup, hardware: Hardware) -> int:
    return max(1, math.ceil(setup.workers / hardware.workers_per_node)) if hardware.workers_per_node else 1


# ------------------------------------------------------------------------------------- memory and time


@dataclass(frozen=True)
class Planned:
    """The run being planned: its config, model and the records it is planned with."""

    cfg: RootConfig
    family: PlanFamily
    strategies: Mapping[str, PlanStrategy]
    shape: ModelShape
    data: dict
    precision: Precision

    def options(self, strategy: str) -> StrategyConfig:
        """The run's own strategy options, or another strategy's defaults (for a suggestion)."""
        if strategy == self.cfg.strategy.name:
            return self.cfg.strategy
        return self.strategies[strategy].schema(name=strategy)

    @property
    def selective(self) -> bool:
        """Whether checkpointing, where a setup turns it on, keeps matmul and attention outputs too."""
        return self.cfg.trainer.activation_checkpointing_policy == CheckpointingPolicy.selective

    def accum_steps(self, setup: Setup) -> int:
        return self.cfg.trainer.global_batch_size // (setup.workers * setup.micro_batch)


def estimate_memory(run: Planned, setup: Setup, *, on_gpu: bool) -> MemoryEstimate:
    strategy, model = run.strategies[setup.strategy], run.cfg.model
    states = strategy.model_states(run.options(setup.strategy), shape=run.shape, world=setup.workers,
                                   precision=run.precision, accum_steps=run.accum_steps(setup),
                                   checkpointing=setup.checkpointing)
    on_meta = model.init_device == InitDevice.meta or (
        model.init_device == InitDevice.auto and run.shape.total > META_INIT_THRESHOLD)
    return MemoryEstimate(states=states, activations=_activations(run, setup), overhead=worker_overhead(on_gpu=on_gpu),
                          build=build_bytes(shape=run.shape, on_meta=on_meta and strategy.meta_init))


def _activations(run: Planned, setup: Setup) -> Activations:
    compute = 2 if run.precision == Precision.bf16 else 4
    # Under autocast over fp32 weights (DDP), what comes from the embeddings stays fp32.
    fp32_stream = run.precision == Precision.fp32 or run.strategies[setup.strategy].autocast_over_fp32
    return run.family.activations(run.cfg.model, data=run.data, micro_batch=setup.micro_batch,
                                  compute_bytes=compute, residual_bytes=4 if fp32_stream else 2,
                                  checkpointing=setup.checkpointing, selective=run.selective)


def estimate_throughput(run: Planned, setup: Setup, *, hardware: Hardware) -> Throughput:
    cfg = run.cfg
    items = cfg.trainer.global_batch_size * run.family.items_per_row(run.data)
    flops = run.family.flops_per_item(cfg.model, data=run.data) * items
    compute_s = None
    if hardware.on_gpu and cfg.cluster.peak_tflops_per_gpu > 0 and cfg.cluster.assumed_mfu > 0:
        compute_s = flops / (setup.workers * cfg.cluster.peak_tflops_per_gpu * 1e12 * cfg.cluster.assumed_mfu)
    strategy = run.strategies[setup.strategy]
    traffic = dict(params=run.shape.total, world=setup.workers, accum_steps=run.accum_steps(setup),
                   precision=run.precision)
    sent = strategy.communication_bytes(run.options(setup.strategy), **traffic)
    across = 0.0
    if _nodes(setup, hardware) > 1:
        across = sent if strategy.network_bytes is None else strategy.network_bytes(
            run.options(setup.strategy), **traffic, workers_per_node=hardware.workers_per_node)
    links = [(sent - across, hardware.bandwidth), (across, min(hardware.bandwidth, hardware.network))]
    described = hardware.on_gpu and all(bandwidth > 0 for volume, bandwidth in links if volume)
    comm_s = sum(volume / bandwidth for volume, bandwidth in links if volume) if described else None
    return Throughput(flops=flops, compute_s=compute_s, comm_bytes=sent, comm_s=comm_s)


# --------------------------------------------------------------------------------------------- the plan


def build_plan(cfg: RootConfig, *, family: PlanFamily, strategies: Mapping[str, PlanStrategy]) -> Plan:
    """Size `cfg` on its cluster; where it does not fit, name the overrides that would. `family` is the run's
    model family and `strategies` every strategy by name (the ones the plan may suggest)."""
    data = family.plan_data(cfg.model, cfg.data)
    hardware = describe_hardware(cfg)
    run = Planned(cfg=cfg, family=family, strategies=strategies, shape=count_shape(family, cfg.model, data=data),
                  data=data, precision=resolve_precision(cfg.trainer.precision, on_gpu=hardware.on_gpu))
    setup = Setup(strategy=cfg.strategy.name, workers=_workers(cfg), micro_batch=cfg.trainer.micro_batch_size,
                  checkpointing=cfg.trainer.activation_checkpointing)

    def size(candidate: Setup, on: Hardware = hardware) -> tuple[MemoryEstimate, list[str]]:
        memory = estimate_memory(run, candidate, on_gpu=hardware.on_gpu)
        return memory, _problems(cfg, candidate, memory=memory, hardware=on)

    memory, problems = size(setup)
    suggestions = _suggest(run, setup, hardware=hardware, size=size) if problems else []
    node, strategy = cfg.cluster.node, strategies[setup.strategy]
    return Plan(family=family.name, preset=cfg.model.preset, row=family.row, shape=run.shape, setup=setup,
                precision=run.precision, hardware=hardware, nodes=_nodes(setup, hardware), memory=memory,
                items_per_step=cfg.trainer.global_batch_size * family.items_per_row(data), item=family.item,
                checkpointing_applies=family.supports_activation_checkpointing, startup_note=strategy.startup_note,
                checkpointing_policy=str(cfg.trainer.activation_checkpointing_policy),
                throughput=estimate_throughput(run, setup, hardware=hardware), accum_steps=run.accum_steps(setup),
                max_steps=cfg.trainer.max_steps, mfu=cfg.cluster.assumed_mfu,
                peak_tflops=cfg.cluster.peak_tflops_per_gpu, price_per_hour=node.price_per_hour,
                price_source=node.price_source, problems=tuple(problems), suggestions=tuple(suggestions),
                notes=tuple(_notes(cfg, strategy, memory)))


def _problems(cfg: RootConfig, setup: Setup, *, memory: MemoryEstimate, hardware: Hardware) -> list[str]:
    problems = []
    if hardware.on_gpu and not (hardware.workers_per_node and hardware.device_memory):
        return [f"cluster={cfg.cluster.name} does not describe its GPUs: set cluster.node.gpus and "
                "cluster.node.gpu_memory_gb"]
    if setup.workers > hardware.max_workers:
        problems.append(f"cluster.num_workers={setup.workers} is more than cluster.max_nodes={cfg.cluster.max_nodes}"
                        f" x {hardware.workers_per_node} workers per node")
    needed = memory.peak * hardware.workers_per_device
    if hardware.device_memory and needed > hardware.device_memory:
        unit = "per GPU" if hardware.on_gpu else "per node"
        problems.append(f"needs {needed / GB:.1f} GB {unit}, has {_gb(hardware.device_memory)}")
    host = memory.states.host * hardware.workers_per_node
    if hardware.on_gpu and cfg.cluster.node.memory_gb and host > cfg.cluster.node.memory_gb * GB:
        problems.append(f"optimizer offload needs {host / GB:.0f} GB of host memory per node, "
                        f"cluster.node.memory_gb={cfg.cluster.node.memory_gb:g}")
    return problems


def _notes(cfg: RootConfig, strategy: PlanStrategy, memory: MemoryEstimate) -> list[str]:
    notes = list(strategy.plan_notes(cfg.strategy))
    if memory.startup > max(memory.forward_backward, memory.optimizer_step):
        notes.append(strategy.startup_peak_note)
    return notes


# ----------------------------------------------------------------------------------- finding what fits


def _suggest(run: Planned, current: Setup, *, hardware: Hardware, size) -> list[str]:
    """Setups that fit, each changing as few keys as possible and staying close to the current one: every
    strategy that fits as it is, then the best setup for each other set of changed keys that is not a
    superset of one already named. Nodes beyond cluster.max_nodes (up to 8 times as many) are named only
    when the current setup fits on them or nothing fits within it."""
    max_nodes = run.cfg.cluster.max_nodes
    more = replace(hardware, max_workers=max(8 * max_nodes, 16) * hardware.workers_per_node)
    first = []
    if not size(current, more)[1] and current.workers > hardware.max_workers:
        first = [f"cluster.max_nodes={_nodes(current, hardware)}"]
    found = _search(run, current, hardware=hardware, size=size)
    if found or not hardware.workers_per_node:
        return first + found
    return first + _search(run, current, hardware=more, size=lambda setup: size(setup, more))


def _search(run: Planned, current: Setup, *, hardware: Hardware, size) -> list[str]:
    fitting: dict[frozenset, list] = {}
    for candidate in _candidates(run, current, hardware=hardware):
        changes = _changes(current, candidate)
        memory, problems = size(candidate)
        if changes and not problems:
            if _nodes(candidate, hardware) > run.cfg.cluster.max_nodes:
                changes["cluster.max_nodes"] = _nodes(candidate, hardware)
            # Closest worker count, then a larger micro batch (faster), then the most headroom.
            rank = (len(changes), abs(candidate.workers - current.workers), -candidate.micro_batch, memory.peak)
            fitting.setdefault(frozenset(changes), []).append((rank, changes))
    chosen: list[tuple[frozenset, dict]] = []
    for key, options in sorted(fitting.items(), key=lambda item: min(item[1], key=itemgetter(0))[0]):
        if not any(picked < key for picked, _ in chosen):
            best = sorted(options, key=itemgetter(0))
            chosen += [(key, changes) for _, changes in (best if key == {"strategy"} else best[:1])]
    return [" with ".join(f"{name}={value}" for name, value in changes.items()) for _, changes in chosen[:5]]


def _candidates(run: Planned, current: Setup, *, hardware: Hardware):
    batch = run.cfg.trainer.global_batch_size
    checkpointing = (False, True) if run.family.supports_activation_checkpointing else (current.checkpointing,)
    for workers in range(1, max(hardware.max_workers, 1) + 1):
        if batch % workers:
            continue
        micro_batches = [m for m in range(1, batch // workers + 1) if (batch // workers) % m == 0]
        for strategy in run.strategies:
            if not _trains_on(run, strategy, workers):
                continue
            for ckpt in checkpointing:
                for micro in micro_batches:
                    yield Setup(strategy=strategy, workers=workers, micro_batch=micro, checkpointing=ckpt)


def _trains_on(run: Planned, strategy: str, workers: int) -> bool:
    try:
        run.strategies[strategy].check_world(run.options(strategy), workers)
    except ValueError:
        return False
    return True


def _changes(current: Setup, candidate: Setup) -> dict[str, object]:
    keys = {"strategy": "strategy", "workers": "cluster.num_workers", "micro_batch": "trainer.micro_batch_size",
            "checkpointing": "trainer.activation_checkpointing"}
    changes = {}
    for attr, key in keys.items():
        value = getattr(candidate, attr)
        if value != getattr(current, attr):
            changes[key] = str(value).lower() if isinstance(value, bool) else value
    return changes


# ------------------------------------------------------------------------------------------- printing


def format_plan(plan: Plan) -> str:
    """The plan as an aligned block of text; launch.py prints it, then `plan: <verdict>` or the error."""
    lines = [*_header_lines(plan), "", *_memory_lines(plan), "", *_time_lines(plan), *_cost_lines(plan), ""]
    lines.append(f"{'fit':<16}" + ("yes" if plan.fits else "no: " + "; ".join(plan.problems)))
    if not plan.fits:
        lines += _wrapped("would fit", ", or ".join(plan.suggestions) or "no setup the plan searched")
    for note in plan.notes:
        lines += _wrapped("note", note)
    return "\n".join(lines)


def _header_lines(plan: Plan) -> list[str]:
    shape, setup = plan.shape, plan.setup
    model = f"{plan.family} {plan.preset}: {human_count(shape.total)} parameters"
    model += f" (embedding {human_count(shape.embedding)})"
    where = f"{_fleet(plan, nodes=False)}, {plan.nodes} node{'s' if plan.nodes > 1 else ''}"
    batch = (f"{setup.workers * setup.micro_batch * plan.accum_steps:,} {plan.row} per step = {setup.workers} workers"
             f" x micro batch {setup.micro_batch} x {plan.accum_steps} accumulation step(s)")
    return [f"{'model':<16}{model}",
            f"{'strategy':<16}{setup.strategy}, {plan.precision}, on {where}",
            f"{'batch':<16}{batch}"]


def _memory_lines(plan: Plan) -> list[str]:
    memory, states, setup = plan.memory, plan.memory.states, plan.setup
    per = "GPU" if plan.hardware.on_gpu else "worker"
    acts = memory.activations
    checkpointing = plan.checkpointing_policy if setup.checkpointing else "off"
    act_note = (f"micro batch {setup.micro_batch}, checkpointing {checkpointing}: {acts.stored / GB:.1f} kept "
                f"for backward + {acts.working / GB:.1f} working" if plan.checkpointing_applies else
                f"micro batch {setup.micro_batch}: {acts.stored / GB:.1f} kept + {acts.working / GB:.1f} working")
    overhead = "CUDA context, NCCL buffers, allocator slack (assumed)" if plan.hardware.on_gpu else \
        "worker process: torch, Ray (assumed)"
    rows = [("parameters", states.params, states.notes.get("params", "")),
            ("gradients", states.grads + states.accumulated, states.notes.get("grads", "")),
            ("optimizer states", states.optimizer, states.notes.get("optimizer", "")),
            ("gathered", states.gathered, states.notes.get("gathered", "")),
            ("buffers", states.buffers, states.notes.get("buffers", "")),
            ("activations", acts.peak, act_note),
            ("overhead", memory.overhead, overhead),
            ("forward/backward", memory.forward_backward, "peak: all of the above"),
            ("optimizer step", memory.optimizer_step,
             f"peak: resident + {states.step / GB:.1f} {states.notes.get('step', 'step temporaries')}"),
            ("start-up", memory.startup, _startup_note(plan))]
    lines = [f"{'memory per ' + per:<26}GB"]
    lines += [f"  {name:<16}{value / GB:>10.1f}  {note}".rstrip() for name, value, note in rows
              if value or name in ("gradients", "activations")]
    if states.host:
        lines.append(f"  {'host memory':<16}{states.host / GB:>10.1f}  per worker: offloaded optimizer states")
    lines.append(_needed_line(plan))
    return lines


def _fleet(plan: Plan, *, nodes: bool = True) -> str:
    fleet = f"{plan.setup.workers} x {plan.hardware.label}" if plan.hardware.on_gpu else \
        f"{plan.setup.workers} CPU worker(s)"
    return fleet + (f" on {plan.nodes} nodes" if nodes and plan.nodes > 1 else "")


def _startup_note(plan: Plan) -> str:
    if not plan.memory.build:
        return "built on the meta device; each worker materializes only its shards"
    return plan.startup_note


def _needed_line(plan: Plan) -> str:
    hardware, sharing = plan.hardware, plan.hardware.workers_per_device
    shared = f" ({sharing} workers x {plan.memory.peak / GB:.1f})" if sharing > 1 else ""
    unit = "GPU" if hardware.on_gpu else "node"
    if not hardware.device_memory:
        return f"  {'needed':<16}{plan.needed / GB:>10.1f}  per {unit}{shared}; capacity not described"
    headroom = hardware.device_memory - plan.needed
    return (f"  {'needed':<16}{plan.needed / GB:>10.1f}  per {unit}{shared} of {_gb(hardware.device_memory)} GB "
            f"({'headroom' if headroom >= 0 else 'short by'} {abs(headroom) / GB:.1f})")


def _time_lines(plan: Plan) -> list[str]:
    throughput, setup = plan.throughput, plan.setup
    per_item = throughput.flops / plan.items_per_step
    lines = [f"{'per step':<16}{plan.items_per_step:,} {plan.item}, {_flops(throughput.flops)} "
             f"({_flops(per_item)} per {plan.item[:-1]}; model FLOPs, recomputation not counted)"]
    if throughput.compute_s is None:
        lines.append(f"{'step time':<16}not estimated: no GPU peak for CPU workers")
        return lines
    lines.append(f"{'compute':<16}{_duration(throughput.compute_s)} per step at {plan.mfu:.0%} MFU of "
                 f"{plan.peak_tflops:g} TFLOP/s x {setup.workers} GPUs")
    sent = f"{throughput.comm_bytes / GB:.1f} GB sent per GPU per step"
    if not throughput.comm_bytes:  # one worker: no collective moves anything
        lines.append(f"{'communication':<16}none (one worker)")
    elif throughput.comm_s is None:
        lines.append(f"{'communication':<16}{sent}; time not estimated (link bandwidth not described)")
    else:
        bound = " (communication-bound)" if throughput.comm_s > throughput.compute_s else ""
        lines.append(f"{'communication':<16}{sent}, {_duration(throughput.comm_s)} at "
                     f"{throughput.comm_bytes / throughput.comm_s / GB:.0f} GB/s per GPU{bound}")
    step = throughput.step_s
    lines.append(f"{'throughput':<16}{plan.items_per_step / step:,.0f} {plan.item}/s, {_duration(step)} per step; "
                 f"{plan.max_steps:,} steps in {_duration(step * plan.max_steps)}")
    return lines


def _cost_lines(plan: Plan) -> list[str]:
    step = plan.throughput.step_s
    if not plan.price_per_hour or step is None:
        return []
    hourly = plan.nodes * plan.price_per_hour
    run = hourly * step * plan.max_steps / 3600
    return [f"{'cost':<16}${hourly:,.2f}/h ({plan.nodes} node{'s' if plan.nodes > 1 else ''} x "
            f"${plan.price_per_hour:,.2f}/h); ${run:,.2f} for {plan.max_steps:,} steps",
            *_wrapped("price source", plan.price_source or "not given (cluster.node.price_source)")]


def _wrapped(label: str, text: str, width: int = 110) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=f"{label:<16}", subsequent_indent=" " * 16)


def _gb(nbytes: float) -> str:
    """GB with one decimal, without a trailing .0 (80, 25.3)."""
    return f"{nbytes / GB:.1f}".removesuffix(".0")


def _flops(value: float) -> str:
    for scale, unit in ((1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
