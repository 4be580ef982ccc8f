"""serve/features.py: raw request features encode exactly as data preparation encoded the same raw values."""

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import datasets.clicklog as clicklog
from conf.schema import ClickLogDataConfig
from datasets.click_encoding import CATEGORICAL_NAMES, DENSE_NAMES, HASH_FUNCTION, NUM_CATEGORICAL, NUM_DENSE
from datasets.clicklog import prepare_clicklog
from serve.features import FeatureEncoder, FeatureError, FeatureSpecError

CRITEO_BUCKETS = [1000] * 20 + [2, 3, 50, 10_000, 2**31, 7]
CRITEO_ROWS = 400
# Small tables, so the largest ids show up in a few thousand rows; table 8 has 3 categories.
CARDS = [5, 10, 3, 40, 7, 100, 2, 9, 3, 60] * 2 + [11, 4, 30, 6, 8, 1]
SYNTHETIC = ClickLogDataConfig(rows=2_000, cardinalities=CARDS, rows_per_shard=500)


# --------------------------------------------------------------------------------------------- Criteo TSV

def criteo_fields(line_number: int) -> list[str]:
    """One line's 40 fields. I1 is the line number, so every prepared row names the line it came from."""
    i = line_number
    dense = [str(i)]
    for j in range(1, NUM_DENSE):
        choice = (i * 5 + j) % 9
        value = ["", "-3", "0", str(2**40 + i), str(2**62 + 1), "-1", str(i * j), "16777217", "1"][choice]
        dense.append(value)
    categories = []
    for j in range(NUM_CATEGORICAL):
        digits = 1 + (i * 3 + j) % 16
        value = format((i * 2654435761 + j * 40503) % 16**digits, "x")
        if (i + j) % 6 == 0:
            value = ""
        elif (i + j) % 11 == 0:
            value = value.upper()
        elif (i + j) % 13 == 0:
            value = "f" * 16
        categories.append(value)
    return [str(int(i % 3 == 0)), *dense, *categories]


def raw_request_row(fields: list[str], *, line_number: int) -> dict:
    """A TSV line as a ranking request would send it: numbers as JSON numbers, categories as strings, and
    missing values left out, sent as null or (for categories) as the empty string, varying by line."""
    row = {}
    for name, text in zip([*DENSE_NAMES, *CATEGORICAL_NAMES], fields[1:], strict=True):
        if text:
            row[name] = int(text) if name.startswith("I") else text
        elif line_number % 3 == 1:
            row[name] = None
        elif line_number % 3 == 2 and name.startswith("C"):
            row[name] = ""
    return row


def read_rows(directory: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(directory)
    dense = np.stack(table["dense"].to_numpy(zero_copy_only=False))
    sparse = np.stack(table["sparse"].to_numpy(zero_copy_only=False))
    return dense, sparse


@pytest.fixture(scope="module")
def criteo(tmp_path_factory):
    root = tmp_path_factory.mktemp("criteo")
    lines = [criteo_fields(number) for number in range(CRITEO_ROWS)]
    (root / "day_0.tsv").write_text("".join("\t".join(fields) + "\n" for fields in lines))
    cfg = ClickLogDataConfig(source="criteo_tsv", path=str(root / "day_0.tsv"), rows=None, val_fraction=0.25,
                             hash_buckets=CRITEO_BUCKETS, rows_per_shard=64, seed=3)
    prepared = prepare_clicklog(cfg, cache_root=root / "cache")
    rows = [raw_request_row(fields, line_number=number) for number, fields in enumerate(lines)]
    return prepared, rows


def test_criteo_spec_is_machine_readable(criteo):
    prepared, _ = criteo
    spec = json.loads(open(prepared.feature_spec_path).read())
    assert spec["dense_features"] == [f"I{i}" for i in range(1, 14)]
    assert spec["categorical_features"] == [f"C{i}" for i in range(1, 27)]
    assert spec["dense_encoding"] == "log1p_clamped"
    assert spec["category_encoding"] == {"kind": "hash", "input": "hex", "buckets": CRITEO_BUCKETS,
                                         "function": HASH_FUNCTION}
    assert spec["table_sizes"] == CRITEO_BUCKETS and spec["hash_function"] == HASH_FUNCTION  # old keys stay


def test_criteo_requests_encode_as_the_prepared_rows(criteo):
    prepared, rows = criteo
    encoder = FeatureEncoder.from_file(prepared.feature_spec_path)
    dense, sparse = encoder.encode(rows, field_prefix="candidates")
    assert dense.dtype == np.float32 and dense.shape == (CRITEO_ROWS, NUM_DENSE)
    assert sparse.dtype == np.int64 and sparse.shape == (CRITEO_ROWS, NUM_CATEGORICAL)
    seen = []
    for directory in (prepared.train_dir, prepared.val_dir):
        prepared_dense, prepared_sparse = read_rows(directory)
        lines = np.rint(np.expm1(prepared_dense[:, 0].astype(np.float64))).astype(np.int64)
        np.testing.assert_array_equal(dense[lines], prepared_dense)  # bit for bit, not approximately
        np.testing.assert_array_equal(sparse[lines], prepared_sparse)
        seen.extend(lines)
    assert sorted(seen) == list(range(CRITEO_ROWS))  # every line matched exactly once
    assert (sparse == 0).any() and (dense == 0).any()  # the missing values were exercised


# ----------------------------------------------------------------------------------------------- synthetic

def prepare_recording_raw_ids(cfg: ClickLogDataConfig, cache_root) -> tuple:
    """Prepare synthetic data, keeping the raw category ids and missing masks the generator drew."""
    drawn = []

    def recording(*args, **kwargs):
        features = draw_features(*args, **kwargs)
        drawn.append(features)
        return features

    draw_features = clicklog.draw_features
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clicklog, "draw_features", recording)
        prepared = prepare_clicklog(cfg, cache_root=cache_root)
    assert drawn, "prepare_clicklog reused a cache instead of generating"
    return prepared, {key: np.concatenate([part[key] for part in drawn]) for key in drawn[0]}


def synthetic_request_row(ids: np.ndarray, missing: np.ndarray, *, null_for_missing: bool) -> dict:
    row = {}
    for name, value, absent in zip(CATEGORICAL_NAMES, ids, missing, strict=True):
        if not absent:
            row[name] = int(value)
        elif null_for_missing:
            row[name] = None
    return row


def sorted_rows(dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """Rows as (dense bits, buckets), sorted: a multiset of whole rows. The continuous dense values make
    rows distinct, so equal multisets pair every generated row with one prepared row."""
    rows = np.concatenate([dense.astype(np.float32).view(np.int32).astype(np.int64), sparse], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize("hash_buckets", [None, 50], ids=["id_plus_one", "hashed"])
def test_synthetic_ids_encode_as_the_prepared_buckets(tmp_path, hash_buckets):
    cfg = dataclasses.replace(SYNTHETIC, hash_buckets=hash_buckets)
    prepared, raw = prepare_recording_raw_ids(cfg, tmp_path)
    # Half the rows say "missing" with null instead of leaving the feature out.
    rows = [synthetic_request_row(ids, missing, null_for_missing=index % 2 == 1)
            for index, (ids, missing) in enumerate(zip(raw["ids"], raw["sparse_missing"], strict=True))]
    assert max(row.get("C9", 0) for row in rows) == CARDS[8] - 1  # the largest id is accepted
    encoder = FeatureEncoder.from_file(prepared.feature_spec_path)
    _, sparse = encoder.encode(rows)
    parts = [read_rows(directory) for directory in (prepared.train_dir, prepared.val_dir)]
    prepared_rows = sorted_rows(*(np.concatenate(columns) for columns in zip(*parts, strict=True)))
    np.testing.assert_array_equal(sorted_rows(raw["dense"], sparse), prepared_rows)
    spec = json.loads(open(prepared.feature_spec_path).read())
    if hash_buckets is None:
        assert spec["category_encoding"] == {"kind": "id_plus_one"}
        assert spec["table_sizes"] == [card + 1 for card in CARDS]
    else:
        assert spec["category_encoding"] == {"kind": "hash", "input": "int", "buckets": [50] * NUM_CATEGORICAL,
                                             "function": HASH_FUNCTION}


def test_synthetic_dense_counts_encode_as_the_generator_transforms_them():
    # The generator draws float counts (floor(exp(normal)) - offset) and transforms them itself.
    counts = np.array([[-3.0, 0.0, 1.0, 2.0**30, 1e6, 7.0, 41.0, 0.0, 2.0, 3.0, 5.0, 8.0, 13.0]])
    expected = np.log1p(np.maximum(counts, 0.0)).astype(np.float32)
    encoder = FeatureEncoder.from_spec(synthetic_spec())
    dense, _ = encoder.encode([dict(zip(DENSE_NAMES, counts[0].tolist(), strict=True))])
    np.testing.assert_array_equal(dense, expected)


# ----------------------------------------------------------------------------------------------- refusals

def synthetic_spec() -> dict:
    return {"num_dense": NUM_DENSE, "num_categorical": NUM_CATEGORICAL, "missing_bucket": 0,
            "dense_features": DENSE_NAMES, "categorical_features": CATEGORICAL_NAMES,
            "dense_encoding": "log1p_clamped", "category_encoding": {"kind": "id_plus_one"},
            "table_sizes": [card + 1 for card in CARDS]}


def criteo_spec() -> dict:
    encoding = {"kind": "hash", "input": "hex", "buckets": CRITEO_BUCKETS, "function": HASH_FUNCTION}
    return {**synthetic_spec(), "category_encoding": encoding, "table_sizes": CRITEO_BUCKETS}


def refusal(spec: dict, bad: dict) -> FeatureError:
    """The error for a request whose fourth candidate carries `bad`; the others are valid."""
    rows = [{"I1": 1, "C1": "a1" if spec is CRITEO else 0}, {}, {"I2": None}, {"I3": 2, **bad}]
    with pytest.raises(FeatureError) as caught:
        FeatureEncoder.from_spec(spec).encode(rows, field_prefix="candidates")
    return caught.value


CRITEO, SYNTHETIC_SPEC = criteo_spec(), synthetic_spec()


BAD_VALUES = [
    (CRITEO, {"C7": 12.5}, "candidates[3].C7: expected a hex string of 1-16 digits or null, got 12.5"),
    (CRITEO, {"C7": 12}, "candidates[3].C7: expected a hex string of 1-16 digits or null, got 12"),
    (CRITEO, {"C7": "0x1f"}, 'candidates[3].C7: expected a hex string of 1-16 digits or null, got "0x1f"'),
    (CRITEO, {"C7": "1" * 17}, "candidates[3].C7: expected a hex string of 1-16 digits or null, got"),
    (CRITEO, {"C7": "é"}, 'candidates[3].C7: expected a hex string of 1-16 digits or null, got "\\u00e9"'),
    (CRITEO, {"I5": "12"}, 'candidates[3].I5: expected a number or null, got "12"'),
    (CRITEO, {"I5": True}, "candidates[3].I5: expected a number or null, got true"),
    (CRITEO, {"I5": float("nan")}, "candidates[3].I5: expected a finite number, got NaN"),
    (CRITEO, {"I5": float("-inf")}, "candidates[3].I5: expected a finite number, got -Infinity"),
    (CRITEO, {"I5": 10**400}, "candidates[3].I5: expected a finite number, got 1000"),
    (SYNTHETIC_SPEC, {"C9": 3}, "candidates[3].C9: expected a category id in [0, 2], got 3"),
    (SYNTHETIC_SPEC, {"C9": -1}, "candidates[3].C9: expected a category id in [0, 2], got -1"),
    (SYNTHETIC_SPEC, {"C9": 1.0}, "candidates[3].C9: expected an integer category id or null, got 1.0"),
    (SYNTHETIC_SPEC, {"C9": "1"}, 'candidates[3].C9: expected an integer category id or null, got "1"'),
    (SYNTHETIC_SPEC, {"C9": False}, "candidates[3].C9: expected an integer category id or null, got false"),
]


@pytest.mark.parametrize(("spec", "bad", "message"), BAD_VALUES)
def test_bad_values_name_the_field(spec, bad, message):
    error = refusal(spec, bad)
    assert str(error).startswith(message)
    assert isinstance(error, ValueError)
    assert (error.field, error.row, error.feature) == (message.split(":")[0], 3, next(iter(bad)))


def test_hashed_ids_need_not_be_seen_in_training_but_must_fit():
    encoding = {"kind": "hash", "input": "int", "buckets": [50] * NUM_CATEGORICAL, "function": HASH_FUNCTION}
    encoder = FeatureEncoder.from_spec({**synthetic_spec(), "category_encoding": encoding,
                                        "table_sizes": [50] * NUM_CATEGORICAL})
    _, sparse = encoder.encode([{"C1": 10**9, "C2": 2**64 - 2}])
    assert 1 <= sparse[0, 0] < 50 and 1 <= sparse[0, 1] < 50 and (sparse[0, 2:] == 0).all()
    with pytest.raises(FeatureError, match=r"rows\[0\]\.C2: expected a category id in \[0, 18446744073709551614\]"):
        encoder.encode([{"C2": 2**64 - 1}])


@pytest.mark.parametrize(("name", "suggestion"), [("c7", "did you mean 'C7'?"), ("I14", "did you mean 'I"),
                                                  ("colour", None)])
def test_unknown_names_list_the_expected_ones(name, suggestion):
    error = refusal(CRITEO, {name: 1})
    assert error.field == f"candidates[3].{name}" and (error.row, error.feature) == (3, name)
    assert "unknown feature; expected dense I1..I13 or categorical C1..C26" in str(error)
    assert (suggestion in str(error)) if suggestion else "did you mean" not in str(error)


@pytest.mark.parametrize(("rows", "field", "message"), [
    ([{}, ["I1", 1]], "candidates[1]", 'expected an object mapping feature names to values, got ["I1", 1]'),
    ({"I1": 1}, "candidates", "expected a list of objects"),
    ("I1", "candidates", "expected a list of objects"),
])
def test_malformed_rows_name_the_field(rows, field, message):
    with pytest.raises(FeatureError) as caught:
        FeatureEncoder.from_spec(CRITEO).encode(rows, field_prefix="candidates")
    assert caught.value.field == field and str(caught.value).startswith(f"{field}: {message}")
    assert caught.value.feature is None


def test_missing_values_and_no_rows():
    encoder = FeatureEncoder.from_spec(CRITEO)
    dense, sparse = encoder.encode([{}, {"I1": None, "C1": None, "C2": ""}])
    assert not dense.any() and not sparse.any()
    dense, sparse = encoder.encode([])
    assert dense.shape == (0, NUM_DENSE) and sparse.shape == (0, NUM_CATEGORICAL)


# -------------------------------------------------------------------------------------------- many requests

HASHED_INT = {**synthetic_spec(), "table_sizes": [50] * NUM_CATEGORICAL,
              "category_encoding": {"kind": "hash", "input": "int", "buckets": [50] * NUM_CATEGORICAL,
                                    "function": HASH_FUNCTION}}


def mixed_requests(spec: dict) -> list[tuple[dict, list[dict]]]:
    """Valid requests that exercise what the batch path merges and converts: contexts and candidates sharing
    a request's features, a candidate's null overriding its context's value, absent and empty features, ints
    and floats, the largest accepted ids, a request without candidates, and one with a numpy value (a type
    JSON does not produce, which the batch leaves to encode)."""
    hex_input = spec["category_encoding"].get("input") == "hex"
    largest = "f" * 16 if hex_input else (2**64 - 2 if spec is HASHED_INT else 2)  # C9 has 3 ids unhashed

    def category(number: int):
        return format(number * 40503 + 1, "x") if hex_input else number % 2

    requests = []
    for index in range(7):
        context = {"I1": index, "I2": 2.5 * index, "C1": category(index), "C2": None}
        if index % 2:
            context["I13"] = 2**62 + 1  # rounds to float64 as preparation rounds it
        candidates = [{"I3": -row, "I4": row / 3, "C3": category(row), "C9": largest if row == 2 else None,
                       **({"I1": None, "C1": None} if row == 1 else {}),  # a null wins over the context's value
                       **({"C4": ""} if hex_input and row == 3 else {})}
                      for row in range(index % 4 + 1)]
        requests.append((context, candidates))
    requests.append(({"I5": 1}, []))
    requests.append(({}, [{}, {"I6": 7}]))
    requests.append(({"I7": np.float64(0.5)}, [{"I8": 1}]))
    return requests


def no_per_request_encoding(*args, **kwargs):
    raise AssertionError("a batch of valid JSON-typed requests was encoded a request at a time")


@pytest.mark.parametrize("spec", [CRITEO, SYNTHETIC_SPEC, HASHED_INT], ids=["hex", "id_plus_one", "hashed_int"])
@pytest.mark.parametrize("numpy_value", [False, True], ids=["json_types", "with_numpy_value"])
def test_a_batch_of_requests_encodes_as_each_request_alone(spec, numpy_value):
    encoder = FeatureEncoder.from_spec(spec)
    requests = mixed_requests(spec)[slice(None) if numpy_value else slice(-1)]
    with pytest.MonkeyPatch.context() as patch:
        if not numpy_value:  # JSON's types alone must not need encode's value by value path
            patch.setattr(encoder, "encode", no_per_request_encoding)
        encoded = encoder.encode_requests(requests)
    assert len(encoded) == len(requests)
    for (context, candidates), (dense, sparse) in zip(requests, encoded, strict=True):
        alone = encoder.encode([{**context, **row} for row in candidates], field_prefix="candidates")
        assert dense.dtype == alone[0].dtype and sparse.dtype == alone[1].dtype
        np.testing.assert_array_equal(dense, alone[0])
        np.testing.assert_array_equal(sparse, alone[1])
    assert encoder.encode_requests([]) == []


def test_a_batch_of_criteo_requests_encodes_as_the_prepared_rows(criteo):
    prepared, rows = criteo
    encoder = FeatureEncoder.from_file(prepared.feature_spec_path)
    # Requests of 1..20 rows; each moves the features its first row gives among C1..C5 into its context.
    requests, start = [], 0
    while start < len(rows):
        chunk = rows[start:start + start % 20 + 1]
        context = {name: chunk[0][name] for name in ("C1", "C2", "C3", "C4", "C5") if name in chunk[0]}
        requests.append((context, [{name: value for name, value in row.items() if name not in context}
                                   for row in chunk]))
        start += len(chunk)
    expected = [encoder.encode([{**context, **row} for row in candidates]) for context, candidates in requests]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(encoder, "encode", no_per_request_encoding)
        encoded = encoder.encode_requests(requests)
    for (dense, sparse), (dense_alone, sparse_alone) in zip(encoded, expected, strict=True):
        np.testing.assert_array_equal(dense, dense_alone)
        np.testing.assert_array_equal(sparse, sparse_alone)


def good_request(spec: dict, number: int) -> tuple[dict, list[dict]]:
    category = format(number + 10, "x") if spec is CRITEO else number % 2
    return {"I1": number, "C1": category}, [{"I2": 1.5}, {"C2": category}]


@pytest.mark.parametrize(("spec", "bad", "message"), BAD_VALUES)
def test_a_bad_request_fails_alone_in_a_batch(spec, bad, message):
    encoder = FeatureEncoder.from_spec(spec)
    bad_rows = [{"I1": 1, "C1": "a1" if spec is CRITEO else 0}, {}, {"I2": None}, {"I3": 2, **bad}]
    requests = [good_request(spec, 0), ({}, bad_rows), good_request(spec, 1)]
    encode, judged = encoder.encode, []
    with pytest.MonkeyPatch.context() as patch:  # only the bad request takes encode's value by value path
        patch.setattr(encoder, "encode", lambda rows, **kwargs: judged.append(rows) or encode(rows, **kwargs))
        first, error, last = encoder.encode_requests(requests)
    assert len(judged) == 1
    assert isinstance(error, FeatureError) and str(error).startswith(message)
    assert (error.field, error.row, error.feature, error.request) == (message.split(":")[0], 3, next(iter(bad)), 1)
    for (context, candidates), (dense, sparse) in ((requests[0], first), (requests[2], last)):
        alone = encoder.encode([{**context, **row} for row in candidates], field_prefix="candidates")
        np.testing.assert_array_equal(dense, alone[0])
        np.testing.assert_array_equal(sparse, alone[1])


@pytest.mark.parametrize(("request_", "field", "message"), [
    (({"C7": 12.5}, [{}, {}]), "candidates[0].C7", "expected a hex string"),  # the context's value, as merged
    (({}, [{"I1": 1}, {"c7": "a"}]), "candidates[1].c7", "unknown feature"),
    (({}, [{}, ["I1", 1]]), "candidates[1]", "expected an object mapping feature names to values"),
    (({}, {"I1": 1}), "candidates", "expected a list of objects"),
    ((["I1"], [{}]), "context", "expected an object mapping feature names to values"),
], ids=["context-value", "unknown-name", "row-not-object", "rows-not-list", "context-not-object"])
def test_malformed_requests_fail_alone_in_a_batch(request_, field, message):
    encoder = FeatureEncoder.from_spec(CRITEO)
    encoded = encoder.encode_requests([good_request(CRITEO, 0), request_])
    assert not isinstance(encoded[0], FeatureError)
    assert isinstance(encoded[1], FeatureError) and (encoded[1].field, encoded[1].request) == (field, 1)
    assert str(encoded[1]).startswith(f"{field}: {message}")


# -------------------------------------------------------------------------------------------------- specs

OLD_SPEC = {"num_dense": 13, "num_categorical": 26, "missing_bucket": 0,
            "dense_transform": "log1p(max(value, 0)); missing -> 0",
            "categories": f"hex value -> {HASH_FUNCTION} hash per table -> bucket 1..buckets-1",
            "table_sizes": CRITEO_BUCKETS, "hash_function": HASH_FUNCTION}


def test_a_spec_from_before_serving_says_to_prepare_again(tmp_path):
    path = tmp_path / "feature_spec.json"
    path.write_text(json.dumps(OLD_SPEC))
    with pytest.raises(FeatureSpecError, match="Prepare the data again") as caught:
        FeatureEncoder.from_file(path)
    assert str(caught.value).startswith(f"{path} lacks dense_features, categorical_features, dense_encoding")
    with pytest.raises(ValueError, match=r"^feature_spec.json lacks .*delete the prepared clicklog-<fingerprint>"):
        FeatureEncoder.from_spec(OLD_SPEC)


@pytest.mark.parametrize(("change", "message"), [
    ({"dense_encoding": "standardize"}, "dense_encoding='standardize' is not supported; expected 'log1p_clamped'"),
    ({"category_encoding": {"kind": "vocabulary"}}, 'category_encoding.kind="vocabulary"; expected'),
    ({"category_encoding": {**criteo_spec()["category_encoding"], "function": "murmur3"}},
     'category_encoding.function="murmur3" is not the hash this server implements'),
    ({"category_encoding": {**criteo_spec()["category_encoding"], "input": "str"}}, "category_encoding.input="),
    ({"category_encoding": {**criteo_spec()["category_encoding"], "buckets": [1] * 26}},
     r"category_encoding.buckets must list 26 integers in \[2, 2147483648\]"),
    ({"table_sizes": [10] * 25}, "table_sizes must list 26 integers"),
    ({"table_sizes": None}, "table_sizes must list 26 integers"),
    ({"dense_features": DENSE_NAMES[:12]}, "dense_features has 12 names but the spec says there are 13"),
    ({"dense_features": ["C1", *DENSE_NAMES[1:]]}, "C1 named both dense and categorical"),
])
def test_malformed_specs_name_the_key(change, message):
    with pytest.raises(FeatureSpecError, match="^feature_spec.json: " + message):
        FeatureEncoder.from_spec({**criteo_spec(), **change})


@pytest.mark.parametrize("encoding", [{"kind": "id_plus_one"},
                                      {"kind": "hash", "input": "int", "buckets": [50_000] * NUM_CATEGORICAL},
                                      {"kind": "hash", "input": "hex", "buckets": [1000] * NUM_CATEGORICAL}])
def test_raw_rows_encode_back_to_the_model_inputs_they_came_from(encoding):
    """Prepared rows replayed as a client's requests (scripts/replay_traffic.py) must reach the model as the very
    inputs they were: counts from their log1p (large ones too), ids from id + 1 buckets, hashed buckets through a
    raw value that hashes there; missing categories left out."""
    sizes = encoding.get("buckets", [60] * NUM_CATEGORICAL)
    encoder = FeatureEncoder.from_spec({
        "dense_features": DENSE_NAMES, "categorical_features": CATEGORICAL_NAMES, "dense_encoding": "log1p_clamped",
        "table_sizes": sizes, "category_encoding": {**encoding, "function": HASH_FUNCTION}})
    rng = np.random.default_rng(0)
    counts = np.floor(np.exp(rng.normal(2.0, 2.0, (300, NUM_DENSE))))
    counts[:3, 0] = [2**40, 2**62, 0]
    dense = np.log1p(counts).astype(np.float32)
    sparse = rng.integers(0, min(sizes), (300, NUM_CATEGORICAL))  # bucket 0: missing
    rows = encoder.raw_rows(dense, sparse)
    assert all(CATEGORICAL_NAMES[t] not in rows[r] for r, t in zip(*np.nonzero(sparse == 0), strict=True))
    back_dense, back_sparse = encoder.encode(rows)
    np.testing.assert_array_equal(back_dense, dense)
    np.testing.assert_array_equal(back_sparse, sparse)


def test_raw_rows_of_a_table_hashed_into_billions_of_buckets_are_refused_by_name():
    encoder = FeatureEncoder.from_spec({
        "dense_features": DENSE_NAMES, "categorical_features": CATEGORICAL_NAMES, "dense_encoding": "log1p_clamped",
        "table_sizes": CRITEO_BUCKETS, "category_encoding": {"kind": "hash", "input": "hex",
                                                             "buckets": CRITEO_BUCKETS, "function": HASH_FUNCTION}})
    sparse = np.ones((1, NUM_CATEGORICAL), dtype=np.int64)
    with pytest.raises(ValueError, match=r"table 24 hashes into 2147483648 buckets.*replay the raw files"):
        encoder.raw_rows(np.zeros((1, NUM_DENSE), dtype=np.float32), sparse)
