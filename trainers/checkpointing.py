"""The one module that saves and restores training state and talks to Ray Train's checkpoint API.

A checkpoint directory holds, whatever the strategy:
  train_state.json       step, epoch, data position (rank 0)
  model_config.json      the model config and data facts needed to rebuild the model (rank 0)
  tokenizer.json         (LLM) the tokenizer the run trained with, so a checkpoint stands on its own (rank 0)
  rng/rank_<r>.pt        each rank's torch RNG state
plus the strategy's own files:
  ddp:    model.pt, optimizer.pt, scheduler.pt (rank 0; replicas are identical)
  fsdp:   dcp/ (torch.distributed.checkpoint: one shard file per rank, metadata from rank 0)
  zero*:  deepspeed/ (DeepSpeed's per-rank ZeRO partitions)
Every rank writes its part into a local temporary directory and calls `ray.train.report` with it; Ray
merges the parts into one directory in the run's storage. Loading never unpickles arbitrary objects:
tensors go through `torch.load(weights_only=True)` and the two pickled metadata files that DCP and
DeepSpeed write are read with an allow-list of their own classes.
"""

import io
import json
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0
    batches_in_epoch: int = 0  # global batches of the current epoch already trained on


# ---------------------------------------------------------------------------------------------- safe loading

# Modules whose classes may appear in DCP's `.metadata` and DeepSpeed's state files besides tensors.
_ALLOWED_PICKLE_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
    "deepspeed.runtime.zero.config",
    "deepspeed.utils.tensor_fragment",
)
_ALLOWED_PICKLE_GLOBALS = {
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch._utils", "_rebuild_tensor_v2"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("torch", "device"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
}
_TORCH_CONSTANT_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only checkpoint-metadata classes and torch dtype/layout constants; anything else is refused."""

    def find_class(self, module: str, name: str):
        if module in _ALLOWED_PICKLE_MODULES or (module, name) in _ALLOWED_PICKLE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANT_TYPES):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}, which is not on the allow-list")


def _safe_deepspeed_globals() -> list:
    """DeepSpeed's own plain-data classes that its ZeRO state files contain besides tensors."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _make_safe_dcp_reader(path: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(metadata_path, "rb") as stream:
                metadata = _AllowListUnpickler(io.BytesIO(stream.read())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(path)


def _install_safe_deepspeed_loader(engine) -> None:
    """DeepSpeed loads its state with weights_only=False; swap in a loader restricted to its own enums."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_safe_deepspeed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.__class__ = SafeTorchCheckpointEngine


# ------------------------------------------------------------------------------------------ strategy savers

def _save_ddp(strategy, directory: Path, *, rank: int) -> None:
    if rank != 0:
        return
    torch.save(strategy.unwrapped_model().state_dict(), directory / "model.pt")
    torch.save(strategy.optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(strategy.scheduler.state_dict(), directory / "scheduler.pt")


def _load_ddp(strategy, directory: Path) -> None:
    load = lambda name: torch.load(directory / name, map_location="cpu", weights_only=True)  # noqa: E731
    strategy.unwrapped_model().load_state_dict(load("model.pt"))
    strategy.optimizer.load_state_dict(load("optimizer.pt"))
    strategy.scheduler.load_state_dict(load("scheduler.pt"))


def _save_fsdp(strategy, directory: Path, *, rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(strategy.model, strategy.optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state},
             storage_writer=dcp.FileSystemWriter(str(directory / "dcp")))
    if rank == 0:
        torch.save(strategy.scheduler.state_dict(), directory / "scheduler.pt")


def _load_fsdp(strategy, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(strategy.model, strategy.optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, storage_reader=_make_safe_dcp_reader(str(directory / "dcp")))
    set_state_dict(strategy.model, strategy.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    strategy.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))


def _save_deepspeed(strategy, directory: Path, *, rank: int) -> None:
    # DeepSpeed's optimizer partitions are per rank and the module states come from rank 0, so each rank's
    # local directory holds its own files and the merged directory holds them all.
    strategy.model.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)


def _load_deepspeed(strategy, directory: Path) -> None:
    _install_safe_deepspeed_loader(strategy.model)
    load_path, _ = strategy.model.load_checkpoint(str(directory / "deepspeed"), tag="state",
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise ValueError(f"DeepSpeed found no checkpoint under {directory / 'deepspeed'}")


_SAVERS = {"ddp": _save_ddp, "fsdp": _save_fsdp, "deepspeed": _save_deepspeed}
_LOADERS = {"ddp": _load_ddp, "fsdp": _load_fsdp, "deepspeed": _load_deepspeed}


def _strategy_key(strategy) -> str:
    return "deepspeed" if strategy.kind == "deepspeed" else strategy.name


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


def write_checkpoint_dir(strategy, state: TrainState, directory: Path, *, rank: int, model_config: dict,
                         files: dict[str, str]) -> None:
    """Write this rank's part of a checkpoint into `directory`; rank 0 also copies `files` (name -> source)."""
    (directory / "rng").mkdir(parents=True, exist_ok=True)
    _SAVERS[_strategy_key(strategy)](strategy, directory, rank=rank)
    torch.save(_rng_state(), directory / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        (directory / "train_state.json").write_text(json.dumps(asdict(state)))
        (directory / "model_config.json").write_text(json.dumps(model_config, indent=2))
        for name, source in files.items():
            shutil.copyfile(source, directory / name)


def read_checkpoint_dir(strategy, directory: Path, *, rank: int) -> TrainState:
    """Load a merged checkpoint directory into the strategy's model/optimizer/schedule and this rank's RNG."""
    _LOADERS[_strategy_key(strategy)](strategy, directory)
    rng_file = directory / "rng" / f"rank_{rank}.pt"
    if rng_file.exists():  # absent when the world size changed; then the seed of this run stands
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return TrainState(**json.loads((directory / "train_state.json").read_text()))


# ------------------------------------------------------------------------------------ Ray Train reporting

def save_and_report(strategy, state: TrainState, metrics: dict, *, rank: int, model_config: dict,
                    files: dict[str, str]) -> None:
    """Every rank writes its part and reports; Ray uploads the parts into storage as one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="slipway-ckpt-") as tmp:
        write_checkpoint_dir(strategy, state, Path(tmp), rank=rank, model_config=model_config, files=files)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_step_{state.step:08d}",
        )


def report_metrics(metrics: dict) -> None:
    import ray.train

    ray.train.report(metrics)


def restore_latest(strategy, *, rank: int) -> TrainState | None:
    """Restore from the run's latest checkpoint if Ray Train has one (rerun or worker restart)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = read_checkpoint_dir(strategy, Path(directory), rank=rank)
    logger.info("restored checkpoint %s at step %d", os.path.basename(checkpoint.path), state.step)
    return state
