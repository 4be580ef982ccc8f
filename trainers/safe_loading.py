"""Loading checkpoint files without running code from them (DESIGN.md section 4).

Tensors go through `torch.load(weights_only=True)`. The two pickled metadata files that the strategies' own
libraries write (DCP's `.metadata`, DeepSpeed's state files) are read through an allow-list of their classes.
The strategies (trainers/strategies/) load their files through these helpers, for resuming and for export.
"""

import contextlib
import io
import os
import pickle

import torch

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


def load_tensors(path, *, map_location="cpu"):
    """A torch.save'd file of tensors and plain containers; anything else in it is refused."""
    return torch.load(path, map_location=map_location, weights_only=True)


def safe_dcp_reader(path: str):
    """A DCP FileSystemReader whose metadata goes through the allow-list instead of plain pickle."""
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


def safe_deepspeed_globals() -> list:
    """DeepSpeed's own plain-data classes that its ZeRO state files contain besides tensors."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def install_safe_deepspeed_loader(engine) -> None:
    """DeepSpeed loads its state with weights_only=False; swap in a loader restricted to its own enums."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(safe_deepspeed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.__class__ = SafeTorchCheckpointEngine


@contextlib.contextmanager
def weights_only_loads():
    """Force tensor-only loading while third-party code that calls torch.load(weights_only=False) runs
    (DeepSpeed's merge tool), allowing the few DeepSpeed classes its state files contain."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(safe_deepspeed_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
