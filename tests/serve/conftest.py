"""One Ray Serve instance for the session (its HTTP port is fixed once started), on the session's Ray."""

import json
import socket
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_best(run_dir: Path, out_dir: Path) -> Path:
    """The export of a finished run's best checkpoint (its summary.json names it)."""
    from serve.export import export_checkpoint

    summary = json.loads((run_dir / "summary.json").read_text())
    return export_checkpoint(run_dir / summary["best_checkpoint"].rsplit("/", 1)[1], out_dir, info={})


def scrape(ray_session) -> str:
    """The session Ray's Prometheus endpoint, as Prometheus would scrape it (every node's metrics agent: one)."""
    import urllib.request

    port = ray_session._private.worker.global_worker.node.metrics_export_port
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def settled(read, *, timeout_s: float = 30.0):
    """read() once two reads 2.5 s apart agree: what was sent before is published (the test deployments' replicas
    publish their live profiles every second, serve.monitor.publish_interval_s)."""
    import time

    deadline, last = time.monotonic() + timeout_s, read()
    while time.monotonic() < deadline:
        time.sleep(2.5)
        current = read()
        if current == last:
            return current
        last = current
    raise AssertionError(f"the metrics kept changing for {timeout_s} s: {last}")


@pytest.fixture(scope="session")
def serve_port(ray_session) -> int:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="module")  # Serve replicas hold CPUs: a module that does not use it gets them back
def served_chat_llm(fine_tuned_llm, serve_port):
    """The fine-tuned Hugging Face chat model (tests/conftest.py: fine_tuned_llm) served on the session's Serve
    under /chat: `.url` (no trailing slash), `.model`, `.export_dir` (its registered Hugging Face directory)."""
    from types import SimpleNamespace

    from ray import serve

    from conf.schema import MonitorConfig, ServeConfig
    from serve.deploy import deploy
    from serve.registry import Registry

    export_dir = Registry(fine_tuned_llm.registry).fetch(fine_tuned_llm.model, 1, cache_dir=fine_tuned_llm.root)
    serve_cfg = ServeConfig(registry=str(fine_tuned_llm.registry), port=serve_port, num_cpus=0.25, min_replicas=1,
                            max_replicas=1, refresh_s=1.0, max_tokens_limit=64, route_prefix="/chat",
                            monitor=MonitorConfig(publish_interval_s=1.0))
    url = deploy(serve_cfg, model=fine_tuned_llm.model).rstrip("/")
    yield SimpleNamespace(url=url, model=fine_tuned_llm.model, export_dir=export_dir)
    serve.delete(fine_tuned_llm.model)
