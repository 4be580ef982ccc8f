"""cluster.launcher=processes: a run trained without Ray, for quick iteration on one machine.

One worker trains in the launching process itself; several train in that many local processes, started and
joined the way torchrun starts and joins them (a process group over a file store in the run directory, RANK,
LOCAL_RANK and WORLD_SIZE exported), each reading the prepared shards straight from disk (datasets/pipeline.py:
ShardStream) in the order Ray Data would hand them over. What is saved: Ray's start, its Train controller and
worker actors, and Ray Data's hand-off, most of the seconds before the first step on a small machine
(README: start-up). What is given up: the Ray dashboard and Train state, multi-node placement and elastic
resizing. A failed worker still restarts the run from its latest checkpoint, up to checkpoint.max_failures
times, as Ray Train would restart its worker group.

The training code is the same (trainers/loop.py: train_loop): trainers/session.py answers it in Ray Train's place.
"""

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from trainers import session

logger = logging.getLogger(__name__)

STORE_FILE = ".process_group_store"  # the rendezvous of one attempt's processes, in the run directory


class WorkersFailedError(RuntimeError):
    """The run failed on its last try (checkpoint.max_failures restarts were spent); the message says how."""


def worker_device(*, use_gpu: bool, rank: int) -> torch.device:
    return torch.device("cuda", rank) if use_gpu else torch.device("cpu")


def run_processes(worker, *, world_size: int, run_dir: Path, use_gpu: bool, args: tuple) -> None:
    """Run `worker(rank, world_size, device, *args)` in `world_size` local processes, joined in one process group,
    and wait.
    A process that fails ends the others and raises here with its error; Ctrl-C ends them all."""
    import torch.multiprocessing as mp

    store = run_dir / STORE_FILE
    store.unlink(missing_ok=True)  # a file store left by an earlier attempt would join the old group
    # spawn, not fork: a forked child inherits the parent's OpenMP and CUDA state, which neither survives.
    context = mp.start_processes(_entry, args=(worker, world_size, str(store), use_gpu, args), nprocs=world_size,
                                 join=False, start_method="spawn")
    try:
        while not context.join():
            pass
    except mp.ProcessRaisedException as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise RuntimeError(f"worker {err.error_index} of {world_size} failed: {lines[-1].strip()}\n"
                           + "\n".join(lines)) from None
    except mp.ProcessExitedException as err:
        raise RuntimeError(f"worker {err.error_index} of {world_size} exited with code {err.exit_code}") from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        store.unlink(missing_ok=True)


def _entry(rank: int, worker, world_size: int, store_path: str, use_gpu: bool, args: tuple) -> None:
    device = worker_device(use_gpu=use_gpu, rank=rank)
    if use_gpu:
        torch.cuda.set_device(device)
    session.join_process_group(dist.FileStore(store_path, world_size), rank=rank, world_size=world_size,
                               use_gpu=use_gpu)
    try:
        worker(rank, world_size, device, *args)
    finally:
        dist.destroy_process_group()


def train_worker(rank: int, world_size: int, device: torch.device, loop_config: dict, storage: dict,
                 datasets: dict) -> None:
    """One local process's training: the loop, answered by an in-process run of this rank."""
    from trainers.loop import train_loop

    run = session.InProcessRun(**storage, datasets=datasets, rank=rank, world_size=world_size, device=device)
    with session.in_process(run):
        train_loop(loop_config)
