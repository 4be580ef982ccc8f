"""Criteo-format click-log TSV files, streamed into the parquet shards described in datasets/clicklog.py.

Features are encoded (dense transform, hex parsing, hashing) by datasets/click_encoding.py, which serving shares.

A line holds 40 tab-separated fields and no header: `label` (0 or 1), `I1`..`I13` (integer counts, possibly
negative or empty) and `C1`..`C26` (categories as 1-16 hex digits, or empty). Files may be gzip (`.gz`).

Reading is block by block with Arrow's streaming CSV reader, so a Criteo day file (~45 GB) never sits in memory.
Every line ends up in train or val by a hash of its row number, so the split does not depend on block sizes.
"""

import logging
import re
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv

from datasets.click_encoding import (
    _MASK64,
    CATEGORICAL_NAMES,
    DENSE_NAMES,
    MAX_BUCKETS,
    MAX_HEX_DIGITS,
    MISSING_BUCKET,
    NUM_CATEGORICAL,
    NUM_DENSE,
    SPLITS,
    _mix64,
    _null_mask,
    _salt,
    hash_to_buckets,
    hex_to_uint64,
    transform_dense,
    write_shard,
)

logger = logging.getLogger(__name__)

COLUMN_NAMES = ["label", *DENSE_NAMES, *CATEGORICAL_NAMES]
FIELDS_EXPECTED = f"{len(COLUMN_NAMES)} tab-separated fields (label, I1-I{NUM_DENSE}, C1-C{NUM_CATEGORICAL})"
# Bytes of text per Arrow block (~16k Criteo lines): enough rows to amortize the per-block numpy calls, small
# enough to stay in cache; 1-16 MiB measured alike. Tests lower it to cross block boundaries.
BLOCK_SIZE = 4 << 20
LOG_EVERY_ROWS = 1_000_000

_COLUMN_TYPES = {name: pa.string() if name.startswith("C") else pa.int64() for name in COLUMN_NAMES}
_CONVERSION_ERROR = re.compile(r"column #(?P<column>\d+): Row #(?P<row>\d+): .*invalid value '(?P<value>.*)'", re.S)
_NOT_HEX = f"is not hexadecimal (expected 1-{MAX_HEX_DIGITS} hex digits or empty)"


def list_input_files(path: str | Path) -> list[Path]:
    """A file, or a directory whose regular files (sorted by name; hidden files skipped) are all read."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"data.path={str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"data.path={str(path)!r} is neither a regular file nor a directory")
    files = sorted(
        (entry for entry in path.iterdir() if entry.is_file() and not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )
    if not files:
        raise ValueError(f"data.path={str(path)!r} is a directory with no (non-hidden) files to read")
    return files


def split_is_val(row_numbers: np.ndarray, *, seed: int, val_fraction: float) -> np.ndarray:
    """Whether each global row number goes to val: a hash of (row number, seed) below val_fraction."""
    mixed = _mix64(np.asarray(row_numbers, dtype=np.uint64) ^ np.uint64(_salt(seed, stream=2)))
    return (mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53 < val_fraction


def convert_criteo_tsv(
    files: list[Path],
    out_dir: Path,
    *,
    hash_buckets: list[int],
    val_fraction: float,
    max_rows: int | None,
    rows_per_shard: int,
    seed: int,
) -> dict:
    """Stream `files` in order into out_dir/{train,val}/part-%05d.parquet; return the counts.

    Raises ValueError naming the file, line and column for malformed input. Shards already written stay
    behind on error: the caller builds into a temporary directory and renames it only on success.
    """
    files = [Path(path) for path in files]
    settings = _Settings(tuple(hash_buckets), val_fraction, max_rows, rows_per_shard, seed)
    settings.check(files)
    converter = _Converter(Path(out_dir), settings=settings)
    for path in files:
        if max_rows is not None and converter.rows_read >= max_rows:
            break
        converter.convert_file(path)
    summary = converter.finish()
    _check_both_classes(summary)
    return summary


@dataclass(frozen=True)
class _Settings:
    hash_buckets: tuple[int, ...]
    val_fraction: float
    max_rows: int | None
    rows_per_shard: int
    seed: int

    def check(self, files: list[Path]) -> None:
        if not files:
            raise ValueError("no input files to convert (data.path)")
        if len(self.hash_buckets) != NUM_CATEGORICAL:
            raise ValueError(
                f"data.hash_buckets has {len(self.hash_buckets)} entries; expected {NUM_CATEGORICAL}, "
                f"one per categorical column C1-C{NUM_CATEGORICAL}"
            )
        for index, buckets in enumerate(self.hash_buckets):
            if not isinstance(buckets, int | np.integer) or not 2 <= buckets <= MAX_BUCKETS:
                raise ValueError(
                    f"data.hash_buckets[{index}] (column C{index + 1}) = {buckets!r} must be an integer in "
                    f"[2, {MAX_BUCKETS}]: bucket {MISSING_BUCKET} is kept for missing values"
                )
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"data.rows={self.max_rows} must be at least 1, or null to read every row")
        if self.rows_per_shard < 1:
            raise ValueError(f"data.rows_per_shard={self.rows_per_shard} must be at least 1")


class _Converter:
    """The state of one conversion: where rows go, how many were read, when progress was last logged."""

    def __init__(self, out_dir: Path, *, settings: _Settings):
        self.settings = settings
        self.sinks = {split: _ShardSink(out_dir / split, split=split, settings=settings) for split in SPLITS}
        self.files: list[str] = []
        self.rows_read = 0
        self.started = time.perf_counter()
        self.next_log = LOG_EVERY_ROWS

    def convert_file(self, path: Path) -> None:
        self.files.append(str(path))
        limit = self.settings.max_rows
        with closing(_iter_batches(path)) as batches:  # closes the file at once, even when _add raises
            for batch, first_line in batches:
                if limit is not None and self.rows_read + batch.num_rows >= limit:
                    self._add(batch.slice(0, limit - self.rows_read), path=path, first_line=first_line)
                    return
                self._add(batch, path=path, first_line=first_line)

    def _add(self, batch: pa.RecordBatch, *, path: Path, first_line: int) -> None:
        label, dense, sparse = _transform_batch(
            batch, path=path, first_line=first_line, hash_buckets=self.settings.hash_buckets
        )
        rows = np.arange(self.rows_read, self.rows_read + batch.num_rows, dtype=np.uint64)
        is_val = split_is_val(rows, seed=self.settings.seed, val_fraction=self.settings.val_fraction)
        for split, mask in (("train", ~is_val), ("val", is_val)):
            self.sinks[split].add(label[mask], dense[mask], sparse[mask])
        self.rows_read += batch.num_rows
        if self.rows_read >= self.next_log:
            self.next_log = (self.rows_read // LOG_EVERY_ROWS + 1) * LOG_EVERY_ROWS
            self._log_progress()

    def _log_progress(self) -> None:
        rate = self.rows_read / max(time.perf_counter() - self.started, 1e-9)
        current = self.files[-1] if self.files else None
        logger.info("read %d rows (%.0f rows/s), current file %s", self.rows_read, rate, current)

    def finish(self) -> dict:
        for sink in self.sinks.values():
            sink.close()
        self._log_progress()
        return {
            "train_rows": self.sinks["train"].rows,
            "val_rows": self.sinks["val"].rows,
            "positives": {split: sink.positives for split, sink in self.sinks.items()},
            "rows_read": self.rows_read,
            "files": list(self.files),
        }


class _ShardSink:
    """The rows of one split, buffered until a shard is full, then shuffled and written."""

    def __init__(self, directory: Path, *, split: str, settings: _Settings):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.rows_per_shard = settings.rows_per_shard
        # Seeds each shard's shuffle; SeedSequence takes only non-negative integers.
        self.seed = [settings.seed & _MASK64, SPLITS.index(split)]
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.shards = self.rows = self.positives = 0

    def add(self, label: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> None:
        self.rows += len(label)
        self.positives += int(np.count_nonzero(label))
        self.pending.append((label, dense, sparse))
        if sum(len(part[0]) for part in self.pending) < self.rows_per_shard:
            return
        # One concatenation per call, however many shards it fills: small shards must not make this quadratic.
        label, dense, sparse = (np.concatenate(parts) for parts in zip(*self.pending, strict=True))
        start = 0
        while len(label) - start >= self.rows_per_shard:
            end = start + self.rows_per_shard
            self._write(label[start:end], dense[start:end], sparse[start:end])
            start = end
        self.pending = [(label[start:], dense[start:], sparse[start:])]

    def close(self) -> None:
        if self.pending:
            label, dense, sparse = (np.concatenate(parts) for parts in zip(*self.pending, strict=True))
            if len(label):
                self._write(label, dense, sparse)
        self.pending = []

    def _write(self, label: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> None:
        # Rows arrive in file order, and Criteo's days are in time order: shuffle so a shard is not a time slice.
        order = np.random.default_rng([*self.seed, self.shards]).permutation(len(label))
        path = self.directory / f"part-{self.shards:05d}.parquet"
        write_shard(path, label=label[order], dense=dense[order], sparse=sparse[order])
        self.shards += 1


def _check_both_classes(summary: dict) -> None:
    names = summary["files"]
    files = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if summary["rows_read"] == 0:
        raise ValueError(f"no rows in {files}: the input is empty (data.path)")
    for split in SPLITS:
        rows, positives = summary[f"{split}_rows"], summary["positives"][split]
        if positives == 0 or positives == rows:
            raise ValueError(
                f"the {split} split of {files} has {positives} positive and {rows - positives} negative rows "
                f"({summary['rows_read']} rows read): AUC is undefined without both classes; use more rows "
                f"(data.max_rows) or another data.val_fraction"
            )


def _open_reader(stream: pa.NativeFile, *, on_invalid_row) -> csv.CSVStreamingReader:
    return csv.open_csv(
        stream,
        # Serial parsing: only then does Arrow count rows, for InvalidRow.number and for the "Row #" of its
        # conversion errors. The streaming reader parses one block at a time anyway; measured, no slower.
        read_options=csv.ReadOptions(column_names=COLUMN_NAMES, use_threads=False, block_size=BLOCK_SIZE),
        # No quoting in Criteo files: a stray '"' must not swallow tabs and newlines. Empty lines are kept (as
        # all-null rows, reported below) so that row k of the file is always line k.
        parse_options=csv.ParseOptions(
            delimiter="\t", quote_char=False, ignore_empty_lines=False, invalid_row_handler=on_invalid_row
        ),
        # Only an empty field is missing ("NA" in a C column is an error, not a null); bytes that are not
        # UTF-8 reach the hex check, which names the line, instead of failing the whole block.
        convert_options=csv.ConvertOptions(
            column_types=_COLUMN_TYPES, null_values=[""], strings_can_be_null=True, check_utf8=False
        ),
    )


def _iter_batches(path: Path) -> Iterator[tuple[pa.RecordBatch, int]]:
    """(batch, line number of its first row) for each block of one file; malformed input raises ValueError."""
    invalid_rows: list[csv.InvalidRow] = []

    def on_invalid_row(row: csv.InvalidRow) -> str:
        # Arrow prints and drops an exception raised here, so record the row and let Arrow stop with an error.
        invalid_rows.append(row)
        return "error"

    line = 1
    with pa.input_stream(str(path), compression="detect") as stream:
        try:
            reader = _open_reader(stream, on_invalid_row=on_invalid_row)
            while True:
                batch = reader.read_next_batch()
                yield batch, line
                line += batch.num_rows
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as error:  # OSError: a corrupt or truncated .gz
            if line == 1 and _is_empty(path):  # Arrow refuses an empty file; it simply has no rows
                logger.warning("%s is empty", path)
                return
            raise _read_error(path, line=line, error=error, invalid_rows=invalid_rows) from error


def _is_empty(path: Path) -> bool:
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            return not stream.read(1)
    except OSError:
        return False


def _read_error(path: Path, *, line: int, error: Exception, invalid_rows: list) -> ValueError:
    if invalid_rows:
        row = invalid_rows[0]
        return ValueError(
            f"{path} line {row.number}: expected {FIELDS_EXPECTED}, got {row.actual_columns}: {row.text[:120]!r}"
        )
    # Arrow names the column and the row (a file line: empty lines are rows here). Re-reading the failing
    # block as text would be cleaner but is not cheap: skip_rows must fit in the first block.
    found = _CONVERSION_ERROR.search(str(error))
    if found is None or int(found["column"]) >= len(COLUMN_NAMES):
        return ValueError(f"{path} at or after line {line}: cannot read as Criteo TSV: {error}")
    column = COLUMN_NAMES[int(found["column"])]
    problem = "expected 0 or 1" if column == "label" else "is not an integer (expected an integer or empty)"
    return _value_error(path, int(found["row"]), column, found["value"], problem)


def _value_error(path: Path, line: int, column: str, value, problem: str) -> ValueError:
    separator = ", " if problem.startswith("expected") else " "
    return ValueError(f"{path} line {line}: column {column} = {value!r}{separator}{problem}")


def _text(strings: pa.Array, index: int) -> str:
    # Through binary: check_utf8=False lets bytes that are not UTF-8 into string columns.
    raw = strings.cast(pa.binary())[index].as_py()
    return raw.decode("utf-8", errors="backslashreplace")


def _transform_batch(
    batch: pa.RecordBatch, *, path: Path, first_line: int, hash_buckets: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label float32 (n,), dense float32 (n, 13), sparse int32 (n, 26)) for one block of rows."""
    label = _labels(batch, path=path, first_line=first_line)
    values = np.empty((batch.num_rows, NUM_DENSE), dtype=np.int64)
    missing = np.zeros((batch.num_rows, NUM_DENSE), dtype=bool)
    for index, name in enumerate(DENSE_NAMES):
        column = batch.column(name)
        if column.null_count:
            missing[:, index] = _null_mask(column)
            column = pc.fill_null(column, 0)
        values[:, index] = column.to_numpy()
    sparse = np.empty((batch.num_rows, NUM_CATEGORICAL), dtype=np.int32)
    for index, name in enumerate(CATEGORICAL_NAMES):
        column = batch.column(name)
        parsed, absent, bad = hex_to_uint64(column)
        if bad is not None:
            raise _value_error(path, first_line + bad, name, _text(column, bad), _NOT_HEX)
        sparse[:, index] = hash_to_buckets(parsed, absent, table=index, buckets=hash_buckets[index])
    return label, transform_dense(values, missing), sparse


def _labels(batch: pa.RecordBatch, *, path: Path, first_line: int) -> np.ndarray:
    column = batch.column("label")
    if column.null_count:
        index = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        if not any(batch.column(name)[index].is_valid for name in COLUMN_NAMES):
            raise ValueError(f"{path} line {first_line + index} is empty; expected {FIELDS_EXPECTED}")
        raise ValueError(f"{path} line {first_line + index}: column label is empty, expected 0 or 1")
    values = column.to_numpy()
    bad = np.flatnonzero((values != 0) & (values != 1))
    if len(bad):
        raise _value_error(path, first_line + int(bad[0]), "label", int(values[bad[0]]), "expected 0 or 1")
    return values.astype(np.float32)
