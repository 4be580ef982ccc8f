"""Loading checkpoint files without running code from them (DESIGN.md section 4).

Tensors go through `torch.load(weights_only=True)`. The pickled parts that the strategies' own libraries
write are read through allow-lists of exact (module, name) pairs: DCP's `.metadata` through our own
unpickler, the non-tensor items inside DCP's shard files (the optimizer's `param_groups`) through a load
planner that unpickles them weights-only, DeepSpeed's state files weights-only with its few plain-data
classes allowed. The strategies (trainers/strategies/) load their files through these helpers, for resuming
and for export. A refusal is a `CheckpointRefused` naming the file and what it referred to.
"""

import contextlib
import io
import os
import pickle
from pathlib import Path

import torch

# Exactly the globals DCP's `.metadata` refers to besides torch dtypes (listed by unpickling the metadata of an
# FSDP2 checkpoint of a model and its AdamW state). Pairs, not modules: pickle resolves dotted names, so
# allowing a module would allow everything it imports (`torch.distributed.checkpoint.filesystem` + `os.getpid`).
_ALLOWED_PICKLE_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch", "Size"),
    ("torch", "device"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
})
_TORCH_CONSTANT_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class CheckpointRefused(ValueError):
    """A checkpoint file refers to something that loading would have to run or import; nothing was run."""


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only the exact (module, name) pairs above and torch's dtype/layout constants."""

    def find_class(self, module: str, name: str):
        if "." not in name:  # a dotted name walks attributes from the allowed object to anything it reaches
            if (module, name) in _ALLOWED_PICKLE_GLOBALS:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANT_TYPES):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}, which is not on the allow-list")


def is_plain_file_name(name: object) -> bool:
    """A name of a file in the same directory: no separator, not '.', '..' or empty (so neither `../x` nor an
    absolute path), as every file name read from metadata must be (DESIGN.md section 4)."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and not any(separator in name for separator in ("/", "\\", "\0")))


def check_plain_name(name: object, *, source, field: str) -> str:
    """`field` of the file `source` names a file: refused unless it is a plain name, so a crafted record can
    neither read nor write outside its directory."""
    if not is_plain_file_name(name):
        raise CheckpointRefused(f"{source}: {field} is {name!r}; expected a plain file name in the same "
                                "directory (no path separators, not '.' or '..')")
    return name


def _refused(path, error: Exception) -> CheckpointRefused:
    return CheckpointRefused(f"{path}: refused to load: {error}. Checkpoint files may hold tensors and plain "
                             f"data only; this one was not written by Slipway's strategies (or was altered)")


def load_tensors(path, *, map_location="cpu", mmap: bool = False):
    """A torch.save'd file of tensors and plain containers; anything else in it is refused, naming the file.
    With `mmap`, tensors are views of the file mapped into memory: their bytes are read when first touched."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise _refused(path, error) from None


# --------------------------------------------------------------------------------------------------- DCP

def _safe_dcp_reader(path: str):
    """A DCP FileSystemReader whose metadata goes through the allow-list instead of plain pickle."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(metadata_path, "rb") as stream:
                try:
                    metadata = _AllowListUnpickler(io.BytesIO(stream.read())).load()
                except pickle.UnpicklingError as error:
                    raise _refused(metadata_path, error) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(path)


def _safe_load_planner(reader):
    """DCP's default planner unpickles every non-tensor item (the optimizer's param_groups) with
    weights_only=False; this one unpickles them weights-only and names the shard file that refers to more."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as error:
                shard = reader.storage_data[read_item.storage_index].relative_path
                raise _refused(Path(reader.path) / shard, f"{read_item.dest_index.fqn}: {error}") from None
            if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, with the value loaded safely
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeLoadPlanner()


def dcp_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor a DCP directory holds (flattened names, e.g. "model.norm.weight") -> its full shape, from
    its metadata alone (read through the allow-list)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _safe_dcp_reader(str(path)).read_metadata()
    return {name: tuple(item.size) for name, item in metadata.state_dict_metadata.items()
            if isinstance(item, TensorStorageMetadata)}


def load_dcp(state: dict, path: Path, *, no_dist: bool = False) -> None:
    """dcp.load into `state` (in place) from a DCP directory, every pickled part through an allow-list."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = _safe_dcp_reader(str(path))
    try:
        dcp.load(state, storage_reader=reader, planner=_safe_load_planner(reader), no_dist=no_dist)
    except CheckpointException as error:
        # DCP gathers every rank's failure into one BaseException; a refusal on any rank is the one to report.
        refusals = [failure for failure, _ in error.failures.values() if isinstance(failure, CheckpointRefused)]
        if refusals:
            raise refusals[0] from None
        raise


# ---------------------------------------------------------------------------------------------- DeepSpeed

def safe_deepspeed_globals() -> list:
    """DeepSpeed's own plain-data classes that its ZeRO state files contain besides tensors."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def install_safe_deepspeed_loader(engine) -> None:
    """DeepSpeed loads its state with weights_only=False; swap in a loader restricted to its own classes."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(safe_deepspeed_globals()):
                return load_tensors(path, map_location=map_location)

    engine.checkpoint_engine.__class__ = SafeTorchCheckpointEngine


def check_deepspeed_files(directory: Path) -> None:
    """Refuse, naming the file, a DeepSpeed state file that refers to anything beyond tensors and DeepSpeed's
    allowed classes. It reads only each file's pickle, not its tensors, so checking before DeepSpeed's merge
    tool runs costs little, and the refusal can name the file (the tool's own error cannot)."""
    allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in safe_deepspeed_globals()}
    for path in sorted(Path(directory).rglob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed
        except (pickle.UnpicklingError, RuntimeError, ValueError) as error:
            raise _refused(path, error) from None
        if unsafe:
            raise _refused(path, f"it refers to {', '.join(sorted(unsafe))}")


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
