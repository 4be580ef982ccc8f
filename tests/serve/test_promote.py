"""Promotion end to end on real runs: export -> registry version -> eval gate against production -> alias,
plus rollback, the registry listing, and two `launch.py stage=promote` processes racing."""

import os
import subprocess
import sys

import pytest

import launch
from conf.schema import ServeConfig
from serve import promote
from serve.registry import Registry
from tests.helpers import LLM_STRATEGY_RUNS, REPO_ROOT, compose_config

MODEL = "tiny"


@pytest.fixture
def registry_dir(tmp_path):
    return tmp_path / "registry"


def promote_run(run_dir, registry_dir, tmp_path, **settings):
    serve_cfg = ServeConfig(registry=str(registry_dir), **settings)
    return promote.promote(serve_cfg, model=MODEL, source=run_dir, experiment="llm_tiny",
                           cache_dir=tmp_path / "cache")


def events(registry_dir, kind):
    return [event for event in Registry(registry_dir).history(MODEL) if event["event"] == kind]


def test_the_gate_promotes_refuses_and_records_both_numbers(trained_runs, registry_dir, tmp_path):
    ddp = trained_runs("llm-ddp", LLM_STRATEGY_RUNS["ddp"])
    zero3 = trained_runs("llm-zero3", LLM_STRATEGY_RUNS["zero3"])
    first = promote_run(ddp, registry_dir, tmp_path)
    assert first["decision"] == "promoted" and first["production_value"] is None
    registry = Registry(registry_dir)
    assert registry.resolve(MODEL, "production") == 1
    record = registry.version(MODEL, 1)
    assert record["source_run"] == str(ddp) and record["step"] == 6 and record["strategy"] == "ddp"
    assert record["config_hash"] and record["data_fingerprint"] and "val_loss" in record["trained_metrics"]

    # The ZeRO-3 run learned the same thing (the strategies agree to 1e-4), so it cannot beat production by 10.
    refused = promote_run(zero3, registry_dir, tmp_path, min_improvement=10.0)
    assert refused["decision"] == "refused" and refused["challenger"] == 2 and refused["production"] == 1
    assert refused["challenger_value"] == pytest.approx(refused["production_value"], rel=1e-3)
    assert registry.resolve(MODEL, "production") == 1, "a refused challenger must not move production"

    forced = promote_run(zero3, registry_dir, tmp_path, min_improvement=10.0, force=True)
    assert forced["decision"] == "promoted" and forced["forced"] and forced["challenger"] == 2
    assert registry.resolve(MODEL, "production") == 2
    assert [e["to"] for e in events(registry_dir, "alias")] == [1, 2]
    assert len(registry.versions(MODEL)) == 2, "the same weights promoted twice are one version"


def test_rollback_returns_to_the_previous_production(trained_runs, registry_dir, tmp_path):
    promote_run(trained_runs("llm-ddp", LLM_STRATEGY_RUNS["ddp"]), registry_dir, tmp_path)
    with pytest.raises(ValueError, match="no earlier version"):
        promote.rollback(ServeConfig(registry=str(registry_dir)), model=MODEL)
    promote_run(trained_runs("llm-fsdp", LLM_STRATEGY_RUNS["fsdp"]), registry_dir, tmp_path, force=True)
    registry = Registry(registry_dir)
    assert registry.resolve(MODEL, "production") == 2
    event = promote.rollback(ServeConfig(registry=str(registry_dir)), model=MODEL)
    assert (event["from"], event["to"]) == (2, 1) and event["reason"] == "rollback from v2"
    promote.rollback(ServeConfig(registry=str(registry_dir), to_version=2, reason="fixed"), model=MODEL)
    assert registry.resolve(MODEL, "production") == 2
    with pytest.raises(ValueError, match="version 7"):
        promote.rollback(ServeConfig(registry=str(registry_dir), to_version=7), model=MODEL)


def test_launch_stages_for_the_registry(trained_runs, tmp_path, capsys):
    """stage=promote / registry / rollback as a user types them (composed by Hydra, run by launch.run)."""
    ddp = trained_runs("llm-ddp", LLM_STRATEGY_RUNS["ddp"])
    common = [f"paths.root={tmp_path}", f"serve.model={MODEL}"]
    with pytest.raises(ValueError, match="serve.source"):
        launch.run(compose_config(["stage=promote", *common]), experiment="default")
    results = launch.run(compose_config(["stage=promote", f"serve.source={ddp}", *common]), experiment="default")
    assert results == [("promotion", f"{MODEL} v1 promoted")]
    results = launch.run(compose_config(["stage=registry", *common]), experiment="default")
    listing = capsys.readouterr().out
    assert "v1" in listing and "production" in listing and "gate v1: promoted" in listing
    assert results == [("registry", f"{MODEL} production v1")]
    results = launch.run(compose_config(["stage=canary", "serve.canary_version=1", "serve.canary_percent=10",
                                         *common]), experiment="default")
    assert results == [("canary", f"{MODEL} canary v1, production v1")]
    assert Registry(tmp_path / "registry").aliases(MODEL)["canary"]["percent"] == 10
    launch.run(compose_config(["stage=canary", "serve.canary_percent=0", *common]), experiment="default")
    assert "canary" not in Registry(tmp_path / "registry").aliases(MODEL)
    with pytest.raises(ValueError, match="stages=\\['train', 'deploy'\\] must name stages from"):
        launch.run(compose_config(["stages=[train,deploy]", *common]), experiment="default")
    with pytest.raises(ValueError, match="promote must come after train"):
        launch.run(compose_config(["stages=[promote,train]", *common]), experiment="default")


def test_two_processes_promoting_at_once_get_distinct_versions(trained_runs, tmp_path):
    """Two `launch.py stage=promote` processes racing on one registry: both versions land, both gate
    decisions are in the history, and production points at one of them."""
    sources = [trained_runs(f"llm-{s}", LLM_STRATEGY_RUNS[s]) for s in ("ddp", "fsdp")]
    registry_dir = tmp_path / "registry"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    processes = [subprocess.Popen(
        [sys.executable, "launch.py", "stage=promote", f"serve.model={MODEL}", f"serve.source={source}",
         f"serve.registry={registry_dir}", "serve.force=true", f"paths.root={tmp_path / str(i)}"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) for i, source in enumerate(sources)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    registry = Registry(registry_dir)
    assert sorted(v["version"] for v in registry.versions(MODEL)) == [1, 2]
    assert sorted(v["source_run"] for v in registry.versions(MODEL)) == sorted(map(str, sources))
    assert len(events(registry_dir, "gate")) == 2 and len(events(registry_dir, "register")) == 2
    assert registry.resolve(MODEL, "production") in (1, 2)


def test_serving_refuses_a_production_version_that_fails_its_checksums(trained_runs, registry_dir, tmp_path):
    """Checked before Serve starts, naming the file: a damaged version is never deployed."""
    from serve.deploy import deploy

    promote_run(trained_runs("llm-ddp", LLM_STRATEGY_RUNS["ddp"]), registry_dir, tmp_path)
    weights = next((registry_dir / MODEL / "versions" / "000001").glob("model-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"oops")
    with pytest.raises(ValueError, match=weights.name):
        deploy(ServeConfig(registry=str(registry_dir)), model=MODEL)
