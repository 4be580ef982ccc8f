"""Values derived from the config alone, which several layers need: they live with the config so that no layer
has to import a higher one to read them (DESIGN.md section 4)."""

import os
from dataclasses import dataclass

from conf.schema import ClusterConfig, Precision


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
    "trainer.lr": POSITIVE,
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
    "serve.refresh_s": POSITIVE,  # the router re-reads the registry every refresh_s: 0 would spin
    "serve.eval_rows": AT_LEAST_0,  # 0 = all
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
