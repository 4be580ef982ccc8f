"""A sweep's 1-worker trial trains in its Tune trial's own process (trainers/session.py): the same training code as
a Ray Train worker, its checkpoints kept as Ray Train keeps them, and a crash resumed from the latest."""

import json

import pytest

from tests.helpers import TINY_OVERRIDES, compose_config, run_training
from trainers import session


def _staged_checkpoint(run_dir, step: int):
    """A checkpoint directory as the checkpoint manager stages it before reporting (one file stands for the rest)."""
    with session.checkpoint_staging(session.checkpoint_dir_name(step)) as staged:
        assert staged.parent == run_dir
    (staged / "train_state.json").write_text(json.dumps({"step": step}))
    return staged


class RecordingCallback:
    def __init__(self):
        self.reports = []

    def after_report(self, run_context, metrics, checkpoint):
        self.reports.append((metrics[0], checkpoint.path if checkpoint else None))  # one per worker: one


def test_checkpoints_are_kept_ranked_and_pruned_as_ray_train_keeps_them(tmp_path):
    """Checkpoints rank by the evaluation at their step in metrics.jsonl, which the loop logs (rank 0, through
    MetricsFile) before it reports the checkpoint; here each report follows its logged row the same way."""
    import torch

    from trainers.tracking import MetricsFile

    callback = RecordingCallback()
    run = session.InProcessRun(run_dir=tmp_path, datasets={}, keep_top_k=2, metric="val_loss", mode="min",
                               device=torch.device("cpu"), callbacks=[callback])
    metrics_file = MetricsFile(tmp_path / "metrics.jsonl", resume_step=0)

    def log_and_report(metrics: dict, *, checkpoint: bool) -> None:
        metrics_file.log(metrics)
        step = metrics["step"]
        session.report(metrics, checkpoint_dir=_staged_checkpoint(tmp_path, step) if checkpoint else None,
                       name=session.checkpoint_dir_name(step) if checkpoint else None)

    with session.in_process(run):
        assert not session.has_checkpoint()
        log_and_report({"step": 1, "train_loss": 9.0}, checkpoint=False)  # a log line: no checkpoint
        for step, val_loss in ((2, 3.0), (4, 1.0), (6, 2.0), (8, 4.0)):
            log_and_report({"step": step, "val_loss": val_loss}, checkpoint=True)
        kept = sorted(path.name for path in tmp_path.glob("checkpoint_step_*"))
        # The best two by val_loss (steps 4 and 6) and the latest (8), which a resume needs; step 2 is gone.
        assert kept == ["checkpoint_step_00000004", "checkpoint_step_00000006", "checkpoint_step_00000008"]
        assert not list(tmp_path.glob(f"{session.STAGING_PREFIX}*"))  # each staged directory was renamed into place
        assert run.best().name == "checkpoint_step_00000004" and run.latest().name == "checkpoint_step_00000008"
        with session.latest_checkpoint() as (directory, name):
            assert name == "checkpoint_step_00000008"
            assert json.loads((directory / "train_state.json").read_text()) == {"step": 8}
        # A run resumed from step 6 trains step 8 again: its row replaces the old one, its checkpoint the old one.
        metrics_file = MetricsFile(tmp_path / "metrics.jsonl", resume_step=6)
        log_and_report({"step": 8, "val_loss": 0.5}, checkpoint=True)
        assert run.best().name == "checkpoint_step_00000008"
    assert [metrics["step"] for metrics, _ in callback.reports] == [1, 2, 4, 6, 8, 8]
    assert callback.reports[0][1] is None and callback.reports[-1][1] == str(tmp_path / "checkpoint_step_00000008")
    with session.checkpoint_staging("checkpoint_step_00000010") as staged:  # closed: a temporary directory again
        assert staged.parent != tmp_path


def _last_row_per_step(run_dir, key: str) -> dict[int, float]:
    from trainers import outputs

    return {row["step"]: row[key] for row in outputs.read_metrics(run_dir) if key in row}


def test_an_in_process_run_trains_like_a_ray_train_worker_and_resumes_after_a_crash(ray_session, data_cache, tmp_path,
                                                                                     monkeypatch):
    import torch.distributed as dist

    import launch
    from trainers.config import config_from_dict
    from trainers.loop import CRASH_AT_STEP_ENV
    from trainers.run import Run, train

    overrides = ["cluster.num_workers=1", "trainer.max_steps=6", "checkpoint.keep_top_k=1"]
    on_worker = run_training(tmp_path / "worker", data_cache, overrides)

    plain = launch.plain_config(compose_config([*TINY_OVERRIDES, f"paths.root={tmp_path / 'here'}",
                                                f"paths.data_cache={data_cache}", *overrides]))
    run = Run(cfg=config_from_dict(plain), config=launch.redacted(plain), experiment="llm_tiny",
              run_dir=tmp_path / "here" / "run", in_process=True)
    monkeypatch.setenv(CRASH_AT_STEP_ENV, "5")  # after the checkpoint at step 3
    # What the in-process run exports as a launcher would, set here too so that the test's end unsets it again.
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                        ("NODE_RANK", "0")):
        monkeypatch.setenv(name, value)
    try:
        with pytest.raises(RuntimeError, match="injected crash at step 5"):
            train(run, connect=False)
        assert json.loads((run.run_dir / "summary.json").read_text())["status"] == "failed"
        # The process keeps its one-process group for the next run (DeepSpeed caches the world group it saw).
        group = dist.group.WORLD
        assert dist.get_world_size() == 1
        summary = train(run, connect=False)  # the same run again: resumes from step 3
        assert dist.group.WORLD is group
    finally:
        if dist.is_initialized():  # leave this test process as the other tests expect it
            dist.destroy_process_group()
    assert summary["status"] == "finished" and summary["steps"] == 6
    from trainers import outputs

    logged = [row["step"] for row in outputs.read_metrics(run.run_dir) if "train_loss" in row]
    assert logged.count(1) == 1 and logged.count(4) >= 1, logged  # resumed at step 4, not started again
    losses, reference = _last_row_per_step(run.run_dir, "train_loss"), _last_row_per_step(on_worker, "train_loss")
    assert sorted(losses) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for step in reference:
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), step
    assert _last_row_per_step(run.run_dir, "val_loss")[6] == pytest.approx(
        _last_row_per_step(on_worker, "val_loss")[6], rel=1e-5)
    # keep_top_k=1 with the latest kept: the best of steps 3 and 6 (6: the loss still falls) is both.
    assert sorted(path.name for path in run.run_dir.glob("checkpoint_step_*")) == ["checkpoint_step_00000006"]
    assert summary["best_checkpoint"] == str(run.run_dir / "checkpoint_step_00000006")
