"""Click logs: Criteo's shape (a 0/1 label, 13 dense and 26 categorical features) in parquet shards.

Layout of a prepared directory `<cache_root>/clicklog-<fingerprint[:16]>/`:

    train/part-00000.parquet  columns: label float32; dense fixed_size_list<float32>[13] (already transformed:
                              log1p of the count clamped at 0, 0 where missing); sparse fixed_size_list<int32>[26]
                              (bucket per table; bucket 0 means missing); ctr float32 (synthetic data only: the
                              true click probability the label was drawn from)
    val/part-00000.parquet    same columns
    feature_spec.json         how raw features become model inputs (transforms, table sizes, hashing)
    meta.json                 written last (see datasets/cache.py); also holds the Bayes-optimal metrics

Synthetic logs have planted ground truth: every row's click probability is known, so the best any model can
do on the validation split (the Bayes-optimal AUC and logloss) is recorded and reports compare against it.
"""

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np

from conf.schema import ClickLogDataConfig
from datasets.cache import META_FILE, build_into_place, read_meta, write_meta
from datasets.click_encoding import (
    CATEGORICAL_NAMES,
    CATEGORY_HASH,
    CATEGORY_ID_PLUS_ONE,
    DENSE_ENCODING,
    DENSE_NAMES,
    FEATURE_SPEC_FILE,
    HASH_FUNCTION,
    MISSING_BUCKET,
    NUM_CATEGORICAL,
    NUM_DENSE,
    SPLITS,
    hash_to_buckets,
    write_shard,
)
from datasets.criteo import convert_criteo_tsv, list_input_files
from datasets.metrics import logloss, roc_auc

logger = logging.getLogger(__name__)

# Bump when the prepared layout, the generator or the transforms change, so old caches are not reused.
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------- synthetic logs

# Latent size of the planted pairwise interactions, and the scales of the planted logit's parts. Chosen so
# that the default set (conf/data/synthetic_clicks.yaml) has a click rate of 16%, a Bayes-optimal AUC of 0.83,
# and about a third of the logit's variance in interactions that a model of first-order effects cannot
# express: the first-order part alone ranks at AUC 0.75.
LATENT_DIM = 4
INTERACTING_TABLES = 8
LOGIT_BIAS = -1.5
FIRST_ORDER_SCALE = 0.35
PAIRWISE_SCALE = 0.35
DENSE_CROSS_SCALE = 0.5
DENSE_PRODUCT_SCALE = 0.4
GENERATE_CHUNK_ROWS = 262_144


@dataclass(frozen=True)
class PlantedModel:
    """The known click probability: p = sigmoid(z), with z the sum of
      - a bias, one effect per category of every table, and a linear term in the dense features;
      - FM-style pairwise interactions <u_s[id_s], u_t[id_t]> among a subset of tables;
      - dense x category interactions x_j * <v_j, u_t[id_t]> and one dense x dense product.
    """

    cardinalities: tuple[int, ...]
    category_cdfs: list[np.ndarray]  # Zipf frequencies per table, as cumulative sums for inverse sampling
    missing_rates: np.ndarray  # per table and per dense feature (first 26, then 13)
    category_effects: list[np.ndarray]
    dense_mu: np.ndarray  # counts are floor(exp(N(mu, sigma))) - offset
    dense_sigma: np.ndarray
    dense_offset: np.ndarray
    dense_weights: np.ndarray
    interacting: tuple[int, ...]  # tables whose latent vectors interact pairwise
    latents: dict[int, np.ndarray]  # table -> (cardinality, LATENT_DIM)
    dense_cross: np.ndarray  # (3, LATENT_DIM): dense feature j crosses with table interacting[j]


def planted_model(cfg: ClickLogDataConfig) -> PlantedModel:
    cards = tuple(int(card) for card in cfg.cardinalities)
    if len(cards) != NUM_CATEGORICAL or min(cards) < 1:
        raise ValueError(f"data.cardinalities must be {NUM_CATEGORICAL} positive numbers, "
                         f"got {list(cfg.cardinalities)}")
    if cfg.zipf_exponent <= 0:
        raise ValueError(f"data.zipf_exponent must be positive, got {cfg.zipf_exponent}")
    rng = np.random.default_rng([cfg.seed, 1])  # the truth; the sample is drawn from other streams
    cdfs = []
    for card in cards:
        weights = np.arange(1, card + 1, dtype=np.float64) ** -cfg.zipf_exponent
        cdfs.append(np.cumsum(weights / weights.sum()))
    # Like Criteo, some columns are often empty: a quarter of the tables and of the dense features.
    missing = np.zeros(NUM_CATEGORICAL + NUM_DENSE)
    sparse_with_gaps = rng.choice(NUM_CATEGORICAL, NUM_CATEGORICAL // 4, replace=False)
    dense_with_gaps = NUM_CATEGORICAL + rng.choice(NUM_DENSE, NUM_DENSE // 4, replace=False)
    missing[sparse_with_gaps] = rng.uniform(0.05, 0.4, len(sparse_with_gaps))
    missing[dense_with_gaps] = rng.uniform(0.05, 0.4, len(dense_with_gaps))
    interacting = tuple(sorted(int(t) for t in rng.choice(NUM_CATEGORICAL, INTERACTING_TABLES, replace=False)))
    offset = np.zeros(NUM_DENSE)
    offset[rng.integers(NUM_DENSE)] = 3  # one feature goes negative, as Criteo's I2 does
    return PlantedModel(
        cardinalities=cards, category_cdfs=cdfs, missing_rates=missing,
        category_effects=[rng.normal(0.0, 0.6, card) for card in cards],
        dense_mu=rng.uniform(0.5, 3.0, NUM_DENSE), dense_sigma=rng.uniform(0.5, 1.5, NUM_DENSE),
        dense_offset=offset, dense_weights=rng.normal(0.0, 0.25, NUM_DENSE),
        interacting=interacting,
        latents={t: rng.normal(0.0, LATENT_DIM**-0.5, (cards[t], LATENT_DIM)) for t in interacting},
        dense_cross=rng.normal(0.0, LATENT_DIM**-0.5, (3, LATENT_DIM)),
    )


def draw_features(model: PlantedModel, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Category ids (before the missing mask), which categories are missing, and transformed dense values."""
    ids = np.stack([np.minimum(np.searchsorted(cdf, rng.random(rows)), len(cdf) - 1)
                    for cdf in model.category_cdfs], axis=1)
    sparse_missing = rng.random((rows, NUM_CATEGORICAL)) < model.missing_rates[:NUM_CATEGORICAL]
    counts = np.floor(np.exp(rng.normal(model.dense_mu, model.dense_sigma, (rows, NUM_DENSE)))) - model.dense_offset
    dense_missing = rng.random((rows, NUM_DENSE)) < model.missing_rates[NUM_CATEGORICAL:]
    dense = np.where(dense_missing, 0.0, np.log1p(np.maximum(counts, 0.0)))
    return {"ids": ids, "sparse_missing": sparse_missing, "dense": dense}


def sample_rows(model: PlantedModel, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """label, dense (transformed as Criteo's are), sparse buckets and the true click probability `ctr`."""
    features = draw_features(model, rows, rng)
    ctr = 1.0 / (1.0 + np.exp(-_planted_logit(model, **features)))
    sparse = np.where(features["sparse_missing"], MISSING_BUCKET, features["ids"] + 1)
    return {"label": (rng.random(rows) < ctr).astype(np.float32), "dense": features["dense"].astype(np.float32),
            "sparse": sparse.astype(np.int32), "ctr": ctr.astype(np.float32)}


def _planted_logit(model: PlantedModel, ids: np.ndarray, sparse_missing: np.ndarray,
                   dense: np.ndarray) -> np.ndarray:
    return LOGIT_BIAS + sum(planted_logit_parts(model, ids, sparse_missing, dense).values())


def planted_logit_parts(model: PlantedModel, ids: np.ndarray, sparse_missing: np.ndarray,
                        dense: np.ndarray) -> dict[str, np.ndarray]:
    """The planted logit (less its bias) split into its first-order and interaction parts."""
    # A missing category contributes nothing: its bucket is shared by every missing row, which a model learns.
    scaled = (dense - model.dense_mu) / (model.dense_sigma + 0.5)
    present = ~sparse_missing
    categories = sum(effects[ids[:, t]] * present[:, t] for t, effects in enumerate(model.category_effects))
    vectors = np.stack([model.latents[t][ids[:, t]] * present[:, t, None] for t in model.interacting], axis=1)
    total = vectors.sum(axis=1)
    pairwise = 0.5 * ((total**2).sum(axis=1) - (vectors**2).sum(axis=(1, 2)))  # sum over pairs s < t
    dense_cross = sum(scaled[:, j] * (vectors[:, j] @ model.dense_cross[j]) for j in range(len(model.dense_cross)))
    return {
        "categories": FIRST_ORDER_SCALE * categories,
        "dense": scaled @ model.dense_weights,
        "pairwise": PAIRWISE_SCALE * pairwise,
        "dense_cross": DENSE_CROSS_SCALE * dense_cross,
        "dense_product": DENSE_PRODUCT_SCALE * scaled[:, 0] * scaled[:, 1],
    }


# ----------------------------------------------------------------------------------------- prepared splits

@dataclass(frozen=True)
class PreparedClickLog:
    """Where prepared click-log rows live, and the facts a model needs. Plain data (see to_dict)."""

    root: str
    fingerprint: str
    source: str
    train_rows: int
    val_rows: int
    train_dir: str
    val_dir: str
    num_dense: int
    table_sizes: list[int]  # rows of each embedding table: hash buckets (or categories) plus the missing bucket
    has_ctr: bool  # the shards carry the true click probability (synthetic data)
    bayes: dict | None  # {"auc", "logloss"} of the true probability on the whole validation split, when known
    feature_spec_path: str  # how raw features become model inputs, for serving

    def to_dict(self) -> dict:
        return asdict(self)

    def columns(self, split: str) -> list[str]:
        """What training reads: the true probability only where evaluation compares against it."""
        return ["label", "dense", "sparse"] + (["ctr"] if self.has_ctr and split == "val" else [])


class ShardWriter:
    """Accumulates rows of one split and writes part-%05d.parquet files of `rows_per_shard` rows.

    Synthetic rows are drawn independently, so they need no shuffling (the Criteo reader shuffles its own)."""

    def __init__(self, directory: Path, *, rows_per_shard: int):
        self.directory, self.rows_per_shard = directory, rows_per_shard
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = self.rows = self.positives = self.shards = 0
        directory.mkdir(parents=True)

    def add(self, columns: dict[str, np.ndarray]) -> None:
        self.pending.append(columns)
        self.pending_rows += len(columns["label"])
        while self.pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def close(self) -> None:
        if self.pending_rows:
            self._flush(self.pending_rows)

    def _flush(self, count: int) -> None:
        merged = {key: np.concatenate([part[key] for part in self.pending]) for key in self.pending[0]}
        shard = {key: values[:count] for key, values in merged.items()}
        rest = {key: values[count:] for key, values in merged.items()}
        self.pending, self.pending_rows = ([rest], len(rest["label"])) if len(rest["label"]) else ([], 0)
        write_shard(self.directory / f"part-{self.shards:05d}.parquet", **shard)
        self.rows += count
        self.positives += int(shard["label"].sum())
        self.shards += 1


def prepare_clicklog(cfg: ClickLogDataConfig, *, cache_root: str | Path) -> PreparedClickLog:
    """Return the prepared rows for `cfg`, building them unless a complete copy with the same fingerprint exists."""
    settings = _settings(cfg)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    target = Path(cache_root).expanduser().resolve() / f"clicklog-{fingerprint[:16]}"
    if _read_meta(target) is None:
        started = time.perf_counter()
        build_into_place(target, partial(_build, cfg, fingerprint=fingerprint, settings=settings),
                         is_complete=lambda root: _read_meta(root) is not None)
        logger.info("prepared click logs at %s in %.1f s", target, time.perf_counter() - started)
    else:
        logger.info("reusing prepared click logs at %s", target)
    return load_prepared_clicklog(target)


def load_prepared_clicklog(root: str | Path) -> PreparedClickLog:
    root = Path(root).resolve()
    meta = _read_meta(root)
    if meta is None:
        raise ValueError(f"{root} is not a complete prepared click-log directory (no valid {META_FILE})")
    absolute = {key: str(root / meta[key]) for key in ("train_dir", "val_dir", "feature_spec_path")}
    names = [field.name for field in fields(PreparedClickLog)]
    return PreparedClickLog(**{**{name: meta[name] for name in names if name in meta}, **absolute, "root": str(root)})


def hash_buckets_per_table(cfg: ClickLogDataConfig) -> list[int] | None:
    buckets = cfg.hash_buckets
    if buckets is None and cfg.source == "synthetic":
        return None
    buckets = [buckets] * NUM_CATEGORICAL if isinstance(buckets, int) else list(buckets)
    if len(buckets) != NUM_CATEGORICAL or not all(isinstance(b, int) and b >= 2 for b in buckets):
        raise ValueError(
            f"data.hash_buckets must be one integer >= 2 or a list of {NUM_CATEGORICAL} of them, got {cfg.hash_buckets}"
        )
    return buckets


def _validate(cfg: ClickLogDataConfig) -> None:
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be between 0 and 1, got {cfg.val_fraction}")
    if cfg.rows_per_shard < 1:
        raise ValueError(f"data.rows_per_shard must be at least 1, got {cfg.rows_per_shard}")
    if cfg.source == "synthetic" and (cfg.rows is None or cfg.rows < 2):
        raise ValueError(f"data.rows must be at least 2 for data.source=synthetic, got {cfg.rows}")
    if cfg.source == "criteo_tsv" and not cfg.path:
        raise ValueError("data.source=criteo_tsv needs data.path: a Criteo TSV file or a directory of them")
    hash_buckets_per_table(cfg)


def _settings(cfg: ClickLogDataConfig) -> dict:
    """What changes the prepared rows. Criteo files are identified by name, size and modification time:
    hashing tens of gigabytes on every launch would cost minutes."""
    _validate(cfg)
    common = {"format_version": FORMAT_VERSION, "source": cfg.source, "rows": cfg.rows,
              "val_fraction": cfg.val_fraction, "rows_per_shard": cfg.rows_per_shard, "seed": cfg.seed}
    if cfg.source == "synthetic":
        return {**common, "cardinalities": list(cfg.cardinalities), "zipf_exponent": cfg.zipf_exponent,
                "hash_buckets": hash_buckets_per_table(cfg)}
    files = [{"name": path.name, "bytes": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
             for path in list_input_files(cfg.path)]
    return {**common, "hash_buckets": hash_buckets_per_table(cfg), "files": files}


def _build(cfg: ClickLogDataConfig, directory: Path, *, fingerprint: str, settings: dict) -> None:
    if cfg.source == "synthetic":
        facts = _build_synthetic(cfg, directory)
    else:
        facts = _build_criteo(cfg, directory)
    spec = {**_shared_spec(), **facts.pop("spec")}
    (directory / FEATURE_SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    write_meta(directory, {**facts, "fingerprint": fingerprint, "source": cfg.source, "settings": settings,
                           "train_dir": "train", "val_dir": "val", "num_dense": NUM_DENSE,
                           "feature_spec_path": FEATURE_SPEC_FILE})


def _shared_spec() -> dict:
    """The keys of feature_spec.json that do not depend on the source. The prose keys are for people; the
    names and encodings are what serve/features.py reads to encode raw requests as training saw them."""
    return {"num_dense": NUM_DENSE, "num_categorical": NUM_CATEGORICAL, "missing_bucket": MISSING_BUCKET,
            "dense_transform": "log1p(max(value, 0)); missing -> 0", "dense_features": DENSE_NAMES,
            "categorical_features": CATEGORICAL_NAMES, "dense_encoding": DENSE_ENCODING}


def _build_synthetic(cfg: ClickLogDataConfig, directory: Path) -> dict:
    model = planted_model(cfg)
    buckets = hash_buckets_per_table(cfg)
    writers = {split: ShardWriter(directory / split, rows_per_shard=cfg.rows_per_shard) for split in SPLITS}
    rng = np.random.default_rng([cfg.seed, 2])
    val_truth: list[tuple[np.ndarray, np.ndarray]] = []
    started, done = time.perf_counter(), 0
    while done < cfg.rows:
        count = min(GENERATE_CHUNK_ROWS, cfg.rows - done)
        chunk = sample_rows(model, count, rng)
        if buckets:
            chunk["sparse"] = _hash_synthetic(chunk["sparse"], buckets)
        is_val = rng.random(count) < cfg.val_fraction
        writers["train"].add({key: values[~is_val] for key, values in chunk.items()})
        writers["val"].add({key: values[is_val] for key, values in chunk.items()})
        val_truth.append((chunk["ctr"][is_val], chunk["label"][is_val]))
        done += count
        logger.info("generated %d/%d synthetic rows (%.0f rows/s)", done, cfg.rows,
                    done / (time.perf_counter() - started))
    for writer in writers.values():
        writer.close()
    _check_both_classes(writers, source="data.source=synthetic")
    ctr, labels = (np.concatenate(parts) for parts in zip(*val_truth, strict=True))
    bayes = {"auc": roc_auc(ctr, labels), "logloss": logloss(ctr, labels)}
    logger.info("synthetic click logs: base rate %.3f; Bayes-optimal validation AUC %.4f, logloss %.4f",
                labels.mean(), bayes["auc"], bayes["logloss"])
    if buckets:
        table_sizes, rule = buckets, f"category id + 1 -> {HASH_FUNCTION}"
        encoding = {"kind": CATEGORY_HASH, "input": "int", "buckets": buckets, "function": HASH_FUNCTION}
    else:
        table_sizes, rule = [card + 1 for card in model.cardinalities], "bucket = category id + 1 (no hashing)"
        # The largest valid id of table t is table_sizes[t] - 2: one row per category plus the missing bucket.
        encoding = {"kind": CATEGORY_ID_PLUS_ONE}
    return {**_split_facts(writers), "table_sizes": table_sizes, "has_ctr": True, "bayes": bayes,
            "spec": {"categories": rule, "table_sizes": table_sizes, "category_encoding": encoding}}


def _hash_synthetic(sparse: np.ndarray, buckets: list[int]) -> np.ndarray:
    """Hash synthetic categories as Criteo's are: tables sized for production traffic, not for this sample."""
    missing = sparse == MISSING_BUCKET
    return np.stack([hash_to_buckets(sparse[:, t], missing[:, t], table=t, buckets=size)
                     for t, size in enumerate(buckets)], axis=1)


def _build_criteo(cfg: ClickLogDataConfig, directory: Path) -> dict:
    buckets = hash_buckets_per_table(cfg)
    counts = convert_criteo_tsv(list_input_files(cfg.path), directory, hash_buckets=buckets,
                                val_fraction=cfg.val_fraction, max_rows=cfg.rows,
                                rows_per_shard=cfg.rows_per_shard, seed=cfg.seed)
    return {"train_rows": counts["train_rows"], "val_rows": counts["val_rows"], "positives": counts["positives"],
            "table_sizes": buckets, "has_ctr": False, "bayes": None,
            "spec": {"categories": f"hex value -> {HASH_FUNCTION} hash per table -> bucket 1..buckets-1",
                     "table_sizes": buckets, "hash_function": HASH_FUNCTION,
                     "category_encoding": {"kind": CATEGORY_HASH, "input": "hex", "buckets": buckets,
                                           "function": HASH_FUNCTION}}}


def _split_facts(writers: dict[str, ShardWriter]) -> dict:
    return {"train_rows": writers["train"].rows, "val_rows": writers["val"].rows,
            "positives": {split: writer.positives for split, writer in writers.items()}}


def _check_both_classes(writers: dict[str, ShardWriter], *, source: str) -> None:
    for split, writer in writers.items():
        if writer.positives in (0, writer.rows):
            raise ValueError(f"{source}: the {split} split has {writer.positives} clicks in {writer.rows} rows; "
                             f"AUC is undefined without both classes")


def _read_meta(root: Path) -> dict | None:
    return read_meta(root, required={field.name for field in fields(PreparedClickLog)} - {"root"})
