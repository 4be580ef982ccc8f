"""stage=optimize: cheaper child versions of a registered version, each measured against its parent and registered
only if it keeps its quality.

    python launch.py stage=optimize serve.model=ranker_dlrm serve.optimize=[int8_dynamic,int8_tables,compile]

For each method named in serve.optimize (trainers/optimizations/): load the parent (serve.version, default
production) from the registry, derive the child (Wanda pruning reads a few rows of the parent run's training
split), write it as an export (the parent's side files, the child's weights, model_config.json with the steps
that derived it under "derived": method, settings, parent), load it back through the loader every replica
uses, and measure both on the same
held-out rows and the same batches: the family's gate metric, the weights' size, and the replica's forward at
the serving batch sizes (p50/p99 latency, throughput). A child whose metric is at most
serve.optimize_max_quality_loss worse than the parent's (relative) is registered with its lineage and its own
reference profile, and can be canaried and rolled out like any version; every decision goes into the model's
history. The table is printed and written, with a quality-against-latency plot, to
<paths.root>/optimize/<model>-v<parent>/ (optimize.json, optimize.png).

The parent and every child are held in memory together while they are timed, so that they take turns on the
same machine: for a model near the machine's memory, name one method per command.
"""

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from conf.schema import RootConfig
from serve.evaluate import evaluate_model, profile_on_run_data, run_held_out_batches, training_eval_rows
from serve.export import DEFAULT_SHARD_BYTES, EXPORT_INFO_FILE, LoadedModel, asset_files, load_export
from serve.monitoring import PROFILE_FILE
from serve.promote import PRODUCTION
from serve.registry import Registry
from serve.replicas import replica_class
from trainers.checkpointing import MODEL_CONFIG_FILE
from trainers.config import config_from_dict
from trainers.families import Family, get_family
from trainers.optimizations import Method, child_layout, derived_steps, get_method

logger = logging.getLogger(__name__)

OPTIMIZE_FILE, PLOT_FILE = "optimize.json", "optimize.png"
MIN_TIMED_CALLS = 10
SPEED_ROUNDS = 3
WARMUP_S = 0.5


@dataclass
class Speed:
    batch_size: int
    p50_ms: float
    p99_ms: float
    items_per_s: float  # rows (rankers) or generated tokens (LLMs) per second


@dataclass
class Measurement:
    """One version's row of the table."""

    label: str  # "parent" or the method
    version: int | None  # registered version; None for a child not registered
    metrics: dict[str, float]
    weights_bytes: int
    bytes_by_kind: dict[str, int]  # "linear", "tables", "other"
    speeds: list[Speed] = field(default_factory=list)
    quality_loss: float | None = None  # relative worsening of the gate metric against the parent
    decision: str = ""  # "parent", "registered" or "refused"
    reason: str = ""


@dataclass
class Parent:
    version: int
    directory: Path
    record: dict
    run_cfg: RootConfig
    family: Family


# --------------------------------------------------------------------------------------------- the stage

def optimize(serve_cfg, *, model: str, root: Path, cache_dir: Path) -> Path:
    """Derive, measure and (if they keep their quality) register a child per serve.optimize method; returns the
    directory holding the table (optimize.json) and its plot."""
    methods = _methods(serve_cfg)
    registry = Registry(serve_cfg.registry)
    parent = _parent(registry, model, version=serve_cfg.version, cache_dir=cache_dir)
    for method in methods:
        method.check_family(parent.family.name)
    out_dir = Path(root) / "optimize" / f"{model}-v{parent.version}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = serve_cfg.eval_rows if serve_cfg.eval_rows is not None else training_eval_rows(parent.run_cfg)
    batch_sizes = serve_cfg.optimize_batch_sizes or list(replica_class(parent.family.name).PROBE_BATCH_SIZES)
    if min(batch_sizes) < 1:
        raise ValueError(f"serve.optimize_batch_sizes={list(batch_sizes)}: each must be at least 1")
    measure = _Measurer(parent, rows=rows, batch_sizes=batch_sizes, seconds=serve_cfg.optimize_time_s)
    with tempfile.TemporaryDirectory(prefix="slipway-optimize-") as tmp:
        versions = {"parent": (load_export(parent.directory), parent.directory)}
        for method in methods:
            logger.info("deriving %s from %s v%d", method.name, model, parent.version)
            child_dir = write_child(method, parent, Path(tmp) / method.name,
                                    calibration_rows=serve_cfg.optimize_calibration_rows)
            versions[method.name] = (load_export(child_dir), child_dir)  # through the loader replicas use
        logger.info("scoring %d versions on %s held-out rows", len(versions), rows or "all")
        table = {label: measure.quality(loaded, label=label, directory=directory)
                 for label, (loaded, directory) in versions.items()}
        # Speeds last, all versions taking turns, so that a slow spell of a busy machine falls on all of them.
        logger.info("timing %d versions at batch sizes %s, %g s each", len(versions), batch_sizes,
                    serve_cfg.optimize_time_s)
        for label, speeds in measure.speeds({label: loaded.model for label, (loaded, _) in versions.items()}).items():
            table[label].speeds = speeds
        reference = table.pop("parent")
        reference.version, reference.decision = parent.version, "parent"
        for method in methods:
            _decide_and_register(method, table[method.name], registry, model, parent, reference=reference,
                                 directory=versions[method.name][1], serve_cfg=serve_cfg)
    rows_out = [reference, *table.values()]
    print(format_table(rows_out, metric=parent.family.metric, model=model), flush=True)
    (out_dir / OPTIMIZE_FILE).write_text(json.dumps({"model": model, "parent": parent.version,
                                                     "metric": parent.family.metric,
                                                     "rows": [asdict(row) for row in rows_out]}, indent=2) + "\n")
    plot_pareto(rows_out, metric=parent.family.metric, mode=parent.family.metric_mode, path=out_dir / PLOT_FILE,
                title=f"{model}: children of v{parent.version}")
    return out_dir


def _methods(serve_cfg) -> list[Method]:
    if not serve_cfg.optimize:
        raise ValueError("stage=optimize needs serve.optimize=[METHOD,...], e.g. serve.optimize=[int8_dynamic,"
                         "compile]; the methods: " + ", ".join(_method_names()))
    if len(set(serve_cfg.optimize)) != len(serve_cfg.optimize):
        raise ValueError(f"serve.optimize={list(serve_cfg.optimize)} names a method twice")
    return [get_method(name) for name in serve_cfg.optimize]


def _method_names() -> list[str]:
    from trainers.optimizations import all_methods

    return sorted(all_methods())


def _parent(registry: Registry, model: str, *, version: int | None, cache_dir: Path) -> Parent:
    """The version to derive from, with the run config its held-out split comes from."""
    number = version or registry.resolve(model, PRODUCTION)
    if number is None:
        raise ValueError(f"{model} has no production version: name the parent with serve.version=N")
    record = registry.version(model, number)
    source_run = record.get("source_run")
    config_path = Path(source_run or "") / "config.yaml"
    if not source_run or not config_path.is_file():
        raise ValueError(f"{model} v{number} was trained in {source_run!r}, whose config.yaml is gone: stage=optimize "
                         "measures children on that run's held-out split")
    run_cfg = config_from_dict(yaml.safe_load(config_path.read_text()))
    directory = registry.fetch(model, number, cache_dir=cache_dir)
    return Parent(version=number, directory=directory, record=record, run_cfg=run_cfg,
                  family=get_family(run_cfg.model.family))


# ------------------------------------------------------------------------------------------- a child

def _decide_and_register(method: Method, child: Measurement, registry: Registry, model: str, parent: Parent, *,
                         reference: Measurement, directory: Path, serve_cfg) -> None:
    """Register the child if its quality loss is within serve.optimize_max_quality_loss; record the decision."""
    metric, mode = parent.family.metric, parent.family.metric_mode
    child.quality_loss = quality_loss(reference.metrics[metric], child.metrics[metric], mode=mode)
    limit = serve_cfg.optimize_max_quality_loss
    event = {"event": "optimize", "parent": parent.version, "method": method.name, "metric": metric,
             "parent_value": reference.metrics[metric], "child_value": _finite(child.metrics[metric]),
             "quality_loss": _finite(child.quality_loss), "max_quality_loss": limit}
    if not child.quality_loss <= limit:  # also refuses NaN
        child.decision = "refused"
        child.reason = (f"{metric} {child.metrics[metric]:.5f} against the parent's {reference.metrics[metric]:.5f}: "
                        f"{child.quality_loss:.2%} worse, over serve.optimize_max_quality_loss={limit:g}")
        logger.warning("%s child of v%d not registered: %s", method.name, parent.version, child.reason)
        registry.record(model, {**event, "decision": "refused", "reason": child.reason})
        return
    (directory / PROFILE_FILE).write_text(json.dumps(profile_on_run_data(
        directory, parent.run_cfg, rows=serve_cfg.monitor.profile_rows,
        trained_on=parent.record.get("data_fingerprint")).to_dict()) + "\n")
    record = registry.register(model, directory, metadata=_child_metadata(parent, method, child),
                               dedupe_file=MODEL_CONFIG_FILE)  # the same method on the same parent: one child
    child.version, child.decision = record["version"], "registered"
    child.reason = f"v{record['version']}: {child.quality_loss:+.2%} {metric} loss within {limit:g}"
    registry.record(model, {**event, "decision": "registered", "version": record["version"]})
    logger.info("%s child of v%d registered as v%d", method.name, parent.version, record["version"])


def write_child(method: Method, parent: Parent, out_dir: Path, *, calibration_rows: int) -> Path:
    """The child's export: the parent's side files, the derived weights in the method's layout (in the parent's
    export dtype), model_config.json with its steps under "derived" (the parent's, then this one), and export.json.
    A child of a child carries both steps: int8 of a pruned version, compile of an int8 one."""
    loaded = load_export(parent.directory)
    earlier = [step["method"] for step in loaded.model_config.get("derived", [])]
    if method.name in earlier:
        raise ValueError(f"serve.optimize={method.name}: v{parent.version} is already {' + '.join(earlier)}; "
                         f"derive from its parent instead")
    calibration = None
    if method.needs_calibration:
        calibration = list(run_held_out_batches(parent.run_cfg, rows=calibration_rows, split="train",
                                                trained_on=parent.record.get("data_fingerprint")))
    child = method.derive(loaded.model, family=parent.family, settings=dict(method.settings), calibration=calibration)
    out_dir.mkdir(parents=True)
    step = {"method": method.name, "settings": dict(method.settings), "parent": parent.version}
    model_config = {**loaded.model_config, "derived": [*loaded.model_config.get("derived", []), step]}
    (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
    for name in asset_files(loaded.model_config):
        (out_dir / name).write_bytes((parent.directory / name).read_bytes())
    parent_info = json.loads((parent.directory / EXPORT_INFO_FILE).read_text())
    dtype = getattr(torch, parent_info.get("dtype", "float32"))
    layout = child_layout(derived_steps(model_config, source=out_dir)) or parent.family.export_layout
    layout.write(child.state_dict(), out_dir, model_config=model_config, dtype=dtype, shard_bytes=DEFAULT_SHARD_BYTES)
    info = {"derived_from": parent.version, "method": method.name, "settings": method.settings,
            "dtype": parent_info.get("dtype"), "parameters": parent_info.get("parameters"),
            "source_run": parent_info.get("source_run"), "step": parent_info.get("step")}
    (out_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def _child_metadata(parent: Parent, method: Method, child: Measurement) -> dict:
    inherited = {key: parent.record[key] for key in ("experiment", "source_run", "checkpoint", "step", "family",
                                                     "strategy", "config_hash", "data_fingerprint")
                 if key in parent.record}
    return {**inherited, "derived": {"parent": parent.version, "method": method.name,
                                     "settings": dict(method.settings)},
            "measured_metrics": {key: _finite(value) for key, value in child.metrics.items()},
            "quality_loss": _finite(child.quality_loss)}


def quality_loss(parent: float, child: float, *, mode: str) -> float:
    """How much worse the child's metric is, relative to the parent's (negative: better)."""
    worse = (child - parent) if mode == "min" else (parent - child)
    return worse / abs(parent) if parent else math.inf


def _finite(value: float | None):
    return value if value is None or math.isfinite(value) else str(value)


# ----------------------------------------------------------------------------------------- measuring

class _Measurer:
    """Quality on the parent run's held-out rows and the replica's forward speed, the same for every version."""

    def __init__(self, parent: Parent, *, rows: int, batch_sizes: list[int], seconds: float):
        self.parent, self.rows, self.batch_sizes, self.seconds = parent, rows, batch_sizes, seconds
        self.trained_on = parent.record.get("data_fingerprint")
        self.sample = self._probe_rows(max(batch_sizes))

    def _probe_rows(self, count: int) -> dict[str, torch.Tensor]:
        batches = list(run_held_out_batches(self.parent.run_cfg, rows=count, trained_on=self.trained_on))
        return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}

    def quality(self, loaded: LoadedModel, *, label: str, directory: Path) -> Measurement:
        batches = run_held_out_batches(self.parent.run_cfg, rows=self.rows, trained_on=self.trained_on)
        return Measurement(label=label, version=None, metrics=evaluate_model(loaded, batches),
                           weights_bytes=weights_bytes(directory), bytes_by_kind=bytes_by_kind(loaded.model))

    def speeds(self, models: dict[str, nn.Module]) -> dict[str, list[Speed]]:
        return measure_speeds(models, family=self.parent.family.name, sample=self.sample,
                              batch_sizes=self.batch_sizes, seconds=self.seconds)


@torch.inference_mode()
def measure_speeds(models: dict[str, nn.Module], *, family: str, sample: dict, batch_sizes: list[int],
                   seconds: float) -> dict[str, list[Speed]]:
    """Each model's replica forward (its family's forward_probe over `sample` rows) at each batch size, timed in
    SPEED_ROUNDS turns of seconds / rounds each, the models taking turns within a round."""
    speeds: dict[str, list[Speed]] = {label: [] for label in models}
    for batch_size in batch_sizes:
        probes = {label: _warm_probe(model, family=family, sample=sample, batch_size=batch_size)
                  for label, model in models.items()}
        durations: dict[str, list[float]] = {label: [] for label in models}
        items = dict.fromkeys(models, 0)
        for _ in range(SPEED_ROUNDS):
            for label, probe in probes.items():
                items[label] += _time_calls(probe, durations[label], seconds=seconds / SPEED_ROUNDS)
        for label in models:
            speeds[label].append(_speed(batch_size, durations[label], items[label]))
    return speeds


def _warm_probe(model: nn.Module, *, family: str, sample: dict, batch_size: int):
    probe = replica_class(family).forward_probe(model, sample, batch_size=batch_size)
    deadline = time.perf_counter() + WARMUP_S  # a compiled child compiles here
    while time.perf_counter() < deadline:
        probe()
    return probe


def _time_calls(probe, durations: list[float], *, seconds: float) -> int:
    items, deadline, calls = 0, time.perf_counter() + seconds, 0
    while calls < MIN_TIMED_CALLS or time.perf_counter() < deadline:
        start = time.perf_counter()
        items += probe()
        durations.append(time.perf_counter() - start)
        calls += 1
    return items


def _speed(batch_size: int, durations: list[float], items: int) -> Speed:
    ordered = sorted(durations)
    return Speed(batch_size=batch_size, p50_ms=1e3 * ordered[len(ordered) // 2],
                 p99_ms=1e3 * ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)],
                 items_per_s=items / sum(durations))


def weights_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in Path(directory).glob("*.safetensors"))


LINEAR_KINDS = ("Linear", "Int8Linear")
TABLE_KINDS = ("Embedding", "EmbeddingBag", "Int8EmbeddingBag")


def bytes_by_kind(model: nn.Module) -> dict[str, int]:
    """Bytes the model's tensors take in memory, by what holds them: linear layers, embedding tables, the rest."""
    totals, seen = {"linear": 0, "tables": 0, "other": 0}, set()
    for module in model.modules():
        kind = type(module).__name__
        group = "linear" if kind in LINEAR_KINDS else "tables" if kind in TABLE_KINDS else "other"
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                totals[group] += tensor.numel() * tensor.element_size()
    return totals


# ------------------------------------------------------------------------------------------ reporting

def format_table(table: list[Measurement], *, metric: str, model: str) -> str:
    parent = table[0]
    sizes = [speed.batch_size for speed in parent.speeds]
    speed_head = "  ".join(f"{'b' + str(size) + ' p50/p99 ms':>18} {'items/s':>9} {'x':>5}" for size in sizes)
    lines = [f"{model}: children of v{parent.version} ({metric} on the held-out split; x: throughput against the "
             f"parent)",
             f"{'version':<27} {'weights MB':>10} {'tables MB':>9} {metric:>9} {'loss':>7}  {speed_head}  decision"]
    for row in table:
        name = f"{row.label} (v{row.version})" if row.version else row.label
        loss = "" if row.quality_loss is None else f"{row.quality_loss:+.2%}"
        cells = "  ".join(f"{speed.p50_ms:>8.2f}/{speed.p99_ms:<9.2f} {speed.items_per_s:>9.0f} "
                          f"{speed.items_per_s / base.items_per_s:>5.2f}"
                          for speed, base in zip(row.speeds, parent.speeds, strict=True))
        lines.append(f"{name:<27} {row.weights_bytes / 1e6:>10.2f} {row.bytes_by_kind['tables'] / 1e6:>9.2f} "
                     f"{row.metrics[metric]:>9.4f} {loss:>7}  {cells}  {row.decision} {row.reason}".rstrip())
    return "\n".join(lines)


def plot_pareto(table: list[Measurement], *, metric: str, mode: str, path: Path, title: str) -> None:
    """Quality against latency (p50 at the largest batch), one point per version; the parent's lines cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    parent = table[0]
    for row in table:
        latency = row.speeds[-1].p50_ms
        marker = "*" if row is parent else "o" if row.decision == "registered" else "x"
        axis.scatter(latency, row.metrics[metric], marker=marker, s=90 if row is parent else 50)
        axis.annotate(f"{row.label} ({row.weights_bytes / 1e6:.2f} MB)", (latency, row.metrics[metric]),
                      textcoords="offset points", xytext=(5, 4), fontsize=8)
    axis.axvline(parent.speeds[-1].p50_ms, color="grey", linewidth=0.6)
    axis.axhline(parent.metrics[metric], color="grey", linewidth=0.6)
    better = "higher" if mode == "max" else "lower"
    axis.set_xlabel(f"p50 latency of one forward at batch {parent.speeds[-1].batch_size} (ms; lower is better)")
    axis.set_ylabel(f"{metric} ({better} is better)")
    axis.set_title(f"{title} (o registered, x refused)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
