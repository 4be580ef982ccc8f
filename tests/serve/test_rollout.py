"""Progressive rollouts judged on live traffic (serve/rollout.py), on real Ray Serve over HTTP with
scripts/replay_traffic.py as the clients (held-out rows, their clicks sent back as delayed feedback):

  - a canary with production's weights is promoted after every step;
  - a worse canary (a ranker trained for 8 steps against one trained for 700) is rolled back on quality, with no
    failed client request;
  - a canary made slow, or failing, by the fault hook is rolled back on latency, or on errors;
  - a rollout whose command is killed continues where it stopped when the command runs again, and a second
    rollout of the model is refused meanwhile.
Each decision is in the registry's history with its evidence. The decision times are printed (pytest -s)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conf.schema import MonitorConfig, RolloutConfig, ServeConfig
from serve.endpoint import Endpoint
from serve.promote import promote, set_shadow
from serve.registry import RESERVED_EXPORT_NAMES, RESERVED_VERSION_KEYS, Registry
from serve.rollout import RolloutError, rollout
from tests.helpers import RANKER_QUALITY_RUN, RANKER_REFERENCE_RUN, REPO_ROOT

MODEL = "rollout-ranker"
API_KEY = "rollout-secret"
# Small steps and tolerances that a 2-core machine's noise stays within: the canary's share takes a second hop
# (its own deployment), a few ms on an idle machine and more on a busy one.
TEST_ROLLOUT = dict(steps=[50.0, 100.0], bake_s=2.0, look_interval_s=2.0, max_looks=20, min_samples=120,
                    latency_tolerance_ms=40.0, latency_tolerance_ratio=0.5, error_tolerance=0.05,
                    quality_tolerance=0.1, resamples=400, lease_s=6.0)


def copy_of_version(registry: Registry, number: int, out_dir):
    """Version `number`'s export files and metadata, to register the same weights again as a new version."""
    source = registry.fetch(MODEL, number, cache_dir=out_dir / "cache")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name not in RESERVED_EXPORT_NAMES:
            (out_dir / path.name).write_bytes(path.read_bytes())
    record = registry.version(MODEL, number)
    return out_dir, {key: value for key, value in record.items() if key not in RESERVED_VERSION_KEYS}


@pytest.fixture(scope="module")
def rollout_app(trained_runs, serve_port, tmp_path_factory):
    """The 700-step ranker in production (v1); v2 the 8-step one (the gate refused it; registered all the same);
    v3 v1's weights registered again. Served with the fault hook on."""
    from ray import serve

    from serve.deploy import deploy

    root = tmp_path_factory.mktemp("rollout")
    good = trained_runs("ranker-quality", RANKER_QUALITY_RUN, ranker=True)
    worse = trained_runs("ranker-reference", RANKER_REFERENCE_RUN, ranker=True)
    serve_cfg = ServeConfig(registry=str(root / "registry"), port=serve_port, num_cpus=0.25, min_replicas=1,
                            max_replicas=1, api_key=API_KEY, max_candidates=8, refresh_s=0.5,
                            route_prefix="/rollout", rollout=RolloutConfig(**TEST_ROLLOUT),
                            # No per-bin counters: this app's versions and arms would take ~3000 series, more
                            # than Ray's agent keeps per metric in a session (conf/schema.py: bin_counters).
                            monitor=MonitorConfig(publish_interval_s=1.0, fault_injection=True, bin_counters=False))
    assert promote(serve_cfg, model=MODEL, source=good, experiment="ranker_dlrm",
                   cache_dir=root / "cache")["decision"] == "promoted"
    assert promote(serve_cfg, model=MODEL, source=worse, experiment="ranker_dlrm",
                   cache_dir=root / "cache")["decision"] == "refused"
    registry = Registry(root / "registry")
    export_dir, metadata = copy_of_version(registry, 1, root / "v1-again")
    assert registry.register(MODEL, export_dir, metadata=metadata)["version"] == 3
    url = deploy(serve_cfg, model=MODEL).rstrip("/")
    serve_cfg.monitor.url = url
    yield SimpleNamespace(url=url, cfg=serve_cfg, registry=registry, source=good, root=root)
    serve.delete(MODEL)


class Traffic:
    """scripts/replay_traffic.py sending held-out rows and their clicks (1 s later) until stopped."""

    def __init__(self, app, *extra: str):
        self.out = app.root / f"replay-{time.monotonic_ns()}.json"
        self.process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "scripts" / "replay_traffic.py"), "--url", app.url, "--model", MODEL,
             "--source", str(app.source), "--registry", str(app.registry.uri), "--requests", "6000", "--candidates",
             "8", "--rate", "60", "--concurrency", "6", "--feedback-delay", "1", "--api-key-env", "REPLAY_KEY",
             "--out", str(self.out), *extra],
            env={**os.environ, "REPLAY_KEY": API_KEY}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> dict:
        import json

        self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=300)  # requests in flight finish, then their feedback
        assert self.out.is_file(), output[-3000:]
        return json.loads(self.out.read_text())


def run_rollout(app, canary: int, *, fault: str | None = None):
    """A rollout of `canary` under replayed traffic; (final state, the replay's summary, seconds it took)."""
    traffic = Traffic(app, *(["--fault", fault] if fault else []))
    started = time.monotonic()
    try:
        cfg = ServeConfig(**{**vars(app.cfg), "canary_version": canary})
        state = rollout(cfg, model=MODEL)
    finally:
        summary = traffic.stop()
    seconds = time.monotonic() - started
    print(f"\nrollout of v{canary} ({fault or 'no fault'}): {state['status']} in {seconds:.0f} s: {state['reason']}")
    return state, summary, seconds


def same_weights_canary(app) -> int:
    """v1 or v3, whichever production is not: the two hold the same weights."""
    return 1 if app.registry.resolve(MODEL, "production") == 3 else 3


def last_decision(registry: Registry) -> dict:
    return [event for event in registry.history(MODEL) if event.get("event") == "rollout"][-1]


def arms_by_key(app) -> dict:
    summary = Endpoint(app.url, api_key=API_KEY).summary()
    return {(arm["version"], arm["arm"]): arm for arm in summary["arms"]}


def test_a_shadow_gets_mirrored_requests_whose_answers_no_client_sees(rollout_app, tmp_path):
    """v2 (the 8-step ranker) shadows all requests: every client answer is production's, the shadow's latency and
    its quality on the same clicks are recorded per arm, and stage=monitor shows both arms and plots them."""
    production = rollout_app.registry.resolve(MODEL, "production")
    shadowed = ServeConfig(**{**vars(rollout_app.cfg), "shadow_version": 2, "shadow_percent": 100.0})
    set_shadow(shadowed, model=MODEL)
    traffic = Traffic(rollout_app)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            shadow = arms_by_key(rollout_app).get((2, "shadow"), {})
            if (shadow.get("labelled_rows") or 0) >= 2000:
                break
            time.sleep(2)
    finally:
        summary = traffic.stop()
        set_shadow(ServeConfig(**{**vars(shadowed), "shadow_percent": 0.0}), model=MODEL)
    assert summary["errors"] == 0 and summary["versions"] == {str(production): summary["requests"]}, summary
    arms = arms_by_key(rollout_app)
    shadow, served = arms[(2, "shadow")], arms[(production, "production")]
    assert shadow["labelled_rows"] >= 2000 and shadow["latency_p50_ms"] is not None, shadow
    assert shadow["auc"] < served["auc"] - 0.1, (shadow["auc"], served["auc"])  # the 8-step ranker, on the same clicks
    monitor = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch.py"), "stage=monitor", f"serve.model={MODEL}",
         f"serve.registry={rollout_app.registry.uri}", "serve.api_key=${oc.env:SLIPWAY_API_KEY}",
         f"serve.monitor.url={rollout_app.url}", f"paths.root={tmp_path}"],
        cwd=REPO_ROOT, env={**os.environ, "SLIPWAY_API_KEY": API_KEY}, capture_output=True, text=True, timeout=120)
    assert monitor.returncode == 0, (monitor.stdout + monitor.stderr)[-3000:]
    assert f"v{production:<7} production" in monitor.stdout and "v2       shadow" in monitor.stdout, monitor.stdout
    assert "drift (largest PSI" in monitor.stdout and "alerts: set serve.monitor.prometheus_url" in monitor.stdout
    png = Path(monitor.stdout.strip().splitlines()[-1].removeprefix("monitor: "))
    assert png == tmp_path / "monitor" / MODEL / "monitor.png" and png.stat().st_size > 10_000


def test_a_canary_with_productions_weights_is_promoted_after_every_step(rollout_app):
    canary = same_weights_canary(rollout_app)
    state, summary, _ = run_rollout(rollout_app, canary)
    assert state["status"] == "promoted", state
    assert rollout_app.registry.resolve(MODEL, "production") == canary
    assert rollout_app.registry.resolve(MODEL, "canary") is None
    decision = last_decision(rollout_app.registry)
    assert decision["decision"] == "promoted" and decision["version"] == canary
    assert {metric["metric"]: metric["outcome"] for metric in decision["evidence"]["metrics"]} == \
        {"latency": "pass", "errors": "pass", "auc": "pass"}
    assert summary["errors"] == 0 and summary["feedback"].get("200", 0) > 0, summary


def test_a_worse_canary_is_rolled_back_on_quality_with_no_failed_request(rollout_app):
    production = rollout_app.registry.resolve(MODEL, "production")
    state, summary, _ = run_rollout(rollout_app, 2)
    assert state["status"] == "rolled_back", state
    assert "auc" in state["reason"], state["reason"]
    assert rollout_app.registry.resolve(MODEL, "canary") is None
    assert rollout_app.registry.resolve(MODEL, "production") == production
    decision = last_decision(rollout_app.registry)
    failed = [metric for metric in decision["evidence"]["metrics"] if metric["outcome"] == "fail"]
    assert [metric["metric"] for metric in failed] == ["auc"], decision
    assert failed[0]["statistics"]["ci_high"] < -rollout_app.cfg.rollout.quality_tolerance
    assert summary["errors"] == 0 and summary["requests"] > 0, summary


@pytest.mark.parametrize(("fault", "metric"), [("latency_ms=150", "latency"), ("error_rate=0.3", "errors")])
def test_a_slow_or_failing_canary_is_rolled_back_on_that_metric(rollout_app, fault, metric):
    canary = same_weights_canary(rollout_app)
    state, summary, _ = run_rollout(rollout_app, canary, fault=f"{canary}:{fault}")
    assert state["status"] == "rolled_back", state
    decision = last_decision(rollout_app.registry)
    failed = {m["metric"] for m in decision["evidence"]["metrics"] if m["outcome"] == "fail"}
    assert metric in failed, decision
    assert rollout_app.registry.resolve(MODEL, "canary") is None


def test_a_killed_rollout_continues_where_it_stopped_and_a_second_one_is_refused(rollout_app, tmp_path):
    """Three steps; the command is killed once the first has passed. Meanwhile another canary's rollout is
    refused, and so is a second command for the same canary while the first is alive. Run again, the rollout
    continues at its second step and ends promoted."""
    canary = same_weights_canary(rollout_app)
    overrides = [f"serve.model={MODEL}", f"serve.registry={rollout_app.registry.uri}", f"serve.canary_version={canary}",
                 "serve.api_key=${oc.env:SLIPWAY_API_KEY}", f"serve.monitor.url={rollout_app.url}",
                 "serve.rollout.steps=[50,75,100]", f"paths.root={tmp_path}",
                 *(f"serve.rollout.{key}={value}" for key, value in TEST_ROLLOUT.items() if key != "steps")]
    command = [sys.executable, str(REPO_ROOT / "launch.py"), "stage=rollout", *overrides]
    env = {**os.environ, "SLIPWAY_API_KEY": API_KEY}
    traffic = Traffic(rollout_app)
    try:
        first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        deadline = time.monotonic() + 240
        while (rollout_app.registry.rollout(MODEL) or {}).get("step", 0) < 1 and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()[0][-3000:]
            time.sleep(0.5)
        with pytest.raises(RolloutError, match=f"has a rollout of v{canary} under way"):
            rollout(ServeConfig(**{**vars(rollout_app.cfg), "canary_version": 2}), model=MODEL)
        with pytest.raises(RolloutError, match="is being run by"):
            rollout(ServeConfig(**{**vars(rollout_app.cfg), "canary_version": canary}), model=MODEL)
        first.kill()
        first.communicate(timeout=30)
        stopped_at = rollout_app.registry.rollout(MODEL)
        assert stopped_at["status"] == "running" and stopped_at["step"] == 1, stopped_at
        time.sleep(rollout_app.cfg.rollout.lease_s)  # the killed command's lease runs out
        second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        traffic.stop()
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "now step 2" in second.stdout, second.stdout
    assert "step 1/3" not in second.stdout, second.stdout
    assert rollout_app.registry.rollout(MODEL)["status"] == "promoted"
    assert rollout_app.registry.resolve(MODEL, "production") == canary
    passed = [event["percent"] for event in rollout_app.registry.history(MODEL)[-12:]
              if event.get("event") == "rollout" and event.get("decision") == "step_passed"]
    assert passed == [50.0, 75.0], passed
