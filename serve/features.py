"""Raw named features of ranking requests -> the model inputs training saw, by the rules in feature_spec.json.

The server has only the feature_spec.json exported next to the weights, so everything the encoding needs is
read from it: the feature names, the dense transform and how each categorical value becomes a bucket. The
transforms themselves are the ones data preparation ran (datasets/click_encoding.py), applied a column at a time, so
a served candidate and a prepared row with the same raw values get the same inputs bit for bit.

A row maps feature names to raw values. An absent feature or a null is missing, as an empty field is in the
data: dense 0, bucket 0. Every refusal is a FeatureError naming the offending field, e.g.
`candidates[3].C7: expected a hex string of 1-16 digits or null, got 12.5`.

A server encodes many requests at once with `encode_requests`: the values of all their rows are checked and
converted in a few passes that run in C, which is what lets dynamic batching amortize the encoding too. A
request it refuses gets the same FeatureError as from `encode`, and the others are encoded all the same.
"""

import difflib
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import pyarrow as pa

from datasets.click_encoding import (
    CATEGORY_HASH,
    CATEGORY_ID_PLUS_ONE,
    DENSE_ENCODING,
    FEATURE_SPEC_FILE,
    HASH_FUNCTION,
    MAX_BUCKETS,
    MAX_HEX_DIGITS,
    MISSING_BUCKET,
    hash_preimages,
    hash_to_buckets,
    hex_to_uint64,
    transform_dense,
)

# The keys added for serving: a spec written before them has none, and this module needs them all.
SERVING_KEYS = ("dense_features", "categorical_features", "dense_encoding", "category_encoding")
CATEGORY_INPUTS = ("int", "hex")
# Hashed integer ids are hashed as id + 1 (as preparation does), and that must fit in a uint64.
MAX_HASHED_ID = 2**64 - 2
_MAX_SHOWN_CHARS = 60
# The exact types a JSON decoder produces, coded so a whole batch's types are checked in one numpy comparison;
# anything else (bool, numpy scalars, lists) sends the batch to the per-request path, which judges it.
_NULL, _INT, _FLOAT, _STR, _OTHER_TYPE = range(5)
_TYPE_CODES = {type(None): _NULL, int: _INT, float: _FLOAT, str: _STR}


class FeatureSpecError(ValueError):
    """feature_spec.json cannot drive the encoder: written by an older version, or malformed. A server
    configuration problem, unlike FeatureError, which is the caller's."""


class FeatureError(ValueError):
    """One raw feature value (or row) the encoder refuses.

    `field` is where it is, `problem` what is wrong with it; str(error) is "<field>: <problem>". `row` is
    the index of the row in the encoded list and `feature` the feature name, each None when not applicable.
    `request` is the index of the request in an `encode_requests` batch (None from `encode`).
    """

    def __init__(self, field: str, problem: str, *, row: int | None = None, feature: str | None = None):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
        self.row = row
        self.feature = feature
        self.request: int | None = None


@dataclass(frozen=True)
class CategoryEncoding:
    """How raw categories become buckets. `limits[t]` bounds the ids of table t (exclusive; int input);
    `buckets[t]` is the hash modulus of table t (hash kind)."""

    kind: str  # CATEGORY_ID_PLUS_ONE or CATEGORY_HASH
    input: str  # "int" or "hex"
    limits: tuple[int, ...]
    buckets: tuple[int, ...]


class FeatureEncoder:
    """Encodes rows of raw named features into (dense float32 (n, D), sparse int64 (n, C)) model inputs."""

    def __init__(self, dense_names: Sequence[str], *, categorical_names: Sequence[str], category: CategoryEncoding):
        self.dense_names = tuple(dense_names)
        self.categorical_names = tuple(categorical_names)
        self.category = category
        self._names = (*self.dense_names, *self.categorical_names)
        self._name_set = frozenset(self._names)
        self._column_of = {name: column for column, name in enumerate(self._names)}
        self._lowered = {name.lower(): name for name in self._names}
        self._id_limits = np.array(category.limits, dtype=np.uint64)

    @classmethod
    def from_spec(cls, spec: Mapping, *, source: str = FEATURE_SPEC_FILE) -> "FeatureEncoder":
        """The encoder a feature_spec.json describes; `source` names the spec in errors (a path, say)."""
        if not isinstance(spec, Mapping):
            raise FeatureSpecError(f"{source}: expected a JSON object, got {_show(spec)}")
        _check_serving_keys(spec, source=source)
        if spec["dense_encoding"] != DENSE_ENCODING:
            raise FeatureSpecError(
                f"{source}: dense_encoding={spec['dense_encoding']!r} is not supported; expected {DENSE_ENCODING!r}"
            )
        if spec.get("missing_bucket", MISSING_BUCKET) != MISSING_BUCKET:
            raise FeatureSpecError(f"{source}: missing_bucket={spec['missing_bucket']!r}; expected {MISSING_BUCKET}")
        dense_names = _feature_names(spec, "dense_features", count=spec.get("num_dense"), source=source)
        categorical_names = _feature_names(
            spec, "categorical_features", count=spec.get("num_categorical"), source=source
        )
        duplicated = sorted(set(dense_names) & set(categorical_names))
        if duplicated:
            raise FeatureSpecError(f"{source}: {', '.join(duplicated)} named both dense and categorical")
        category = _category_encoding(spec, tables=len(categorical_names), source=source)
        return cls(dense_names, categorical_names=categorical_names, category=category)

    @classmethod
    def from_file(cls, path: str | Path) -> "FeatureEncoder":
        path = Path(path)
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise FeatureSpecError(f"{path}: not valid JSON ({error})") from error
        return cls.from_spec(spec, source=str(path))

    def sample_category(self, table: int, index: int = 0) -> int | str:
        """A raw value that table `table` accepts (for example requests): the index-th id, or a hex string."""
        if self.category.input == "hex":
            return format(index + 1, "08x")
        if self.category.kind == CATEGORY_ID_PLUS_ONE:
            return min(index, self.category.limits[table] - 1)
        return index

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Every accepted feature name: the dense ones, then the categorical ones, in model input order."""
        return self._names

    def input_columns(self, dense: np.ndarray, sparse: np.ndarray) -> tuple[dict, dict]:
        """Encoded model inputs as ({dense name: values}, {categorical name: bucket ids}): how a reference split
        and live traffic are profiled alike (serve/monitoring.py), after encoding, as the model sees them."""
        return ({name: dense[:, column] for column, name in enumerate(self.dense_names)},
                {name: sparse[:, column] for column, name in enumerate(self.categorical_names)})

    def raw_rows(self, dense: np.ndarray, sparse: np.ndarray) -> list[dict]:
        """Rows of raw features, as a client would send them, that `encode` turns back into these model inputs
        (prepared rows replayed as traffic: scripts/replay_traffic.py). Dense values are the counts their
        log1p came from (a missing value and a count of 0 encode alike: 0 is sent); a missing category is left
        out; a hashed category is sent as the smallest raw value that hashes to its bucket (any such value
        encodes the same)."""
        counts = np.rint(np.expm1(dense.astype(np.float64))).astype(np.int64)
        columns = [(name, counts[:, column].tolist()) for column, name in enumerate(self.dense_names)]
        for table, name in enumerate(self.categorical_names):
            columns.append((name, self._raw_categories(sparse[:, table], table=table)))
        return [{name: values[row] for name, values in columns if values[row] is not None}
                for row in range(len(dense))]

    def _raw_categories(self, buckets: np.ndarray, *, table: int) -> list:
        """A raw value per bucket id (None for the missing bucket)."""
        if self.category.kind == CATEGORY_ID_PLUS_ONE:
            return [None if bucket == MISSING_BUCKET else int(bucket) - 1 for bucket in buckets.tolist()]
        wanted = set(buckets.tolist()) - {MISSING_BUCKET}
        preimages = hash_preimages(wanted, table=table, buckets=self.category.buckets[table],
                                    plus_one=self.category.input == "int")
        raw = (lambda value: format(value, "x")) if self.category.input == "hex" else int
        return [None if bucket == MISSING_BUCKET else raw(preimages[bucket]) for bucket in buckets.tolist()]

    def encode(self, rows: Sequence[Mapping], *, field_prefix: str = "rows") -> tuple[np.ndarray, np.ndarray]:
        """(dense float32 (n, D), sparse int64 (n, C)) for `rows`, each a mapping of feature name to raw value.

        Errors name the field as `<field_prefix>[<row>].<feature>`: pass the request's own path to the list
        (e.g. "candidates") so the caller can report it as is.
        """
        columns = self._columns(rows, field_prefix=field_prefix)
        count = len(rows)
        values = np.zeros((count, len(self.dense_names)), dtype=np.float64)
        missing = np.zeros((count, len(self.dense_names)), dtype=bool)
        for index, name in enumerate(self.dense_names):
            values[:, index], missing[:, index] = _dense_column(columns[name], _Where(field_prefix, name))
        sparse = np.zeros((count, len(self.categorical_names)), dtype=np.int64)
        for table, name in enumerate(self.categorical_names):
            sparse[:, table] = self._bucket_column(columns[name], table=table, where=_Where(field_prefix, name))
        return transform_dense(values, missing), sparse

    def encode_requests(self, requests: Sequence[tuple[Mapping, Sequence[Mapping]]], *,
                        field_prefix: str = "candidates") -> list[tuple[np.ndarray, np.ndarray] | FeatureError]:
        """Per (context, rows) request, what `encode([{**context, **row} for row in rows])` returns, or the
        FeatureError it raises, with `request` set to the request's index: a bad request fails alone.

        The rows of all requests are encoded together, each conversion one numpy operation over every value
        of the batch, and a context once per request rather than once per row. A batch holding anything this
        path would have to judge value by value (a refused value, a type JSON does not produce) is encoded a
        request at a time instead, and a request that needs it by `encode`, so that errors and rare types are
        handled exactly as there.
        """
        if not requests:
            return []
        encoded = self._encode_batch(requests)
        if encoded is not None:
            return encoded
        return [self._encode_request(index, context, rows, field_prefix=field_prefix)
                for index, (context, rows) in enumerate(requests)]

    def _encode_request(self, index: int, context: Mapping, rows: Sequence[Mapping], *,
                        field_prefix: str) -> tuple[np.ndarray, np.ndarray] | FeatureError:
        alone = self._encode_batch([(context, rows)])  # the good requests of a batch with a bad one stay fast
        if alone is not None:
            return alone[0]
        try:
            if not isinstance(context, Mapping):
                raise FeatureError("context", f"expected an object mapping feature names to values, got "
                                              f"{_show(context)}")
            if isinstance(rows, Sequence) and not isinstance(rows, str | bytes | Mapping):
                # A row that is not an object is passed on as is, for encode to name it.
                rows = [{**context, **row} if isinstance(row, Mapping) else row for row in rows]
            return self.encode(rows, field_prefix=field_prefix)
        except FeatureError as error:
            error.request = index
            return error

    def _encode_batch(self, requests: Sequence[tuple[Mapping, Sequence[Mapping]]]) -> list | None:
        """encode_requests' fast path: each request's (dense, sparse), or None where `encode` must judge."""
        entries = _flatten(requests, column_of=self._column_of)
        if entries is None:
            return None
        is_dense = entries.column < len(self.dense_names)
        dense_entries = entries.subset(is_dense)
        categorical_entries = entries.subset(~is_dense, column_offset=len(self.dense_names))
        dense, categorical = _dense_values(dense_entries), self._category_values(categorical_entries)
        if dense is None or categorical is None:
            return None
        values, missing = dense_entries.candidate_matrix(*dense, width=len(self.dense_names))
        parsed, absent = categorical_entries.candidate_matrix(*categorical, width=len(self.categorical_names))
        sparse = np.zeros(parsed.shape, dtype=np.int64)
        for table in range(len(self.categorical_names)):
            sparse[:, table] = self._buckets(parsed[:, table], absent[:, table], table=table)
        bounds = np.cumsum(entries.candidates)[:-1]
        return list(zip(np.split(transform_dense(values, missing), bounds), np.split(sparse, bounds), strict=True))

    def _category_values(self, entries: "_Entries") -> tuple[np.ndarray, np.ndarray] | None:
        """(uint64 values as preparation stores or hashes them, is_missing) of categorical entries, whose
        `column` is the table; None if any value is refused."""
        null = entries.type_code == _NULL
        if self.category.input == "hex":
            if not (null | (entries.type_code == _STR)).all():
                return None
            try:
                parsed, missing, bad = hex_to_uint64(pa.array(entries.value, type=pa.string()))
            except (UnicodeError, pa.ArrowException):  # a lone surrogate cannot be encoded as UTF-8
                return None
            return None if bad is not None else (parsed, missing)
        if not (null | (entries.type_code == _INT)).all():
            return None
        ids = entries.value.copy()
        ids[null] = 0
        try:
            ids = ids.astype(np.uint64)
        except OverflowError:  # negative, or beyond 64 bits
            return None
        if (ids >= self._id_limits[entries.column]).any():
            return None
        # Preparation stores (or hashes) id + 1, keeping bucket 0 for missing; see datasets/clicklog.py.
        return ids + np.uint64(1), null

    def _columns(self, rows: Sequence[Mapping], *, field_prefix: str) -> dict[str, list]:
        """Raw values per feature name, None where a row lacks the feature."""
        if isinstance(rows, str | bytes | Mapping) or not isinstance(rows, Sequence):
            raise FeatureError(field_prefix, f"expected a list of objects, got {_show(rows)}")
        for row_index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise FeatureError(
                    f"{field_prefix}[{row_index}]",
                    f"expected an object mapping feature names to values, got {_show(row)}",
                    row=row_index,
                )
            if not row.keys() <= self._name_set:  # a set comparison in C; the loop below runs only on error
                name = next(name for name in row if name not in self._name_set)
                field = f"{field_prefix}[{row_index}].{name}"
                raise FeatureError(field, self._unknown_name(name), row=row_index, feature=str(name))
        return {name: [row.get(name) for row in rows] for name in self._names}

    def _unknown_name(self, name) -> str:
        expected = (f"expected dense {_name_range(self.dense_names)} "
                    f"or categorical {_name_range(self.categorical_names)}")
        text = str(name)
        # Case first: difflib rates "c7" against "C7" too low to suggest it.
        match = self._lowered.get(text.lower()) or next(iter(difflib.get_close_matches(text, self._names, n=1)), None)
        hint = f"; did you mean {match!r}?" if match else ""
        return f"unknown feature; {expected}{hint}"

    def _bucket_column(self, values: list, *, table: int, where: "_Where") -> np.ndarray:
        category = self.category
        if category.input == "hex":
            parsed, missing = _hex_column(values, where)
        else:
            ids, missing = _id_column(values, limit=category.limits[table], where=where)
            # Preparation stores (or hashes) id + 1, keeping bucket 0 for missing; see datasets/clicklog.py.
            parsed = ids + np.uint64(1)
        return self._buckets(parsed, missing, table=table)

    def _buckets(self, parsed: np.ndarray, missing: np.ndarray, *, table: int) -> np.ndarray:
        if self.category.kind == CATEGORY_ID_PLUS_ONE:
            return np.where(missing, MISSING_BUCKET, parsed.astype(np.int64))
        return hash_to_buckets(parsed, missing, table=table, buckets=self.category.buckets[table])


@dataclass(frozen=True)
class _Where:
    """Names the field of one column's value in errors."""

    prefix: str
    feature: str

    def error(self, row: int, problem: str) -> FeatureError:
        return FeatureError(f"{self.prefix}[{row}].{self.feature}", problem, row=row, feature=self.feature)


@dataclass(frozen=True)
class _Entries:
    """Every feature value given in a batch's rows, one entry each. Rows are numbered contexts first (one per
    request), then the candidate rows of every request in order."""

    row: np.ndarray  # intp
    column: np.ndarray  # intp: the feature's index in feature_names (less any offset `subset` took off)
    value: np.ndarray  # object: None, int, float or str (_flatten let nothing else through)
    type_code: np.ndarray  # int8: _TYPE_CODES of value
    requests: int
    candidates: np.ndarray  # intp: candidate rows per request

    def subset(self, mask: np.ndarray, *, column_offset: int = 0) -> "_Entries":
        return _Entries(row=self.row[mask], column=self.column[mask] - column_offset, value=self.value[mask],
                        type_code=self.type_code[mask], requests=self.requests, candidates=self.candidates)

    def candidate_matrix(self, values: np.ndarray, missing: np.ndarray, *,
                         width: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, is_missing) per candidate row and column, from each entry's value: a candidate's own
        where it gives the feature (a null included), else its context's, as {**context, **row} has it;
        missing where neither gives it."""
        rows, where = self.requests + int(self.candidates.sum()), (self.row, self.column)
        matrix = np.zeros((rows, width), dtype=values.dtype)
        absent = np.ones((rows, width), dtype=bool)
        given = np.zeros((rows, width), dtype=bool)
        matrix[where], absent[where], given[where] = values, missing, True
        own, context_of = given[self.requests:], np.repeat(np.arange(self.requests), self.candidates)
        return (np.where(own, matrix[self.requests:], matrix[context_of]),
                np.where(own, absent[self.requests:], absent[context_of]))


def _flatten(requests: Sequence[tuple[Mapping, Sequence[Mapping]]], *, column_of: dict[str, int]) -> _Entries | None:
    """The entries of every (context, rows) request, or None where a request is not the plain shape a JSON
    decoder gives (dicts in a list), names an unknown feature or holds a value of another type.

    Each step is one pass in C (chain, map, fromiter) over all the values: no Python code runs per value."""
    contexts = [context for context, _ in requests]
    candidate_lists = [rows for _, rows in requests]
    if not all(type(rows) is list for rows in candidate_lists):
        return None
    rows = [*contexts, *chain.from_iterable(candidate_lists)]
    if not set(map(type, rows)) <= {dict}:
        return None
    try:
        column = np.fromiter(map(column_of.__getitem__, chain.from_iterable(rows)), dtype=np.intp)
    except KeyError:
        return None
    values = list(chain.from_iterable(map(dict.values, rows)))
    type_code = np.fromiter(map(_TYPE_CODES.get, map(type, values), repeat(_OTHER_TYPE)), dtype=np.int8,
                            count=len(values))
    if (type_code == _OTHER_TYPE).any():
        return None
    lengths = np.fromiter(map(len, rows), dtype=np.intp, count=len(rows))
    return _Entries(row=np.repeat(np.arange(len(rows)), lengths), column=column,
                    value=np.array(values, dtype=object),  # only scalars here, so never a nested array
                    type_code=type_code, requests=len(contexts),
                    candidates=np.fromiter(map(len, candidate_lists), dtype=np.intp, count=len(candidate_lists)))


def _dense_values(entries: _Entries) -> tuple[np.ndarray, np.ndarray] | None:
    """(float64 values, is_missing) of dense entries; None if any value is refused."""
    null = entries.type_code == _NULL
    if not (null | (entries.type_code == _INT) | (entries.type_code == _FLOAT)).all():
        return None
    numbers_in = entries.value.copy()
    numbers_in[null] = 0.0
    try:
        values = numbers_in.astype(np.float64)
    except OverflowError:  # an int beyond float range
        return None
    return (values, null) if np.isfinite(values).all() else None


def _dense_column(values: list, where: _Where) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, is_missing) of one dense feature; 0 where missing."""
    for row, value in enumerate(values):
        # Exact types first: the abstract-class checks cost a microsecond each, and JSON gives int or float.
        if value is None or type(value) is float or type(value) is int:
            continue
        # bool is an int to Python, but true/false in a count is a caller's bug, not a 1 or 0.
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            raise where.error(row, f"expected a number or null, got {_show(value)}")
    missing = np.fromiter((value is None for value in values), dtype=bool, count=len(values))
    try:
        numbers_out = np.array([0.0 if value is None else value for value in values], dtype=np.float64)
    except OverflowError:  # an int beyond float range
        numbers_out = np.array([_to_float(value) for value in values], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(numbers_out))
    if len(bad):
        raise where.error(int(bad[0]), f"expected a finite number, got {_show(values[bad[0]])}")
    return numbers_out, missing


def _to_float(value) -> float:
    if value is None:
        return 0.0
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _id_column(values: list, *, limit: int, where: _Where) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 ids, is_missing) of one integer categorical feature; ids must lie in [0, limit)."""
    for row, value in enumerate(values):
        if value is None:
            continue
        if type(value) is not int:  # the exact type first: JSON gives int, and the abstract checks are slow
            if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
                raise where.error(row, f"expected an integer category id or null, got {_show(value)}")
            value = int(value)  # numpy integers would compare against a limit beyond int64 with overflow
        if not 0 <= value < limit:
            raise where.error(row, f"expected a category id in [0, {limit - 1}], got {value}")
    missing = np.fromiter((value is None for value in values), dtype=bool, count=len(values))
    ids = np.array([0 if value is None else value for value in values], dtype=np.uint64)
    return ids, missing


def _hex_column(values: list, where: _Where) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 values, is_missing) of one hex categorical feature. An empty string is missing, as an empty
    field is in a Criteo file."""
    expected = f"expected a hex string of 1-{MAX_HEX_DIGITS} digits or null"
    for row, value in enumerate(values):
        # Hex digits are ASCII; checking here also keeps strings Arrow cannot encode (lone surrogates) out.
        if value is None or (type(value) is str and value.isascii()):
            continue
        if not (isinstance(value, str) and value.isascii()):
            raise where.error(row, f"{expected}, got {_show(value)}")
    parsed, missing, bad = hex_to_uint64(pa.array(values, type=pa.string()))
    if bad is not None:
        raise where.error(bad, f"{expected}, got {_show(values[bad])}")
    return parsed, missing


def _check_serving_keys(spec: Mapping, *, source: str) -> None:
    absent = [key for key in SERVING_KEYS if key not in spec]
    if absent:
        raise FeatureSpecError(
            f"{source} lacks {', '.join(absent)}: it was written before serving could read it. Prepare the data "
            f"again to rewrite it: delete the prepared clicklog-<fingerprint> directory first (its fingerprint "
            f"is unchanged, so preparing would reuse it), then export with the new {FEATURE_SPEC_FILE}; the "
            f"prepared rows are the same, so trained weights stay valid"
        )


def _feature_names(spec: Mapping, key: str, *, count, source: str) -> list[str]:
    names = spec[key]
    if not isinstance(names, list) or not names or not all(isinstance(name, str) and name for name in names):
        raise FeatureSpecError(f"{source}: {key} must be a non-empty list of names, got {_show(names)}")
    if len(set(names)) != len(names):
        raise FeatureSpecError(f"{source}: {key} repeats a name: {_show(names)}")
    if count is not None and count != len(names):
        raise FeatureSpecError(f"{source}: {key} has {len(names)} names but the spec says there are {count}")
    return names


def _category_encoding(spec: Mapping, *, tables: int, source: str) -> CategoryEncoding:
    encoding = spec["category_encoding"]
    kind = encoding.get("kind") if isinstance(encoding, Mapping) else None
    sizes = _table_list(spec.get("table_sizes"), "table_sizes", tables=tables, source=source)
    if kind == CATEGORY_ID_PLUS_ONE:
        # Table t holds one row per id plus the missing bucket, so ids run 0..table_sizes[t] - 2.
        return CategoryEncoding(CATEGORY_ID_PLUS_ONE, "int", limits=tuple(size - 1 for size in sizes), buckets=())
    if kind != CATEGORY_HASH:
        raise FeatureSpecError(
            f"{source}: category_encoding.kind={_show(kind)}; expected {CATEGORY_ID_PLUS_ONE!r} or {CATEGORY_HASH!r}"
        )
    if encoding.get("function") != HASH_FUNCTION:
        raise FeatureSpecError(
            f"{source}: category_encoding.function={_show(encoding.get('function'))} is not the hash this server "
            f"implements ({HASH_FUNCTION!r}); buckets would not match training"
        )
    if encoding.get("input") not in CATEGORY_INPUTS:
        raise FeatureSpecError(
            f"{source}: category_encoding.input={_show(encoding.get('input'))}; expected one of {CATEGORY_INPUTS}"
        )
    buckets = _table_list(encoding.get("buckets"), "category_encoding.buckets", tables=tables, source=source)
    # Hashing exists for open vocabularies: an id training never saw still lands in some bucket.
    return CategoryEncoding(
        CATEGORY_HASH, encoding["input"], limits=(MAX_HASHED_ID + 1,) * tables, buckets=tuple(buckets)
    )


def _table_list(sizes, key: str, *, tables: int, source: str) -> list[int]:
    valid = isinstance(sizes, list) and len(sizes) == tables and all(
        isinstance(size, int) and not isinstance(size, bool) and 2 <= size <= MAX_BUCKETS for size in sizes
    )
    if not valid:
        raise FeatureSpecError(
            f"{source}: {key} must list {tables} integers in [2, {MAX_BUCKETS}] (one per categorical feature; "
            f"row 0 is the missing bucket), got {_show(sizes)}"
        )
    return sizes


def _name_range(names: Sequence[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}..{names[-1]}"


def _show(value) -> str:
    """A value as the caller wrote it in JSON, shortened."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 3] + "..."
