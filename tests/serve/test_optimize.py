"""stage=optimize on trained runs: each method's child is derived, measured, registered with its lineage only if it
keeps its quality, and served by the code that serves its parent: the ranker replica over HTTP, the LLM engine."""

import json
import subprocess
import sys
import time

import pytest

from conf.schema import MonitorConfig, ServeConfig
from serve.evaluate import evaluate_on_run_data
from serve.export import load_export
from serve.optimize import OPTIMIZE_FILE, PLOT_FILE, optimize
from serve.promote import PRODUCTION, best_candidate, format_registry, promote
from serve.registry import Registry
from tests.helpers import LLM_STRATEGY_RUNS, RANKER_REFERENCE_RUN, REPO_ROOT
from tests.serve.http_client import request
from tests.serve.test_serving_ranker import exported_scores

RANKER, LLM = "opt-ranker", "opt-llm"
RANKER_METHODS = ["int8_dynamic", "int8_weight_only", "int8_tables", "compile"]


def _serve_cfg(root, **overrides) -> ServeConfig:
    # Short timings and one batch size: the figures are scripts/bench_optimize.py's; here every path runs.
    settings = dict(registry=str(root / "registry"), optimize_time_s=0.2, optimize_calibration_rows=16,
                    monitor=MonitorConfig(profile_rows=256))
    return ServeConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def ranker_children(trained_runs, tmp_path_factory):
    """The reference ranker promoted, then one child per linear/table/compile method (a lenient bound)."""
    root = tmp_path_factory.mktemp("optimize_ranker")
    run_dir = trained_runs("ranker-reference", RANKER_REFERENCE_RUN, ranker=True)
    serve_cfg = _serve_cfg(root, optimize=RANKER_METHODS, optimize_max_quality_loss=0.05,
                           optimize_batch_sizes=[64])
    promote(serve_cfg, model=RANKER, source=run_dir, experiment="ranker_dlrm", cache_dir=root / "cache")
    out_dir = optimize(serve_cfg, model=RANKER, root=root, cache_dir=root / "cache")
    table = json.loads((out_dir / OPTIMIZE_FILE).read_text())
    return root, run_dir, serve_cfg, table, out_dir


@pytest.fixture(scope="module")
def llm_children(trained_runs, tmp_path_factory):
    """The DDP-trained tiny LLM promoted, then optimized through launch.py (the stage as users run it): int8,
    Wanda 2:4 and compiled children under a bound they meet."""
    root = tmp_path_factory.mktemp("optimize_llm")
    run_dir = trained_runs("llm-ddp", LLM_STRATEGY_RUNS["ddp"])
    serve_cfg = _serve_cfg(root)
    promote(serve_cfg, model=LLM, source=run_dir, experiment="llm_tiny", cache_dir=root / "cache")
    result = subprocess.run(
        [sys.executable, "launch.py", "stage=optimize", f"serve.model={LLM}", f"serve.registry={root / 'registry'}",
         f"paths.root={root}", "serve.optimize=[int8_dynamic,int8_weight_only,prune_2of4,compile]",
         "serve.optimize_max_quality_loss=0.5",
         "serve.optimize_time_s=0.2", "serve.optimize_calibration_rows=16", "serve.optimize_batch_sizes=[2]",
         "serve.monitor.profile_rows=64"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, run_dir, serve_cfg, result.stdout


def _registered(table: dict) -> dict[str, dict]:
    return {row["label"]: row for row in table["rows"] if row["decision"] == "registered"}


def test_each_ranker_child_is_registered_with_its_lineage_and_measured_quality(ranker_children):
    root, run_dir, serve_cfg, table, out_dir = ranker_children
    registry = Registry(serve_cfg.registry)
    children = _registered(table)
    assert set(children) == set(RANKER_METHODS), table["rows"]
    assert (out_dir / PLOT_FILE).stat().st_size > 10_000
    parent_row = table["rows"][0]
    candidate = best_candidate(run_dir)
    for method, row in children.items():
        record = registry.version(RANKER, row["version"])
        assert record["derived"]["parent"] == 1 and record["derived"]["method"] == method
        assert record["derived"]["settings"]  # what the method did, recorded
        assert record["source_run"] == str(run_dir)
        # The child as the registry gives it (checksums verified on fetch) scores what the table says.
        fetched = registry.fetch(RANKER, row["version"], cache_dir=root / "cache")
        metrics = evaluate_on_run_data(load_export(fetched), candidate.run_cfg, rows=serve_cfg.eval_rows)
        assert metrics["auc"] == pytest.approx(row["metrics"]["auc"], abs=1e-9)
        assert (fetched / "profile.json").is_file()
    # int8 weights and tables: smaller; the compiled child: the parent's weights, the parent's scores
    assert children["int8_tables"]["bytes_by_kind"]["tables"] * 3 <= parent_row["bytes_by_kind"]["tables"]
    assert children["int8_dynamic"]["bytes_by_kind"]["linear"] * 3 <= parent_row["bytes_by_kind"]["linear"]
    assert children["compile"]["metrics"]["auc"] == pytest.approx(parent_row["metrics"]["auc"], abs=1e-6)
    history = [event for event in registry.history(RANKER) if event.get("event") == "optimize"]
    assert {event["method"] for event in history if event["decision"] == "registered"} == set(RANKER_METHODS)
    listing = format_registry(registry, RANKER)
    assert f"v{children['int8_tables']['version']}" in listing and "int8_tables of v1" in listing


def test_the_same_method_on_the_same_parent_is_one_child(ranker_children):
    root, _, serve_cfg, table, _ = ranker_children
    again = json.loads((optimize(serve_cfg.__class__(**{**serve_cfg.__dict__, "optimize": ["int8_tables"]}),
                                 model=RANKER, root=root, cache_dir=root / "cache") / OPTIMIZE_FILE).read_text())
    assert _registered(again)["int8_tables"]["version"] == _registered(table)["int8_tables"]["version"]


def test_a_child_of_a_child_carries_both_steps(ranker_children):
    """int8 linear layers derived from the int8-tables child: both kinds of module, both steps in its
    model_config.json, lineage to its direct parent; the same method twice in a line is refused by name."""
    root, _, serve_cfg, table, _ = ranker_children
    tables_child = _registered(table)["int8_tables"]["version"]
    derive = serve_cfg.__class__(**{**serve_cfg.__dict__, "version": tables_child, "optimize": ["int8_dynamic"]})
    grandchild = _registered(json.loads((optimize(derive, model=RANKER, root=root, cache_dir=root / "cache")
                                         / OPTIMIZE_FILE).read_text()))["int8_dynamic"]
    registry = Registry(serve_cfg.registry)
    assert registry.version(RANKER, grandchild["version"])["derived"]["parent"] == tables_child
    directory = registry.fetch(RANKER, grandchild["version"], cache_dir=root / "cache")
    steps = json.loads((directory / "model_config.json").read_text())["derived"]
    assert [step["method"] for step in steps] == ["int8_tables", "int8_dynamic"]
    kinds = {type(module).__name__ for module in load_export(directory).model.modules()}
    assert {"Int8Linear", "Int8EmbeddingBag"} <= kinds and "Linear" not in kinds
    assert grandchild["bytes_by_kind"]["tables"] == _registered(table)["int8_tables"]["bytes_by_kind"]["tables"]
    again = serve_cfg.__class__(**{**serve_cfg.__dict__, "version": tables_child, "optimize": ["int8_tables"]})
    with pytest.raises(ValueError, match=f"v{tables_child} is already int8_tables"):
        optimize(again, model=RANKER, root=root, cache_dir=root / "cache")


def test_every_ranker_child_serves_over_http_with_its_own_scores(ranker_children, serve_port, capsys):
    """One deployment; production moves to each child in turn (replicas swap versions on the alias, as a rollout
    does) and each answers with the scores its own export gives."""
    from ray import serve

    from serve.deploy import deploy
    from serve.monitor_report import monitor

    root, _, serve_cfg, table, _ = ranker_children
    registry = Registry(serve_cfg.registry)
    children = {method: row["version"] for method, row in _registered(table).items()}
    serving = serve_cfg.__class__(**{**serve_cfg.__dict__, "port": serve_port, "num_cpus": 0.25, "refresh_s": 0.5,
                                     "min_replicas": 1, "max_replicas": 1})
    registry.move_alias(RANKER, PRODUCTION, children["int8_dynamic"], reason="serve the int8 child")
    url = deploy(serving, model=RANKER)
    context, candidates = {"I1": 3, "C1": 4}, [{"C3": i, "I3": float(i)} for i in range(5)]
    try:
        for method, version in children.items():
            registry.move_alias(RANKER, PRODUCTION, version, reason=f"serve the {method} child")
            body = _served_by(url, version, {"model": RANKER, "context": context, "candidates": candidates})
            expected = exported_scores(registry.fetch(RANKER, version, cache_dir=root / "cache"), context, candidates)
            assert body["scores"] == pytest.approx(expected.tolist(), abs=1e-6), method
        # stage=monitor tells a child from its parent, in its report and its plot's labels
        capsys.readouterr()
        assert monitor(serving, model=RANKER, out_root=root).is_file()
        assert f"v{children['compile']} is a child: compile of v1" in capsys.readouterr().out
    finally:
        serve.delete(RANKER)


def _served_by(url: str, version: int, body: dict, *, timeout_s: float = 120.0) -> dict:
    """The first answer from `version` once the replicas have read the alias move (a compiled child compiles on
    its first requests)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, answer, _ = request(url + "/v1/rank", body)
        assert status == 200, answer
        if answer["model_version"] == version or time.monotonic() > deadline:
            assert answer["model_version"] == version, f"still served by v{answer['model_version']}"
            return answer
        time.sleep(0.3)


def test_llm_children_are_registered_and_generate_through_the_engine(llm_children):
    from serve.completion import load_llm
    from serve.engine import Engine, EngineConfig
    from serve.generation import SamplingParams

    root, run_dir, serve_cfg, stdout = llm_children
    assert stdout.strip().splitlines()[-1].startswith("optimize_dir: ")
    table = json.loads((root / "optimize" / f"{LLM}-v1" / OPTIMIZE_FILE).read_text())
    children = _registered(table)
    assert set(children) == {"int8_dynamic", "int8_weight_only", "prune_2of4", "compile"}, table["rows"]
    registry = Registry(serve_cfg.registry)
    candidate = best_candidate(run_dir)
    for method, row in children.items():
        directory = registry.fetch(LLM, row["version"], cache_dir=root / "cache")
        loaded = load_export(directory)
        metrics = evaluate_on_run_data(loaded, candidate.run_cfg, rows=serve_cfg.eval_rows)
        assert metrics["val_loss"] == pytest.approx(row["metrics"]["val_loss"], rel=1e-6)
        llm = load_llm(loaded, version=row["version"])
        engine = Engine(llm.model, llm.tokenizer, stop_token_ids=llm.stop_token_ids, config=EngineConfig())
        [sequence] = engine.add([(llm.tokenizer.encode("def ").ids, SamplingParams(max_tokens=6, temperature=0))])
        tokens = 0
        while engine.has_work:
            tokens += sum(chunk.completion_tokens > 0 for _, chunk in engine.step().outputs)
        assert tokens > 0, method
    pruned_dir = registry.fetch(LLM, children["prune_2of4"]["version"], cache_dir=root / "cache")
    weight = load_export(pruned_dir).model.layers[0].feed_forward.w1.weight
    assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all()  # the 2:4 pattern survived export
    assert (pruned_dir / "config.json").is_file()  # still a Hugging Face directory


def test_a_child_over_the_quality_bound_is_not_registered(llm_children):
    """With no loss allowed, magnitude-pruned children (which lose a little even on this barely trained model)
    are refused: measured and recorded in the history, never registered."""
    root, _, serve_cfg, _ = llm_children
    registry = Registry(serve_cfg.registry)
    before = [record["version"] for record in registry.versions(LLM)]
    strict = serve_cfg.__class__(**{**serve_cfg.__dict__, "optimize": ["prune_magnitude_50", "prune_magnitude_2of4"],
                                    "optimize_max_quality_loss": 0.0, "optimize_batch_sizes": [1]})
    table = json.loads((optimize(strict, model=LLM, root=root, cache_dir=root / "cache") / OPTIMIZE_FILE).read_text())
    refused = [row for row in table["rows"][1:] if row["decision"] == "refused"]
    assert refused, table["rows"]
    for row in table["rows"][1:]:
        assert (row["decision"] == "refused") == (row["quality_loss"] > 0), row
    for row in refused:
        assert row["version"] is None and "serve.optimize_max_quality_loss=0" in row["reason"]
    registered = [row["version"] for row in table["rows"][1:] if row["decision"] == "registered"]
    assert [record["version"] for record in registry.versions(LLM)] == before + registered
    events = [e for e in registry.history(LLM) if e.get("event") == "optimize" and e["decision"] == "refused"]
    assert {event["method"] for event in events} == {row["label"] for row in refused}
    assert all(event["parent"] == 1 and event["quality_loss"] > 0 for event in events)


def test_bad_optimize_requests_are_named(llm_children):
    root, _, serve_cfg, _ = llm_children
    for overrides, message in [({"optimize": []}, "needs serve.optimize"),
                               ({"optimize": ["int8_tables"]}, "applies to ranker models, not llm"),
                               ({"optimize": ["int3"]}, "serve.optimize='int3' is not one of"),
                               ({"optimize": ["compile", "compile"]}, "names a method twice"),
                               ({"optimize": ["compile"], "optimize_batch_sizes": [0]},
                                "serve.optimize_batch_sizes=\\[0\\]: each must be at least 1"),
                               ({"optimize": ["compile"], "version": 99}, "no committed version 99")]:
        cfg = serve_cfg.__class__(**{**serve_cfg.__dict__, **overrides})
        with pytest.raises(ValueError, match=message):
            optimize(cfg, model=LLM, root=root, cache_dir=root / "cache")
