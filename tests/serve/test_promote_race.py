"""Two promoters at once (issue 14 item 5): deciding and moving production is one step, a compare-and-set on
the production the gate compared against, and the same weights registered twice at once are one version."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conf.schema import ServeConfig
from serve import promote
from serve.export import export_checkpoint
from serve.registry import AliasMoved, Registry
from tests.helpers import LLM_STRATEGY_RUNS

MODEL = "tiny"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _noisy_export(candidate: promote.Candidate, directory: Path, *, scale: float) -> Path:
    """The run's export with Gaussian noise on every weight: the larger `scale`, the worse the model."""
    export_checkpoint(candidate.checkpoint, directory, info={"step": candidate.step, "noise": scale})
    generator = torch.Generator().manual_seed(0)
    for shard in sorted(directory.glob("model-*.safetensors")):  # the Hugging Face layout of an LLM export
        weights = load_file(str(shard))
        noisy = {name: tensor + scale * torch.randn(tensor.shape, generator=generator)
                 for name, tensor in weights.items()}
        save_file(noisy, str(shard), metadata={"format": "pt"})
    return directory


def _wait_for(condition, *, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_two_promoters_that_both_beat_production_end_on_the_better_one(trained_runs, tmp_path, monkeypatch):
    candidate = promote.best_candidate(trained_runs("llm-ddp", LLM_STRATEGY_RUNS["ddp"]))
    registry = Registry(tmp_path / "registry")
    versions = {}
    for quality, scale in (("worst", 0.3), ("medium", 0.05), ("best", 0.0)):
        export = _noisy_export(candidate, tmp_path / quality, scale=scale)
        versions[quality] = registry.register(MODEL, export, metadata={"quality": quality})["version"]
    registry.move_alias(MODEL, "production", versions["worst"], reason="the incumbent")

    # Both promoters score against the incumbent before either moves; the worse one then moves last, which
    # is the order that used to leave it in production.
    real_decide, both_scored, decided = promote.decide, threading.Barrier(2, timeout=300), threading.local()

    def decide_in_lockstep(**kwargs):
        decision = real_decide(**kwargs)
        if not getattr(decided, "once", False):
            decided.once = True
            both_scored.wait()
            if threading.current_thread().name == "medium":
                _wait_for(lambda: registry.resolve(MODEL, "production") == versions["best"], what="best's move")
        return decision

    monkeypatch.setattr(promote, "decide", decide_in_lockstep)
    serve_cfg, results = ServeConfig(registry=str(tmp_path / "registry")), {}

    def promote_one(quality: str) -> None:
        results[quality] = promote.promote_version(registry, MODEL, versions[quality], candidate,
                                                   serve_cfg=serve_cfg, cache_dir=tmp_path / "cache")

    threads = [threading.Thread(target=promote_one, args=(quality,), name=quality) for quality in ("medium", "best")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)

    assert registry.resolve(MODEL, "production") == versions["best"]
    assert results["best"]["decision"] == "promoted"
    medium = results["medium"]
    assert medium["decision"] == "refused" and medium["production"] == versions["best"], medium
    assert medium["production_value"] < medium["challenger_value"]  # val_loss: lower is better
    moves = [event for event in registry.history(MODEL) if event["event"] == "alias"]
    assert [(event["from"], event["to"]) for event in moves] == [(None, versions["worst"]),
                                                                 (versions["worst"], versions["best"])]
    gates = [event for event in registry.history(MODEL) if event["event"] == "gate"]
    assert sorted((event["challenger"], event["decision"]) for event in gates) == [
        (versions["medium"], "refused"), (versions["best"], "promoted")]


def test_two_promoters_of_the_same_weights_at_once_register_one_version(trained_runs, tmp_path, monkeypatch):
    source = trained_runs("llm-ddp", LLM_STRATEGY_RUNS["ddp"])
    # Both have their export in hand before either asks whether the weights are registered.
    real_export, both_exported = promote.export_checkpoint, threading.Barrier(2, timeout=300)

    def export_in_lockstep(*args, **kwargs):
        directory = real_export(*args, **kwargs)
        both_exported.wait()
        return directory

    monkeypatch.setattr(promote, "export_checkpoint", export_in_lockstep)
    serve_cfg, results = ServeConfig(registry=str(tmp_path / "registry")), []

    def promote_once(index: int) -> None:
        results.append(promote.promote(serve_cfg, model=MODEL, source=source, experiment="llm_tiny",
                                       cache_dir=tmp_path / f"cache{index}"))

    threads = [threading.Thread(target=promote_once, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)

    registry = Registry(tmp_path / "registry")
    # One version, whichever promoter committed first: the loser's claimed number stays unused (never reused).
    (only,) = [record["version"] for record in registry.versions(MODEL)]
    assert [event["challenger"] for event in results] == [only, only]
    assert sorted(event["decision"] for event in results) == ["promoted", "unchanged"]
    assert registry.resolve(MODEL, "production") == only
    assert [event["version"] for event in registry.history(MODEL) if event["event"] == "register"] == [only]


DEDUPE_SCRIPT = """
import sys, time
from pathlib import Path
from serve.registry import Registry
root, export_dir, worker, gate = sys.argv[1:]
Path(gate, f"ready-{worker}").touch()
while not Path(gate, "go").exists():
    time.sleep(0.001)
record = Registry(root).register("ranker", Path(export_dir), metadata={"worker": int(worker)},
                                 dedupe_file="model.safetensors")
print(record["version"])
"""


def test_processes_registering_identical_weights_at_once_share_one_version(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(os.urandom(1 << 20))
    (export / "model_config.json").write_text(json.dumps({"hidden": 8}))
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    processes = [subprocess.Popen([sys.executable, "-c", DEDUPE_SCRIPT, str(tmp_path / "registry"), str(export),
                                   str(worker), str(gate)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for worker in range(4)]
    _wait_for(lambda: len(list(gate.glob("ready-*"))) == 4 or any(p.poll() is not None for p in processes),
              what="the workers to start")
    (gate / "go").touch()
    outputs = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), [errors for _, errors in outputs]

    registry = Registry(tmp_path / "registry")
    (only,) = [record["version"] for record in registry.versions(MODEL_RANKER)]
    assert [int(out) for out, _ in outputs] == [only] * 4
    assert [(event["event"], event["version"]) for event in registry.history(MODEL_RANKER)] == [("register", only)]


MODEL_RANKER = "ranker"


def test_an_alias_move_that_expects_another_version_is_refused_naming_the_current_one(tmp_path):
    registry = Registry(tmp_path / "registry")
    for seed in (1, 2, 3):
        export = tmp_path / f"export{seed}"
        export.mkdir()
        (export / "model.safetensors").write_bytes(bytes([seed]) * 64)
        registry.register(MODEL, export, metadata={})
    registry.move_alias(MODEL, "production", 1, reason="first", expected=None)
    registry.move_alias(MODEL, "production", 3, reason="someone else's move", expected=1)
    with pytest.raises(AliasMoved, match="production.*v3") as moved:
        registry.move_alias(MODEL, "production", 2, reason="stale decision", expected=1)
    assert (moved.value.expected, moved.value.current) == (1, 3)
    with pytest.raises(AliasMoved):
        registry.move_alias(MODEL, "production", 2, reason="thought it was unset", expected=None)
    assert registry.resolve(MODEL, "production") == 3
    assert len([event for event in registry.history(MODEL) if event["event"] == "alias"]) == 2
