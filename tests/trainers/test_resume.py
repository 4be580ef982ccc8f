"""Fault tolerance: a crash ends exactly where an uninterrupted run ends, and a finished run is not trained
again. (Workers killed from outside, with their whole node, are tests/cluster/test_multinode.py's; a stopped
run resumed by rerunning the command is tests/test_launch.py's Ctrl-C test.)

DDP on CPU is deterministic (fixed thread count, gloo all-reduce over 2 ranks, data order fixed by the
prepared shards), so "the same final loss" is checked as exact equality of every logged training loss.
"""


import pytest

from tests.helpers import CRASH_AT_STEP, LLM_STRATEGY_RUNS, read_metrics, run_training, train_losses
from trainers.loop import CRASH_AT_STEP_ENV

# Long enough (about 5 s of training) for a kill from outside to land mid-run.
RESUME_OVERRIDES = ["strategy=ddp", "trainer.max_steps=40", "checkpoint.every_n_steps=5",
                    "trainer.eval_every_n_steps=10", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def uninterrupted_run(ray_session, data_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    return root, run_training(root, data_cache, RESUME_OVERRIDES)


@pytest.fixture(scope="module")
def uninterrupted_losses(uninterrupted_run):
    losses = train_losses(uninterrupted_run[1])
    assert sorted(losses) == list(range(1, 41))
    return losses


def checkpoint_dirs(run_dir):
    return sorted(path.name for path in run_dir.glob("checkpoint_step_*"))


def test_worker_crash_restarts_from_latest_checkpoint(uninterrupted_losses, data_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_AT_STEP_ENV, "13")

    run_dir = run_training(tmp_path, data_cache, RESUME_OVERRIDES)

    assert (run_dir / ".crash_injected_at_13").exists(), "the fault hook did not fire"
    assert train_losses(run_dir) == uninterrupted_losses
    assert [row["step"] for row in read_metrics(run_dir) if "train_loss" in row] == list(range(1, 41))


def test_rerunning_a_finished_run_does_not_train_again(uninterrupted_run, data_cache):
    root, run_dir = uninterrupted_run
    metrics_before, checkpoints_before = (run_dir / "metrics.jsonl").read_text(), checkpoint_dirs(run_dir)

    assert run_training(root, data_cache, RESUME_OVERRIDES) == run_dir  # short-circuits on summary.json
    (run_dir / "summary.json").unlink()
    assert run_training(root, data_cache, RESUME_OVERRIDES) == run_dir  # restores step 40 = max_steps

    assert (run_dir / "metrics.jsonl").read_text() == metrics_before
    assert checkpoint_dirs(run_dir) == checkpoints_before
    assert '"status": "finished"' in (run_dir / "summary.json").read_text()


@pytest.fixture(scope="module")
def short_ddp_losses(trained_runs):
    return train_losses(trained_runs("llm-ddp", LLM_STRATEGY_RUNS["ddp"]))


# FSDP2's sharded restore is tested through a crash in tests/trainers/test_ranker_training.py.
@pytest.mark.parametrize("strategy", ["zero2", "zero3", "hsdp"])
def test_sharded_strategies_restore_their_checkpoints(strategy, short_ddp_losses, trained_runs):
    """A crash after the step-3 checkpoint: the sharded state (DCP or ZeRO partitions) must load back.

    Compared with the uninterrupted DDP run at the parity tolerance (test_strategy_parity.py). The crashed runs
    are the shared ones the parity and export tests read (tests/helpers.py: CRASH_AT_STEP).
    """
    assert CRASH_AT_STEP[f"llm-{strategy}"] == 5
    run_dir = trained_runs(f"llm-{strategy}", LLM_STRATEGY_RUNS[strategy])

    assert (run_dir / ".crash_injected_at_5").exists()
    losses = train_losses(run_dir)
    assert sorted(losses) == sorted(short_ddp_losses)
    for step, expected in short_ddp_losses.items():
        assert losses[step] == pytest.approx(expected, rel=1e-4), f"{strategy} after restore, step {step}"
