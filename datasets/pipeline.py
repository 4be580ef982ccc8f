"""Ray Data datasets over prepared parquet shards (token rows or click-log rows), and the same batches read
without Ray (ShardStream, for cluster.launcher=processes)."""

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import ray.data

SPLITS = ("train", "val")


class Prepared(Protocol):
    """What any kind of prepared data (PreparedText, PreparedClickLog, ...) offers the pipeline."""

    train_dir: str
    val_dir: str

    def columns(self, split: str) -> list[str]: ...

logger = logging.getLogger(__name__)


def build_ray_datasets(prepared: Prepared, *,
                       in_memory_limit_mb: int = 512) -> dict[str, "ray.data.Dataset"]:
    """{"train": ..., "val": ...}, each in shard order, with the columns `prepared.columns(split)` names.

    Sets `preserve_order` on the current DataContext: Ray Data otherwise yields blocks in completion order, and
    Ray Train copies this setting into its ingest options, so it must be set in the driver before the trainer
    is built. The shuffling that training wants was done once, with data.seed, when the rows were prepared.

    A split no larger than `in_memory_limit_mb` is read by the driver and handed to Ray as Arrow tables:
    every epoch and every evaluation then iterates blocks already in the object store, where a streaming
    read would start read tasks (seconds each on a small machine) every time. Larger splits stream.
    """
    import ray.data  # imported here: Ray is slow to import and most users of this package do not need it

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # one bar per worker and epoch would bury the training log
    directories = {"train": prepared.train_dir, "val": prepared.val_dir}
    return {name: _load_split(Path(directories[name]), split=name, columns=prepared.columns(name),
                              in_memory_limit_mb=in_memory_limit_mb)
            for name in SPLITS}


def _shard_files(directory: Path, *, split: str) -> list[str]:
    files = sorted(str(path) for path in directory.glob("part-*.parquet"))
    if not files:
        raise ValueError(f"prepared {split} directory {directory} has no part-*.parquet shards; prepare the data again")
    return files


def _load_split(directory: Path, *, split: str, columns: list[str], in_memory_limit_mb: int) -> "ray.data.Dataset":
    import pyarrow.parquet as pq
    import ray.data

    files = _shard_files(directory, split=split)
    size_mb = sum(Path(file).stat().st_size for file in files) / 2**20
    if size_mb <= in_memory_limit_mb:
        logger.info("loading %d %s shards (%.1f MB) from %s into the object store", len(files), split, size_mb,
                    directory)
        return ray.data.from_arrow([pq.read_table(file, columns=columns) for file in files])
    logger.info("streaming %d %s shards (%.1f MB) from %s", len(files), split, size_mb, directory)
    return ray.data.read_parquet(files, columns=columns)


# ---------------------------------------------------------------------------------- without Ray (local launcher)

def build_local_datasets(prepared: Prepared) -> dict[str, "ShardStream"]:
    """{"train": ..., "val": ...} read straight from the prepared shards, for runs without Ray
    (cluster.launcher=processes): the same rows in the same order, batched as Ray Data batches them."""
    directories = {"train": prepared.train_dir, "val": prepared.val_dir}
    return {name: ShardStream(_shard_files(Path(directories[name]), split=name), columns=prepared.columns(name))
            for name in SPLITS}


class ShardStream:
    """A split's parquet shards in order, offering the one method the training loop calls on a Ray dataset:
    `iter_torch_batches`. Batches run across shard boundaries, as Ray Data's do, so both give the loop the same
    global batches (tests/trainers/test_local_launcher.py compares them)."""

    READ_ROWS = 8192  # rows read from a shard at a time: a 1 GB split is never held whole

    def __init__(self, files: list[str], *, columns: list[str]):
        self.files, self.columns = list(files), list(columns)

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = False):
        """Dicts of column -> tensor with `batch_size` rows (the last one shorter unless `drop_last`)."""
        import pyarrow as pa

        rest = None  # rows read and not yet handed out; slicing and concatenating tables copies no rows
        for batch in self._record_batches():
            read = pa.Table.from_batches([batch])
            rest = read if rest is None else pa.concat_tables([rest, read])
            while rest.num_rows >= batch_size:
                yield _torch_columns(rest.slice(0, batch_size))
                rest = rest.slice(batch_size)
        if rest is not None and rest.num_rows and not drop_last:
            yield _torch_columns(rest)

    def _record_batches(self):
        import pyarrow.parquet as pq

        for file in self.files:
            yield from pq.ParquetFile(file).iter_batches(batch_size=self.READ_ROWS, columns=self.columns)


def _torch_columns(table) -> dict:
    """A table as Ray Data's iter_torch_batches gives it: a fixed-size list column as a [rows, size] tensor, a
    scalar column as a [rows] tensor, each of the column's own dtype."""
    import pyarrow as pa
    import torch

    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            values = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
        else:
            values = column.to_numpy(zero_copy_only=False)
        out[name] = torch.from_numpy(values.copy())
    return out
