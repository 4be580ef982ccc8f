"""Fault tolerance: a crash ends exactly where an uninterrupted run ends, and a finished run is not trained
again. (Workers killed from outside, with their whole node, are tests/cluster/test_multinode.py's; a stopped
run resumed by rerunning the command is tests/test_launch.py's Ctrl-C test.)

DDP on CPU is deterministic (fixed thread count, gloo all-reduce over 2 ranks, data order fixed by the
prepared shards), so "the same final loss" is checked as exact equality of every logged training loss.
"""

import json
from pathlib import Path

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


# ---- a rerun never resumes weights trained on other data; one launch per run directory

def _corpus(directory, *, seed: int) -> None:
    import random

    rng = random.Random(seed)
    words = ["def", "return", "class", "import", "value", "self", "for", "in", "range", "print", "data", "model"]
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(4):
        lines = (" ".join(rng.choice(words) for _ in range(12)) for _ in range(400))
        (directory / f"part{index}.txt").write_text("\n".join(lines))


def test_a_rerun_on_changed_data_refuses_to_resume_and_says_how_to_go_on(ray_session, data_cache, tmp_path):
    from tests.helpers import run_training

    corpus = tmp_path / "corpus"
    _corpus(corpus, seed=1)
    overrides = ["data=text_dir", f"data.path={corpus}", "strategy=ddp", "cluster.num_workers=1"]
    run_dir = run_training(tmp_path, data_cache, overrides)
    first = json.loads((run_dir / "manifest.json").read_text())
    assert len(first["launches"]) == 1 and first["launches"][0]["data_fingerprint"] == first["data_fingerprint"]

    (corpus / "part2.txt").write_text("an edited file: other rows, other token ids\n" * 300)
    with pytest.raises(ValueError, match=r"was trained on other data: the prepared data \(fingerprint \w+ -> \w+\) "
                                         r"and tokenizer.json \(sha256 .*checkpoint.resume=fresh.*"
                                         r"checkpoint.resume=anyway"):
        run_training(tmp_path, data_cache, overrides)
    assert json.loads((run_dir / "manifest.json").read_text()) == first  # the refusal wrote nothing
    with pytest.raises(ValueError, match=r"the run's data changed since it trained \(data fingerprint "):
        run_training(tmp_path, data_cache, [*overrides, "stage=promote", f"serve.source={run_dir}",
                                            f"serve.registry={tmp_path / 'registry'}"])

    assert run_training(tmp_path, data_cache, [*overrides, "checkpoint.resume=fresh"]) == run_dir
    set_aside = list(tmp_path.glob(f"runs/{run_dir.name}.replaced-*"))
    assert len(set_aside) == 1 and checkpoint_dirs(set_aside[0]) == checkpoint_dirs(run_dir)
    assert [row["step"] for row in read_metrics(run_dir) if "train_loss" in row] == list(range(1, 7))

    (corpus / "part3.txt").write_text("edited again\n" * 300)
    assert run_training(tmp_path, data_cache, [*overrides, "checkpoint.resume=anyway"]) == run_dir  # finished
    launches = json.loads((run_dir / "manifest.json").read_text())["launches"]
    assert len(launches) == 2 and launches[0]["data_fingerprint"] != launches[1]["data_fingerprint"]
    assert {"at", "host", "pid", "commit", "dirty", "data_files"} <= launches[1].keys()


def test_a_second_launch_of_the_same_run_is_refused_naming_the_first(ray_session, data_cache, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    from trainers import outputs

    run_dir = tmp_path / "runs" / "held"
    with outputs.run_lock(run_dir):
        with pytest.raises(ValueError, match=f"in use by another launch of the same run "
                                             rf"\(host {socket.gethostname()}, pid {os.getpid()}, since"):
            with outputs.run_lock(run_dir):
                pass
    # A holder killed with SIGKILL leaves no stale lock: the kernel drops its flock.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from trainers.outputs import run_lock; cm = run_lock(Path(sys.argv[1])); "
                               "cm.__enter__(); print('held', flush=True); time.sleep(60)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=f"pid {holder.pid}"):
        with outputs.run_lock(run_dir):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with outputs.run_lock(run_dir):
        pass
