"""Prepare fine-tuning examples once into token rows with loss masks, in parquet shards keyed by a fingerprint.

Two formats, one JSON object per line (datasets/chat_records.py reads them and refuses a bad line by number):

    chat_jsonl               {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
    prompt_completion_jsonl  {"prompt": "...", "completion": "..."}

A conversation is rendered with the model's chat template (tokenizer_config.json, rendered as transformers
renders it: datasets/chat_template.py) and tokenized with the model's tokenizer.json; the loss covers the
assistant's text and its end-of-turn token. A prompt/completion pair is the prompt's tokens (with the
tokenizer's BOS), the completion's and the end-of-sequence token; the loss covers the completion and that token.

Layout of a prepared directory `<cache_root>/chat-<fingerprint[:16]>/`:

    tokenizer.json, tokenizer_config.json   copies of the model's files that rendered and tokenized the rows
    train/part-00000.parquet  rows shuffled with data.seed, three columns:
        tokens        fixed_size_list<int32>[seq_len + 1]  inputs row[:-1], targets row[1:]
        loss_mask     fixed_size_list<int8>[seq_len]       1 where the target token is trained on
        document_ids  fixed_size_list<int32>[seq_len]      which example each input position belongs to
    val/part-00000.parquet    same columns
    meta.json                 written last: its presence marks the directory complete

With data.packing several whole examples share a row; the model gets `document_ids` and attends only within
an example, with positions restarting at each example (trainers/llm.py document_layout), so an example's
logits in a packed row are the ones it gets alone. Without packing each example has its own row. Either way
the padding after the last example is a document of its own and its targets are masked out.
"""

import hashlib
import json
import logging
import shutil
import time
from bisect import bisect_left, insort
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Encoding, Tokenizer

from conf.schema import ChatDataConfig, ChatFormat
from datasets.cache import META_FILE, build_into_place, prepared_from_dict, read_meta, write_meta
from datasets.chat_records import Record, iter_records, record_error
from datasets.chat_template import ChatTemplate, ChatTemplateError
from datasets.text import split_score
from datasets.tokenizer import (
    PRETRAINED_TOKENIZER_FILES,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    load_pretrained_tokenizer,
)

logger = logging.getLogger(__name__)

# Bump when the prepared layout, the masking or the packing changes, so old caches are not reused by new code.
FORMAT_VERSION = 1
TOKENIZER_FILES = PRETRAINED_TOKENIZER_FILES  # both are needed: the tokenizer, and the template with the EOS
SPLITS = ("train", "val")
COLUMNS = ["tokens", "loss_mask", "document_ids"]
# Examples per encode_batch call: enough to keep the tokenizer's threads busy, small enough to stream.
ENCODE_BATCH = 256
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class PreparedChat:
    """Where prepared fine-tuning rows live. Plain data (see to_dict) so it can travel to Ray workers."""

    root: str
    fingerprint: str
    tokenizer_path: str  # the model's tokenizer.json (a copy inside root)
    tokenizer_config_path: str  # the model's tokenizer_config.json, with the chat template (a copy inside root)
    vocab_size: int  # the tokenizer's size; a checkpoint's embedding table may be padded beyond it
    seq_len: int  # a row holds seq_len + 1 tokens: inputs row[:-1], targets row[1:]
    train_rows: int
    val_rows: int
    train_dir: str
    val_dir: str
    eos_id: int  # tokenizer_config.json's eos_token: ends a completion, and fills padding (never trained on)

    def to_dict(self) -> dict:
        return asdict(self)

    def columns(self, split: str) -> list[str]:
        return list(COLUMNS)

    @classmethod
    def from_dict(cls, data: dict) -> "PreparedChat":
        return prepared_from_dict(cls, data, what="chat")


@dataclass(frozen=True)
class Example:
    """One tokenized example: its tokens and, per token, whether predicting the *next* token is trained on."""

    tokens: np.ndarray  # int32 (length,)
    targets: np.ndarray  # int8 (length,): targets[i] = 1 when tokens[i + 1] is trained; the last entry is 0
    score: float  # split_score of its line: which split it belongs to


@dataclass(frozen=True)
class _Model:
    """What preparation needs from the model's tokenizer directory."""

    tokenizer: Tokenizer
    template: ChatTemplate | None  # only chat_jsonl renders conversations
    eos_id: int


def prepare_chat(cfg: ChatDataConfig, *, cache_root: str | Path, tokenizer_dir: Path,
                 max_seq_len: int) -> PreparedChat:
    """Return the prepared rows for `cfg`, building them unless a complete copy with the same fingerprint exists."""
    _validate(cfg, max_seq_len=max_seq_len)
    data_file = _data_file(cfg)
    tokenizer_dir = _tokenizer_dir(tokenizer_dir)
    fingerprint = _fingerprint(cfg, data_file=data_file, tokenizer_dir=tokenizer_dir)
    target = Path(cache_root).expanduser().resolve() / f"chat-{fingerprint[:16]}"
    if _read_meta(target) is not None:
        logger.info("reusing prepared fine-tuning data at %s", target)
        return load_prepared_chat(target)
    started = time.perf_counter()
    build = partial(_build, cfg, data_file=data_file, tokenizer_dir=tokenizer_dir, fingerprint=fingerprint)
    build_into_place(target, build, is_complete=lambda root: _read_meta(root) is not None)
    logger.info("prepared fine-tuning data at %s in %.1f s", target, time.perf_counter() - started)
    return load_prepared_chat(target)


def load_prepared_chat(root: str | Path) -> PreparedChat:
    """Describe a complete prepared directory, with absolute paths."""
    root = Path(root).resolve()
    meta = _read_meta(root)
    if meta is None:
        raise ValueError(f"{root} is not a complete prepared chat directory (no valid {META_FILE})")
    keys = ("tokenizer_path", "tokenizer_config_path", "train_dir", "val_dir")
    return PreparedChat.from_dict({**meta, **{key: str(root / meta[key]) for key in keys}, "root": str(root)})


def _validate(cfg: ChatDataConfig, *, max_seq_len: int) -> None:
    if cfg.seq_len > max_seq_len:
        raise ValueError(f"data.seq_len={cfg.seq_len} exceeds model.max_seq_len={max_seq_len}; "
                         "lower data.seq_len or raise model.max_seq_len")
    if cfg.seq_len < 1:
        raise ValueError(f"data.seq_len={cfg.seq_len} must be at least 1")
    if not 0 < cfg.val_fraction <= 0.5:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} must be in (0, 0.5]")
    if cfg.rows_per_shard < 1:
        raise ValueError(f"data.rows_per_shard={cfg.rows_per_shard} must be at least 1")
    if cfg.format not in tuple(ChatFormat):
        raise ValueError(f"data.format={cfg.format!r} must be one of {', '.join(ChatFormat)}")


def _data_file(cfg: ChatDataConfig) -> Path:
    if not cfg.path:
        raise ValueError(f"data.path is required for data.format={cfg.format}: a .jsonl file; got null")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise ValueError(f"data.path={cfg.path!r} is not a file; data.format={cfg.format} expects one .jsonl file")
    return path


def _tokenizer_dir(tokenizer_dir: Path) -> Path:
    directory = Path(tokenizer_dir).expanduser()
    for name in TOKENIZER_FILES:
        if not (directory / name).is_file():
            raise ValueError(f"{directory / name} does not exist; fine-tuning data is tokenized with the model's "
                             f"own tokenizer: a Hugging Face checkpoint directory with {' and '.join(TOKENIZER_FILES)}")
    return directory


def _settings(cfg: ChatDataConfig) -> dict:
    # Only what changes the prepared rows; data.path and the tokenizer's directory are left out (their files'
    # bytes are fingerprinted), so moved files keep their cache.
    fields_read = ([cfg.messages_field] if cfg.format == ChatFormat.chat_jsonl
                   else [cfg.prompt_field, cfg.completion_field])
    return {"format_version": FORMAT_VERSION, "format": str(cfg.format), "fields": fields_read,
            "seq_len": cfg.seq_len, "packing": cfg.packing, "val_fraction": cfg.val_fraction,
            "rows_per_shard": cfg.rows_per_shard, "seed": cfg.seed}


def _fingerprint(cfg: ChatDataConfig, *, data_file: Path, tokenizer_dir: Path) -> str:
    """Settings, the data file's bytes and every tokenizer file's bytes: a new chat template, special token or
    vocabulary changes the rows as surely as new data does."""
    digest = hashlib.sha256(json.dumps(_settings(cfg), sort_keys=True).encode())
    for path in (data_file, *(tokenizer_dir / name for name in TOKENIZER_FILES)):
        digest.update(path.stat().st_size.to_bytes(8, "little"))  # length prefix: file boundaries stay distinct
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _load_model_files(cfg: ChatDataConfig, tokenizer_dir: Path) -> _Model:
    tokenizer, eos = load_pretrained_tokenizer(tokenizer_dir)  # its eos_token ends a completion
    config_path = tokenizer_dir / TOKENIZER_CONFIG_FILE
    template = ChatTemplate.from_tokenizer_config(config_path) if cfg.format == ChatFormat.chat_jsonl else None
    return _Model(tokenizer=tokenizer, template=template, eos_id=tokenizer.token_to_id(eos))


def _build(cfg: ChatDataConfig, directory: Path, *, data_file: Path, tokenizer_dir: Path, fingerprint: str) -> None:
    model = _load_model_files(cfg, tokenizer_dir)
    examples = _keep_fitting(list(_examples(cfg, data_file=data_file, model=model)), seq_len=cfg.seq_len,
                             path=data_file)
    splits = _split(examples, val_fraction=cfg.val_fraction, path=data_file)
    rng = np.random.default_rng(cfg.seed)
    rows, stats = {}, {}
    for name in SPLITS:
        groups = _pack(splits[name], width=cfg.seq_len + 1) if cfg.packing else [[e] for e in splits[name]]
        rows[name] = _assemble_rows(groups, seq_len=cfg.seq_len, pad_id=model.eos_id)
        if name == "train":  # shuffled once here, with data.seed; packing had ordered them by length
            order = rng.permutation(len(groups))
            rows[name] = {column: values[order] for column, values in rows[name].items()}
        stats[name] = _split_stats(splits[name], rows[name])
        shards = _write_shards(rows[name], directory=directory / name, rows_per_shard=cfg.rows_per_shard)
        logger.info("wrote %d %s rows (%d examples, %.0f%% of token slots used, %d trained tokens) in %d shards",
                    len(groups), name, len(splits[name]), 100 * stats[name]["fill"], stats[name]["trained_tokens"],
                    shards)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, directory / name)
    write_meta(directory, {
        "fingerprint": fingerprint, "tokenizer_path": TOKENIZER_FILE, "tokenizer_config_path": TOKENIZER_CONFIG_FILE,
        "vocab_size": model.tokenizer.get_vocab_size(), "seq_len": cfg.seq_len,
        "train_rows": len(rows["train"]["tokens"]), "val_rows": len(rows["val"]["tokens"]),
        "train_dir": "train", "val_dir": "val", "eos_id": model.eos_id, "stats": stats, "settings": _settings(cfg),
    })


def _examples(cfg: ChatDataConfig, *, data_file: Path, model: _Model) -> Iterator[Example]:
    """Every line of the data file as an Example, tokenized in batches, with progress on long files."""
    records = iter_records(cfg, path=data_file)
    started = last_log = time.perf_counter()
    count = 0
    while batch := list(islice(records, ENCODE_BATCH)):
        if cfg.format == ChatFormat.chat_jsonl:
            yield from _chat_examples(batch, model=model, path=data_file)
        else:
            yield from _completion_examples(batch, model=model)
        count += len(batch)
        if time.perf_counter() - last_log > PROGRESS_EVERY_S:
            last_log = time.perf_counter()
            logger.info("tokenized %d examples of %s (%.0f s)", count, data_file, last_log - started)
    if count == 0:
        raise ValueError(f"{data_file} has no examples (it is empty or every line is blank); expected one JSON "
                         f"object per line (data.format={cfg.format})")
    logger.info("tokenized %d examples of %s in %.1f s", count, data_file, time.perf_counter() - started)


def _chat_examples(batch: list[Record], *, model: _Model, path: Path) -> Iterator[Example]:
    texts, spans = [], []
    for record in batch:
        try:
            texts.append(model.template.render(record.messages))
            spans.append(model.template.assistant_spans(record.messages))
        except ChatTemplateError as err:
            raise record_error(path, record.line, str(err)) from None
    # No special tokens added: the template writes BOS and every other special token itself, as text.
    encodings = model.tokenizer.encode_batch(texts, add_special_tokens=False)
    for record, encoding, record_spans in zip(batch, encodings, spans, strict=True):
        trained = _tokens_in_spans(encoding, record_spans)
        yield _example(np.array(encoding.ids, dtype=np.int32), trained, score=split_score(record.text))


def _tokens_in_spans(encoding: Encoding, spans: list[tuple[int, int]]) -> np.ndarray:
    """Whether each token overlaps an assistant span: a token that straddles the span's start (a merge across
    the boundary) counts as the assistant's, as transformers' assistant mask counts it (char_to_token of the
    span's first character)."""
    offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    trained = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        trained |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return trained


def _completion_examples(batch: list[Record], *, model: _Model) -> Iterator[Example]:
    # The prompt gets the tokenizer's special tokens (its BOS) as a plain `tokenizer(prompt)` would; the
    # completion is encoded apart so the boundary between them is a token boundary, then the EOS ends it.
    prompts = model.tokenizer.encode_batch_fast([record.prompt for record in batch], add_special_tokens=True)
    completions = model.tokenizer.encode_batch_fast([record.completion for record in batch], add_special_tokens=False)
    for record, prompt, completion in zip(batch, prompts, completions, strict=True):
        tokens = np.array([*prompt.ids, *completion.ids, model.eos_id], dtype=np.int32)
        trained = np.zeros(len(tokens), dtype=bool)
        trained[len(prompt.ids):] = True
        yield _example(tokens, trained, score=split_score(record.text))


def _example(tokens: np.ndarray, trained: np.ndarray, *, score: float) -> Example:
    # Position i predicts token i + 1, so the mask moves one to the left; an example's last position would
    # predict whatever follows it in a packed row (another example), which is never trained.
    targets = np.zeros(len(tokens), dtype=np.int8)
    targets[:-1] = trained[1:]
    return Example(tokens=tokens, targets=targets, score=score)


def _keep_fitting(examples: list[Example], *, seq_len: int, path: Path) -> list[Example]:
    """Examples that fit a row. Longer ones are dropped, not truncated: a cut conversation would teach an answer
    that stops mid-sentence without its end-of-turn token (or, cut in the prompt, no answer at all), and
    packing never splits an example across rows because each row is attended to on its own."""
    width = seq_len + 1
    kept = [example for example in examples if len(example.tokens) <= width]
    dropped = len(examples) - len(kept)
    if not kept:
        shortest = min(len(example.tokens) for example in examples)
        raise ValueError(f"every example of {path} is longer than data.seq_len + 1 = {width} tokens (the shortest "
                         f"has {shortest}); raise data.seq_len")
    if dropped:
        longest = max(len(example.tokens) for example in examples)
        logger.warning("dropped %d of %d examples of %s longer than data.seq_len + 1 = %d tokens (the longest has "
                       "%d); raise data.seq_len to keep them", dropped, len(examples), path, width, longest)
    return kept


def _split(examples: list[Example], *, val_fraction: float, path: Path) -> dict[str, list[Example]]:
    """Hold out examples by a stable hash of their line, so an example keeps its split when the file grows
    (and duplicate lines share one); the lowest or highest scored example moves if a split would be empty."""
    if len(examples) < 2:
        raise ValueError(f"{path} has only {len(examples)} usable example; at least two are needed to hold out a "
                         "validation split (data.val_fraction)")
    is_val = [example.score < val_fraction for example in examples]
    scores = [example.score for example in examples]
    if not any(is_val):
        is_val[int(np.argmin(scores))] = True
    if all(is_val):
        is_val[int(np.argmax(scores))] = False
    return {"train": [e for e, val in zip(examples, is_val, strict=True) if not val],
            "val": [e for e, val in zip(examples, is_val, strict=True) if val]}


def _pack(examples: list[Example], *, width: int) -> list[list[Example]]:
    """Best-fit decreasing: each example, longest first, goes into the fullest row it still fits (a new row
    if none), which leaves little padding. `rooms` holds (free slots, row index) of rows not yet full, sorted."""
    order = sorted(range(len(examples)), key=lambda index: (-len(examples[index].tokens), index))
    groups: list[list[Example]] = []
    rooms: list[tuple[int, int]] = []
    for index in order:
        length = len(examples[index].tokens)
        place = bisect_left(rooms, (length, -1))
        if place == len(rooms):
            groups.append([])
            room, row = width, len(groups) - 1
        else:
            room, row = rooms.pop(place)
        groups[row].append(examples[index])
        if room - length > 0:
            insort(rooms, (room - length, row))
    return groups


def _assemble_rows(groups: list[list[Example]], *, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The three columns for rows holding `groups` of examples end to end, then padding."""
    width = seq_len + 1
    tokens = np.full((len(groups), width), pad_id, dtype=np.int32)
    loss_mask = np.zeros((len(groups), width), dtype=np.int8)
    document_ids = np.zeros((len(groups), width), dtype=np.int32)
    for row, group in enumerate(groups):
        at = 0
        for document, example in enumerate(group):
            end = at + len(example.tokens)
            tokens[row, at:end], loss_mask[row, at:end], document_ids[row, at:end] = (
                example.tokens, example.targets, document)
            at = end
        document_ids[row, at:] = len(group)  # padding is a document of its own: no example attends to it
    return {"tokens": tokens, "loss_mask": loss_mask[:, :seq_len], "document_ids": document_ids[:, :seq_len]}


def conversations_of(tokens: np.ndarray, loss_mask: np.ndarray,
                     document_ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per conversation of fine-tuning rows (as _assemble_rows lays them out: whole conversations packed in
    rows, `document_ids` per input position, `loss_mask[p]` whether the token after position p is trained):
    its tokens before its first trained one, the prompt a client would have sent, and its trained tokens, the
    answers it was taught. Padding trains nothing: skipped."""
    pairs = []
    for row, mask, documents in zip(tokens, loss_mask, document_ids, strict=True):
        starts = np.flatnonzero(np.r_[True, documents[1:] != documents[:-1]])
        for start, end in zip(starts, [*starts[1:], len(documents)], strict=True):
            trained = np.flatnonzero(mask[start:end])
            if trained.size:  # position p predicts token p + 1, the first trained one
                targets = start + trained + 1
                pairs.append((row[start : start + int(trained[0]) + 1], row[targets[targets < len(row)]]))
    return pairs


def prompts_of(tokens: np.ndarray, loss_mask: np.ndarray, document_ids: np.ndarray) -> list[np.ndarray]:
    """Each conversation's prompt (see conversations_of)."""
    return [prompt for prompt, _ in conversations_of(tokens, loss_mask, document_ids)]


def _split_stats(examples: list[Example], rows: dict[str, np.ndarray]) -> dict:
    used = sum(len(example.tokens) for example in examples)
    return {"examples": len(examples), "tokens": used, "trained_tokens": int(rows["loss_mask"].sum()),
            "fill": used / max(rows["tokens"].size, 1)}


def _write_shards(rows: dict[str, np.ndarray], *, directory: Path, rows_per_shard: int) -> int:
    directory.mkdir()
    types = {"tokens": pa.int32(), "loss_mask": pa.int8(), "document_ids": pa.int32()}
    starts = range(0, len(rows["tokens"]), rows_per_shard)
    for index, start in enumerate(starts):
        columns = {}
        for name in COLUMNS:
            part = rows[name][start : start + rows_per_shard]
            flat = pa.array(np.ascontiguousarray(part).reshape(-1), type=types[name])
            columns[name] = pa.FixedSizeListArray.from_arrays(flat, part.shape[1])
        pq.write_table(pa.table(columns), directory / f"part-{index:05d}.parquet")
    return len(starts)


def _read_meta(root: Path) -> dict | None:
    return read_meta(root, required={field.name for field in fields(PreparedChat)} - {"root"})
