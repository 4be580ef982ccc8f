"""Text corpora as a deterministic stream of documents.

Every source yields documents in sorted order so that the content fingerprint, the train/val split and the
`data.max_chars` cap are the same on every machine and every run.
"""

import json
import logging
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conf.schema import TextDataConfig

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
# Rows per pyarrow batch when streaming a parquet source: small enough to bound memory, big enough to be fast.
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Document:
    doc_id: str  # stable across machines: a path relative to the source root, with a line or row number
    text: str


def iter_documents(cfg: TextDataConfig) -> Iterator[Document]:
    """Yield the documents of `cfg.source` in sorted order, stopping once `cfg.max_chars` have been yielded.

    The configuration is checked here, before the first document is read, so a wrong key fails at once rather
    than when the caller first pulls from the iterator.
    """
    if cfg.max_chars is not None and cfg.max_chars <= 0:
        raise ValueError(f"data.max_chars={cfg.max_chars} must be a positive number of characters or null")
    if cfg.source in PATH_SOURCES:
        _check_path(cfg)
    read = SOURCES[cfg.source]
    return _cap_chars(read(cfg), max_chars=cfg.max_chars)


def _cap_chars(documents: Iterator[Document], *, max_chars: int | None) -> Iterator[Document]:
    # Whole documents only: the document that crosses the cap is kept, so no document is ever cut in half.
    total = 0
    for document in documents:
        yield document
        total += len(document.text)
        if max_chars is not None and total >= max_chars:
            return


def _iter_stdlib(cfg: TextDataConfig) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = 0
    for relative in _sorted_files(root, suffixes=(".py",), skip_dirs={"site-packages", "__pycache__"}):
        try:
            text = (root / relative).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            # A few test fixtures of the standard library are deliberately not UTF-8; they are not useful text.
            skipped += 1
            continue
        yield Document(doc_id=relative, text=text)
    logger.debug("stdlib source: skipped %d files that are not UTF-8", skipped)


def _iter_text_dir(cfg: TextDataConfig) -> Iterator[Document]:
    root = Path(cfg.path).expanduser()
    for relative in _sorted_files(root, suffixes=(*TEXT_SUFFIXES, JSONL_SUFFIX), skip_dirs=set()):
        path = root / relative
        if relative.endswith(JSONL_SUFFIX):
            yield from _iter_jsonl(path, relative=relative, field=cfg.column)
        else:
            yield Document(doc_id=relative, text=_read_utf8(path))


def _iter_jsonl(path: Path, *, relative: str, field: str) -> Iterator[Document]:
    with path.open("rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            line = _decode_utf8(raw, path=path, where=f"line {line_number}")
            if not line.strip():
                continue  # blank lines (a trailing newline, hand-edited files) carry no record
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}: line {line_number} is not valid JSON ({error.msg}); expected one object per line "
                    f"with a string field {field!r} (data.column)"
                ) from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}: line {line_number} has no string field {field!r} (data.column); "
                    f"expected one JSON object per line with the text in that field"
                )
            _check_encodable(text, path=path, where=f"line {line_number}", field=field)
            yield Document(doc_id=f"{relative}:{line_number}", text=text)


def _check_encodable(text: str, *, path: Path, where: str, field: str) -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 text holds: the tokenizer and the
    parquet writer would fail on it much later, so the file and line are named now."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{path}: {where} field {field!r} (data.column) holds a lone surrogate {text[error.start]!r} at "
            f"character {error.start} (an unpaired \\uD800-\\uDFFF escape); expected text that is valid Unicode"
        ) from None


def _iter_parquet(cfg: TextDataConfig) -> Iterator[Document]:
    path = Path(cfg.path).expanduser()
    if path.is_file():
        files = [(path.name, path)]
    else:
        files = [(relative, path / relative) for relative in _sorted_files(path, suffixes=(".parquet",))]
    for relative, file in files:
        yield from _iter_parquet_file(file, relative=relative, column=cfg.column)


def _iter_parquet_file(path: Path, *, relative: str, column: str) -> Iterator[Document]:
    with pq.ParquetFile(path) as parquet:
        _check_text_column(parquet.schema_arrow, path=path, column=column)
        row = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
            for text in batch.column(0).to_pylist():
                if text is not None:  # a null is a missing document, not an empty one
                    yield Document(doc_id=f"{relative}:{row}", text=text)
                row += 1


def _check_text_column(schema: pa.Schema, *, path: Path, column: str) -> None:
    if column not in schema.names:
        raise ValueError(f"{path}: no column {column!r} (data.column); the columns present are {schema.names}")
    column_type = schema.field(column).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(f"{path}: column {column!r} (data.column) has type {column_type}; expected a string column")


def _check_path(cfg: TextDataConfig) -> None:
    expected = PATH_SOURCES[cfg.source]
    if cfg.path is None:
        raise ValueError(f"data.path is required for data.source={cfg.source!r} (a {expected}); got null")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ValueError(f"data.path={cfg.path!r} does not exist; data.source={cfg.source!r} expects a {expected}")
    if expected == "directory" and not path.is_dir():
        raise ValueError(f"data.path={cfg.path!r} is not a directory; data.source={cfg.source!r} expects one")


def _sorted_files(root: Path, *, suffixes: tuple[str, ...], skip_dirs: set[str] | None = None) -> list[str]:
    """Paths under `root` (relative, '/'-separated) ending in one of `suffixes`, sorted, symlinked dirs not followed."""
    skip_dirs = skip_dirs or set()
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in skip_dirs]
        relative_dir = Path(directory).relative_to(root)
        found.extend((relative_dir / name).as_posix() for name in files if name.endswith(suffixes))
    return sorted(found)


def _read_utf8(path: Path) -> str:
    return _decode_utf8(path.read_bytes(), path=path, where="the file")


def _decode_utf8(raw: bytes, *, path: Path, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: {where} is not valid UTF-8 (byte {error.start}); expected UTF-8 text") from None


# Sources that read `data.path`, and what it must be.
PATH_SOURCES = {"text_dir": "directory", "parquet": "parquet file or directory"}
SOURCES: dict[str, Callable[[TextDataConfig], Iterator[Document]]] = {
    "stdlib": _iter_stdlib,
    "text_dir": _iter_text_dir,
    "parquet": _iter_parquet,
}
