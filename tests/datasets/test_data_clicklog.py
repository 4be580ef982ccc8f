import glob
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conf.schema import ClickLogDataConfig
from datasets.click_encoding import NUM_CATEGORICAL, NUM_DENSE
from datasets.clicklog import (
    draw_features,
    planted_logit_parts,
    planted_model,
    prepare_clicklog,
)
from datasets.metrics import roc_auc

CARDS = [200, 100, 1000, 500, 50, 10, 500, 150, 3, 1000, 200, 1000, 300,
         20, 300, 600, 10, 200, 150, 4, 1000, 15, 15, 600, 50, 600]
SMALL = ClickLogDataConfig(rows=30_000, cardinalities=CARDS, rows_per_shard=8_000)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_clicklog(SMALL, cache_root=tmp_path_factory.mktemp("clicks"))


def read_split(directory: str) -> dict:
    table = pq.read_table(sorted(glob.glob(f"{directory}/part-*.parquet")))
    return {name: np.stack(table[name].to_numpy(zero_copy_only=False)) if name in ("dense", "sparse")
            else table[name].to_numpy() for name in table.column_names}


def test_layout_and_value_ranges(prepared):
    train, val = read_split(prepared.train_dir), read_split(prepared.val_dir)
    assert prepared.train_rows + prepared.val_rows == SMALL.rows
    assert len(train["label"]) == prepared.train_rows and len(val["label"]) == prepared.val_rows
    assert 0.07 < prepared.val_rows / SMALL.rows < 0.13
    assert train["dense"].shape == (prepared.train_rows, NUM_DENSE) and train["dense"].dtype == np.float32
    assert train["sparse"].shape == (prepared.train_rows, NUM_CATEGORICAL) and train["sparse"].dtype == np.int32
    assert set(np.unique(train["label"])) == {0.0, 1.0}
    assert prepared.table_sizes == [card + 1 for card in CARDS]
    assert (train["sparse"] >= 0).all() and (train["sparse"] < np.array(prepared.table_sizes)).all()
    missing_share = (train["sparse"] == 0).mean(axis=0)
    assert (missing_share > 0.03).sum() == NUM_CATEGORICAL // 4  # the tables with planted gaps
    assert (train["dense"] >= 0).all()  # log1p of counts clamped at 0
    spec = json.loads(open(prepared.feature_spec_path).read())
    assert spec["table_sizes"] == prepared.table_sizes and spec["missing_bucket"] == 0


def test_bayes_metrics_come_from_the_true_probabilities(prepared):
    val = read_split(prepared.val_dir)
    assert prepared.bayes["auc"] == pytest.approx(roc_auc(val["ctr"], val["label"]), abs=1e-6)
    assert 0.75 < prepared.bayes["auc"] < 0.9
    assert 0.15 < val["label"].mean() < 0.4  # a click rate in Criteo's range


def test_interactions_carry_signal_first_order_models_miss():
    """The ceiling needs interactions: the true first-order part alone, and a logistic regression fitted on
    one-hot categories and dense values, both stay well below the Bayes-optimal AUC."""
    model = planted_model(SMALL)
    rng = np.random.default_rng(7)
    features = draw_features(model, 60_000, rng)
    parts = planted_logit_parts(model, **features)
    logit = sum(parts.values()) - 1.5
    labels = (rng.random(len(logit)) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    bayes = roc_auc(logit, labels)
    assert roc_auc(parts["categories"] + parts["dense"], labels) < bayes - 0.05
    sparse = np.where(features["sparse_missing"], 0, features["ids"] + 1)
    logistic = fit_logistic(sparse[:50_000], features["dense"][:50_000], labels[:50_000], tables=[c + 1 for c in CARDS])
    scores = logistic(sparse[50_000:], features["dense"][50_000:])
    assert roc_auc(scores, labels[50_000:]) < roc_auc(logit[50_000:], labels[50_000:]) - 0.03


def fit_logistic(sparse, dense, labels, *, tables):
    """A logistic model on one-hot categories and dense values, trained with Adam for a few epochs."""
    torch.manual_seed(0)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(tables)[:-1]]))
    weights = torch.nn.EmbeddingBag(sum(tables), 1, mode="sum")
    torch.nn.init.zeros_(weights.weight)
    linear = torch.nn.Linear(dense.shape[1], 1)
    optimizer = torch.optim.Adam([*weights.parameters(), *linear.parameters()], lr=0.02)
    ids, values, target = torch.tensor(sparse) + offsets, torch.tensor(dense).float(), torch.tensor(labels)

    def score(ids, values):
        return (weights(ids) + linear(values)).squeeze(-1)

    for _ in range(4):
        for start in range(0, len(ids), 2048):
            batch = slice(start, start + 2048)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(score(ids[batch], values[batch]), target[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return lambda s, d: score(torch.tensor(s) + offsets, torch.tensor(d).float()).detach().numpy()


def test_prepared_data_is_reused_and_keyed_by_settings(prepared, tmp_path):
    again = prepare_clicklog(SMALL, cache_root=prepared.root.rsplit("/", 1)[0])
    assert again.root == prepared.root
    other_seed = prepare_clicklog(ClickLogDataConfig(rows=3000, cardinalities=CARDS, seed=1), cache_root=tmp_path)
    same_seed = prepare_clicklog(ClickLogDataConfig(rows=3000, cardinalities=CARDS), cache_root=tmp_path)
    assert other_seed.fingerprint != same_seed.fingerprint
    first = read_split(same_seed.train_dir)
    rebuilt = prepare_clicklog(ClickLogDataConfig(rows=3000, cardinalities=CARDS), cache_root=tmp_path / "fresh")
    assert np.array_equal(first["sparse"], read_split(rebuilt.train_dir)["sparse"])  # deterministic


@pytest.mark.parametrize(("overrides", "message"), [
    ({"cardinalities": [10] * 25}, "data.cardinalities must be 26"),
    ({"val_fraction": 1.0}, "data.val_fraction must be between 0 and 1"),
    ({"rows": 1}, "data.rows must be at least 2"),
    ({"source": "criteo_tsv", "path": None}, "needs data.path"),
    ({"zipf_exponent": 0.0}, "data.zipf_exponent must be positive"),
])
def test_bad_settings_name_the_key(tmp_path, overrides, message):
    cfg = ClickLogDataConfig(**{"rows": 1000, "cardinalities": CARDS, **overrides})
    with pytest.raises(ValueError, match=message):
        prepare_clicklog(cfg, cache_root=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-built left behind


def test_prepare_script_prints_the_launch_command_that_reuses_its_data(tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    def run(*args):
        return subprocess.run([sys.executable, "scripts/prepare_clicklog.py", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)

    done = run("rows=4_000", "zipf_exponent=1.2", f"cache={tmp_path}")
    assert done.returncode == 0, done.stderr
    assert "Bayes-optimal validation AUC" in done.stdout
    assert f"+exp=ranker_dlrm data.rows=4000 data.zipf_exponent=1.2 paths.data_cache={tmp_path}" in done.stdout
    (prepared_dir,) = tmp_path.glob("clicklog-*")
    # The printed overrides compose to the same data settings, so the launch finds the prepared copy.
    from omegaconf import OmegaConf

    from tests.helpers import compose_config

    launched = OmegaConf.to_object(compose_config(["+exp=ranker_dlrm", "data.rows=4000", "data.zipf_exponent=1.2"]))
    assert prepare_clicklog(launched.data, cache_root=tmp_path).root == str(prepared_dir)
    wrong = run("rowz=3", f"cache={tmp_path}")
    assert wrong.returncode == 2 and "rowz" in wrong.stderr
