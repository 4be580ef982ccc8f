"""The checkpoint manager: the one module that owns a checkpoint's layout, saves and restores training state,
reads a checkpoint back whole for export, and talks to Ray Train's checkpoint API.

A checkpoint directory holds, whatever the strategy:
  train_state.json       step, epoch, data position, and the strategy that wrote it (rank 0)
  model_config.json      the model config and data facts needed to rebuild the model (rank 0)
  tokenizer.json ...     the family's side files (checkpoint_payload), so a checkpoint stands on its own (rank 0)
  rng/rank_<r>.pt        each rank's torch RNG state
plus the strategy's own part, in its checkpoint format (trainers/strategies/): ddp writes model.pt,
optimizer.pt and scheduler.pt from rank 0; fsdp and hsdp a dcp/ directory (one shard file per rank); ZeRO a
deepspeed/ directory of per-rank partitions.

Every rank writes its part into a staging directory and reports it (trainers/session.py): under Ray Train a
temporary directory of its own, whose parts Ray Train merges into one directory in the run's storage; in an
in-process run (a sweep's 1-worker trial, cluster.launcher=processes) one directory in the run directory that every
rank writes into and rank 0 renames into place. Loading never unpickles arbitrary objects (trainers/safe_loading.py).
"""

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainers import session
from trainers.safe_loading import load_tensors
from trainers.strategies import CheckpointFormat, Strategy, all_strategies, checkpoint_formats, get_strategy

logger = logging.getLogger(__name__)


TRAIN_STATE_FILE = "train_state.json"
MODEL_CONFIG_FILE = "model_config.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0
    batches_in_epoch: int = 0  # global batches of the current epoch already trained on
    strategy: str = ""  # strategy.name of the run that wrote it; empty in checkpoints from before it was recorded


# ----------------------------------------------------------------------------------------- RNG and metadata

def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_checkpoint_dir(strategy: Strategy, state: TrainState, directory: Path, *, rank: int, model_config: dict,
                         files: dict[str, str]) -> None:
    """Write this rank's part of a checkpoint into `directory`; rank 0 also copies `files` (name -> source)."""
    (directory / "rng").mkdir(parents=True, exist_ok=True)
    strategy.save_state(directory, rank=rank)
    torch.save(_rng_state(), directory / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        (directory / TRAIN_STATE_FILE).write_text(json.dumps(asdict(state)))
        (directory / MODEL_CONFIG_FILE).write_text(json.dumps(model_config, indent=2))
        for name, source in files.items():
            shutil.copyfile(source, directory / name)


def read_checkpoint_dir(strategy: Strategy, directory: Path, *, rank: int) -> TrainState:
    """Load a merged checkpoint directory into the strategy's model/optimizer/schedule and this rank's RNG."""
    strategy.load_state(directory)
    rng_file = directory / "rng" / f"rank_{rank}.pt"
    if rng_file.exists():  # absent when the world size changed; then the seed of this run stands
        _set_rng_state(load_tensors(rng_file))
    return _read_train_state(directory)


def _read_train_state(directory: Path) -> TrainState:
    return TrainState(**json.loads((directory / TRAIN_STATE_FILE).read_text()))


# --------------------------------------------------------------------------------------- reading for export

def recorded_strategy(checkpoint_dir: Path) -> str | None:
    """The strategy.name that wrote a checkpoint; None for checkpoints from before it was recorded."""
    path = Path(checkpoint_dir) / TRAIN_STATE_FILE
    return (_read_train_state(Path(checkpoint_dir)).strategy or None) if path.exists() else None


def checkpoint_format(checkpoint_dir: Path) -> CheckpointFormat:
    """The format of a checkpoint's strategy part, whose `consolidate` reads it back whole for export: the
    recorded strategy's, or (in checkpoints written before the strategy was recorded) the format whose marker
    is there. A checkpoint without it is refused by name."""
    checkpoint_dir = Path(checkpoint_dir)
    recorded = recorded_strategy(checkpoint_dir)
    candidates = [get_strategy(recorded).checkpoint] if recorded else list(checkpoint_formats().values())
    for found in candidates:
        if (checkpoint_dir / found.marker).exists():
            return found
    users: dict[str, list[str]] = {}
    for spec in all_strategies().values():
        users.setdefault(spec.checkpoint.marker, []).append(spec.name)
    expected = [f"{found.marker} ({', '.join(users[found.marker])})" for found in candidates]
    listed = expected[0] if len(expected) == 1 else f"{', '.join(expected[:-1])} or {expected[-1]}"
    raise ValueError(f"{checkpoint_dir} holds no model weights: expected {listed}")


# ------------------------------------------------------------------------------------ Ray Train reporting

def save_and_report(strategy: Strategy, state: TrainState, metrics: dict, *, rank: int, model_config: dict,
                    files: dict[str, str]) -> None:
    """Every rank writes its part and reports it; the parts become one checkpoint in the run's storage."""
    name = session.checkpoint_dir_name(state.step)
    with session.checkpoint_staging(name) as directory:
        write_checkpoint_dir(strategy, state, directory, rank=rank, model_config=model_config, files=files)
        session.report(metrics, checkpoint_dir=directory, name=name)


def report_metrics(metrics: dict) -> None:
    session.report(metrics)


def has_checkpoint() -> bool:
    """Whether this run has a checkpoint to resume (then pretrained weights need not be read first)."""
    return session.has_checkpoint()


def restore_latest(strategy: Strategy, *, rank: int) -> TrainState | None:
    """Restore from the run's latest checkpoint if it has one (rerun or worker restart)."""
    with session.latest_checkpoint() as latest:
        if latest is None:
            return None
        directory, name = latest
        state = read_checkpoint_dir(strategy, directory, rank=rank)
    logger.info("restored checkpoint %s at step %d", name, state.step)
    return state
