"""The ranker endpoint on real Ray Serve over HTTP: scores equal the exported model's, bearer-token auth, 4xx
answers naming the field, and requests combined by @serve.batch under concurrent load."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch
import yaml

from conf.schema import MonitorConfig, ServeConfig
from serve.drift import PSI_MAJOR
from serve.export import load_export
from serve.features import FeatureEncoder
from serve.monitoring import bin_rows_from_exposition, live_from_bin_rows, profile_drift, read_reference
from serve.promote import promote
from serve.registry import Registry
from tests.helpers import RANKER_REFERENCE_RUN, REPO_ROOT
from tests.serve.conftest import free_port, scrape, settled
from tests.serve.http_client import request

MODEL = "tiny-ranker"
API_KEY = "test-secret"
AUTH = {"authorization": f"Bearer {API_KEY}"}
CONTEXT = {"I1": 3, "I2": 0.5, "C1": 4, "C2": 1}
HISTOGRAM = "ray_slipway_ranker_batch_requests"  # requests per @serve.batch call
CANDIDATES = [{"C3": i, "C4": 2 * i, "I3": float(i)} for i in range(6)]
DRIFT_WINDOW_S = 30.0


@pytest.fixture(scope="module")
def served_ranker(trained_runs, serve_port, tmp_path_factory):
    """A trained ranker promoted into a registry of its own and served: `.url`, `.export_dir` (its registered
    version), `.run_dir` and `.registry`."""
    from types import SimpleNamespace

    from ray import serve

    from serve.deploy import deploy

    root = tmp_path_factory.mktemp("ranker_serving")
    run_dir = trained_runs("ranker-reference", RANKER_REFERENCE_RUN, ranker=True)
    # Publishing every second, so that the monitoring tests read their own requests' counts within seconds, and
    # a drift window of 30 s, so that the alert test can wait for earlier tests' traffic to leave it.
    serve_cfg = ServeConfig(registry=str(root / "registry"), port=serve_port, num_cpus=0.25, min_replicas=1,
                            max_replicas=1, api_key=API_KEY, max_candidates=8, max_batch_size=16,
                            batch_wait_timeout_s=0.05,
                            monitor=MonitorConfig(publish_interval_s=1.0, drift_window_s=DRIFT_WINDOW_S,
                                                  fault_injection=True))
    # As stage=promote registers a run's best checkpoint: exported, profiled on the held-out split, gated.
    assert promote(serve_cfg, model=MODEL, source=run_dir, experiment="ranker_dlrm",
                   cache_dir=root / "cache")["decision"] == "promoted"
    export_dir = Registry(root / "registry").fetch(MODEL, 1, cache_dir=root / "cache")
    yield SimpleNamespace(url=deploy(serve_cfg, model=MODEL), export_dir=export_dir, run_dir=run_dir,
                          registry=root / "registry")
    serve.delete(MODEL)


@pytest.fixture(scope="module")
def endpoint(served_ranker):
    """(url, export_dir) of the served ranker."""
    return served_ranker.url, served_ranker.export_dir


def metric_total(rows: list[str], name: str, label: str = "") -> float:
    """The sum over Prometheus sample lines of `name` (carrying `label`) of their values."""
    return sum(float(row.rsplit(" ", 1)[1]) for row in rows if row.startswith(name) and label in row)


def rank(url: str, body, *, headers=AUTH):
    return request(url + "/v1/rank", body, headers=headers)


def exported_scores(export_dir, context: dict, candidates: list[dict]) -> np.ndarray:
    """The click probabilities the exported model gives, computed here without Serve."""
    loaded = load_export(export_dir)
    dense, sparse = FeatureEncoder.from_file(export_dir / "feature_spec.json").encode(
        [{**context, **c} for c in candidates])
    with torch.no_grad():
        return torch.sigmoid(loaded.model(torch.from_numpy(dense), torch.from_numpy(sparse))).numpy()


def settled_batch_counts(ray_session) -> tuple[float, float]:
    """(batches, batches of a single request) from the @serve.batch histogram, read once it has stopped growing
    (metrics are exported every second)."""
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    deadline, previous, counts = time.monotonic() + 30, None, (0.0, 0.0)
    while time.monotonic() < deadline:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        rows = [line for line in body.splitlines() if line.startswith(HISTOGRAM) and f'model="{MODEL}"' in line]
        counts = (metric_total(rows, HISTOGRAM + "_count"), metric_total(rows, HISTOGRAM + "_bucket", 'le="1.0"'))
        if counts[0] > 0 and counts == previous:
            break
        previous = counts
        time.sleep(1.5)
    return counts


def test_scores_are_the_exported_models_click_probabilities(endpoint):
    url, export_dir = endpoint
    status, answer, headers = rank(url, {"model": MODEL, "context": CONTEXT, "candidates": CANDIDATES})
    assert status == 200, answer
    assert answer["model_version"] == 1 and headers["x-model-version"] == "1"
    expected = exported_scores(export_dir, CONTEXT, CANDIDATES)
    np.testing.assert_allclose(answer["scores"], expected, rtol=1e-6)
    assert answer["ranking"] == list(np.argsort(-expected, kind="stable"))


def test_the_sample_request_printed_by_the_serve_stage_is_accepted(endpoint):
    from serve.deploy import replica_class

    url, export_dir = endpoint
    route, body = replica_class("ranker").sample_request(ServeConfig(), model=MODEL, fetch_export=lambda: export_dir)
    status, answer, _ = request(url + route, body, headers=AUTH)
    assert status == 200 and len(answer["scores"]) == len(body["candidates"]), answer


def test_feedback_joins_an_answer_by_its_id_and_refusals_name_the_field(endpoint):
    """POST /v1/feedback with the id of an answer: 200 once joined (the answer reaches the watcher within half a
    second; before that it waits there, 202), 409 for a second label, 400 naming the field, 401 without the key;
    the joined clicks show in GET /v1/monitor."""
    url, _ = endpoint
    status, answer, _ = rank(url, {"model": MODEL, "context": CONTEXT, "candidates": CANDIDATES})
    assert status == 200 and answer["id"].startswith("rank-"), answer
    status, joined, _ = request(url + "/v1/feedback", {"request_id": answer["id"], "clicked": [1]}, headers=AUTH)
    assert (status, joined["status"]) in ((200, "joined"), (202, "pending")), joined
    time.sleep(1.5)  # reported by then: a pending label has joined
    status, again, _ = request(url + "/v1/feedback", {"request_id": answer["id"], "clicked": []}, headers=AUTH)
    assert status == 409 and again["error"]["param"] == "request_id", again
    _, other, _ = rank(url, {"model": MODEL, "context": CONTEXT, "candidates": CANDIDATES})
    time.sleep(1.5)
    for body, field in (({"request_id": other["id"], "clicked": [len(CANDIDATES)]}, "clicked"),
                        ({"request_id": other["id"], "thumbs": "meh"}, "thumbs"), ({"clicked": [0]}, "request_id")):
        status, refused, _ = request(url + "/v1/feedback", body, headers=AUTH)
        assert status == 400 and refused["error"]["param"] == field, refused
    status, _, _ = request(url + "/v1/feedback", {"request_id": answer["id"], "clicked": [0]})
    assert status == 401
    status, summary, _ = request(url + "/v1/monitor", headers=AUTH)
    production = [arm for arm in summary["arms"] if arm["arm"] == "production" and arm["version"] == 1]
    assert status == 200 and production[0]["labelled_rows"] >= len(CANDIDATES), summary


def test_requests_need_the_api_key(endpoint):
    url, _ = endpoint
    body = {"candidates": CANDIDATES[:1]}
    for headers in ({}, {"authorization": "Bearer wrong"}):
        status, answer, _ = rank(url, body, headers=headers)
        assert status == 401 and answer["error"]["param"] == "authorization"
    assert rank(url, body)[0] == 200


def test_models_needs_the_api_key_and_healthz_stays_open_for_probes(endpoint):
    url, _ = endpoint
    for headers in ({}, {"authorization": "Bearer wrong"}):
        status, answer, _ = request(url + "/v1/models", headers=headers)
        assert status == 401 and answer["error"]["type"] == "authentication_error", answer
    status, answer, _ = request(url + "/v1/models", headers=AUTH)
    assert status == 200 and answer["data"][0]["id"] == MODEL
    status, answer, _ = request(url + "/healthz")
    assert status == 200 and answer["status"] == "ok"


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_is_a_config_error_not_auth_off(tmp_path, key):
    """Exit 2 at composition, before any stage (or Ray) starts, naming serve.api_key."""
    done = subprocess.run([sys.executable, "launch.py", "stage=serve", "serve.model=anything",
                           f"serve.api_key='{key}'", f"paths.root={tmp_path}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "serve.api_key is empty" in output, output[-2000:]
    assert "starting an embedded local Ray" not in output


@pytest.mark.parametrize("body, param", [
    (b"[1, 2", "body"),
    ({"candidates": []}, "candidates"),
    ({"candidates": [{"C1": 1}] * 9}, "candidates"),  # over serve.max_candidates
    ({"candidates": [{"C1": 1}, {"C99": 1}]}, "candidates[1].C99"),
    ({"candidates": [{"C1": "a"}]}, "candidates[0].C1"),
    ({"candidates": [{"I1": "big"}]}, "candidates[0].I1"),
    ({"context": {"C1": 1}, "candidates": [{"C1": 2}]}, "candidates[0].C1"),
    ({"context": [1], "candidates": [{"C1": 2}]}, "context"),
    ({"candidates": [{"C\ud800": 1}]}, "candidates[0].C\ud800"),  # quoted in the error: not UTF-8, was a 500
    (b'{"a": ' * 30_000, "body"),  # RecursionError in the JSON parser: was a 500
], ids=["malformed-json", "no-candidates", "too-many-candidates", "unknown-feature", "category-type",
        "dense-type", "feature-twice", "context-type", "lone-surrogate-feature", "nested-json"])
def test_a_bad_request_gets_a_400_naming_the_field(endpoint, body, param):
    url, _ = endpoint
    status, answer, _ = rank(url, body)
    assert status == 400 and answer["error"]["param"] == param, answer
    assert rank(url, {"candidates": CANDIDATES[:2]})[0] == 200


def test_the_llm_route_is_not_served_by_a_ranker(endpoint):
    url, _ = endpoint
    status, answer, _ = request(url + "/v1/completions", {"prompt": "x"}, headers=AUTH)
    assert status == 404 and "ranker" in answer["error"]["message"]


def test_concurrent_requests_are_scored_in_shared_batches(endpoint, ray_session):
    """16 clients at once: @serve.batch must combine requests, which the batch-size histogram shows."""
    url, _ = endpoint
    statuses = []

    def client():
        for _ in range(10):
            statuses.append(rank(url, {"context": CONTEXT, "candidates": CANDIDATES})[0])

    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert statuses.count(200) == 160
    # Batching happened if some batch held more than one request: the histogram's count of batches exceeds its
    # bucket of batches of one.
    batches, single = settled_batch_counts(ray_session)
    assert batches > 0, "no batch was recorded"
    assert single < batches, f"every one of {batches:.0f} batches held a single request"


WAIT_HISTOGRAM = "ray_serve_batch_wait_time_ms"  # Ray's own: how long each batch waited to fill


def settled_wait_counts(ray_session) -> tuple[float, float]:
    """(batches of score(), those that waited under 10 ms) from Ray's batch-wait histogram, once settled."""
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    deadline, previous, counts = time.monotonic() + 30, None, (0.0, 0.0)
    while time.monotonic() < deadline:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        rows = [line for line in body.splitlines()
                if line.startswith(WAIT_HISTOGRAM) and 'function_name="score"' in line]
        counts = (metric_total(rows, WAIT_HISTOGRAM + "_count"),
                  metric_total(rows, WAIT_HISTOGRAM + "_bucket", 'le="10.0"'))
        if counts == previous:
            break
        previous = counts
        time.sleep(1.5)
    return counts


def test_a_request_alone_is_not_held_for_company(endpoint, ray_session):
    """With no other request being ranked, a batch does not wait serve.batch_wait_timeout_s (50 ms here) for
    more: Ray's batch-wait histogram puts each of these sequential requests' batches under 10 ms."""
    url, _ = endpoint
    batches_before, quick_before = settled_wait_counts(ray_session)
    for _ in range(5):
        assert rank(url, {"context": CONTEXT, "candidates": CANDIDATES})[0] == 200
    batches, quick = settled_wait_counts(ray_session)
    assert batches - batches_before == 5, (batches_before, batches)
    assert quick - quick_before == 5, f"{5 - (quick - quick_before):.0f} of 5 lone requests waited 10 ms or more"


def test_a_bad_request_in_a_shared_batch_fails_alone(endpoint, ray_session):
    """Requests arriving together are encoded together (serve/features.py encode_requests): one with a bad value
    gets its own 400 naming the field, and the others of its batch their own scores."""
    url, export_dir = endpoint
    clients, rounds, bad_client = 8, 5, 3
    bodies = [{"context": {**CONTEXT, "I1": index}, "candidates": CANDIDATES[index % 3:]} for index in range(clients)]
    bodies[bad_client]["candidates"] = [*CANDIDATES[:3], {"C5": "a"}]  # categories are integer ids here
    answers = [[] for _ in range(clients)]
    start = threading.Barrier(clients)

    def client(index: int):
        for _ in range(rounds):
            start.wait(timeout=60)  # all at once, well within one batch wait (batch_wait_timeout_s=0.05)
            answers[index].append(rank(url, bodies[index]))

    before = settled_batch_counts(ray_session)
    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for index, body in enumerate(bodies):
        assert len(answers[index]) == rounds
        expected = None if index == bad_client else exported_scores(export_dir, body["context"], body["candidates"])
        for status, answer, _ in answers[index]:
            if index == bad_client:
                assert status == 400 and answer["error"]["param"] == "candidates[3].C5", answer
                assert "expected an integer category id or null" in answer["error"]["message"]
            else:
                assert status == 200, answer
                np.testing.assert_allclose(answer["scores"], expected, rtol=1e-6)
    after = settled_batch_counts(ray_session)
    batches, single = after[0] - before[0], after[1] - before[1]
    assert single < batches, f"the {clients * rounds} requests were scored one at a time ({batches:.0f} batches)"


def test_promotion_writes_the_reference_profile_of_the_held_out_split(endpoint):
    """stage=promote profiled the version on its run's held-out split, as the version scores it: every feature
    the spec names, the scores and their calibration, each over the same rows."""
    _, export_dir = endpoint
    reference = read_reference(export_dir)
    encoder = FeatureEncoder.from_file(export_dir / "feature_spec.json")
    assert list(reference.features) == list(encoder.feature_names)
    rows = reference.rows
    assert rows > 0 and all(h.total + h.missing == rows for h in reference.features.values())
    assert reference.scores.total == rows and reference.calibration.total == rows
    assert len(reference.features["I1"].edges) > 1  # quantile bins, not one
    assert 0 <= reference.calibration.expected_calibration_error() < 0.5


def test_live_traffic_is_counted_on_the_reference_bins_and_a_shifted_feature_flagged(endpoint, ray_session):
    """Every scored candidate lands in the live profile's counters (exact counts, summed over replicas), and a
    dense feature far beyond anything the reference saw is flagged as drifted, on that feature, both by the
    replica's PSI gauge and by the drift of the counted rows."""
    url, export_dir = endpoint
    reference = read_reference(export_dir)
    top_bin = len(reference.features["I1"].counts) - 1
    before = settled(lambda: bin_rows_from_exposition(scrape(ray_session), model=MODEL, version=1))
    rng = np.random.default_rng(0)
    requests, per_request = 64, 6
    for _ in range(requests):
        candidates = [{"I1": 10**9, "I2": int(rng.integers(0, 50)), "C1": int(rng.integers(0, 4))}
                      for _ in range(per_request)]
        assert rank(url, {"context": {}, "candidates": candidates})[0] == 200
    sent = requests * per_request
    deadline, counted = time.monotonic() + 30, {}
    while time.monotonic() < deadline:  # published every second; Ray exports a publish's series as they come
        after = bin_rows_from_exposition(scrape(ray_session), model=MODEL, version=1, arm="production")
        counted = {key: rows - before.get(key, 0.0) for key, rows in after.items()}
        scores = sum(rows for (feature, _), rows in counted.items() if feature == "score")
        if counted.get(("I1", str(top_bin)), 0) >= sent and scores >= sent:
            break
        time.sleep(1)
    assert counted.get(("I1", str(top_bin))) == sent
    assert sum(rows for (feature, _), rows in counted.items() if feature == "I1") == sent
    assert sum(rows for (feature, _), rows in counted.items() if feature == "score") == sent
    drift = profile_drift(reference, live_from_bin_rows(reference, counted))
    assert drift["I1"].drifted and drift["I1"].live_rows == sent
    deadline, psi = time.monotonic() + 30, 0.0
    while psi < PSI_MAJOR and time.monotonic() < deadline:  # the gauge is set after the counters, at each publish
        rows = [line for line in scrape(ray_session).splitlines() if line.startswith("ray_slipway_feature_psi{")
                and f'model="{MODEL}"' in line and 'feature="I1"' in line]
        psi = max([float(row.rsplit(" ", 1)[1]) for row in rows], default=0.0)
        time.sleep(0.5)
    assert psi >= PSI_MAJOR


def replay(served_ranker, ray_session, *args: str) -> dict:
    """Run scripts/replay_traffic.py as a user does; returns {(feature, bin): rows} it added to the counters."""
    before = settled(lambda: bin_rows_from_exposition(scrape(ray_session), model=MODEL, version=1))
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "replay_traffic.py"), "--url",
                           served_ranker.url, "--model", MODEL, "--source", str(served_ranker.run_dir), "--registry",
                           str(served_ranker.registry), "--api-key-env", "REPLAY_KEY", *args],
                          env={**os.environ, "REPLAY_KEY": API_KEY}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    sent = int(args[args.index("--requests") + 1]) * int(args[args.index("--candidates") + 1])
    assert f"{sent} candidates scored" in done.stdout and "0 errors" in done.stdout, done.stdout
    features = [*read_reference(served_ranker.export_dir).features, "score"]
    deadline, counted = time.monotonic() + 60, {}
    while time.monotonic() < deadline:  # published every second; Ray exports a publish's series as they come
        after = bin_rows_from_exposition(scrape(ray_session), model=MODEL, version=1)
        counted = {key: rows - before.get(key, 0.0) for key, rows in after.items()}
        totals = {feature: sum(rows for (name, _), rows in counted.items() if name == feature) for feature in features}
        if min(totals.values()) >= sent:
            break
        time.sleep(1)
    return counted


def test_replayed_unseen_rows_raise_no_drift_and_a_shifted_feature_is_flagged_alone(served_ranker, ray_session):
    """Rows of the training split (which the reference, built from the held-out split, never saw) replayed as raw
    requests: no feature drifts. The same replay with one dense feature shifted: that feature is flagged, and
    only that one (and the scores, which follow it)."""
    reference = read_reference(served_ranker.export_dir)
    plain = profile_drift(reference, live_from_bin_rows(reference, replay(
        served_ranker, ray_session, "--split", "train", "--requests", "60", "--candidates", "8")))
    assert plain["I2"].live_rows == 480
    assert not [name for name, drift in plain.items() if drift.drifted], plain
    shifted = profile_drift(reference, live_from_bin_rows(reference, replay(
        served_ranker, ray_session, "--split", "train", "--requests", "60", "--candidates", "8", "--seed", "1",
        "--shift", "I2=1.5")))
    assert shifted["I2"].drifted, shifted["I2"]
    assert {name for name, drift in shifted.items() if drift.drifted} <= {"I2", "score"}


def prometheus_query(url: str, path: str) -> dict:
    return json.loads(urllib.request.urlopen(url + path, timeout=10).read())["data"]


def window_rows(url: str) -> float | None:
    """The rows in the model's drift windows, as Prometheus last scraped them (None: nothing scraped yet)."""
    query = urllib.parse.quote(f'sum(ray_slipway_profile_window_rows{{model="{MODEL}"}})')
    try:
        result = prometheus_query(url, f"/api/v1/query?query={query}")["result"]
    except OSError:  # not listening yet
        return None
    return float(result[0]["value"][1]) if result else None


def firing(url: str) -> set[tuple[str, str]]:
    """(alert, feature) of Slipway's alerts firing for this model."""
    return {(alert["labels"]["alertname"], alert["labels"].get("feature", "")) for alert in
            prometheus_query(url, "/api/v1/alerts")["alerts"]
            if alert["state"] == "firing" and alert["labels"].get("model") == MODEL}


def test_a_real_prometheus_fires_the_drift_alert_for_the_shifted_feature_and_the_error_alert(served_ranker,
                                                                                           ray_session, tmp_path):
    """Prometheus (the Debian package) scrapes Ray's metrics endpoint and evaluates cluster/monitoring's rules
    (their 10 minutes of `for` cut to none). Once earlier tests' traffic has left the replica's drift window, no
    drift alert fires; replayed rows with I2 shifted make SlipwayFeatureDrift fire for I2, and for no other
    feature. Then the fault hook fails half of v1's requests during a replay: SlipwayErrorBudgetFastBurn fires
    for v1, where no error alert fired before."""
    rules = (REPO_ROOT / "cluster" / "monitoring" / "slipway_rules.yml").read_text()
    (tmp_path / "rules.yml").write_text(rules.replace("for: 10m", "for: 0s"))
    metrics_port = ray_session._private.worker.global_worker.node.metrics_export_port
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": ["rules.yml"],
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    prometheus = subprocess.Popen(["prometheus", "--config.file=prometheus.yml", f"--storage.tsdb.path={tmp_path}/tsdb",
                                   f"--web.listen-address=127.0.0.1:{port}"], cwd=tmp_path,
                                  stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    try:
        deadline = time.monotonic() + DRIFT_WINDOW_S + 60
        while window_rows(url) != 0.0 and time.monotonic() < deadline:
            time.sleep(1)
        assert window_rows(url) == 0.0, (tmp_path / "prometheus.log").read_text()[-3000:]
        time.sleep(3)  # a few rule evaluations on the empty window
        assert firing(url) == set()
        replay(served_ranker, ray_session, "--split", "train", "--requests", "60", "--candidates", "8",
               "--shift", "I2=2.0")
        deadline, alerts = time.monotonic() + 60, set()
        while ("SlipwayFeatureDrift", "I2") not in alerts and time.monotonic() < deadline:
            time.sleep(1)
            alerts = firing(url)
        assert {feature for alert, feature in alerts if alert == "SlipwayFeatureDrift"} == {"I2"}, alerts
        assert not {alert for alert, _ in alerts if alert.startswith("SlipwayError")}, alerts
        faulty = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "replay_traffic.py"), "--url",
                                 served_ranker.url, "--model", MODEL, "--source", str(served_ranker.run_dir),
                                 "--registry", str(served_ranker.registry), "--api-key-env", "REPLAY_KEY",
                                 "--requests", "120", "--rate", "12", "--candidates", "4",
                                 "--fault", "1:error_rate=0.5"],
                                env={**os.environ, "REPLAY_KEY": API_KEY}, capture_output=True, text=True, timeout=300)
        assert faulty.returncode == 0 and "'500'" in faulty.stdout, faulty.stdout + faulty.stderr
        deadline = time.monotonic() + 60
        while ("SlipwayErrorBudgetFastBurn", "") not in alerts and time.monotonic() < deadline:
            time.sleep(1)
            alerts = firing(url)
        ratios = {window: prometheus_query(url, "/api/v1/query?query=" + urllib.parse.quote(
            f"slipway:request_server_error_ratio:{window}"))["result"] for window in ("rate5m", "rate1h")}
        assert ("SlipwayErrorBudgetFastBurn", "") in alerts, (alerts, ratios)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
