import gzip
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import datasets.criteo as criteo
from datasets.click_encoding import (
    MISSING_BUCKET,
    NUM_CATEGORICAL,
    NUM_DENSE,
    hash_to_buckets,
    hex_to_uint64,
    transform_dense,
)
from datasets.criteo import COLUMN_NAMES, convert_criteo_tsv, list_input_files

BUCKETS = [1000] * 24 + [2, 50]  # C25 has one bucket besides "missing"
SETTINGS = dict(hash_buckets=BUCKETS, val_fraction=0.25, max_rows=None, rows_per_shard=32, seed=7)
# Bucket of 0x68fd1e64 in table 2 of 1000: changing the hash re-buckets every prepared data set.
PINNED_BUCKET = 229
TINY_BLOCK = 2048  # bytes: a few blocks per test file, so rows cross block boundaries


def make_rows(count: int, *, start: int = 0) -> list[list]:
    """Rows whose I1 is the row id (recovered from the output as expm1(dense[0])); None is an empty field."""
    rows = []
    for i in range(start, start + count):
        dense = [i] + [None if (i + j) % 5 == 0 else (i * 7 + j) % 50 - 10 for j in range(1, NUM_DENSE)]
        categories = []
        for j in range(NUM_CATEGORICAL):
            digits = 1 + (i + j) % 16  # every length from 1 to 16 hex digits
            value = format((i * 2654435761 + j * 97) % 16**digits, "x")
            categories.append(None if (i + j) % 7 == 0 else value.upper() if i % 4 == 0 else value)
        rows.append([int(i % 3 == 0), *dense, *categories])
    return rows


def render(rows: list[list]) -> str:
    return "".join("\t".join("" if value is None else str(value) for value in row) + "\n" for row in rows)


def write_tsv(path: Path, rows: list[list] | str) -> Path:
    text = rows if isinstance(rows, str) else render(rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def read_split(directory: Path) -> dict[str, np.ndarray]:
    tables = [pq.read_table(shard) for shard in sorted(directory.glob("part-*.parquet"))]
    table = pa.concat_tables(tables)
    assert table.schema.field("label").type == pa.float32()
    assert table.schema.field("dense").type == pa.list_(pa.float32(), NUM_DENSE)
    assert table.schema.field("sparse").type == pa.list_(pa.int32(), NUM_CATEGORICAL)
    dense = np.array(table["dense"].to_pylist(), dtype=np.float32).reshape(-1, NUM_DENSE)
    return {
        "label": table["label"].to_numpy(),
        "dense": dense,
        "sparse": np.array(table["sparse"].to_pylist(), dtype=np.int32).reshape(-1, NUM_CATEGORICAL),
        "ids": np.rint(np.expm1(dense[:, 0].astype(np.float64))).astype(np.int64),
        "shard_rows": [len(t) for t in tables],
    }


def expected_row(row: list) -> tuple[float, np.ndarray, np.ndarray]:
    """What one input row should become, computed value by value."""
    dense = np.array([0.0 if v is None else np.log1p(max(v, 0)) for v in row[1:14]], dtype=np.float32)
    sparse = []
    for table, value in enumerate(row[14:]):
        if value is None:
            sparse.append(MISSING_BUCKET)
        else:
            number = np.array([int(value, 16)], dtype=np.uint64)
            sparse.append(int(hash_to_buckets(number, np.array([False]), table=table, buckets=BUCKETS[table])[0]))
    return float(row[0]), dense, np.array(sparse, dtype=np.int32)


@pytest.fixture
def tiny_blocks(monkeypatch):
    monkeypatch.setattr(criteo, "BLOCK_SIZE", TINY_BLOCK)


def convert(files, out_dir, **overrides):
    return convert_criteo_tsv([Path(f) for f in files], Path(out_dir), **{**SETTINGS, **overrides})


def test_round_trip_values(tmp_path, tiny_blocks):
    rows = make_rows(300)
    rows[5][1:4] = [5, -5, None]  # I1 stays the row id; then a negative and a missing dense value
    summary = convert([write_tsv(tmp_path / "day_0.tsv", rows)], tmp_path / "out")
    train, val = read_split(tmp_path / "out" / "train"), read_split(tmp_path / "out" / "val")
    assert summary["rows_read"] == 300 and summary["train_rows"] + summary["val_rows"] == 300
    assert (len(train["label"]), len(val["label"])) == (summary["train_rows"], summary["val_rows"])
    assert summary["positives"] == {"train": int(train["label"].sum()), "val": int(val["label"].sum())}
    assert summary["files"] == [str(tmp_path / "day_0.tsv")]
    assert train["shard_rows"][:-1] == [32] * (len(train["shard_rows"]) - 1)
    ids = np.concatenate([train["ids"], val["ids"]])
    assert sorted(ids) == list(range(300))
    for split in (train, val):
        for position, row_id in enumerate(split["ids"]):
            label, dense, sparse = expected_row(rows[row_id])
            assert split["label"][position] == label
            np.testing.assert_allclose(split["dense"][position], dense, rtol=1e-6)
            np.testing.assert_array_equal(split["sparse"][position], sparse)
    split, position = next((s, list(s["ids"]).index(5)) for s in (train, val) if 5 in s["ids"])
    assert split["dense"][position, 1] == 0.0 and split["dense"][position, 2] == 0.0  # -5 clamps; missing is 0
    assert split["dense"][position, 0] == pytest.approx(np.log1p(5))


def test_category_buckets(tmp_path):
    rows = make_rows(120)
    for index, row in enumerate(rows):
        row[14] = ["68fd1e64", "68FD1E64", "0068fd1e64"][index % 3]  # one value, three spellings
        row[15] = None if index % 2 else "68fd1e64"
        row[16] = format(index, "x")  # C3: 120 distinct values
    convert([write_tsv(tmp_path / "c.tsv", rows)], tmp_path / "out")
    sparse = np.concatenate([read_split(tmp_path / "out" / split)["sparse"] for split in ("train", "val")])
    assert len(set(sparse[:, 0])) == 1 and sparse[0, 0] != MISSING_BUCKET
    assert (sparse[:, 1] == MISSING_BUCKET).sum() == 60
    present = sparse[:, 1] != MISSING_BUCKET
    assert len(set(sparse[present, 1])) == 1
    assert sparse[present, 1][0] != sparse[0, 0]  # same value, another table, another bucket (p = 1/999)
    assert len(set(sparse[:, 2])) > 100  # 120 distinct values spread over 999 buckets
    assert set(sparse[sparse[:, 24] != 0, 24]) == {1}  # C25 has buckets=2: every present value is bucket 1
    for table, buckets in enumerate(BUCKETS):
        assert sparse[:, table].min() >= 0 and sparse[:, table].max() < buckets


def test_hex_to_uint64_parses_buffers():
    strings = ["0", "ff", "FFFFFFFFFFFFFFFF", "68fd1e64", "", None, "zz12", "12345678901234567", "a"]
    values, missing, first_invalid = hex_to_uint64(pa.array(strings))
    assert values[:4].tolist() == [0, 255, 2**64 - 1, 0x68FD1E64] and values[8] == 10
    assert missing.tolist() == [False] * 4 + [True, True] + [False] * 3
    assert first_invalid == 6
    sliced, sliced_missing, sliced_invalid = hex_to_uint64(pa.array(strings).slice(3, 4))
    assert sliced.tolist()[0] == 0x68FD1E64 and sliced_missing.tolist() == [False, True, True, False]
    assert sliced_invalid == 3
    eight = [format(v, "08x") for v in (0, 1, 0xDEADBEEF, 0x12345678)] + [None, ""]
    values, missing, first_invalid = hex_to_uint64(pa.chunked_array([eight]))  # the equal-length fast path
    assert values[:4].tolist() == [0, 1, 0xDEADBEEF, 0x12345678] and missing[4:].all() and first_invalid is None
    assert hex_to_uint64(pa.array(["1234567g"]))[2] == 0


def test_hash_to_buckets_is_pinned_and_salted():
    values = np.arange(5000, dtype=np.uint64)
    missing = values % 10 == 0
    first = hash_to_buckets(values, missing, table=0, buckets=100)
    assert first.dtype == np.int32
    assert (first[missing] == MISSING_BUCKET).all() and first[~missing].min() >= 1 and first[~missing].max() <= 99
    counts = np.bincount(first[~missing], minlength=100)[1:]
    assert counts.min() > 20  # sequential ids spread over all 99 buckets (45 expected each)
    other_table = hash_to_buckets(values, missing, table=1, buckets=100)
    assert (other_table[~missing] != first[~missing]).mean() > 0.95  # 1/99 agree by chance
    # Changing the hash re-buckets every prepared data set: if this value changes, so must the cache key.
    assert hash_to_buckets(
        np.array([0x68FD1E64], dtype=np.uint64), np.array([False]), table=2, buckets=1000
    ).tolist() == [PINNED_BUCKET]
    with pytest.raises(ValueError, match="must be in"):
        hash_to_buckets(values, missing, table=0, buckets=1)


def test_transform_dense_known_values():
    values = np.array([[0, 1, -5, 10**12] + [3] * 9], dtype=np.int64)
    missing = np.zeros_like(values, dtype=bool)
    missing[0, 4] = True
    out = transform_dense(values, missing)
    assert out.dtype == np.float32 and out.shape == (1, 13)
    np.testing.assert_allclose(out[0, :4], [0.0, np.log(2), 0.0, np.log1p(1e12)], rtol=1e-6)
    assert out[0, 4] == 0.0 and out[0, 5] == pytest.approx(np.log(4))


def test_deterministic_and_independent_of_block_size(tmp_path, monkeypatch):
    path = write_tsv(tmp_path / "d.tsv", make_rows(400))
    convert([path], tmp_path / "a")
    monkeypatch.setattr(criteo, "BLOCK_SIZE", TINY_BLOCK)
    convert([path], tmp_path / "b")
    convert([path], tmp_path / "c", seed=8)
    for split in ("train", "val"):
        shards = sorted((tmp_path / "a" / split).glob("*.parquet"))
        assert len(shards) > 2
        for shard in shards:
            assert pq.read_table(shard).equals(pq.read_table(tmp_path / "b" / split / shard.name))
    first = read_split(tmp_path / "a" / "train")
    assert np.any(np.diff(first["ids"][:32]) < 0)  # shuffled within the shard, not in file order
    assert set(read_split(tmp_path / "c" / "val")["ids"]) != set(read_split(tmp_path / "a" / "val")["ids"])


def test_val_fraction_is_respected(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", make_rows(2000))
    assert abs(convert([path], tmp_path / "a", val_fraction=0.2, rows_per_shard=500)["val_rows"] / 2000 - 0.2) < 0.04
    assert abs(convert([path], tmp_path / "b", val_fraction=0.5, rows_per_shard=500)["val_rows"] / 2000 - 0.5) < 0.05


def test_max_rows_reads_the_first_rows(tmp_path, tiny_blocks):
    first = write_tsv(tmp_path / "a.tsv", make_rows(100))
    second = write_tsv(tmp_path / "b.tsv", make_rows(100, start=100))
    third = write_tsv(tmp_path / "c.tsv", "not even tsv\n")  # never opened: the cap is reached first
    summary = convert([first, second, third], tmp_path / "out", max_rows=150)
    ids = np.concatenate([read_split(tmp_path / "out" / split)["ids"] for split in ("train", "val")])
    assert summary["rows_read"] == 150 and sorted(ids) == list(range(150))
    assert summary["files"] == [str(first), str(second)]


def test_directory_of_files_equals_their_concatenation(tmp_path, tiny_blocks):
    directory = tmp_path / "days"
    directory.mkdir()
    write_tsv(directory / "day_0.tsv", make_rows(150))
    write_tsv(directory / "day_1.tsv.gz", render(make_rows(170, start=150)).rstrip("\n"))  # no final newline
    write_tsv(directory / ".partial", "garbage\n")
    (directory / "subdir").mkdir()
    files = list_input_files(directory)
    assert [f.name for f in files] == ["day_0.tsv", "day_1.tsv.gz"]
    joined = convert(files, tmp_path / "joined")
    single = convert([write_tsv(tmp_path / "all.tsv", make_rows(320))], tmp_path / "single")
    assert joined["rows_read"] == 320 and joined["val_rows"] == single["val_rows"]
    for split in ("train", "val"):
        for shard in sorted((tmp_path / "single" / split).glob("*.parquet")):
            assert pq.read_table(shard).equals(pq.read_table(tmp_path / "joined" / split / shard.name))


def test_list_input_files_errors_name_the_path(tmp_path):
    assert list_input_files(write_tsv(tmp_path / "one.tsv", make_rows(1))) == [tmp_path / "one.tsv"]
    with pytest.raises(FileNotFoundError, match=r"data\.path=.*nowhere"):
        list_input_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("x")
    with pytest.raises(ValueError, match=r"data\.path=.*empty.*no .*files"):
        list_input_files(tmp_path / "empty")


def set_field(rows, line, column, value):
    rows[line - 1][COLUMN_NAMES.index(column)] = value
    return rows


BAD_INPUTS = {
    "field count": (
        lambda rows: render(rows[:4]) + "\t".join(["1"] * 39) + "\n" + render(rows[5:]),
        5,
        ["expected 40 tab-separated fields (label, I1-I13, C1-C26), got 39"],
    ),
    "too many fields": (
        lambda rows: render(rows[:376]) + "\t".join(["1"] * 41) + "\n" + render(rows[377:]),
        377,
        ["expected 40 tab-separated fields", "got 41"],
    ),
    "not hex": (
        lambda rows: render(set_field(rows, 17, "C3", "zz12")),
        17,
        ["column C3 = 'zz12' is not hexadecimal (expected 1-16 hex digits or empty)"],
    ),
    "too many digits": (
        lambda rows: render(set_field(rows, 233, "C26", "1" * 17)),
        233,
        ["column C26 = '11111111111111111'", "not hexadecimal"],
    ),
    "label 2": (lambda rows: render(set_field(rows, 9, "label", 2)), 9, ["column label = 2, expected 0 or 1"]),
    "label missing": (lambda rows: render(set_field(rows, 4, "label", None)), 4, ["column label is empty"]),
    "label text": (
        lambda rows: render(set_field(rows, 301, "label", "yes")),
        301,
        ["column label = 'yes', expected 0 or 1"],
    ),
    "dense text": (
        lambda rows: render(set_field(rows, 250, "I7", "abc")),
        250,
        ["column I7 = 'abc' is not an integer"],
    ),
    "dense float": (lambda rows: render(set_field(rows, 2, "I13", "1.5")), 2, ["column I13 = '1.5'"]),
    "empty line": (lambda rows: render(rows[:99]) + "\n" + render(rows[99:]), 100, ["is empty; expected 40"]),
}


@pytest.mark.parametrize("suffix", [".tsv", ".tsv.gz"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_errors_name_file_line_and_column(tmp_path, tiny_blocks, case, suffix):
    corrupt, line, fragments = BAD_INPUTS[case]
    good = write_tsv(tmp_path / f"day_0{suffix}", make_rows(50))
    bad = write_tsv(tmp_path / f"day_1{suffix}", corrupt(make_rows(400, start=50)))
    with pytest.raises(ValueError) as raised:
        convert([good, bad], tmp_path / "out")
    message = str(raised.value)
    assert f"day_1{suffix} line {line}" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_corrupt_gzip_names_the_file(tmp_path):
    whole = gzip.compress(render(make_rows(2000)).encode())
    (tmp_path / "cut.tsv.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "fake.tsv.gz").write_bytes(b"not gzip\n" * 10)
    for name in ("cut.tsv.gz", "fake.tsv.gz"):
        with pytest.raises(ValueError, match=rf"{name} at or after line \d+: cannot read as Criteo TSV"):
            convert([tmp_path / name], tmp_path / f"out-{name}")


def test_one_class_split_is_an_error(tmp_path):
    rows = make_rows(200)
    for row in rows:
        row[0] = 0
    path = write_tsv(tmp_path / "negatives.tsv", rows)
    with pytest.raises(ValueError, match=r"negatives\.tsv.* 0 positive and \d+ negative rows.*AUC is undefined"):
        convert([path], tmp_path / "out")
    rows[0][0] = 1  # one positive: one split still lacks positives
    with pytest.raises(ValueError, match="AUC is undefined without both classes"):
        convert([write_tsv(tmp_path / "one.tsv", rows)], tmp_path / "out2")


def test_empty_input_and_bad_settings(tmp_path):
    empty = write_tsv(tmp_path / "empty.tsv", "")
    with pytest.raises(ValueError, match=r"no rows in .*empty\.tsv"):
        convert([empty], tmp_path / "out")
    path = write_tsv(tmp_path / "d.tsv", make_rows(10))
    with pytest.raises(ValueError, match=r"data\.hash_buckets has 25 entries; expected 26"):
        convert([path], tmp_path / "out", hash_buckets=[10] * 25)
    with pytest.raises(ValueError, match=r"data\.hash_buckets\[3\] \(column C4\) = 1"):
        convert([path], tmp_path / "out", hash_buckets=[10] * 3 + [1] + [10] * 22)
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        convert([path], tmp_path / "out", val_fraction=1.0)


def test_progress_is_logged(tmp_path, monkeypatch, caplog, tiny_blocks):
    monkeypatch.setattr(criteo, "LOG_EVERY_ROWS", 100)
    path = write_tsv(tmp_path / "logged.tsv", make_rows(300))
    with caplog.at_level(logging.INFO, logger="datasets.criteo"):
        convert([path], tmp_path / "out")
    progress = [r.getMessage() for r in caplog.records if "rows/s" in r.getMessage()]
    assert len(progress) >= 3 and "read 300 rows" in progress[-1] and "logged.tsv" in progress[-1]
