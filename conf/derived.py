"""Values derived from the config alone, which several layers need: they live with the config so that no layer
has to import a higher one to read them (DESIGN.md section 4)."""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from conf.schema import ClusterConfig, Launcher, Precision


def resolve_address(cfg: ClusterConfig) -> str | None:
    """`cluster.address`, else RAY_ADDRESS, else None (start an embedded local Ray)."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def worker_range(cfg: ClusterConfig) -> tuple[int, int]:
    """(min, max) training workers: `cluster.num_workers=4` is (4, 4); `cluster.num_workers=[2,4]` is elastic."""
    value = cfg.num_workers
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise ValueError(f"cluster.num_workers must be an integer or [min, max], got {value!r}")
    low, high = (value, value) if isinstance(value, int) else _pair(value)
    if low < 1 or high < low:
        raise ValueError(f"cluster.num_workers={value} needs 1 <= min <= max")
    return low, high


def _pair(value) -> tuple[int, int]:
    if len(value) != 2 or not all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        raise ValueError(f"cluster.num_workers={list(value)} must be an integer or a list of two: [min, max]")
    return value[0], value[1]


def uses_ray(cfg) -> bool:
    """Whether the run's workers are a Ray Train worker group (cluster.launcher=ray), not local processes."""
    return cfg.cluster.launcher == Launcher.ray


def is_elastic(cfg: ClusterConfig) -> bool:
    low, high = worker_range(cfg)
    return low != high


def scaling_workers(cfg: ClusterConfig) -> int | tuple[int, int]:
    """What Ray Train's ScalingConfig(num_workers=...) takes: an int, or a (min, max) tuple for elastic runs."""
    low, high = worker_range(cfg)
    return low if low == high else (low, high)


def resolve_precision(precision: Precision, *, on_gpu: bool) -> Precision:
    """`trainer.precision` on the device a worker has: auto is bf16 on GPUs and fp32 on CPUs."""
    if precision == Precision.auto:
        return Precision.bf16 if on_gpu else Precision.fp32
    return Precision(precision)


# Config keys whose values are secrets, and the environment variable a submitted job reads each from: redacted
# from everything a run writes (trainers/config.py), passed to a job by name, never in its entrypoint
# (cluster/submit.py).
SECRET_KEYS = {"serve.api_key": "SLIPWAY_API_KEY"}


# ------------------------------------------------------------------------------------------------- bounds
# The numeric keys' allowed ranges, checked in one place (check_bounds, below) before anything divides
# by them or waits on them: a zero batch size is an error naming trainer.micro_batch_size, not a
# ZeroDivisionError, and serve.refresh_s=0 is refused instead of spinning. A key absent from its section
# belongs to another model family or kind of data and is skipped; a null (derive, or "none") is skipped; a list
# is checked item by item. Order matters: the first key out of range is the one reported.


@dataclass(frozen=True)
class Bound:
    low: float
    high: float = float("inf")
    low_open: bool = False  # low itself is excluded
    high_open: bool = False

    def holds(self, value: float) -> bool:  # written so that NaN fails
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.high == float("inf"):
            return f"above {self.low:g}" if self.low_open else f"at least {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_1, AT_LEAST_0, POSITIVE = Bound(1), Bound(0), Bound(0, low_open=True)
FRACTION = Bound(0, 1)

BOUNDS: dict[str, Bound] = {
    "trainer.max_steps": AT_LEAST_1,  # first: the derived step counts follow from it
    "trainer.global_batch_size": AT_LEAST_1,
    "trainer.micro_batch_size": AT_LEAST_1,
    "trainer.lr": AT_LEAST_0,  # 0 leaves the weights as loaded: an import/export round trip (model.init_from)
    "trainer.min_lr_ratio": FRACTION,
    "trainer.warmup_steps": AT_LEAST_0,
    "trainer.weight_decay": AT_LEAST_0,
    "trainer.beta1": Bound(0, 1, high_open=True),
    "trainer.beta2": Bound(0, 1, high_open=True),
    "trainer.grad_clip": AT_LEAST_0,
    "trainer.log_every_n_steps": AT_LEAST_1,
    "trainer.eval_every_n_steps": AT_LEAST_1,
    "trainer.eval_batches": AT_LEAST_0,  # 0 = the whole validation split
    "trainer.torch_threads": AT_LEAST_0,  # 0 = the worker's CPU share
    "checkpoint.every_n_steps": AT_LEAST_1,
    "checkpoint.keep_top_k": AT_LEAST_1,  # 0 would keep no checkpoint to rank, or to resume from
    "checkpoint.max_failures": AT_LEAST_0,  # Ray's -1 (retry forever) would loop on a deterministic error
    # model, llm
    "model.dim": AT_LEAST_1,
    "model.n_layers": AT_LEAST_1,
    "model.n_heads": AT_LEAST_1,
    "model.n_kv_heads": AT_LEAST_1,
    "model.ffn_hidden": AT_LEAST_1,
    "model.max_seq_len": AT_LEAST_1,
    "model.rope_theta": POSITIVE,
    "model.norm_eps": POSITIVE,
    "model.init_std": POSITIVE,
    # model, ranker
    "model.embedding_dim": AT_LEAST_1,
    "model.bottom_mlp": AT_LEAST_1,
    "model.top_mlp": AT_LEAST_1,
    "model.cross_layers": AT_LEAST_0,  # dcn needs one at least (trainers/families/ranker.py)
    "model.cross_rank": AT_LEAST_0,  # 0 = full rank
    "model.deep_mlp": AT_LEAST_1,
    # data (text and click logs)
    "data.vocab_size": AT_LEAST_1,  # the tokenizer's own minimum is checked with the family (datasets/tokenizer.py)
    "data.seq_len": AT_LEAST_1,
    "data.max_chars": AT_LEAST_1,
    "data.rows": AT_LEAST_1,
    "data.val_fraction": Bound(0, 1, low_open=True, high_open=True),
    "data.rows_per_shard": AT_LEAST_1,
    "data.in_memory_limit_mb": AT_LEAST_0,
    "data.cardinalities": AT_LEAST_1,
    "data.zipf_exponent": POSITIVE,
    # distillation (read with model.teacher only, checked always: a typo waits for the day a teacher is set)
    "distill.mixture_weight": FRACTION,
    "distill.temperature": POSITIVE,
    "distill.weight": FRACTION,
    # cluster
    "cluster.cpus_per_worker": POSITIVE,
    "cluster.local_num_cpus": AT_LEAST_1,
    "cluster.scale_up_timeout_s": POSITIVE,
    "cluster.max_nodes": AT_LEAST_1,
    "cluster.peak_tflops_per_gpu": POSITIVE,
    "cluster.assumed_mfu": Bound(0, 1, low_open=True),
    # sweep
    "sweep.num_samples": AT_LEAST_1,
    "sweep.max_concurrent_trials": AT_LEAST_0,  # 0 = as many as fit
    "sweep.grace_period": AT_LEAST_1,
    "sweep.reduction_factor": Bound(1, low_open=True),
    # serve
    "serve.refresh_s": POSITIVE,  # replicas re-read the registry every refresh_s: 0 would spin
    "serve.eval_rows": AT_LEAST_0,  # 0 = all
    "serve.export_shard_gb": POSITIVE,
    "serve.version": AT_LEAST_1,
    "serve.canary_percent": Bound(0, 100),
    "serve.port": Bound(1, 65535),
    "serve.min_replicas": AT_LEAST_0,
    "serve.max_replicas": AT_LEAST_1,
    "serve.target_ongoing_requests": POSITIVE,
    "serve.upscale_delay_s": AT_LEAST_0,
    "serve.downscale_delay_s": AT_LEAST_0,
    "serve.max_ongoing_requests": AT_LEAST_1,
    "serve.num_cpus": AT_LEAST_0,
    "serve.num_gpus": AT_LEAST_0,
    "serve.health_check_period_s": POSITIVE,
    "serve.graceful_shutdown_timeout_s": AT_LEAST_0,
    "serve.max_tokens_limit": AT_LEAST_1,
    "serve.max_candidates": AT_LEAST_1,
    "serve.max_batch_size": AT_LEAST_1,
    "serve.batch_wait_timeout_s": AT_LEAST_0,
    "serve.optimize_max_quality_loss": AT_LEAST_0,
    "serve.optimize_time_s": POSITIVE,
    "serve.optimize_calibration_rows": AT_LEAST_1,
}


def check_bounds(cfg, *, sections: tuple[str, ...] | None = None) -> None:
    """Every numeric key of BOUNDS (or only those of `sections`, e.g. ("serve",) for a
    command that only serves) within its range, naming the first that is not."""
    for key, bound in BOUNDS.items():
        section, name = key.split(".", 1)
        if sections is not None and section not in sections:
            continue
        node = getattr(cfg, section)
        if not hasattr(node, name):  # another model family's or kind of data's key
            continue
        value = getattr(node, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if item is None or isinstance(item, bool) or not isinstance(item, (int, float)):
                continue  # null means derive or none; a type error is OmegaConf's to report
            if not bound.holds(item):
                shown = list(value) if isinstance(value, (list, tuple)) else value
                each = " each" if isinstance(value, (list, tuple)) else ""
                raise ValueError(f"{key}={shown} must{each} be {bound.describe()}")


def check_serve(cfg) -> None:
    """The serve block on its own (ServeConfig): what serving and promotion need before anything starts."""
    check_bounds(cfg, sections=("serve",))
    serve = cfg.serve
    if serve.max_replicas < serve.min_replicas:
        raise ValueError(f"serve.max_replicas={serve.max_replicas} must be at least serve.min_replicas="
                         f"{serve.min_replicas}")
    check_gate_metric(cfg)


# ---------------------------------------------------------------- distillation's teacher: model.teacher

TEACHER_SYNTAX = "registry:MODEL@ALIAS (e.g. @production), registry:MODEL@vN (a version number) or an export directory"
REGISTRY_PREFIX = "registry:"
# The registry's own name rule (serve/registry.py: NAME_PATTERN), for the model and the alias alike.
_REGISTRY_REFERENCE = re.compile(r"registry:([A-Za-z0-9][A-Za-z0-9_.-]*)@([A-Za-z0-9][A-Za-z0-9_.-]*)")
_VERSION_NUMBER = re.compile(r"v([0-9]+)")


@dataclass(frozen=True)
class TeacherReference:
    """model.teacher, parsed: a registry model with an alias or a version number, or a local export directory."""

    text: str  # as written, for errors and the manifest
    model: str | None = None
    alias: str | None = None
    version: int | None = None
    path: str | None = None


def parse_teacher(value: str) -> TeacherReference:
    """model.teacher's syntax, checked with the config (an alias named like a version, "v3", reads as version 3)."""
    if not value.strip():
        raise ValueError(f"model.teacher is empty: expected {TEACHER_SYNTAX}, or null to train without a teacher")
    if not value.startswith(REGISTRY_PREFIX):
        return TeacherReference(text=value, path=value)
    match = _REGISTRY_REFERENCE.fullmatch(value)
    if match is None:
        raise ValueError(f"model.teacher={value!r} is not a registry reference: expected {TEACHER_SYNTAX}; names "
                         "hold letters, digits, '_', '.' or '-'")
    model, tag = match.groups()
    number = _VERSION_NUMBER.fullmatch(tag)
    if number is None:
        return TeacherReference(text=value, model=model, alias=tag)
    if int(number.group(1)) < 1:
        raise ValueError(f"model.teacher={value!r}: registry versions are numbered from 1 (@v1, @v2, ...)")
    return TeacherReference(text=value, model=model, version=int(number.group(1)))


# ------------------------------------------------------------ the eval gate's metric: serve.gate_metric

GATE_METRIC_SYNTAX = "lm_eval:TASK:METRIC[,FILTER]"


@dataclass(frozen=True)
class TaskMetric:
    """A score of a local lm-evaluation-harness task, e.g. lm_eval:slipway_choice:acc. lm-eval reports each metric
    once per filter of the task, as "METRIC,FILTER"; a task without a filter_list has the one filter "none"."""

    task: str
    metric: str
    filter: str = "none"

    @property
    def key(self) -> str:
        return f"{self.metric},{self.filter}"


@dataclass(frozen=True)
class LocalTask:
    name: str
    yaml_path: Path
    config: dict  # as lm-eval's index reads it: includes merged, !function tags not yet imported


def parse_gate_metric(value: str, *, key: str = "serve.gate_metric") -> TaskMetric:
    parts = value.split(":")
    metric, _, filter_name = parts[-1].partition(",")
    if len(parts) != 3 or parts[0] != "lm_eval" or not parts[1].strip() or not metric.strip():
        raise ValueError(f"{key}={value!r} must be {GATE_METRIC_SYNTAX} (e.g. lm_eval:slipway_choice:acc), or null "
                         "for the model family's own metric")
    return TaskMetric(parts[1], metric, filter_name or "none")


def local_lm_eval_tasks(directory: str | Path, *, key: str) -> dict[str, LocalTask]:
    """The tasks (not groups or tags) that lm-eval finds in `directory`'s YAML files, by name; only these, not
    lm-eval's built-in tasks, which download their data."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ValueError(f"{key}={directory} is not a directory (expected one holding lm-eval task YAML files)")
    try:
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as err:
        raise ValueError(f"{key} needs lm-evaluation-harness ({err}): pip install lm-eval==0.4.13") from None
    index = TaskManager(include_path=str(path.resolve()), include_defaults=False).task_index
    return {name: LocalTask(name, Path(entry.yaml_path), entry.cfg) for name, entry in index.items()
            if entry.kind.name == "TASK"}


def require_local_task(tasks: dict[str, LocalTask], name: str, *, key: str, directory: str | Path) -> LocalTask:
    if name in tasks:
        return tasks[name]
    read = {task.yaml_path.resolve() for task in tasks.values()}
    unread = sorted(p.name for p in Path(directory).expanduser().resolve().glob("**/*.yaml") if p not in read)
    skipped = f"; lm-eval skipped {', '.join(unread)} (not a task, or not valid YAML)" if unread else ""
    raise ValueError(f"{key}: no lm-eval task {name!r} in {directory} (tasks there: "
                     f"{', '.join(sorted(tasks)) or 'none'}{skipped})")


def task_metric_mode(task: LocalTask, metric: TaskMetric, *, mode: str | None) -> str:
    """"max" or "min" for `metric` of `task`: serve.gate_mode when set, else the direction the task's metric_list
    declares (higher_is_better), else lm-eval's own for a metric it knows (acc and exact_match: higher)."""
    listed = {item.get("metric"): item for item in task.config.get("metric_list") or [] if isinstance(item, dict)}
    if listed and metric.metric not in listed:
        raise ValueError(f"serve.gate_metric: task {task.name} ({task.yaml_path}) reports {', '.join(map(str, listed))}"
                         f", not {metric.metric}")
    filters = [item.get("name") for item in task.config.get("filter_list") or [] if isinstance(item, dict)]
    if metric.filter not in (filters or ["none"]):
        raise ValueError(f"serve.gate_metric: task {task.name} reports its metrics under the filters "
                         f"{', '.join(filters or ['none'])}, not {metric.filter} (lm_eval:TASK:METRIC,FILTER)")
    if mode is not None:
        return str(mode)
    higher = listed.get(metric.metric, {}).get("higher_is_better")
    if higher is None:
        from lm_eval.api.registry import is_higher_better

        higher = is_higher_better(metric.metric)
    if higher is None:
        raise ValueError(f"serve.gate_metric: neither task {task.name} nor lm-eval says whether a higher "
                         f"{metric.metric} is better; set serve.gate_mode=max or serve.gate_mode=min")
    return "max" if higher else "min"


def check_gate_metric(cfg) -> str | None:
    """serve.gate_metric with serve.gate_tasks and serve.gate_mode, checked before anything starts."""
    return gate_metric_mode(cfg.serve, family=getattr(cfg.model, "family", None))


def gate_metric_mode(serve, *, family: str | None) -> str | None:
    """The direction ("max" or "min") of serve.gate_metric for a model of `family`, its task found in
    serve.gate_tasks; None when the gate uses the family's own metric."""
    if serve.gate_metric is None:
        for key in ("gate_tasks", "gate_mode"):
            if getattr(serve, key) is not None:
                raise ValueError(f"serve.{key} is set but serve.gate_metric is null: the family's metric has its "
                                 f"own direction and data; set serve.gate_metric={GATE_METRIC_SYNTAX}, or drop "
                                 f"serve.{key}")
        return None
    metric = parse_gate_metric(serve.gate_metric)
    if family is not None and family != "llm":  # lm-eval tasks score text; other families have their own metric
        raise ValueError(f"serve.gate_metric={serve.gate_metric} scores a language model, and model.family={family} "
                         "is not one: leave serve.gate_metric null to gate on the family's metric")
    if serve.gate_tasks is None:
        raise ValueError(f"serve.gate_metric={serve.gate_metric} needs serve.gate_tasks=DIR, the directory holding "
                         f"task {metric.task}'s YAML file (e.g. scripts/lm_eval_tasks)")
    tasks = local_lm_eval_tasks(serve.gate_tasks, key="serve.gate_tasks")
    task = require_local_task(tasks, metric.task, key="serve.gate_metric", directory=serve.gate_tasks)
    return task_metric_mode(task, metric, mode=serve.gate_mode)
