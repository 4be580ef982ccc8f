import json
import logging
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import datasets.text
from conf.schema import TextDataConfig
from datasets.text import PreparedText, load_prepared_text, prepare_text
from datasets.tokenizer import EOS_TOKEN, load_tokenizer

STDLIB = TextDataConfig(source="stdlib", max_chars=200_000, vocab_size=320, seq_len=32, rows_per_shard=64)
MARKER = re.compile(r"<d(\d{3})>")


def read_rows(directory):
    shards = sorted(Path(directory).glob("part-*.parquet"))
    return [pq.read_table(shard) for shard in shards]


def marker_corpus(directory, *, documents=40):
    """Documents that each repeat their own marker, so decoded rows tell which document they came from."""
    directory.mkdir()
    for index in range(documents):
        (directory / f"doc{index:03d}.txt").write_text(f"<d{index:03d}> words and more words " * 30)
    return directory


def markers_in(rows, tokenizer):
    found = set()
    for row in rows:
        found.update(MARKER.findall(tokenizer.decode(row.tolist())))
    return found


def as_matrix(tables):
    return np.concatenate([np.array(table["tokens"].to_pylist(), dtype=np.int32) for table in tables])


@pytest.fixture(scope="module")
def stdlib_prepared(tmp_path_factory):
    return prepare_text(STDLIB, cache_root=tmp_path_factory.mktemp("cache"), max_seq_len=64)


def test_shards_have_fixed_size_int32_rows_and_expected_counts(stdlib_prepared):
    prepared = stdlib_prepared
    for directory, expected_rows in ((prepared.train_dir, prepared.train_rows), (prepared.val_dir, prepared.val_rows)):
        tables = read_rows(directory)
        assert [len(table) for table in tables[:-1]] == [STDLIB.rows_per_shard] * (len(tables) - 1)
        assert sum(len(table) for table in tables) == expected_rows > 0
        assert all(table.schema.field("tokens").type == pa.list_(pa.int32(), STDLIB.seq_len + 1) for table in tables)
        assert all(table.column_names == ["tokens"] for table in tables)
    assert [shard.name for shard in sorted(Path(prepared.train_dir).iterdir())][:2] == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    matrix = as_matrix(read_rows(prepared.train_dir))
    assert matrix.min() >= 0 and matrix.max() < prepared.vocab_size
    assert (matrix == prepared.eos_id).any()


def test_prepared_text_round_trips_through_json(stdlib_prepared):
    data = json.loads(json.dumps(stdlib_prepared.to_dict()))

    assert PreparedText.from_dict(data) == stdlib_prepared
    assert load_prepared_text(stdlib_prepared.root) == stdlib_prepared
    assert Path(stdlib_prepared.tokenizer_path).is_absolute()


def test_meta_records_documents_and_tokens_per_split(stdlib_prepared):
    meta = json.loads((Path(stdlib_prepared.root) / "meta.json").read_text())

    assert meta["documents"]["train"] > 0 and meta["documents"]["val"] > 0
    assert meta["tokens"]["train"] >= stdlib_prepared.train_rows * (STDLIB.seq_len + 1)
    assert meta["fingerprint"] == stdlib_prepared.fingerprint
    assert Path(stdlib_prepared.root).name == f"text-{stdlib_prepared.fingerprint[:16]}"


def test_second_call_reuses_cache_without_training(stdlib_prepared, monkeypatch, caplog):
    tokenizer_mtime = os.stat(stdlib_prepared.tokenizer_path).st_mtime_ns
    monkeypatch.setattr(datasets.text, "train_tokenizer", lambda *args, **kwargs: pytest.fail("retrained"))
    caplog.set_level(logging.INFO, logger="datasets.text")

    again = prepare_text(STDLIB, cache_root=Path(stdlib_prepared.root).parent, max_seq_len=64)

    assert again == stdlib_prepared
    assert "reusing prepared data at" in caplog.text
    assert os.stat(stdlib_prepared.tokenizer_path).st_mtime_ns == tokenizer_mtime


def test_changed_setting_changes_fingerprint(tmp_path):
    corpus = marker_corpus(tmp_path / "corpus", documents=10)
    cfg = TextDataConfig(source="text_dir", path=str(corpus), vocab_size=300, seq_len=16, val_fraction=0.3)

    first = prepare_text(cfg, cache_root=tmp_path / "cache", max_seq_len=16)
    reseeded = prepare_text(replace(cfg, seed=1), cache_root=tmp_path / "cache", max_seq_len=16)
    (corpus / "doc000.txt").write_text("edited")
    edited = prepare_text(cfg, cache_root=tmp_path / "cache", max_seq_len=16)

    assert len({first.fingerprint, reseeded.fingerprint, edited.fingerprint}) == 3
    assert len({first.root, reseeded.root, edited.root}) == 3


def test_moved_corpus_keeps_its_fingerprint(tmp_path):
    corpus = marker_corpus(tmp_path / "corpus", documents=10)
    moved = shutil.copytree(corpus, tmp_path / "moved")
    cfg = TextDataConfig(source="text_dir", path=str(corpus), vocab_size=300, seq_len=16, val_fraction=0.3)

    first = prepare_text(cfg, cache_root=tmp_path / "cache", max_seq_len=16)
    second = prepare_text(replace(cfg, path=str(moved)), cache_root=tmp_path / "cache", max_seq_len=16)

    assert first == second


def test_train_and_val_hold_disjoint_documents_and_val_keeps_document_order(tmp_path):
    corpus = marker_corpus(tmp_path / "corpus")
    cfg = TextDataConfig(source="text_dir", path=str(corpus), vocab_size=300, seq_len=16, val_fraction=0.25)

    prepared = prepare_text(cfg, cache_root=tmp_path / "cache", max_seq_len=16)

    tokenizer = load_tokenizer(prepared.tokenizer_path)
    train_rows, val_rows = as_matrix(read_rows(prepared.train_dir)), as_matrix(read_rows(prepared.val_dir))
    train_markers, val_markers = markers_in(train_rows, tokenizer), markers_in(val_rows, tokenizer)
    assert train_markers and val_markers
    assert not train_markers & val_markers
    assert train_markers | val_markers == {f"{index:03d}" for index in range(40)}
    expected_val = []
    for marker in sorted(val_markers):
        expected_val += tokenizer.encode((corpus / f"doc{marker}.txt").read_text()).ids + [prepared.eos_id]
    assert val_rows.reshape(-1).tolist() == expected_val[: val_rows.size]


def test_two_documents_always_give_one_per_split(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt"):
        (corpus / name).write_text(f"{name} holds enough words to fill a few rows of tokens. " * 20)
    cfg = TextDataConfig(source="text_dir", path=str(corpus), vocab_size=300, seq_len=8, val_fraction=0.01)

    prepared = prepare_text(cfg, cache_root=tmp_path / "cache", max_seq_len=8)

    meta = json.loads((Path(prepared.root) / "meta.json").read_text())
    assert meta["documents"] == {"train": 1, "val": 1}


def test_literal_eos_text_in_a_document_stays_text(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(6):
        (corpus / f"{index}.txt").write_text(f"document {index} mentions {EOS_TOKEN} in its text. " * 10)
    cfg = TextDataConfig(source="text_dir", path=str(corpus), vocab_size=300, seq_len=4, val_fraction=0.3)

    prepared = prepare_text(cfg, cache_root=tmp_path / "cache", max_seq_len=4)

    meta = json.loads((Path(prepared.root) / "meta.json").read_text())
    rows = np.concatenate([as_matrix(read_rows(prepared.train_dir)), as_matrix(read_rows(prepared.val_dir))])
    assert (rows == prepared.eos_id).sum() <= sum(meta["documents"].values())


def test_seq_len_beyond_model_max_seq_len_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"data.seq_len=512 exceeds model.max_seq_len=256"):
        prepare_text(replace(STDLIB, seq_len=512), cache_root=tmp_path, max_seq_len=256)


@pytest.mark.parametrize("fraction", [0.0, 0.6])
def test_val_fraction_outside_range_is_rejected(tmp_path, fraction):
    with pytest.raises(ValueError, match="data.val_fraction"):
        prepare_text(replace(STDLIB, val_fraction=fraction), cache_root=tmp_path, max_seq_len=64)


def test_missing_path_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="data.path=.*does not exist"):
        prepare_text(TextDataConfig(source="text_dir", path=str(tmp_path / "no")), cache_root=tmp_path, max_seq_len=256)


@pytest.mark.parametrize("files", [{}, {"empty.txt": "", "blank.md": ""}])
def test_empty_corpus_names_source_and_path(tmp_path, files):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in files.items():
        (corpus / name).write_text(text)

    with pytest.raises(ValueError, match="empty corpus") as error:
        prepare_text(TextDataConfig(source="text_dir", path=str(corpus)), cache_root=tmp_path / "cache",
                     max_seq_len=256)

    assert "text_dir" in str(error.value) and str(corpus) in str(error.value)


def test_too_little_data_for_a_row_fails_and_leaves_no_cache(tmp_path):
    corpus = marker_corpus(tmp_path / "corpus", documents=4)
    cfg = TextDataConfig(source="text_dir", path=str(corpus), vocab_size=300, seq_len=4096, val_fraction=0.5)

    with pytest.raises(ValueError, match=r"data.seq_len=4096 .* split has only \d+ tokens"):
        prepare_text(cfg, cache_root=tmp_path / "cache", max_seq_len=4096)

    assert list((tmp_path / "cache").iterdir()) == []


def test_losing_a_race_uses_the_winners_copy(tmp_path, monkeypatch, caplog):
    corpus = marker_corpus(tmp_path / "corpus", documents=10)
    cfg = TextDataConfig(source="text_dir", path=str(corpus), vocab_size=300, seq_len=16, val_fraction=0.3)
    winner = prepare_text(cfg, cache_root=tmp_path / "winner", max_seq_len=16)
    real_rename = os.rename

    def rename_after_the_other_process(source, target):
        shutil.copytree(winner.root, target)
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename_after_the_other_process)
    caplog.set_level(logging.INFO, logger="datasets.cache")

    loser = prepare_text(cfg, cache_root=tmp_path / "loser", max_seq_len=16)

    assert "another process prepared" in caplog.text
    assert loser.fingerprint == winner.fingerprint
    assert [path.name for path in (tmp_path / "loser").iterdir()] == [Path(winner.root).name]


def test_a_pretrained_tokenizer_is_used_as_is_and_counts_in_the_fingerprint(tmp_path):
    """data.tokenizer (set by model.init_from): no BPE training; each document starts with the tokenizer's BOS
    and ends with its eos_token; another tokenizer_config.json (e.g. another chat template) is other data."""
    from tokenizers import Tokenizer

    from tests.hf_models import BOS, END_OF_TURN, write_tiny_llama

    checkpoint = write_tiny_llama(tmp_path / "hf")
    corpus = marker_corpus(tmp_path / "corpus", documents=6)
    cfg = TextDataConfig(source="text_dir", path=str(corpus), tokenizer=str(checkpoint), seq_len=32,
                         val_fraction=0.2)
    prepared = prepare_text(cfg, cache_root=tmp_path / "cache", max_seq_len=64)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    assert prepared.vocab_size == tokenizer.get_vocab_size()
    assert Path(prepared.tokenizer_path).read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    assert (Path(prepared.root) / "tokenizer_config.json").read_bytes() == (
        checkpoint / "tokenizer_config.json").read_bytes()
    stream = as_matrix(read_rows(prepared.train_dir)).reshape(-1).tolist()
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(END_OF_TURN)
    assert prepared.eos_id == eos and stream.count(bos) >= 2
    assert all(stream[i + 1] == bos for i, token in enumerate(stream[:-1]) if token == eos)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ messages }}"}))
    again = prepare_text(cfg, cache_root=tmp_path / "cache", max_seq_len=64)
    assert again.fingerprint != prepared.fingerprint
