"""Raw named features of ranking requests -> the model inputs training saw, by the rules in feature_spec.json.

The server has only the feature_spec.json exported next to the weights, so everything the encoding needs is
read from it: the feature names, the dense transform and how each categorical value becomes a bucket. The
transforms themselves are the ones data preparation ran (datasets/click_encoding.py), applied a column at a time, so
a served candidate and a prepared row with the same raw values get the same inputs bit for bit.

A row maps feature names to raw values. An absent feature or a null is missing, as an empty field is in the
data: dense 0, bucket 0. Every refusal is a FeatureError naming the offending field, e.g.
`candidates[3].C7: expected a hex string of 1-16 digits or null, got 12.5`.
"""

import difflib
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


class FeatureSpecError(ValueError):
    """feature_spec.json cannot drive the encoder: written by an older version, or malformed. A server
    configuration problem, unlike FeatureError, which is the caller's."""


class FeatureError(ValueError):
    """One raw feature value (or row) the encoder refuses.

    `field` is where it is, `problem` what is wrong with it; str(error) is "<field>: <problem>". `row` is
    the index of the row in the encoded list and `feature` the feature name, each None when not applicable.
    """

    def __init__(self, field: str, problem: str, *, row: int | None = None, feature: str | None = None):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
        self.row = row
        self.feature = feature


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
        self._lowered = {name.lower(): name for name in self._names}

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
        if category.kind == CATEGORY_ID_PLUS_ONE:
            return np.where(missing, MISSING_BUCKET, parsed.astype(np.int64))
        return hash_to_buckets(parsed, missing, table=table, buckets=category.buckets[table])


@dataclass(frozen=True)
class _Where:
    """Names the field of one column's value in errors."""

    prefix: str
    feature: str

    def error(self, row: int, problem: str) -> FeatureError:
        return FeatureError(f"{self.prefix}[{row}].{self.feature}", problem, row=row, feature=self.feature)


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
