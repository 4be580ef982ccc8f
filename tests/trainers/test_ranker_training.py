"""The ranking family on the shared spine, on small synthetic click logs with 2 gloo workers: sharded
strategies follow the single-process losses (through a crash and resume), evaluation covers the whole
validation split, and DLRM gets close to the Bayes-optimal AUC."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conf.schema import RankerConfig
from datasets.metrics import logloss, roc_auc
from tests.helpers import RANKER_QUALITY_RUN, RANKER_REFERENCE_RUN, read_metrics, run_ranker, train_losses
from trainers.loop import CRASH_AT_STEP_ENV
from trainers.ranker import build_ranker

RTOL = 1e-4
# The gap to the Bayes-optimal AUC of the quality run (tests/helpers.py: RANKER_QUALITY_RUN) is about 0.024 (a
# single process with the same recipe: 0.0241); the bound leaves room for noise, while a broken interaction, a wrong
# loss or lost gradients leave AUC far below it. The full-size bar (+exp=ranker_dlrm: 0.01) is measured by running
# it; see README.
QUALITY_GAP_BOUND = 0.04


@pytest.fixture(scope="module")
def reference_losses(trained_runs):
    losses = train_losses(trained_runs("ranker-reference", RANKER_REFERENCE_RUN, ranker=True))
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 0.05, "the reference run did not learn"
    return losses


def assert_same_losses(losses: dict, expected: dict, what: str) -> None:
    assert sorted(losses) == sorted(expected)
    for step, value in expected.items():
        assert losses[step] == pytest.approx(value, rel=RTOL), f"{what} diverges at step {step}"


def test_fsdp_matches_single_process_through_a_crash_and_resume(reference_losses, data_cache, tmp_path,
                                                                 monkeypatch):
    """FSDP2 shards every table; a worker crash at step 6 restores the step-4 sharded checkpoint. The losses
    must still be the single process's at every step."""
    monkeypatch.setenv(CRASH_AT_STEP_ENV, "6")
    run_dir = run_ranker(tmp_path, data_cache, ["strategy=fsdp"])
    assert (run_dir / ".crash_injected_at_6").exists(), "the fault hook did not fire"
    assert_same_losses(train_losses(run_dir), reference_losses, "fsdp")
    assert [row["step"] for row in read_metrics(run_dir) if "train_loss" in row] == list(range(1, 9))


def test_zero2_matches_single_process(reference_losses, data_cache, tmp_path):
    assert_same_losses(train_losses(run_ranker(tmp_path, data_cache, ["strategy=zero2"])), reference_losses, "zero2")


@pytest.fixture(scope="module")
def quality_run(trained_runs):
    return trained_runs("ranker-quality", RANKER_QUALITY_RUN, ranker=True)


def test_dlrm_comes_close_to_the_bayes_optimal_auc(quality_run):
    summary = json.loads((quality_run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["auc_gap"] == pytest.approx(summary["bayes_auc"] - summary["auc"])
    assert 0 < summary["auc_gap"] < QUALITY_GAP_BOUND, summary
    assert 0.9 < summary["calibration"] < 1.1
    assert summary["logloss"] < summary["bayes_logloss"] + 0.03


def test_reported_auc_is_the_auc_of_the_whole_validation_split(quality_run, data_cache):
    """Recompute the metrics from the final checkpoint on every validation row in one process: they must equal
    what the 2 workers reported, which they only do if predictions were gathered (not per-worker AUCs
    averaged) and the padded rows of the last, short eval batch were left out."""
    checkpoint = quality_run / "checkpoint_step_00000700"
    model_config = json.loads((checkpoint / "model_config.json").read_text())
    model = build_ranker(RankerConfig(**model_config["model"]), num_dense=model_config["num_dense"],
                         table_sizes=model_config["table_sizes"])
    model.load_state_dict(torch.load(checkpoint / "model.pt", weights_only=True))
    fingerprint = json.loads((quality_run / "manifest.json").read_text())["data_fingerprint"]
    val = pq.read_table(sorted((data_cache / f"clicklog-{fingerprint[:16]}" / "val").glob("part-*.parquet")))
    assert len(val) % 1024, "the validation split should end in a short eval batch, to exercise the padding"
    with torch.no_grad():
        dense = torch.tensor(np.stack(val["dense"].to_numpy(zero_copy_only=False)))
        sparse = torch.tensor(np.stack(val["sparse"].to_numpy(zero_copy_only=False)))
        probs = torch.sigmoid(model(dense, sparse)).numpy()
    labels = val["label"].to_numpy()
    final = [row for row in read_metrics(quality_run) if row["step"] == 700 and "auc" in row][0]
    assert final["auc"] == pytest.approx(roc_auc(probs, labels), abs=1e-6)
    assert final["logloss"] == pytest.approx(logloss(probs, labels), abs=1e-5)
    assert final["bayes_auc"] == pytest.approx(roc_auc(val["ctr"].to_numpy(), labels), abs=1e-6)
    summary = json.loads((quality_run / "summary.json").read_text())
    assert summary["best_auc"] == max(row["auc"] for row in read_metrics(quality_run) if "auc" in row)
    assert (checkpoint / "feature_spec.json").exists()


def write_criteo_tsv(path, *, rows: int, seed: int = 0) -> None:
    """Criteo-format lines (label, I1-I13, C1-C26) where C1 carries the signal: 10 "good" values click 70%
    of the time, 10 others 10%. Some fields are empty and some counts negative, as in the real logs."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(rows):
        good = rng.random() < 0.3
        label = int(rng.random() < (0.7 if good else 0.1))
        counts = ["" if rng.random() < 0.2 else str(rng.integers(-2, 200)) for _ in range(13)]
        signal = format(int(rng.integers(0, 10) if good else rng.integers(10, 20)) * 7919, "08x")
        noise = ["" if rng.random() < 0.1 else format(int(rng.integers(0, 300)), "08x") for _ in range(25)]
        lines.append("\t".join([str(label), *counts, signal, *noise]))
    path.write_text("\n".join(lines) + "\n")


def test_dcn_trains_on_criteo_format_files(ray_session, data_cache, tmp_path):
    """The user's own logs: `+exp=ranker_dcn data=criteo_tsv data.path=...` end to end."""
    write_criteo_tsv(tmp_path / "day_0", rows=6000)
    run_dir = run_ranker(tmp_path, data_cache, [
        "model=dcn_small", "data=criteo_tsv", f"data.path={tmp_path / 'day_0'}", "data.hash_buckets=1000",
        "data.val_fraction=0.2", "trainer.max_steps=16", "trainer.eval_every_n_steps=8",
        "checkpoint.every_n_steps=8",
    ])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["auc"] > 0.7, summary
    assert "bayes_auc" not in summary  # unknown for real logs
    model_config = json.loads((run_dir / "checkpoint_step_00000016" / "model_config.json").read_text())
    assert model_config["model"]["arch"] == "dcn" and model_config["table_sizes"] == [1000] * 26
