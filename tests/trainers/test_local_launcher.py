"""cluster.launcher=processes (trainers/local.py): training without Ray. The prepared shards batch as Ray Data
batches them; two local processes train as a Ray Train worker group of two does, step for step, and restart from
their checkpoint after a worker fails; launch.py with one worker trains in its own process, starts no Ray, and
records its start-up phases."""

import json
import subprocess
import sys

import pytest

from tests.helpers import (
    LLM_STRATEGY_RUNS,
    RANKER_OVERRIDES,
    REPO_ROOT,
    TINY_OVERRIDES,
    assert_output_contract,
    compose_config,
    read_metrics,
    run_training,
)


def _last_row_per_step(run_dir, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(run_dir) if key in row}


@pytest.mark.parametrize("base", [TINY_OVERRIDES, RANKER_OVERRIDES], ids=["tokens", "clicklog"])
def test_shard_streams_batch_as_ray_data_does(base, ray_session, data_cache, tmp_path):
    from datasets.pipeline import build_local_datasets, build_ray_datasets
    from trainers.run import prepare_data

    cfg = compose_config([*base, f"paths.root={tmp_path}", f"paths.data_cache={data_cache}"])
    prepared = prepare_data(cfg)
    # A small in-memory limit makes Ray stream the shards, as it does a large split.
    ray_sets = build_ray_datasets(prepared, in_memory_limit_mb=0)
    local_sets = build_local_datasets(prepared)
    for split in ("train", "val"):
        for batch_size, drop_last in ((7, False), (96, True), (96, False)):
            ours = list(local_sets[split].iter_torch_batches(batch_size=batch_size, drop_last=drop_last))
            theirs = list(ray_sets[split].iter_torch_batches(batch_size=batch_size, drop_last=drop_last))
            assert len(ours) == len(theirs) > 1, (split, batch_size)
            for mine, ray_batch in zip(ours, theirs, strict=True):
                assert mine.keys() == ray_batch.keys()
                for name in mine:
                    assert mine[name].dtype == ray_batch[name].dtype and mine[name].shape == ray_batch[name].shape
                    assert bool((mine[name] == ray_batch[name]).all()), (split, batch_size, name)


def test_two_local_processes_train_as_a_ray_train_group_and_restart_after_a_crash(trained_runs, data_cache, tmp_path,
                                                                                   monkeypatch, caplog, capfd):
    """FSDP2 on two local processes: every step's train loss and the evaluations equal the Ray Train run's; a worker
    that fails at step 5 restarts both from the checkpoint at step 3; the checkpoints are kept as Ray Train keeps
    them, with no staging directory or rendezvous file left behind."""
    from trainers import local, session
    from trainers.checkpointing import checkpoint_format
    from trainers.loop import CRASH_AT_STEP_ENV

    reference = trained_runs("llm-fsdp", LLM_STRATEGY_RUNS["fsdp"])
    monkeypatch.setenv(CRASH_AT_STEP_ENV, "5")  # rank 1 fails once (the spawned processes inherit it)
    run_dir = run_training(tmp_path, data_cache, [*LLM_STRATEGY_RUNS["fsdp"], "cluster.launcher=processes"])

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished", summary
    assert (run_dir / ".crash_injected_at_5").exists()
    restarts = [record.getMessage() for record in caplog.records if "restarting from the latest" in record.getMessage()]
    assert len(restarts) == 1 and "worker 1 of 2 failed: RuntimeError: injected crash at step 5" in restarts[0]
    assert "restart 1 of checkpoint.max_failures=1" in restarts[0]
    printed = "".join(capfd.readouterr())  # the spawned workers write to this process's stdout and stderr
    assert printed.count("restored checkpoint checkpoint_step_00000003 at step 3") == 2, printed[-3000:]  # both ranks
    for key in ("train_loss", "val_loss"):
        ours, theirs = _last_row_per_step(run_dir, key), _last_row_per_step(reference, key)
        assert sorted(ours) == sorted(theirs) and ours, key
        for step in theirs:
            assert ours[step] == pytest.approx(theirs[step], rel=1e-5), (key, step)
    kept = sorted(path.name for path in run_dir.glob("checkpoint_step_*"))
    assert kept == sorted(path.name for path in reference.glob("checkpoint_step_*")), kept
    best = summary["best_checkpoint"]
    assert best and checkpoint_format(best).marker == "dcp"
    assert sorted(path.name for path in (run_dir / kept[-1] / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    assert not list(run_dir.glob(f"{session.STAGING_PREFIX}*")) and not (run_dir / local.STORE_FILE).exists()


def test_one_local_worker_trains_in_this_process_as_a_ray_train_worker_does(trained_runs, data_cache, tmp_path,
                                                                           monkeypatch, capfd):
    """With no restart left (checkpoint.max_failures=0) a crash at step 5 fails the run by name; the same command
    again resumes from step 3 and finishes, every step's loss equal to the Ray Train run's."""
    import torch.distributed as dist

    from trainers.local import WorkersFailedError
    from trainers.loop import CRASH_AT_STEP_ENV

    reference = trained_runs("reference", LLM_STRATEGY_RUNS["reference"])
    overrides = [*LLM_STRATEGY_RUNS["reference"], "cluster.launcher=processes", "checkpoint.max_failures=0"]
    monkeypatch.setenv(CRASH_AT_STEP_ENV, "5")
    with pytest.raises(WorkersFailedError, match="RuntimeError: injected crash at step 5"):
        run_training(tmp_path, data_cache, overrides)
    assert not dist.is_initialized()  # the launch's one-process group is gone with its run
    capfd.readouterr()
    run_dir = run_training(tmp_path, data_cache, overrides)
    assert not dist.is_initialized()
    assert "restored checkpoint checkpoint_step_00000003 at step 3" in "".join(capfd.readouterr())
    logged = [row["step"] for row in read_metrics(run_dir) if "train_loss" in row]
    assert logged == [1, 2, 3, 4, 5, 6]
    for key in ("train_loss", "val_loss"):
        ours, theirs = _last_row_per_step(run_dir, key), _last_row_per_step(reference, key)
        assert sorted(ours) == sorted(theirs) and ours, key
        for step in theirs:
            assert ours[step] == pytest.approx(theirs[step], rel=1e-5), (key, step)


def test_launch_with_local_processes_keeps_the_output_contract_without_starting_ray(data_cache, tmp_path):
    import os

    from trainers import startup

    command = [sys.executable, "launch.py", *TINY_OVERRIDES, "cluster.num_workers=2", "cluster.launcher=processes",
               "logger=wandb", f"paths.root={tmp_path}", f"paths.data_cache={data_cache}"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    run_dir = assert_output_contract(done.stdout, done.stderr, root=tmp_path)
    assert "Started a local Ray instance" not in done.stdout + done.stderr
    phases = startup.phases(run_dir)
    assert phases is not None and "Ray start" not in phases and phases["total"] > 0, phases
    assert "s to step 1:" in done.stdout + done.stderr
