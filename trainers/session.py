"""What a training worker asks of whatever runs it: its rank and world size, its device, its data, and where its
reports and checkpoints go.

Under Ray Train (every plain run, and sweep trials of several workers) the answer is Ray Train's worker API. A
sweep's 1-worker trial instead trains in its Tune trial's own process (trainers/sweep.py: trials_in_process), which
Tune reuses from trial to trial, so no Train controller or worker process starts and torch stays imported. Ray's
own local mode (ScalingConfig(num_workers=0)) cannot serve there: inside a Tune session, Ray 2.60 refuses
ray.train.get_context, report and get_checkpoint. So the driver opens `in_process(run)` around `train_loop`, and an
InProcessRun answers in Ray Train's place and does its controller's work with the reports: it keeps each checkpoint
in the run directory in Ray Train's layout (`<run_dir>/checkpoint_step_<N>/`), ranks them by the evaluation at their
step (rank 0 logs it to metrics.jsonl before it reports the checkpoint, so a resumed run ranks its earlier ones
too), prunes them to checkpoint.keep_top_k (the latest is always kept, as Ray Train keeps it), and calls the run's
callbacks.

A run launched with cluster.launcher=processes has no Ray at all (trainers/local.py): one worker trains in the
launching process, several in local processes joined like torchrun's. Each process opens `in_process(run)` with
its rank; the ranks write a checkpoint's parts into one staging directory in the run directory, and rank 0 renames
it into place once every rank is done (a barrier), then ranks and prunes as above.

The training loop and the checkpoint manager call only this module, so every kind of run trains the same code.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from trainers import outputs

CHECKPOINT_PREFIX = "checkpoint_step_"
STAGING_PREFIX = ".staging-"  # a checkpoint being written by an in-process run's ranks; renamed when complete


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


@dataclass
class InProcessRun:
    """A run trained in the calling process, and what Ray Train's controller would do with its reports."""

    run_dir: Path
    datasets: dict  # name -> ray.data.Dataset (each worker of a Ray Train run reads the whole stream too)
    keep_top_k: int  # checkpoint.keep_top_k, ranked by `metric`
    metric: str
    mode: str  # min | max
    device: torch.device
    callbacks: list = field(default_factory=list)  # ray.train.UserCallback objects; after_report is called
    rank: int = 0  # this process's rank among `world_size` local processes (cluster.launcher=processes)
    world_size: int = 1

    def staging(self, name: str) -> Path:
        """Where every rank writes its part of checkpoint `name`: one directory in the run directory."""
        directory = self.run_dir / f"{STAGING_PREFIX}{name}"
        directory.mkdir(exist_ok=True)
        return directory

    def report(self, metrics: dict, *, checkpoint_dir: Path | None, name: str | None) -> None:
        if checkpoint_dir is not None and self.world_size > 1:
            dist.barrier()  # every rank's part is written
        if self.rank != 0:
            return
        checkpoint = None
        if checkpoint_dir is not None:
            final = self.run_dir / name
            shutil.rmtree(final, ignore_errors=True)  # a resumed run that saves the same step again
            checkpoint_dir.rename(final)  # staged in the run directory: the rename is the commit
            self._prune()
            checkpoint = _ray_checkpoint(final) if self.callbacks else None
        for callback in self.callbacks:
            callback.after_report(None, [metrics], checkpoint)

    def checkpoints(self) -> dict[int, Path]:
        """{step: directory} of the checkpoints kept in the run directory."""
        return {int(path.name.removeprefix(CHECKPOINT_PREFIX)): path
                for path in self.run_dir.glob(f"{CHECKPOINT_PREFIX}*")}

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[max(found)] if found else None

    def best(self) -> Path | None:
        """The checkpoint whose evaluation scored best (None when no checkpoint's step was evaluated)."""
        ranked = self._ranked()
        return ranked[0] if ranked else None

    def _ranked(self) -> list[Path]:
        """The kept checkpoints whose step has an evaluation, best first (the latest row of a step wins)."""
        scores = {row["step"]: row[self.metric] for row in outputs.read_metrics(self.run_dir) if self.metric in row}
        found = self.checkpoints()
        ranked = sorted((step for step in found if step in scores), key=scores.get, reverse=self.mode == "max")
        return [found[step] for step in ranked]

    def _prune(self) -> None:
        latest = self.latest()
        for path in self._ranked()[self.keep_top_k:]:
            if path != latest:
                shutil.rmtree(path)


_in_process: InProcessRun | None = None


def clear_staging(run_dir: Path) -> None:
    """Remove the parts of checkpoints that an in-process run began and did not finish (it failed meanwhile)."""
    for leftover in Path(run_dir).glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def in_process(run: InProcessRun) -> Iterator[InProcessRun]:
    """While open, this module answers the training loop from `run` instead of Ray Train."""
    global _in_process
    assert _in_process is None, "one in-process run at a time"
    _in_process = run
    try:
        yield run
    finally:
        _in_process = None


def _ray_checkpoint(path: Path):
    import ray.train

    return ray.train.Checkpoint.from_directory(str(path))


def join_process_group(store, *, rank: int, world_size: int, use_gpu: bool) -> None:
    """Join this process to a group of `world_size` over `store`, exporting what a launcher exports to each worker
    (torchrun and Ray Train do too; DeepSpeed asserts LOCAL_RANK is set)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "NODE_RANK": "0"})
    backend = "cpu:gloo,cuda:nccl" if use_gpu else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)



# ------------------------------------------------------------------------------------- what a worker asks

def rank_and_world() -> tuple[int, int]:
    if _in_process is not None:
        return _in_process.rank, _in_process.world_size
    import ray.train

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def device() -> torch.device:
    if _in_process is not None:
        return _in_process.device
    import ray.train.torch

    return ray.train.torch.get_device()


def dataset_shard(name: str):
    """What this worker iterates for `name` ("train", "val"): the whole ordered stream (see trainers/loop.py)."""
    if _in_process is not None:
        return _in_process.datasets[name]
    import ray.train

    return ray.train.get_dataset_shard(name)


@contextlib.contextmanager
def checkpoint_staging(name: str) -> Iterator[Path]:
    """A directory to write this rank's part of checkpoint `name` into before reporting it: for an in-process run,
    one in the run directory that all its ranks share (its report renames it into place); under Ray Train, a
    temporary one of this rank's own, removed after the report (Ray Train copied it into storage)."""
    if _in_process is not None:
        yield _in_process.staging(name)
        return
    with tempfile.TemporaryDirectory(prefix=".slipway-ckpt-") as tmp:
        yield Path(tmp)


def report(metrics: dict, *, checkpoint_dir: Path | None = None, name: str | None = None) -> None:
    """Report metrics, and a checkpoint written into `checkpoint_dir` to be kept as `name`."""
    if _in_process is not None:
        _in_process.report(metrics, checkpoint_dir=checkpoint_dir, name=name)
        return
    import ray.train

    if checkpoint_dir is None:
        ray.train.report(metrics)
    else:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
                         checkpoint_dir_name=name)


@contextlib.contextmanager
def latest_checkpoint() -> Iterator[tuple[Path, str] | None]:
    """The run's latest checkpoint while open: (a local directory holding it, its name), or None."""
    if _in_process is not None:
        latest = _in_process.latest()
        yield (latest, latest.name) if latest else None
        return
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield Path(directory), Path(checkpoint.path).name


def has_checkpoint() -> bool:
    if _in_process is not None:
        return _in_process.latest() is not None
    import ray.train

    return ray.train.get_checkpoint() is not None
