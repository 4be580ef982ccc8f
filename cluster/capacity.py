"""What a run asks of the cluster, and whether the cluster can give it: worker counts (fixed or elastic),
capacity, and the shared storage that a run spread over several nodes needs."""

import logging
import os
import uuid
from pathlib import Path

from conf.schema import ClusterConfig

logger = logging.getLogger(__name__)

# Ray Train V2 restarts an elastic run on a different number of workers. DDP and FSDP2 checkpoints load at any
# world size (the model is whole, or DCP reshards it); DeepSpeed's ZeRO checkpoints are partitioned per rank.
ELASTIC_STRATEGIES = ("ddp", "fsdp")
# Ray Train's wait for a worker group's resources; it reads it in the driver and passes it on to its controller.
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies


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


def check_placement(cfg: ClusterConfig) -> None:
    if cfg.placement_strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"cluster.placement_strategy={cfg.placement_strategy!r} is not one of "
                         f"{', '.join(PLACEMENT_STRATEGIES)}")


def scaling_workers(cfg: ClusterConfig) -> int | tuple[int, int]:
    """What Ray Train's ScalingConfig(num_workers=...) takes: an int, or a (min, max) tuple for elastic runs."""
    low, high = worker_range(cfg)
    return low if low == high else (low, high)


def check_capacity(cfg: ClusterConfig) -> None:
    """Fail fast, naming both numbers, when the run asks for more than the cluster has (Ray would wait).

    An elastic run needs its minimum; a cluster that adds nodes on demand (`cluster.autoscaling=true`) is
    asked to scale instead: Ray Train's pending placement group is the autoscaler's demand."""
    import ray

    if cfg.autoscaling:  # a value the user exported wins
        os.environ.setdefault(WORKER_GROUP_START_TIMEOUT_ENV, f"{cfg.scale_up_timeout_s:g}")
    low, _ = worker_range(cfg)
    available = ray.cluster_resources()
    wanted = {"CPU": low * cfg.cpus_per_worker}
    if cfg.use_gpu:
        wanted["GPU"] = low * cfg.gpus_per_worker
    for resource, amount in wanted.items():
        have = available.get(resource, 0.0)
        if amount <= have:
            continue
        per_worker = cfg.gpus_per_worker if resource == "GPU" else cfg.cpus_per_worker
        need = f"{low} worker(s) x {per_worker:g} {resource} needs {amount:g} {resource}"
        if cfg.autoscaling:
            logger.info("%s and the cluster has %g now: waiting for the autoscaler to add nodes", need, have)
            continue
        raise ValueError(
            f"cluster.num_workers={cfg.num_workers}: {need}, but the Ray cluster has {have:g} {resource} "
            "(set cluster.autoscaling=true if the cluster adds nodes on demand)"
        )


def check_local_gpus(cfg: ClusterConfig) -> None:
    """An embedded Ray sees only this machine: refuse a GPU run it cannot hold before preparing data and
    starting Ray. (On a cluster, check_capacity asks Ray.)"""
    from cluster.connection import resolve_address

    if not cfg.use_gpu or resolve_address(cfg) is not None:
        return
    import torch

    have = torch.cuda.device_count()
    need = worker_range(cfg)[0] * cfg.gpus_per_worker
    if need > have:
        raise ValueError(
            f"cluster.num_workers={cfg.num_workers} x cluster.gpus_per_worker={cfg.gpus_per_worker:g} needs "
            f"{need:g} GPU, but this machine has {have} GPU; the embedded Ray uses this machine only: set "
            "cluster.address (or RAY_ADDRESS) to run on a cluster, or cluster=local for CPU workers"
        )


def check_shared_storage(root: Path, *, key: str = "paths.root") -> None:
    """On a cluster of several nodes, every node must see `root`: workers write checkpoints and metrics there
    and the driver reads them back. Write a probe file here and have a task on every alive node look for it;
    a node that cannot see it means `root` is local to this machine, which would lose checkpoints silently."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".shared-storage-probe-{uuid.uuid4().hex}"
    probe.write_text(probe.name)
    try:
        look = ray.remote(num_cpus=0)(_sees_probe)
        names = [f"{node['NodeManagerAddress']} {node['NodeID'][:8]}" for node in nodes]
        answers = [look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                   .remote(str(probe)) for node in nodes]
        seen = ray.get(answers, timeout=120)
        blind = [name for name, sees in zip(names, seen, strict=True) if not sees]
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise ValueError(
            f"{key}={root} is not shared storage: node(s) {', '.join(blind)} of this {len(nodes)}-node cluster "
            f"cannot see it. Training on several nodes needs {key} on storage that every node mounts at the same "
            "path (NFS, EFS, Filestore, or a bucket mounted with a FUSE driver); see README 'Running on a cluster'"
        )


def _sees_probe(path: str) -> bool:
    return os.path.exists(path) and Path(path).read_text() == Path(path).name
