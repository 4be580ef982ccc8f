"""Ray Tune sweeps for real: ASHA stopping bad trials, the report, resources after a sweep, and resuming."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO_ROOT, TINY_OVERRIDES, compose_config, run_training

pytestmark = pytest.mark.slow

# One trial at a time over a learning rate that learns and two that cannot (1e-6 and 1e-7 leave the loss
# where it started), the good one first: ASHA records it at every rung, and the bad ones fall below the
# cutoff at the first rung (step 5). One worker per trial: each trains in its Tune trial's own process
# (trainers/session.py); the interrupted sweep below runs trials of two workers, each a Ray Train run.
ASHA_OVERRIDES = [
    "sweep=asha", "cluster.num_workers=1", "~sweep.family_space.llm", "+sweep.space.trainer.lr=[grid,3e-3,1e-6,1e-7]",
    "sweep.num_samples=1", "sweep.max_concurrent_trials=1", "trainer.max_steps=60",
    "trainer.eval_every_n_steps=5", "checkpoint.every_n_steps=30", "trainer.warmup_steps=2",
]


@pytest.fixture(scope="module")
def asha_sweep(ray_session, data_cache, tmp_path_factory):
    import launch

    root = tmp_path_factory.mktemp("asha")
    cfg = compose_config([*TINY_OVERRIDES, f"paths.root={root}", f"paths.data_cache={data_cache}", *ASHA_OVERRIDES])
    kind, sweep_dir = launch.run(cfg, experiment="llm_tiny")[0]
    assert kind == "sweep_dir"
    with (sweep_dir / "trials.csv").open() as handle:
        trials = list(csv.DictReader(handle))
    return sweep_dir, trials, ray_session


def test_asha_stops_the_bad_learning_rates_and_lets_the_good_ones_finish(asha_sweep):
    sweep_dir, trials, _ = asha_sweep
    assert len(trials) == 3
    good = [t for t in trials if float(t["trainer.lr"]) == 3e-3]
    bad = [t for t in trials if float(t["trainer.lr"]) < 1e-5]
    assert [(t["status"], t["steps"]) for t in good] == [("finished", "60")]
    assert [t["status"] for t in bad] == ["stopped", "stopped"]
    assert all(5 <= int(t["steps"]) < 60 for t in bad), [t["steps"] for t in bad]
    for trial in bad:  # the Train run ended itself, cleanly, as a stopped run
        run_summary = json.loads((sweep_dir / trial["trial_id"] / "summary.json").read_text())
        assert run_summary["status"] == "stopped"
    # Each trial trained in its own Tune process: a Ray Train worker would have recorded its placement group.
    from trainers.outputs import PLACEMENT_GROUPS_FILE

    assert not any((sweep_dir / trial["trial_id"] / PLACEMENT_GROUPS_FILE).exists() for trial in trials)


def test_the_report_names_the_best_trial_and_its_best_checkpoint(asha_sweep):
    sweep_dir, trials, _ = asha_sweep
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["metric"] == "val_loss" and summary["mode"] == "min"
    assert summary["by_status"] == {"finished": 1, "stopped": 2}
    assert summary["best_config"] == {"trainer.lr": 3e-3}
    best_row = next(t for t in trials if t["trial_id"] == summary["best_trial"])
    assert summary["best_val_loss"] == pytest.approx(min(float(t["best_val_loss"]) for t in trials))
    assert summary["best_checkpoint"] == best_row["best_checkpoint"]
    assert os.path.isdir(summary["best_checkpoint"]) and summary["best_checkpoint"].startswith(best_row["run_dir"])
    assert (sweep_dir / "trials.png").stat().st_size > 10_000
    trial_config = (sweep_dir / summary["best_trial"] / "config.yaml").read_text()
    assert "lr: 0.003" in trial_config  # each trial's run directory keeps the config it trained with


def test_promoting_a_sweep_registers_its_best_trials_best_checkpoint(asha_sweep, tmp_path):
    """`stages=[sweep,promote,...]` hands the sweep dir to promotion, which must take the best trial's best
    checkpoint and score it, on the held-out rows, as that trial reported."""
    from conf.schema import ServeConfig
    from serve.promote import promote
    from serve.registry import Registry

    sweep_dir, _, _ = asha_sweep
    summary = json.loads((sweep_dir / "summary.json").read_text())
    event = promote(ServeConfig(registry=str(tmp_path / "registry")), model="swept", source=sweep_dir,
                    experiment="llm_tiny", cache_dir=tmp_path / "cache")
    assert event["decision"] == "promoted"
    version = Registry(tmp_path / "registry").version("swept", 1)
    assert version["checkpoint"] == summary["best_checkpoint"]
    assert version["source_run"] == summary["best_run_dir"]
    assert event["challenger_value"] == pytest.approx(summary["best_val_loss"], rel=1e-5)


def test_a_finished_sweep_leaves_the_cluster_free_for_a_plain_run(asha_sweep, data_cache, tmp_path):
    _, _, ray = asha_sweep
    groups = ray.util.placement_group_table().values()
    assert [g["placement_group_id"] for g in groups if g["state"] != "REMOVED"] == []
    deadline = time.monotonic() + 10  # resources are returned asynchronously after a group is removed
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
    started = time.monotonic()
    run_dir = run_training(tmp_path, data_cache, ["trainer.max_steps=2", "checkpoint.every_n_steps=2"])
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert time.monotonic() - started < 120


def test_an_interrupted_sweep_resumes_without_training_finished_trials_again(tmp_path, data_cache):
    """Ctrl-C (SIGINT to the process group) once the first trial has finished, then the same command."""
    from tests.test_launch import _live_session_processes

    args = [sys.executable, "launch.py", *TINY_OVERRIDES, f"paths.root={tmp_path}", f"paths.data_cache={data_cache}",
            "sweep=optuna", "sweep.num_samples=2", "sweep.max_concurrent_trials=1", "trainer.max_steps=10",
            "trainer.eval_every_n_steps=5", "checkpoint.every_n_steps=5"]
    process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        first = _wait_for_a_finished_trial(tmp_path, process)
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=90)
    finally:
        for leftover in _live_session_processes(process.pid):
            leftover.kill()
    assert process.returncode == 130, output[-3000:]
    assert "rerun the same command to resume" in output
    finished_metrics = (first / "metrics.jsonl").read_text()
    finished_checkpoints = sorted(path.name for path in first.glob("checkpoint_step_*"))

    rerun = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    sweep_dir = tmp_path.joinpath(rerun.stdout.strip().splitlines()[-1].removeprefix("sweep_dir: "))
    assert sweep_dir == first.parent
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["by_status"] == {"finished": 2}
    assert (first / "metrics.jsonl").read_text() == finished_metrics, "a finished trial was trained again"
    assert sorted(path.name for path in first.glob("checkpoint_step_*")) == finished_checkpoints
    assert "resuming sweep" in rerun.stdout + rerun.stderr


def _wait_for_a_finished_trial(root, process, timeout_s: float = 240):
    deadline = time.monotonic() + timeout_s
    while True:
        for summary in root.glob("sweeps/*/*/summary.json"):
            if json.loads(summary.read_text())["status"] == "finished":
                return summary.parent
        assert time.monotonic() < deadline and process.poll() is None, "no trial finished"
        time.sleep(0.1)


def test_placement_groups_a_killed_trial_left_are_released(ray_session, tmp_path):
    """The safety net for a Train run whose driver was killed: its recorded placement group is removed."""
    from ray.util.placement_group import placement_group

    from trainers.outputs import PLACEMENT_GROUPS_FILE
    from trainers.sweep import release_leftover_placement_groups

    orphan = placement_group([{"CPU": 1}])
    ray_session.get(orphan.ready(), timeout=30)
    run_dir = tmp_path / "trial_00000"
    run_dir.mkdir()
    (run_dir / PLACEMENT_GROUPS_FILE).write_text(orphan.id.hex() + "\n")
    assert release_leftover_placement_groups([run_dir, tmp_path / "never_started"]) == 1
    assert ray_session.util.placement_group_table(orphan)["state"] == "REMOVED"
    assert release_leftover_placement_groups([run_dir]) == 0  # already gone: nothing to do
