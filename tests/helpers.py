"""Shared test helpers: compose a config the way launch.py does and run it on the session's Ray."""

import contextlib
import json
import os
import socket
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small enough that one Ray Train run of a few steps takes seconds on 2 cores.
TINY_OVERRIDES = [
    "+exp=llm_tiny",
    "data.max_chars=400000",
    "data.seq_len=64",
    "data.val_fraction=0.2",
    "trainer.max_steps=6",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.warmup_steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.eval_every_n_steps=3",
    "trainer.eval_batches=2",
    "checkpoint.every_n_steps=3",
]


# A DLRM on a small synthetic click log: 8 steps of 512 rows, 2 micro-batches of 128 per worker and step.
RANKER_OVERRIDES = [
    "+exp=ranker_dlrm",
    "data.rows=24000",
    "data.cardinalities=[40,20,200,100,10,5,100,30,3,200,40,200,60,5,60,120,4,40,30,4,200,5,5,120,10,120]",
    "data.rows_per_shard=4096",
    "trainer.max_steps=8",
    "trainer.global_batch_size=512",
    "trainer.micro_batch_size=128",
    "trainer.warmup_steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.eval_every_n_steps=4",
    "checkpoint.every_n_steps=4",
]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def composition_error(overrides: list[str]) -> str:
    """What Hydra says when `overrides` do not compose: its message and the validation error under it."""
    from hydra.errors import ConfigCompositionException

    try:
        compose_config(overrides)
    except ConfigCompositionException as err:
        return f"{err}\n{err.__cause__}"
    raise AssertionError(f"{overrides} composed")


def run_training(root: Path, data_cache: Path, overrides: list[str] = (), *, experiment: str = "llm_tiny",
                 base: list[str] = TINY_OVERRIDES) -> Path:
    """launch.run for the tiny config plus `overrides`, outputs under `root`; returns the run directory."""
    import launch

    cfg = compose_config([*base, f"paths.root={root}", f"paths.data_cache={data_cache}", *overrides])
    _, directory = launch.run(cfg, experiment=experiment, command_line=list(overrides))[0]
    return directory


def run_ranker(root: Path, data_cache: Path, overrides: list[str] = ()) -> Path:
    return run_training(root, data_cache, overrides, experiment="ranker_dlrm", base=RANKER_OVERRIDES)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["train_loss"] for row in read_metrics(run_dir) if "train_loss" in row}


# Runs that several modules read: the strategy parity tests check their losses, the serve tests export them.
LLM_STRATEGY_RUNS = {
    "reference": ["strategy=ddp", "cluster.num_workers=1"],
    "ddp": ["strategy=ddp", "cluster.num_workers=2"],
    "fsdp": ["strategy=fsdp", "cluster.num_workers=2"],
    "zero2": ["strategy=zero2", "cluster.num_workers=2"],
    "zero3": ["strategy=zero3", "cluster.num_workers=2"],
    # 4 gloo workers as a 2x2 mesh: 2 replicas of 2-way shard groups (half a CPU each on the 4-CPU test Ray)
    "hsdp": ["strategy=hsdp", "strategy.hsdp_shard_size=2", "cluster.num_workers=4", "cluster.cpus_per_worker=0.5"],
}
RANKER_REFERENCE_RUN = ["strategy=ddp", "cluster.num_workers=1"]
# Two passes over 360k training rows in 700 steps of 1024: about 15 s of training on 2 cores, close to the
# Bayes-optimal AUC (tests/trainers/test_ranker_training.py). The rollout tests serve it as a good production.
RANKER_QUALITY_RUN = ["data.rows=400000", "trainer.max_steps=700", "trainer.global_batch_size=1024",
                      "trainer.micro_batch_size=512", "trainer.eval_every_n_steps=350", "checkpoint.every_n_steps=350",
                      "trainer.log_every_n_steps=50", "trainer.warmup_steps=10"]
# The sharded runs crash once, after their step-3 checkpoint (the test-only hook), and go on from it: the parity,
# export and serving tests read them as any finished run, and tests/trainers/test_resume.py checks the restore.
CRASH_AT_STEP = {"llm-zero2": 5, "llm-zero3": 5, "llm-hsdp": 5}


def assert_output_contract(stdout: str, stderr: str, *, root: Path) -> Path:
    """What a finished TINY_OVERRIDES run with logger=wandb (offline) leaves behind and prints (DESIGN.md
    section 3); returns the run directory."""
    output = stdout + stderr
    last_line = stdout.strip().splitlines()[-1]
    assert last_line.startswith("run_dir: "), output[-3000:]
    run_dir = root.joinpath(last_line.removeprefix("run_dir: ")).resolve()
    assert run_dir.parent == (root / "runs").resolve() and run_dir.name.startswith("llm_tiny-")

    assert "step 6/6 | loss" in output  # rank-0 progress line
    assert "max_steps: 6" in (run_dir / "config.yaml").read_text()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config_hash"].startswith(run_dir.name.split("-")[-1])
    assert set(manifest["git"]) == {"commit", "dirty"} and manifest["world_size"] == 2
    assert all(manifest["versions"][name] for name in ("torch", "ray", "deepspeed"))
    assert len(manifest["data_fingerprint"]) == 64 and manifest["strategy"] == "ddp"

    rows = read_metrics(run_dir)
    logged = [row for row in rows if "train_loss" in row]
    assert [row["step"] for row in logged] == [1, 2, 3, 4, 5, 6]
    for key in ("train_loss", "grad_norm", "lr", "tokens_per_s", "step_time_s"):
        assert all(row[key] > 0 for row in logged), key
    assert [row["step"] for row in rows if "val_loss" in row] == [3, 6]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 6
    assert os.path.isdir(summary["best_checkpoint"])
    best = root.joinpath(summary["best_checkpoint"])
    assert json.loads((best / "model_config.json").read_text())["model"]["preset"] == "tiny"
    assert (best / "tokenizer.json").exists() and (best / "train_state.json").exists()
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "wandb").glob("offline-run-*")), "logger=wandb left no offline run"
    return run_dir


@contextlib.contextmanager
def one_rank_group():
    """A one-rank gloo process group in this process, with the launcher variables DeepSpeed reads, for the
    strategies' own code called directly. A one-rank group already here (a process keeps the group of an
    in-process sweep trial, trainers/loop.py) is used as it is and left in place."""
    import pytest
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as patch:
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            patch.setenv(name, "1" if "WORLD" in name else "0")
        if dist.is_initialized():
            assert dist.get_world_size() == 1
            yield
            return
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
