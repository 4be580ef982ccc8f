"""The LLM endpoint on real Ray Serve over HTTP: OpenAI-style completions (plain and streamed) that equal the
exported model's own output, 4xx answers naming the field, a canary split, version swaps under load with no
failed request, and per-version metrics on Ray's Prometheus endpoint. Then the clients and versions that used to
break it: oversized and deeply nested bodies, a full queue, clients that go away mid-answer, a canary that fails
its health check, a port another program holds, and a replica that dies mid-stream (last: it restarts one)."""

import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conf.schema import ServeConfig
from serve import promote
from serve.export import load_export
from serve.generation import SamplingParams, generate
from serve.registry import Registry
from tests.helpers import LLM_STRATEGY_RUNS, REPO_ROOT
from tests.serve.conftest import export_best, free_port
from tests.serve.http_client import (
    Load,
    Poll,
    post_oversized,
    post_then_disconnect,
    request,
    stream,
    stream_then_disconnect,
)

MODEL = "tiny-llm"
PROMPT = "def main("


@pytest.fixture(scope="module")
def endpoint(trained_runs, serve_port, tmp_path_factory):
    """v1 (the DDP run) in production and v2 (the ZeRO-3 run) registered, served by one replica."""
    from ray import serve

    from serve.deploy import deploy

    root = tmp_path_factory.mktemp("llm_serving")
    registry = Registry(root / "registry")
    for version, strategy in ((1, "ddp"), (2, "zero3")):
        export_dir = export_best(trained_runs(f"llm-{strategy}", LLM_STRATEGY_RUNS[strategy]), root / strategy)
        assert registry.register(MODEL, export_dir, metadata={"family": "llm"})["version"] == version
    registry.move_alias(MODEL, "production", 1, reason="test setup")
    # Four requests at a time on the replica and four waiting: the queue test fills that; the load tests'
    # four client threads do not. Health checks every second let a broken canary fail them within the test.
    serve_cfg = ServeConfig(registry=str(root / "registry"), port=serve_port, num_cpus=0.25, min_replicas=1,
                            max_replicas=1, refresh_s=0.3, max_tokens_limit=200, max_running_requests=4,
                            max_queued_requests=4, health_check_period_s=1.0)
    url = deploy(serve_cfg, model=MODEL)
    yield url, serve_cfg, root
    serve.delete(MODEL)


def completions(url: str, **fields):
    return request(url + "/v1/completions", {"model": MODEL, "prompt": PROMPT, **fields})


def test_a_completion_is_the_exported_models_own_greedy_output(endpoint):
    url, _, root = endpoint
    status, answer, headers = completions(url, max_tokens=12, temperature=0)
    assert status == 200, answer
    assert answer["model_version"] == 1 and headers["x-model-version"] == "1"
    assert answer["object"] == "text_completion" and answer["model"] == MODEL
    loaded = load_export(root / "ddp")
    from datasets.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(loaded.asset("tokenizer"))
    expected = generate(loaded.model, tokenizer, tokenizer.encode(PROMPT).ids,
                        SamplingParams(max_tokens=12, temperature=0))
    assert answer["choices"][0]["text"] == expected.text
    assert answer["choices"][0]["finish_reason"] == expected.finish_reason
    assert answer["usage"]["completion_tokens"] == expected.completion_tokens


def test_thumbs_on_a_completion_join_it_as_its_arms_feedback_score(endpoint):
    """An LLM's delayed label is a score per answer: thumbs up and down on two completions (by their ids) average
    to 0.5 on the arm that answered them; a click list, which only a ranker's answer can take, is refused."""
    url, _, _ = endpoint
    ids = [completions(url, max_tokens=2, temperature=0)[1]["id"] for _ in range(2)]
    time.sleep(1.5)  # the answers reach the watcher within half a second
    for request_id, thumbs in zip(ids, ("up", "down"), strict=True):
        status, joined, _ = request(url + "/v1/feedback", {"request_id": request_id, "thumbs": thumbs})
        assert status == 200 and joined == {"request_id": request_id, "status": "joined"}, joined
    status, refused, _ = request(url + "/v1/feedback", {"request_id": completions(url, max_tokens=2)[1]["id"],
                                                        "clicked": [0]})
    assert status in (202, 400), refused  # 400 once the answer is known; 202 while it is still on its way
    status, summary, _ = request(url + "/v1/monitor")
    production = next(arm for arm in summary["arms"] if arm["version"] == 1 and arm["arm"] == "production")
    assert (production["feedback_rows"], production["feedback_score"]) == (2, 0.5), production


def test_a_streamed_completion_sends_the_same_text_as_events(endpoint):
    url, _, _ = endpoint
    _, plain, _ = completions(url, max_tokens=12, temperature=0.8, seed=7)
    events = stream(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.8, "seed": 7,
                                              "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert {c["model_version"] for c in chunks} == {1}


def test_a_seeded_request_gets_the_same_answer_alone_and_batched_with_others(endpoint):
    """The engine batches concurrent requests into the same forward passes; sampling stays per request, so a
    seeded request's text (and its token scores) do not depend on what else was running."""
    url, _, _ = endpoint
    body = {"max_tokens": 40, "temperature": 1.0, "top_p": 0.9, "seed": 5, "logprobs": 1}
    status, alone, _ = completions(url, **body)
    assert status == 200 and alone["usage"]["completion_tokens"] > 1
    answers, spans = {}, {}

    def client(index: int) -> None:  # the others: different prompts, seeds and lengths, and index 3 is ours
        fields = body if index == 3 else {"prompt": PROMPT * (index + 1), "max_tokens": 30 + index,
                                          "temperature": 1.2, "seed": 100 + index}
        started = time.perf_counter()
        answers[index] = completions(url, **fields)
        spans[index] = (started, time.perf_counter())

    clients = [threading.Thread(target=client, args=(index,)) for index in range(6)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=120)
    assert {status for status, _, _ in answers.values()} == {200}
    # Ours was generated while others were: the replica runs every request it holds in the same steps.
    ours = spans[3]
    assert sum(start < ours[1] and ours[0] < end for index, (start, end) in spans.items() if index != 3) >= 3
    batched = answers[3][1]["choices"][0]
    assert batched["text"] == alone["choices"][0]["text"]
    assert batched["logprobs"]["tokens"] == alone["choices"][0]["logprobs"]["tokens"]
    assert batched["logprobs"]["token_logprobs"] == pytest.approx(alone["choices"][0]["logprobs"]["token_logprobs"],
                                                                  abs=1e-4)


def test_models_lists_the_served_versions(endpoint):
    url, _, _ = endpoint
    with urllib.request.urlopen(url + "/v1/models") as response:
        models = json.loads(response.read())["data"]
    assert [(m["id"], m["production_version"], m["canary_version"]) for m in models] == [(MODEL, 1, None)]


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, "body"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x = 1\n" * 400}, 400, "prompt"),  # far beyond the model's 256-token context
    ({"prompt": PROMPT, "max_tokens": 201}, 400, "max_tokens"),  # over serve.max_tokens_limit
    ({"prompt": "NEAR_CONTEXT", "max_tokens": 32}, 400, "max_tokens"),  # prompt + max_tokens beyond the context
    ({"prompt": PROMPT, "max_tokens": "3"}, 400, "max_tokens"),
    ({"prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "model"),
    (b"[" * 50_000 + b"]" * 50_000, 400, "body"),  # RecursionError in the JSON parser: a 500
    (b'{"prompt": "def \\ud800("}', 400, "prompt"),  # a lone surrogate: the tokenizer's 500
    (b'{"prompt": "x", "stop": ["\\udc00"], "stream": true}', 400, "stop"),
], ids=["malformed-json", "prompt-type", "empty-prompt", "prompt-over-context", "max-tokens-limit",
        "prompt-plus-max-tokens", "max-tokens-type", "temperature-type", "top-p-range", "too-many-stops",
        "stream-type", "unknown-model", "nested-json", "lone-surrogate-prompt", "lone-surrogate-stop"])
def test_a_bad_request_gets_a_4xx_naming_the_field_and_serving_goes_on(endpoint, body, status, param):
    url, _, root = endpoint
    if isinstance(body, dict) and body["prompt"] == "NEAR_CONTEXT":
        body = {**body, "prompt": prompt_of_tokens(root / "ddp", 240)}
    got, answer, _ = request(url + "/v1/completions", body)
    assert got == status, answer
    assert answer["error"]["param"] == param and param in answer["error"]["message"], answer
    assert completions(url, max_tokens=1)[0] == 200


def prompt_of_tokens(export_dir, count: int) -> str:
    """A prompt that the export's tokenizer turns into `count` tokens (within a few)."""
    from datasets.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(export_dir / "tokenizer.json")
    ids = [tokenizer.encode(f"x{i} = {i}\n").ids for i in range(count)]
    text, total = "", 0
    for i, piece in enumerate(ids):
        if total + len(piece) > count:
            break
        text, total = text + f"x{i} = {i}\n", total + len(piece)
    assert count - 8 <= len(tokenizer.encode(text).ids) <= count
    return text


def wait_for_version(url: str, version: int, *, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if completions(url, max_tokens=1)[1].get("model_version") == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"the endpoint did not switch to v{version} within {timeout_s} s")


def models(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]


def test_canary_gets_its_share_of_the_traffic(endpoint):
    """25% to v2 over 400 requests: the observed share must fall within 4.5 standard deviations."""
    url, serve_cfg, _ = endpoint
    promote.set_canary(ServeConfig(registry=serve_cfg.registry, canary_version=2, canary_percent=25), model=MODEL)
    deadline = time.monotonic() + 90  # the canary's deployment scales up from zero replicas and loads v2
    while (models(url)["canary_version"], models(url)["canary_healthy"]) != (2, True):
        assert time.monotonic() < deadline, f"the router did not take up the canary alias: {models(url)}"
        time.sleep(0.2)
    with Load(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 1}, threads=4) as load:
        while len(load.answers) < 400:
            time.sleep(0.1)
    answers = load.answers[:400]
    assert {status for status, _ in answers} == {200}
    share = sum(version == 2 for _, version in answers) / len(answers)
    assert abs(share - 0.25) < 4.5 * (0.25 * 0.75 / 400) ** 0.5, share
    promote.set_canary(ServeConfig(registry=serve_cfg.registry, canary_percent=0), model=MODEL)


def test_promotion_and_rollback_under_load_fail_no_request(endpoint):
    url, serve_cfg, _ = endpoint
    wait_for_version(url, 1)
    registry = Registry(serve_cfg.registry)
    with Load(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4}, threads=4) as load:
        time.sleep(1.0)
        registry.move_alias(MODEL, "production", 2, reason="test: promote under load")
        wait_for_version(url, 2)
        time.sleep(1.0)
        promote.rollback(ServeConfig(registry=serve_cfg.registry), model=MODEL)
        wait_for_version(url, 1)
        time.sleep(1.0)
    statuses = [status for status, _ in load.answers]
    assert statuses and set(statuses) == {200}, f"{len(statuses) - statuses.count(200)} failed requests"
    assert {version for _, version in load.answers} == {1, 2}


def test_a_version_that_fails_its_checksum_never_takes_traffic(endpoint):
    """Production moved to a version whose weights were altered after registration: the router cannot load it
    (the registry refuses it), so it keeps serving the version it had."""
    url, serve_cfg, root = endpoint
    wait_for_version(url, 1)
    registry = Registry(serve_cfg.registry)
    version = registry.register(MODEL, root / "ddp", metadata={"family": "llm"})["version"]
    weights = next((Path(registry.root) / MODEL / "versions" / f"{version:06d}").glob("model-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    registry.move_alias(MODEL, "production", version, reason="test: a corrupted version")
    try:
        time.sleep(10 * serve_cfg.refresh_s)
        status, answer, _ = completions(url, max_tokens=1)
        assert status == 200 and answer["model_version"] == 1
    finally:
        registry.move_alias(MODEL, "production", 1, reason="test: back to a good version")


def test_per_version_metrics_reach_the_prometheus_endpoint(endpoint, ray_session):
    url, _, _ = endpoint
    completions(url, max_tokens=1)
    request(url + "/v1/completions", {"prompt": ""})
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    deadline, body = time.monotonic() + 30, ""
    wanted = ("ray_slipway_requests_total", "ray_slipway_request_errors_total", "ray_slipway_request_latency_ms_bucket")
    while time.monotonic() < deadline and not all(name in body for name in wanted):
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        time.sleep(0.5)
    lines = [line for line in body.splitlines() if line.startswith("ray_slipway_requests_total")]
    assert any(f'model="{MODEL}"' in line and 'version="1"' in line for line in lines), lines
    assert any('status="400"' in line for line in body.splitlines() if "request_errors" in line)


# ------------------------------------------------------------------------- what used to break the endpoint

def test_a_vanishing_temperature_is_greedy_rather_than_a_500(endpoint):
    """logits / 1e-40 overflow to inf and sampling failed on NaN; below 1e-5 sampling is now greedy."""
    url, _, _ = endpoint
    greedy = completions(url, max_tokens=12, temperature=0)[1]["choices"][0]["text"]
    for temperature in (1e-40, 5e-324):
        status, answer, _ = completions(url, max_tokens=12, temperature=temperature, seed=3)
        assert status == 200 and answer["choices"][0]["text"] == greedy, answer


def test_huge_bodies_get_413_before_they_are_read_and_healthz_stays_fast(endpoint):
    """Four 50 MB bodies at once, each refused by its Content-Length (1 MiB default) while the sender is still
    sending it, and /healthz polled throughout: the router's event loop never parses them."""
    url, _, _ = endpoint
    answers = []
    with Poll(url + "/healthz") as poll:
        time.sleep(0.5)
        senders = [threading.Thread(target=lambda: answers.append(post_oversized(url + "/v1/completions", 50 << 20)))
                   for _ in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=120)
        time.sleep(0.5)
    assert len(answers) == 4
    for status, answer, _, seconds in answers:
        assert status == 413 and answer["error"]["param"] == "body", answer
        assert "serve.max_body_bytes" in answer["error"]["message"] and seconds < 5, (answer, seconds)
    latencies = sorted(seconds for _, seconds in poll.answers)
    print(f"\n/healthz during 4 concurrent 50 MB bodies: {len(latencies)} polls, p50 "
          f"{latencies[len(latencies) // 2] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms; 413 after "
          f"{', '.join(f'{a[3] * 1000:.0f}' for a in answers)} ms")
    assert {status for status, _ in poll.answers} == {200}
    assert latencies[-1] < 0.5, latencies[-5:]
    assert completions(url, max_tokens=1)[0] == 200


def test_a_full_queue_answers_503_with_retry_after(endpoint):
    """The replica runs 4 requests at once and 4 more wait (serve.max_running_requests, max_queued_requests):
    of 32 long requests sent together, the rest are refused at once rather than queued without bound."""
    url, _, _ = endpoint
    answers = []
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 2.0, "seed": 1}
    clients = [threading.Thread(target=lambda: answers.append(completions(url, **body))) for _ in range(32)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=300)
    refused = [(answer, headers) for status, answer, headers in answers if status == 503]
    assert len(answers) == 32 and {status for status, _, _ in answers} == {200, 503}, [a[:2] for a in answers]
    # How many: 32 - 8 if all arrived at once, fewer as some finish while the last threads start (18 on 2 cores).
    print(f"\n32 requests at once: {32 - len(refused)} answered, {len(refused)} refused with 503")
    for answer, headers in refused:
        assert answer["error"]["type"] == "server_error" and "max_queued_requests" in answer["error"]["message"]
        assert int(headers["retry-after"]) >= 1
    assert completions(url, max_tokens=1)[0] == 200


def generated_tokens(ray_session, *, settle_s: float = 20.0) -> float:
    """ray_slipway_generated_tokens_total for MODEL, read once two reads 1.5 s apart agree (metrics are exported
    every second)."""
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    deadline, previous = time.monotonic() + settle_s, None
    while True:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        total = sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                    if line.startswith("ray_slipway_generated_tokens_total") and f'model="{MODEL}"' in line)
        if total == previous or time.monotonic() > deadline:
            return total
        previous = total
        time.sleep(1.5)


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "plain"])
def test_a_client_that_goes_away_stops_its_generation(endpoint, ray_session, streamed):
    """The counter of generated tokens grows by a whole completion for a client that stays, and by far less for
    one that drops the connection early: Serve's cancellation reaches the decode loop."""
    url, _, _ = endpoint
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 2.0, "seed": 11}  # hot: EOS is unlikely
    before = generated_tokens(ray_session)
    started = time.perf_counter()
    status, answer, _ = completions(url, **body)
    full_s = time.perf_counter() - started
    full = answer["usage"]["completion_tokens"]
    assert status == 200 and full >= 150, answer
    after_full = generated_tokens(ray_session)
    assert after_full - before == full
    if streamed:
        stream_then_disconnect(url + "/v1/completions", {**body, "stream": True}, events=2)
    else:
        post_then_disconnect(url + "/v1/completions", body, after_s=full_s / 5)
    time.sleep(2 * full_s)  # long enough for an uncancelled generation to have finished
    stopped_after = generated_tokens(ray_session) - after_full
    print(f"\n{'streamed' if streamed else 'plain'}: a full completion took {full_s:.2f} s for {full} tokens; "
          f"the dropped one generated {stopped_after:.0f}")
    assert stopped_after < full / 2, (stopped_after, full)


def nan_export(export_dir: Path, out_dir: Path) -> Path:
    """A copy of an export whose output layer is NaN: loadable, with valid checksums once registered, but every
    logit is NaN, so its health check fails."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(export_dir, out_dir)
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shard = out_dir / index["weight_map"]["lm_head.weight"]  # the Hugging Face layout of an LLM export
    state = load_file(str(shard))
    state["lm_head.weight"] = torch.full_like(state["lm_head.weight"], float("nan"))
    save_file(state, str(shard), metadata={"format": "pt"})
    return out_dir


def replica_actors(deployment: str) -> set[str]:
    import ray

    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if f"#{deployment}#" in actor["name"] and MODEL in actor["name"]}


def test_a_canary_that_fails_its_health_check_leaves_production_alone(endpoint):
    """A canary whose logits are NaN: its own deployment's replicas fail their health checks and restart, the
    router gives it no traffic, and production's replica goes on serving every request, never restarted."""
    url, serve_cfg, root = endpoint
    wait_for_version(url, 1)
    registry = Registry(serve_cfg.registry)
    broken = registry.register(MODEL, nan_export(root / "ddp", root / "nan"), metadata={"family": "llm"})["version"]
    production_replicas = replica_actors("llm_replica")
    assert len(production_replicas) == 1
    promote.set_canary(ServeConfig(registry=serve_cfg.registry, canary_version=broken, canary_percent=50),
                       model=MODEL)
    try:
        deadline = time.monotonic() + 30
        while models(url)["canary_version"] != broken:
            assert time.monotonic() < deadline, "the router did not pick up the canary alias"
            time.sleep(0.2)
        with Load(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 1.0}, threads=4) as load:
            time.sleep(8.0)  # several of the canary's health checks (every second), each one failing
        assert models(url)["canary_healthy"] is False
        statuses = [status for status, _ in load.answers]
        assert statuses and set(statuses) == {200}, f"{len(statuses) - statuses.count(200)} failed requests"
        assert {version for _, version in load.answers} == {1}
        assert replica_actors("llm_replica") == production_replicas, "production's replica was restarted"
    finally:
        promote.set_canary(ServeConfig(registry=serve_cfg.registry, canary_percent=0), model=MODEL)


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Another program on the port: answers everything with 200 and remembers what it was sent."""

    seen: list[str] = []

    def _answer(self):
        self.seen.append(f"{self.command} {self.path}")
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def test_the_serve_stage_refuses_a_port_another_program_holds(endpoint, tmp_path):
    """Exit 2 naming serve.port, before Serve starts, and nothing (least of all the sample request with its API
    key) is sent to the program that holds the port."""
    _, serve_cfg, _ = endpoint
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = subprocess.run(
            [sys.executable, "launch.py", "stage=serve", f"serve.model={MODEL}", f"serve.registry={serve_cfg.registry}",
             f"serve.port={port}", "serve.block=false", "serve.api_key=not-for-them", f"paths.root={tmp_path}",
             "cluster.include_dashboard=false"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert f"serve.port={port}" in output and "another program" in output, output[-3000:]
    assert _Recorder.seen == []


def test_a_replica_that_dies_mid_stream_leaves_the_stream_visibly_unfinished(endpoint):
    """Runs last: it kills the production replica (as the OOM killer or a lost node would) while a completion
    streams. The replica is the ingress (one hop), so nothing of ours is left to write an error event: Serve's
    proxy ends the body, and what tells a client the text is incomplete is what a finished stream always has
    and this one lacks, a finish_reason and [DONE]. Serve then replaces the replica."""
    import ray

    url, _, _ = endpoint
    wait_for_version(url, 1)
    (replica,) = replica_actors("llm_replica")
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 2.0, "seed": 11, "stream": True}
    events = []

    def kill_after_first_event():
        while not events:
            time.sleep(0.01)
        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)

    killer = threading.Thread(target=kill_after_first_event, daemon=True)
    killer.start()
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=120) as response:
        for line in response:
            if line.startswith(b"data: "):
                events.append(line[len(b"data: "):].decode().strip())
    killer.join(timeout=30)
    assert events and "[DONE]" not in events, events[-3:]
    chunks = [json.loads(event) for event in events]
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks), chunks[-1]
    assert sum(len(chunk["choices"][0]["text"]) > 0 for chunk in chunks) < 200
    deadline = time.monotonic() + 120
    while completions(url, max_tokens=1)[0] != 200:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(1.0)
