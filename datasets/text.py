"""Prepare a text corpus once into packed token rows in parquet shards, keyed by a content fingerprint.

Layout of a prepared directory `<cache_root>/text-<fingerprint[:16]>/`:

    tokenizer.json            byte-level BPE trained on the train documents only, or a copy of data.tokenizer's
    tokenizer_config.json     with data.tokenizer: its copy (special tokens, chat template)
    train/part-00000.parquet  column `tokens`: fixed_size_list<int32>[seq_len + 1], rows shuffled with data.seed
    val/part-00000.parquet    same column, rows in document order
    meta.json                 written last: its presence marks the directory complete

The directory is built and renamed into place as datasets/cache.py describes.
"""

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from conf.schema import TextDataConfig
from datasets.cache import META_FILE, build_into_place, prepared_from_dict, read_meta, write_meta
from datasets.sources import Document, iter_documents
from datasets.tokenizer import (
    EOS_TOKEN,
    PRETRAINED_TOKENIZER_FILES,
    TOKENIZER_FILE,
    check_vocab_size,
    load_pretrained_tokenizer,
    tokenizer_digest,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

# Bump when the prepared layout or the packing changes, so old caches are not reused by new code.
FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Documents per encode_batch call: enough to keep the tokenizer's threads busy, small enough to stream.
ENCODE_BATCH_DOCS = 256


@dataclass(frozen=True)
class PreparedText:
    """Where prepared token rows live. Plain data (see to_dict) so it can travel to Ray workers."""

    root: str
    fingerprint: str
    tokenizer_path: str
    vocab_size: int  # the trained tokenizer's actual size, which may be below data.vocab_size on a tiny corpus
    seq_len: int  # a row holds seq_len + 1 tokens: inputs row[:-1], targets row[1:]
    train_rows: int
    val_rows: int
    train_dir: str
    val_dir: str
    eos_id: int

    def to_dict(self) -> dict:
        return asdict(self)

    def columns(self, split: str) -> list[str]:
        return ["tokens"]

    @classmethod
    def from_dict(cls, data: dict) -> "PreparedText":
        return prepared_from_dict(cls, data, what="text")


@dataclass(frozen=True)
class SplitRule:
    """Which documents are held out: a stable hash of the doc_id, plus overrides so neither split is empty."""

    val_fraction: float
    forced_val: str | None = None
    forced_train: str | None = None

    def is_val(self, doc_id: str) -> bool:
        if doc_id == self.forced_val:
            return True
        if doc_id == self.forced_train:
            return False
        return split_score(doc_id) < self.val_fraction


@dataclass(frozen=True)
class _CorpusScan:
    fingerprint: str
    split: SplitRule
    documents: int
    chars: int


def prepare_text(cfg: TextDataConfig, *, cache_root: str | Path, max_seq_len: int) -> PreparedText:
    """Return the prepared rows for `cfg`, building them unless a complete copy with the same fingerprint exists."""
    _validate(cfg, max_seq_len=max_seq_len)
    scan = _scan_corpus(cfg)
    target = Path(cache_root).expanduser().resolve() / f"text-{scan.fingerprint[:16]}"
    if _read_meta(target) is not None:
        logger.info("reusing prepared data at %s", target)
        return load_prepared_text(target)
    started = time.perf_counter()
    build_into_place(target, partial(_build, cfg, scan=scan), is_complete=lambda root: _read_meta(root) is not None)
    logger.info("prepared data at %s in %.1f s", target, time.perf_counter() - started)
    return load_prepared_text(target)


def load_prepared_text(root: str | Path) -> PreparedText:
    """Describe a complete prepared directory, with absolute paths."""
    root = Path(root).resolve()
    meta = _read_meta(root)
    if meta is None:
        raise ValueError(f"{root} is not a complete prepared text directory (no valid {META_FILE})")
    absolute = {key: str(root / meta[key]) for key in ("tokenizer_path", "train_dir", "val_dir")}
    return PreparedText.from_dict({**meta, **absolute, "root": str(root)})


def split_score(doc_id: str) -> float:
    """A number in [0, 1) fixed by the doc_id alone, so a document stays in its split when the corpus grows."""
    digest = hashlib.sha256(doc_id.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _validate(cfg: TextDataConfig, *, max_seq_len: int) -> None:
    if cfg.seq_len > max_seq_len:
        raise ValueError(
            f"data.seq_len={cfg.seq_len} exceeds model.max_seq_len={max_seq_len}; "
            f"lower data.seq_len or raise model.max_seq_len"
        )
    if cfg.seq_len < 1:
        raise ValueError(f"data.seq_len={cfg.seq_len} must be at least 1")
    if not 0 < cfg.val_fraction <= 0.5:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} must be in (0, 0.5]")
    if cfg.rows_per_shard < 1:
        raise ValueError(f"data.rows_per_shard={cfg.rows_per_shard} must be at least 1")
    if cfg.tokenizer is None:
        check_vocab_size(cfg.vocab_size)
    else:
        load_pretrained_tokenizer(cfg.tokenizer)  # a missing or broken tokenizer is named before any reading

def _settings(cfg: TextDataConfig) -> dict:
    # Only what changes the prepared rows; data.path is left out so a moved corpus keeps its cache.
    return {
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "column": cfg.column,
        # A pretrained tokenizer counts by its files' content; data.vocab_size only sizes BPE training.
        **({"vocab_size": cfg.vocab_size} if cfg.tokenizer is None else {"tokenizer": tokenizer_digest(cfg.tokenizer)}),
        "seq_len": cfg.seq_len,
        "val_fraction": cfg.val_fraction,
        "max_chars": cfg.max_chars,
        "rows_per_shard": cfg.rows_per_shard,
        "seed": cfg.seed,
    }


def _documents(cfg: TextDataConfig) -> Iterator[Document]:
    # An empty document adds nothing but an end-of-text token; the stdlib alone has hundreds of empty __init__.py.
    return (document for document in iter_documents(cfg) if document.text)


def _scan_corpus(cfg: TextDataConfig) -> _CorpusScan:
    """Read the corpus once: fingerprint its settings and content, and fix the train/val split."""
    digest = hashlib.sha256(json.dumps(_settings(cfg), sort_keys=True).encode())
    documents = chars = val_documents = 0
    lowest = highest = None  # (score, doc_id) of the documents that may be moved to keep both splits non-empty
    for document in _documents(cfg):
        for part in (document.doc_id, document.text):
            raw = part.encode("utf-8", errors="surrogatepass")
            digest.update(len(raw).to_bytes(8, "little"))  # length prefix: ("ab", "c") must differ from ("a", "bc")
            digest.update(raw)
        scored = (split_score(document.doc_id), document.doc_id)
        lowest = scored if lowest is None else min(lowest, scored)
        highest = scored if highest is None else max(highest, scored)
        val_documents += scored[0] < cfg.val_fraction
        documents += 1
        chars += len(document.text)
    if documents == 0:
        raise ValueError(f"empty corpus: data.source={cfg.source!r} data.path={cfg.path!r} has no text")
    if documents < 2:
        raise ValueError(
            f"data.source={cfg.source!r} data.path={cfg.path!r} has only one document; "
            f"at least two are needed to hold out a validation split (data.val_fraction)"
        )
    split = SplitRule(
        val_fraction=cfg.val_fraction,
        forced_val=lowest[1] if val_documents == 0 else None,
        forced_train=highest[1] if val_documents == documents else None,
    )
    logger.info("read %d documents (%d characters) from data.source=%r", documents, chars, cfg.source)
    return _CorpusScan(fingerprint=digest.hexdigest(), split=split, documents=documents, chars=chars)


def _build(cfg: TextDataConfig, directory: Path, *, scan: _CorpusScan) -> None:
    tokenizer, eos_token = _tokenizer_into(directory, cfg, split=scan.split)
    tokens, documents = _tokenize_splits(cfg, tokenizer=tokenizer, eos_token=eos_token, split=scan.split)
    rows = {name: _pack_rows(tokens[name], seq_len=cfg.seq_len, split=name) for name in SPLITS}
    rows["train"] = rows["train"][np.random.default_rng(cfg.seed).permutation(len(rows["train"]))]
    for name in SPLITS:
        shards = _write_shards(rows[name], directory=directory / name, rows_per_shard=cfg.rows_per_shard)
        logger.info("wrote %d %s rows of %d tokens in %d shards", len(rows[name]), name, cfg.seq_len + 1, shards)
    meta = {
        "fingerprint": scan.fingerprint,
        "tokenizer_path": TOKENIZER_FILE,
        "vocab_size": tokenizer.get_vocab_size(),
        "seq_len": cfg.seq_len,
        "train_rows": len(rows["train"]),
        "val_rows": len(rows["val"]),
        "train_dir": "train",
        "val_dir": "val",
        "eos_id": tokenizer.token_to_id(eos_token),
        "documents": documents,
        "tokens": {name: len(tokens[name]) for name in SPLITS},
        "settings": _settings(cfg),
    }
    write_meta(directory, meta)


def _tokenizer_into(directory: Path, cfg: TextDataConfig, *, split: SplitRule) -> tuple[Tokenizer, str]:
    """The tokenizer the rows are encoded with, saved into the prepared directory (exports copy it from there):
    data.tokenizer's files as they are, or a BPE trained on the train documents."""
    if cfg.tokenizer is not None:
        tokenizer, eos_token = load_pretrained_tokenizer(cfg.tokenizer)
        for name in PRETRAINED_TOKENIZER_FILES:
            if (Path(cfg.tokenizer) / name).is_file():
                shutil.copyfile(Path(cfg.tokenizer) / name, directory / name)
        logger.info("using the pretrained tokenizer of %s (vocab %d)", cfg.tokenizer, tokenizer.get_vocab_size())
        return tokenizer, eos_token
    started = time.perf_counter()
    train_texts = (doc.text for doc in _documents(cfg) if not split.is_val(doc.doc_id))
    tokenizer = train_tokenizer(train_texts, vocab_size=cfg.vocab_size)
    tokenizer.save(str(directory / TOKENIZER_FILE))
    logger.info("trained tokenizer (vocab %d) in %.1f s", tokenizer.get_vocab_size(), time.perf_counter() - started)
    return tokenizer, EOS_TOKEN


def _tokenize_splits(
    cfg: TextDataConfig, *, tokenizer: Tokenizer, eos_token: str, split: SplitRule
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Each split as one stream of token ids, every document followed by the end-of-text token (and preceded by
    whatever the tokenizer's post-processor adds, e.g. a pretrained Llama tokenizer's begin-of-text)."""
    eos_id = tokenizer.token_to_id(eos_token)
    # Text that happens to contain "<|endoftext|>" must stay text, not forge a document boundary.
    tokenizer.encode_special_tokens = True
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    for batch in _batched(_documents(cfg), size=ENCODE_BATCH_DOCS):
        encodings = tokenizer.encode_batch_fast([doc.text for doc in batch],
                                                add_special_tokens=cfg.tokenizer is not None)
        ids: dict[str, list[int]] = {name: [] for name in SPLITS}
        for doc, encoding in zip(batch, encodings, strict=True):
            name = "val" if split.is_val(doc.doc_id) else "train"
            ids[name].extend(encoding.ids)
            ids[name].append(eos_id)
            documents[name] += 1
        for name in SPLITS:
            pieces[name].append(np.array(ids[name], dtype=np.int32))
    tokens = {name: np.concatenate(pieces[name]) for name in SPLITS}
    logger.info(
        "tokenized train: %d documents, %d tokens; val: %d documents, %d tokens",
        documents["train"],
        len(tokens["train"]),
        documents["val"],
        len(tokens["val"]),
    )
    return tokens, documents


def _batched(documents: Iterator[Document], *, size: int) -> Iterator[list[Document]]:
    # itertools.batched arrives only in Python 3.12.
    while batch := list(islice(documents, size)):
        yield batch


def _pack_rows(tokens: np.ndarray, *, seq_len: int, split: str) -> np.ndarray:
    # Non-overlapping rows; the remainder shorter than a row is dropped.
    width = seq_len + 1
    count = len(tokens) // width
    if count == 0:
        raise ValueError(
            f"data.seq_len={seq_len} needs {width} tokens per row but the {split} split has only {len(tokens)} "
            f"tokens; lower data.seq_len or use more data (data.max_chars, data.val_fraction)"
        )
    return tokens[: count * width].reshape(count, width)


def _write_shards(rows: np.ndarray, *, directory: Path, rows_per_shard: int) -> int:
    directory.mkdir()
    width = rows.shape[1]
    starts = range(0, len(rows), rows_per_shard)
    for index, start in enumerate(starts):
        flat = np.ascontiguousarray(rows[start : start + rows_per_shard]).reshape(-1)
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.int32()), width)
        pq.write_table(pa.table({"tokens": column}), directory / f"part-{index:05d}.parquet")
    return len(starts)


def _read_meta(root: Path) -> dict | None:
    return read_meta(root, required={field.name for field in fields(PreparedText)} - {"root"})
