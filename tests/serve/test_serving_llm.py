"""The LLM endpoint on real Ray Serve over HTTP: OpenAI-style completions (plain and streamed) that equal the
exported model's own output, 4xx answers naming the field, a canary split, version swaps under load with no
failed request, and per-version metrics on Ray's Prometheus endpoint."""

import json
import time
import urllib.request
from pathlib import Path

import pytest

from conf.schema import ServeConfig
from serve import promote
from serve.export import export_checkpoint, load_export
from serve.generation import SamplingParams, generate
from serve.registry import Registry
from tests.helpers import LLM_STRATEGY_RUNS
from tests.serve.http_client import Load, request, stream

MODEL = "tiny-llm"
PROMPT = "def main("


def _export(run_dir, out_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    return export_checkpoint(run_dir / summary["best_checkpoint"].rsplit("/", 1)[1], out_dir, info={})


@pytest.fixture(scope="module")
def endpoint(trained_runs, serve_port, tmp_path_factory):
    """v1 (the DDP run) in production and v2 (the ZeRO-3 run) registered, served by one replica."""
    from ray import serve

    from serve.deploy import deploy

    root = tmp_path_factory.mktemp("llm_serving")
    registry = Registry(root / "registry")
    for version, strategy in ((1, "ddp"), (2, "zero3")):
        export_dir = _export(trained_runs(f"llm-{strategy}", LLM_STRATEGY_RUNS[strategy]), root / strategy)
        assert registry.register(MODEL, export_dir, metadata={"family": "llm"})["version"] == version
    registry.move_alias(MODEL, "production", 1, reason="test setup")
    serve_cfg = ServeConfig(registry=str(root / "registry"), port=serve_port, num_cpus=0.25, min_replicas=1,
                            max_replicas=1, refresh_s=0.3, max_tokens_limit=32)
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
    ({"prompt": PROMPT, "max_tokens": 33}, 400, "max_tokens"),  # over serve.max_tokens_limit
    ({"prompt": "NEAR_CONTEXT", "max_tokens": 32}, 400, "max_tokens"),  # prompt + max_tokens beyond the context
    ({"prompt": PROMPT, "max_tokens": "3"}, 400, "max_tokens"),
    ({"prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "model"),
], ids=["malformed-json", "prompt-type", "empty-prompt", "prompt-over-context", "max-tokens-limit",
        "prompt-plus-max-tokens", "max-tokens-type", "temperature-type", "top-p-range", "too-many-stops",
        "stream-type", "unknown-model"])
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


def test_canary_gets_its_share_of_the_traffic(endpoint):
    """25% to v2 over 400 requests: the observed share must fall within 4.5 standard deviations."""
    url, serve_cfg, _ = endpoint
    promote.set_canary(ServeConfig(registry=serve_cfg.registry, canary_version=2, canary_percent=25), model=MODEL)
    deadline = time.monotonic() + 30
    while json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]["canary_version"] != 2:
        assert time.monotonic() < deadline, "the router did not pick up the canary alias"
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
    weights = Path(registry.root) / MODEL / "versions" / f"{version:06d}" / "model.safetensors"
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
