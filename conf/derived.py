"""Values derived from the config alone, which several layers need: they live with the config so that no layer
has to import a higher one to read them (DESIGN.md section 4)."""

import os

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
