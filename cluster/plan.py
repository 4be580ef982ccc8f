"""The launch plan (`python launch.py +exp=NAME cluster=... plan=true`): per-GPU memory, FLOPs, time and cost of
a training run, and whether it fits, computed from the config alone. Nothing is started, no data is prepared
and no model is allocated (the model is built on the meta device to count its parts).

A run that does not fit is searched for the nearest setups that would: another strategy, activation
checkpointing, a smaller micro batch (keeping the global batch), or more workers within cluster.max_nodes.
Memory comes from cluster/memory.py and cluster/activations.py; FLOPs from the model family
(trainers/families.py), so the plan and the training run's MFU agree.
"""

import math
import textwrap
from dataclasses import dataclass, replace
from operator import itemgetter

from cluster.activations import Activations, llm_activations, ranker_activations
from cluster.memory import (
    GB,
    STRATEGIES,
    MemoryEstimate,
    ModelShape,
    build_bytes,
    count_shape,
    human_count,
    model_states,
    worker_overhead,
)
from conf.schema import RootConfig
from trainers.families import META_INIT_THRESHOLD, Family, get_family


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
    shape: ModelShape
    setup: Setup
    precision: str
    hardware: Hardware
    nodes: int
    memory: MemoryEstimate
    items_per_step: int
    item: str  # "tokens" or "samples"
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


# ------------------------------------------------------------------------------------------- the model


def plan_data(cfg: RootConfig) -> dict:
    """The `data` dict the model family needs, derived from cfg.data the way data preparation would derive it
    (datasets/clicklog.py: hash buckets per table, else one row per category plus the missing bucket)."""
    if cfg.model.family == "llm":
        return {"vocab_size": cfg.data.vocab_size, "seq_len": cfg.data.seq_len}
    from datasets.clicklog import NUM_CATEGORICAL, NUM_DENSE, hash_buckets_per_table

    buckets = hash_buckets_per_table(cfg.data)
    if buckets is None:
        if len(cfg.data.cardinalities) != NUM_CATEGORICAL:
            raise ValueError(f"data.cardinalities must be {NUM_CATEGORICAL} numbers, got {len(cfg.data.cardinalities)}")
        buckets = [int(card) + 1 for card in cfg.data.cardinalities]
    return {"num_dense": NUM_DENSE, "table_sizes": buckets}


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
    from cluster.connection import resolve_address

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
    from cluster.capacity import worker_range

    return worker_range(cfg.cluster)[1]


def _nodes(setup: Setup, hardware: Hardware) -> int:
    return max(1, math.ceil(setup.workers / hardware.workers_per_node)) if hardware.workers_per_node else 1


# ------------------------------------------------------------------------------------- memory and time


def estimate_memory(cfg: RootConfig, setup: Setup, *, shape: ModelShape, data: dict, precision: str,
                    on_gpu: bool) -> MemoryEstimate:
    accum = cfg.trainer.global_batch_size // (setup.workers * setup.micro_batch)
    states = model_states(setup.strategy, shape=shape, world=setup.workers, precision=precision,
                          offload_optimizer=cfg.strategy.zero_offload_optimizer,
                          accum_steps=accum, reshard_after_forward=cfg.strategy.fsdp_reshard_after_forward,
                          checkpointing=setup.checkpointing)
    on_meta = cfg.model.init_device == "meta" or (cfg.model.init_device == "auto" and shape.total > META_INIT_THRESHOLD)
    return MemoryEstimate(states=states, activations=_activations(cfg, setup, data=data, precision=precision),
                          overhead=worker_overhead(on_gpu=on_gpu),
                          build=build_bytes(setup.strategy, shape=shape, on_meta=on_meta))


def _activations(cfg: RootConfig, setup: Setup, *, data: dict, precision: str) -> Activations:
    compute = 2 if precision == "bf16" else 4
    # DDP trains fp32 weights under autocast: what comes from the embeddings stays fp32.
    residual = 4 if precision == "fp32" or setup.strategy == "ddp" else 2
    if cfg.model.family == "llm":
        return llm_activations(cfg.model, vocab_size=data["vocab_size"], seq_len=data["seq_len"],
                               micro_batch=setup.micro_batch, compute_bytes=compute, residual_bytes=residual,
                               checkpointing=setup.checkpointing)
    return ranker_activations(cfg.model, num_dense=data["num_dense"], num_tables=len(data["table_sizes"]),
                              micro_batch=setup.micro_batch, compute_bytes=compute, residual_bytes=residual)


def estimate_throughput(cfg: RootConfig, setup: Setup, *, family: Family, shape: ModelShape, data: dict,
                        hardware: Hardware, precision: str) -> Throughput:
    items = cfg.trainer.global_batch_size * family.items_per_row(data)
    flops = family.flops_per_item(cfg.model, data=data) * items
    compute_s = None
    if hardware.on_gpu and cfg.cluster.peak_tflops_per_gpu > 0 and cfg.cluster.assumed_mfu > 0:
        compute_s = flops / (setup.workers * cfg.cluster.peak_tflops_per_gpu * 1e12 * cfg.cluster.assumed_mfu)
    accum = cfg.trainer.global_batch_size // (setup.workers * setup.micro_batch)
    sent = communication_bytes(setup.strategy, params=shape.total, world=setup.workers, accum_steps=accum,
                               precision=precision, reshard_after_forward=cfg.strategy.fsdp_reshard_after_forward)
    bandwidth = hardware.bandwidth if _nodes(setup, hardware) == 1 else min(hardware.bandwidth, hardware.network)
    comm_s = sent / bandwidth if hardware.on_gpu and bandwidth > 0 else None
    return Throughput(flops=flops, compute_s=compute_s, comm_bytes=sent, comm_s=comm_s)


def communication_bytes(strategy: str, *, params: int, world: int, accum_steps: int, precision: str,
                        reshard_after_forward: bool = True) -> float:
    """Bytes each worker sends per optimizer step in ring collectives ((N-1)/N of each payload).

    ddp: one all-reduce of the fp32 gradients (2 payloads). fsdp: a bf16 all-gather per micro batch in forward
    (and again in backward when resharding) and one fp32 reduce-scatter. zero1: a bf16 reduce at the
    boundary and an all-gather of the updated parameters; zero2 reduces every micro batch; zero3 gathers
    twice and reduce-scatters every micro batch.
    """
    low = 2 if precision == "bf16" else 4
    payloads = {
        "ddp": 2 * 4,
        "fsdp": accum_steps * (2 if reshard_after_forward else 1) * low + 4,
        "zero1": 2 * low,
        "zero2": (accum_steps + 1) * low,
        "zero3": accum_steps * 3 * low,
    }[strategy]
    return payloads * params * (world - 1) / world


# --------------------------------------------------------------------------------------------- the plan


def build_plan(cfg: RootConfig) -> Plan:
    """Size `cfg` on its cluster; where it does not fit, name the overrides that would."""
    import torch

    from trainers.loop import resolve_precision

    family = get_family(cfg.model.family)
    data = plan_data(cfg)
    shape = count_shape(family, cfg.model, data=data)
    hardware = describe_hardware(cfg)
    precision = resolve_precision(cfg.trainer.precision, torch.device("cuda" if hardware.on_gpu else "cpu"))
    setup = Setup(strategy=cfg.strategy.name, workers=_workers(cfg), micro_batch=cfg.trainer.micro_batch_size,
                  checkpointing=cfg.trainer.activation_checkpointing)

    def size(candidate: Setup, on: Hardware = hardware) -> tuple[MemoryEstimate, list[str]]:
        memory = estimate_memory(cfg, candidate, shape=shape, data=data, precision=precision,
                                 on_gpu=hardware.on_gpu)
        return memory, _problems(cfg, candidate, memory=memory, hardware=on)

    memory, problems = size(setup)
    suggestions = _suggest(cfg, setup, family=family, hardware=hardware, size=size) if problems else []
    node = cfg.cluster.node
    return Plan(family=cfg.model.family, preset=cfg.model.preset, shape=shape, setup=setup, precision=precision,
                hardware=hardware, nodes=_nodes(setup, hardware), memory=memory,
                items_per_step=cfg.trainer.global_batch_size * family.items_per_row(data),
                item="tokens" if cfg.model.family == "llm" else "samples",
                throughput=estimate_throughput(cfg, setup, family=family, shape=shape, data=data,
                                               hardware=hardware, precision=precision),
                accum_steps=cfg.trainer.global_batch_size // (setup.workers * setup.micro_batch),
                max_steps=cfg.trainer.max_steps, mfu=cfg.cluster.assumed_mfu,
                peak_tflops=cfg.cluster.peak_tflops_per_gpu, price_per_hour=node.price_per_hour,
                price_source=node.price_source, problems=tuple(problems), suggestions=tuple(suggestions),
                notes=tuple(_notes(cfg, memory)))


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


def _notes(cfg: RootConfig, memory: MemoryEstimate) -> list[str]:
    notes = []
    if cfg.strategy.zero_offload_optimizer and cfg.strategy.name.startswith("zero"):
        notes.append("DeepSpeed 0.19.8 refuses ZeRO-Offload with a torch optimizer (trainers/optim.py builds "
                     "torch.optim.AdamW) unless the DeepSpeed config sets zero_force_ds_cpu_optimizer=false")
    if memory.startup > max(memory.forward_backward, memory.optimizer_step):
        notes.append("start-up is the peak: DeepSpeedStrategy builds the whole fp32 model on each GPU before "
                     "deepspeed.initialize partitions it (deepspeed.zero.Init would avoid it)")
    return notes


# ----------------------------------------------------------------------------------- finding what fits


def _suggest(cfg: RootConfig, current: Setup, *, family: Family, hardware: Hardware, size) -> list[str]:
    """Setups that fit, each changing as few keys as possible and staying close to the current one: every
    strategy that fits as it is, then the best setup for each other set of changed keys that is not a
    superset of one already named. Nodes beyond cluster.max_nodes (up to 8 times as many) are named only
    when the current setup fits on them or nothing fits within it."""
    more = replace(hardware, max_workers=max(8 * cfg.cluster.max_nodes, 16) * hardware.workers_per_node)
    first = []
    if not size(current, more)[1] and current.workers > hardware.max_workers:
        first = [f"cluster.max_nodes={_nodes(current, hardware)}"]
    found = _search(cfg, current, family=family, hardware=hardware, size=size)
    if found or not hardware.workers_per_node:
        return first + found
    return first + _search(cfg, current, family=family, hardware=more, size=lambda setup: size(setup, more))


def _search(cfg: RootConfig, current: Setup, *, family: Family, hardware: Hardware, size) -> list[str]:
    fitting: dict[frozenset, list] = {}
    for candidate in _candidates(cfg, current, family=family, hardware=hardware):
        changes = _changes(current, candidate)
        memory, problems = size(candidate)
        if changes and not problems:
            if _nodes(candidate, hardware) > cfg.cluster.max_nodes:
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


def _candidates(cfg: RootConfig, current: Setup, *, family: Family, hardware: Hardware):
    batch = cfg.trainer.global_batch_size
    checkpointing = (False, True) if family.supports_activation_checkpointing else (current.checkpointing,)
    for workers in range(1, max(hardware.max_workers, 1) + 1):
        if batch % workers:
            continue
        micro_batches = [m for m in range(1, batch // workers + 1) if (batch // workers) % m == 0]
        for strategy in STRATEGIES:
            for ckpt in checkpointing:
                for micro in micro_batches:
                    yield Setup(strategy=strategy, workers=workers, micro_batch=micro, checkpointing=ckpt)


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
    rows = "sequences" if plan.family == "llm" else "samples"
    batch = (f"{setup.workers * setup.micro_batch * plan.accum_steps:,} {rows} per step = {setup.workers} workers"
             f" x micro batch {setup.micro_batch} x {plan.accum_steps} accumulation step(s)")
    return [f"{'model':<16}{model}",
            f"{'strategy':<16}{setup.strategy}, {plan.precision}, on {where}",
            f"{'batch':<16}{batch}"]


def _memory_lines(plan: Plan) -> list[str]:
    memory, states, setup = plan.memory, plan.memory.states, plan.setup
    per = "GPU" if plan.hardware.on_gpu else "worker"
    acts = memory.activations
    checkpointing = "on" if setup.checkpointing else "off"
    act_note = (f"micro batch {setup.micro_batch}, checkpointing {checkpointing}: {acts.stored / GB:.1f} kept "
                f"for backward + {acts.working / GB:.1f} working" if plan.family == "llm" else
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
    if plan.setup.strategy.startswith("zero"):
        return "peak: whole fp32 model on each GPU until deepspeed.initialize partitions it"
    return "peak: the whole fp32 model, built on each worker"


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
    if throughput.comm_s is None:
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
