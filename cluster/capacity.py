"""Whether the cluster can give a run what it asks for: its workers' resources (fixed or elastic, with or
without an autoscaler), this machine's GPUs for an embedded Ray, and the shared storage that a run spread
over several nodes needs. (The worker range itself is derived from the config: conf/derived.py.)"""

import logging
import os
import uuid
from pathlib import Path

from conf.derived import resolve_address, worker_range
from conf.schema import ClusterConfig

logger = logging.getLogger(__name__)

# Ray Train's wait for a worker group's resources; it reads it in the driver and passes it on to its controller.
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


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
