"""The click-log feature encoding: how raw Criteo-shaped features become model inputs, in one place.

Data preparation (datasets/clicklog.py for synthetic logs, datasets/criteo.py for Criteo TSV files) and serving
(serve/features.py) all encode through this module, so a served candidate and a prepared row with the same raw
values get the same inputs bit for bit. A row has 13 dense features I1..I13 (integer counts, possibly negative
or missing) and 26 categorical features C1..C26 (category ids or 1-16 hex digits, possibly missing). A dense
value becomes log1p(max(count, 0)), 0 where missing; a category becomes a bucket of its table, bucket 0 meaning
missing. The names and encodings here are written into feature_spec.json and the buckets into prepared shards:
changing one re-encodes every prepared data set (bump FORMAT_VERSION in datasets/clicklog.py).
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

NUM_DENSE = 13
NUM_CATEGORICAL = 26
MISSING_BUCKET = 0
DENSE_NAMES = [f"I{index}" for index in range(1, NUM_DENSE + 1)]
CATEGORICAL_NAMES = [f"C{index}" for index in range(1, NUM_CATEGORICAL + 1)]
FEATURE_SPEC_FILE = "feature_spec.json"
# Encodings named in feature_spec.json; serve/features.py implements each. Renaming one breaks exported specs.
DENSE_ENCODING = "log1p_clamped"
CATEGORY_ID_PLUS_ONE = "id_plus_one"
CATEGORY_HASH = "hash"
MAX_HEX_DIGITS = 16
# A bucket is an int32 and bucket 0 is reserved for "missing".
MAX_BUCKETS = 2**31
# Named in feature_spec.json, so a server hashing raw requests knows which function to apply.
HASH_FUNCTION = "splitmix64-finalizer(value xor table salt) % (buckets - 1) + 1"
# A prepared directory holds one folder of shards per split (see write_shard).
SPLITS = ("train", "val")

_MASK64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# Digit value of every byte; 255 marks a byte that is not a hex digit.
_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _digits, _first in ((b"0123456789", 0), (b"abcdef", 10), (b"ABCDEF", 10)):
    _HEX_VALUE[np.frombuffer(_digits, dtype=np.uint8)] = np.arange(_first, _first + len(_digits))


def transform_dense(values: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """int64 counts (n, 13) -> float32 log1p(max(count, 0)); missing -> 0."""
    # log1p in float64 first: float32 would round counts above 2**24 before the log.
    transformed = np.log1p(np.maximum(values, 0).astype(np.float64)).astype(np.float32)
    transformed[missing] = 0.0
    return transformed


def hex_to_uint64(strings: pa.Array) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Parse 1-16 hex digits per value into uint64: (values, is_missing, index of the first invalid or None).

    Works on the Arrow buffers without a Python loop over rows. Empty or null values are missing (value 0);
    invalid values also read as 0.
    """
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    offsets, data = _string_buffers(strings)
    lengths = np.diff(offsets)
    if strings.null_count:
        lengths[_null_mask(strings)] = 0
    missing = lengths == 0
    digits = np.take(_HEX_VALUE, data[offsets[0] : offsets[-1]])
    bad_digits = np.flatnonzero(digits == 255)
    invalid = lengths > MAX_HEX_DIGITS
    if len(bad_digits):
        # Rare, so mapping the few bad bytes back to their rows costs nothing in the common case.
        invalid[np.searchsorted(offsets, offsets[0] + bad_digits, side="right") - 1] = True
        invalid &= ~missing  # bytes behind a null slot are not a value
    width = int(lengths.max(initial=0))
    # Every value `width` digits long and no bytes behind null slots: the digits lie back to back.
    equal = width in (2, 4, 8, 16) and lengths.sum() == len(digits) == width * np.count_nonzero(~missing)
    if equal and not len(bad_digits):
        values = _parse_equal_lengths(digits, missing, width=width)
    else:
        values = _parse_any_lengths(digits, offsets - offsets[0], lengths, invalid)
    bad = np.flatnonzero(invalid)
    return values, missing, int(bad[0]) if len(bad) else None


def _parse_equal_lengths(digits: np.ndarray, missing: np.ndarray, *, width: int) -> np.ndarray:
    # The common case: real Criteo files write every category as 8 digits. Reshape the digits into rows,
    # pair them into bytes and read those as big-endian integers.
    rows = digits.reshape(-1, width)
    packed = (rows[:, 0::2] << 4) | rows[:, 1::2]
    values = np.zeros(len(missing), dtype=np.uint64)
    values[~missing] = packed.view(f">u{width // 2}").reshape(-1)
    return values


def _parse_any_lengths(digits: np.ndarray, starts: np.ndarray, lengths: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    # Each value's digits are gathered right-aligned into an (n, 16) matrix, left-padded with zeros.
    count = len(lengths)
    used = np.where(invalid, 0, lengths)
    width = int(used.max(initial=0))
    matrix = np.zeros((count, MAX_HEX_DIGITS), dtype=np.uint8)
    if width:
        column = np.arange(width)
        positions = (starts[:-1] + used)[:, None] - width + column
        gathered = digits[np.clip(positions, 0, max(len(digits) - 1, 0))]
        gathered[column < (width - used)[:, None]] = 0
        matrix[:, MAX_HEX_DIGITS - width :] = gathered
    packed = (matrix[:, 0::2] << 4) | matrix[:, 1::2]
    return packed.view(">u8").reshape(count).astype(np.uint64)


def _null_mask(array: pa.Array) -> np.ndarray:
    # Straight from the validity bitmap: Array.is_null().to_numpy() was measured ~100x slower per block.
    validity = array.buffers()[0]
    if validity is None:
        return np.zeros(len(array), dtype=bool)
    bits = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")
    return bits[array.offset : array.offset + len(array)] == 0


def _string_buffers(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets as int64, data bytes) of a string or large_string array."""
    offset_type = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    _, offsets_buffer, data_buffer = strings.buffers()
    if offsets_buffer is None:  # an empty array may come without buffers
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8)
    offsets = np.frombuffer(
        offsets_buffer,
        dtype=offset_type,
        count=len(strings) + 1,
        offset=strings.offset * np.dtype(offset_type).itemsize,
    )
    data = np.zeros(0, dtype=np.uint8) if data_buffer is None else np.frombuffer(data_buffer, dtype=np.uint8)
    return offsets.astype(np.int64), data


def hash_to_buckets(values: np.ndarray, missing: np.ndarray, *, table: int, buckets: int) -> np.ndarray:
    """A stable hash of each value (salted per table, so tables hash independently) into 1..buckets-1.

    Missing values go to MISSING_BUCKET (0). The hash is the splitmix64 finalizer, which mixes every input
    bit into every output bit, so nearby ids (Criteo's are often sequential) spread evenly over the buckets.
    """
    if not 2 <= buckets <= MAX_BUCKETS:
        raise ValueError(f"data.hash_buckets[{table}]={buckets} must be in [2, {MAX_BUCKETS}]; bucket 0 is 'missing'")
    mixed = _mix64(np.asarray(values, dtype=np.uint64) ^ np.uint64(_salt(table, stream=1)))
    mixed %= np.uint64(buckets - 1)
    result = mixed.astype(np.int32)
    result += 1
    result[missing] = MISSING_BUCKET
    return result


PREIMAGE_SEARCH_CHUNK = 1 << 20
# Finding a raw value for every bucket takes about buckets * ln(wanted) hashes (the hash mixes every bit, so
# consecutive values land in random buckets): a few seconds up to 2**24 buckets, hours for Criteo's 2**31.
PREIMAGE_MAX_BUCKETS = 1 << 24
PREIMAGE_TRIES_PER_BUCKET = 64  # values tried per bucket: a bucket is missed by chance with probability e**-64


def hash_preimages(wanted: set[int], *, table: int, buckets: int, plus_one: bool) -> dict[int, int]:
    """{bucket: the smallest raw value that hashes into it} for the `wanted` buckets of a table (of raw integer
    ids, which preparation hashes as id + 1: `plus_one`; of hex values, hashed as they are)."""
    if not wanted:
        return {}
    if buckets > PREIMAGE_MAX_BUCKETS:
        raise ValueError(f"categorical table {table} hashes into {buckets} buckets, too many to find a raw value for "
                         f"each (at most {PREIMAGE_MAX_BUCKETS}): replay the raw files instead")
    found: dict[int, int] = {}
    for start in range(0, PREIMAGE_TRIES_PER_BUCKET * buckets, PREIMAGE_SEARCH_CHUNK):
        values = np.arange(start, start + PREIMAGE_SEARCH_CHUNK, dtype=np.uint64)
        hashed = hash_to_buckets(values + np.uint64(plus_one), np.zeros(len(values), dtype=bool), table=table,
                                 buckets=buckets)
        wanted_here = np.isin(hashed, np.fromiter(wanted - found.keys(), dtype=np.int64))
        for value, bucket in zip(values[wanted_here].tolist(), hashed[wanted_here].tolist(), strict=True):
            found.setdefault(bucket, value)
        if len(found) == len(wanted):
            return found
    missing = sorted(wanted - found.keys())[:5]
    raise ValueError(f"categorical table {table}: no raw value under {PREIMAGE_TRIES_PER_BUCKET * buckets} hashes to "
                     f"buckets {missing} of {buckets}")


def _mix64(values: np.ndarray) -> np.ndarray:
    # numpy uint64 arrays wrap on overflow, which is the modular arithmetic splitmix64 wants.
    mixed = values ^ (values >> np.uint64(30))
    mixed *= np.uint64(_MIX1)
    mixed ^= mixed >> np.uint64(27)
    mixed *= np.uint64(_MIX2)
    mixed ^= mixed >> np.uint64(31)
    return mixed


def _salt(number: int, *, stream: int) -> int:
    """A 64-bit salt from (number, stream), in Python ints so numpy scalars never warn about overflow."""
    mixed = ((number & _MASK64) * _GOLDEN + stream * _MIX2) & _MASK64
    mixed = ((mixed ^ (mixed >> 30)) * _MIX1) & _MASK64
    mixed = ((mixed ^ (mixed >> 27)) * _MIX2) & _MASK64
    return mixed ^ (mixed >> 31)


# ------------------------------------------------------------------------------------------------ shards

def write_shard(path: Path, *, label: np.ndarray, dense: np.ndarray, sparse: np.ndarray,
                ctr: np.ndarray | None = None) -> None:
    """One parquet shard: label (n,), dense (n, 13) float, sparse (n, 26) int buckets, optional ctr (n,)."""
    rows = len(label)
    if dense.shape != (rows, NUM_DENSE) or sparse.shape != (rows, NUM_CATEGORICAL):
        raise AssertionError(f"shard arrays disagree: label {label.shape}, dense {dense.shape}, sparse {sparse.shape}")
    columns = {
        "label": pa.array(np.asarray(label, dtype=np.float32)),
        "dense": _fixed_size_list(np.asarray(dense, dtype=np.float32), pa.float32()),
        "sparse": _fixed_size_list(np.asarray(sparse, dtype=np.int32), pa.int32()),
    }
    if ctr is not None:
        columns["ctr"] = pa.array(np.asarray(ctr, dtype=np.float32))
    pq.write_table(pa.table(columns), path)


def _fixed_size_list(matrix: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])
