"""The Quickstart's main job, `python launch.py +exp=quickstart`, at test size: it trains, promotes into the
registry, serves on localhost, and prints a sample answer and a curl command that works."""

import json
import re
import shlex

import launch
from tests.helpers import TINY_OVERRIDES, compose_config
from tests.serve.http_client import request


def test_quickstart_trains_promotes_and_serves(serve_port, ray_session, data_cache, tmp_path, capsys):
    from ray import serve

    overrides = [*TINY_OVERRIDES[1:], f"paths.root={tmp_path}", f"paths.data_cache={data_cache}",
                 "serve.block=false", f"serve.port={serve_port}", "serve.num_cpus=0.25", "serve.max_replicas=1",
                 "serve.api_key=qs-secret"]
    assert TINY_OVERRIDES[0] == "+exp=llm_tiny"
    try:
        results = launch.run(compose_config(["+exp=quickstart", *overrides]), experiment="quickstart")
        assert [kind for kind, _ in results] == ["run_dir", "promotion", "endpoint"]
        assert results[1][1] == "quickstart v1 promoted"
        url = results[2][1]
        assert url == f"http://127.0.0.1:{serve_port}"
        printed = capsys.readouterr().out
        assert "sample /v1/completions answered by quickstart v1" in printed
        curl = re.search(r"^\s*(curl .*)$", printed, re.M).group(1)
        assert "Authorization: Bearer $SLIPWAY_API_KEY" in curl  # the key itself is never printed
        words = shlex.split(curl)
        body = json.loads(words[words.index("-d") + 1])
        assert request(words[2], body)[0] == 401
        status, answer, _ = request(words[2], body, headers={"authorization": "Bearer qs-secret"})
        assert status == 200 and answer["model_version"] == 1 and answer["choices"][0]["text"]
        assert "qs-secret" not in (results[0][1] / "config.yaml").read_text()
    finally:
        serve.delete("quickstart")


def test_the_serve_stage_serves_until_ctrl_c(tmp_path, trained_runs):
    """`stage=serve` as a user runs it: its own embedded Ray, serving until SIGINT, then a clean exit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import LLM_STRATEGY_RUNS, REPO_ROOT
    from tests.serve.conftest import free_port

    common = [f"paths.root={tmp_path}", "serve.model=tiny"]
    source = trained_runs("llm-ddp", LLM_STRATEGY_RUNS["ddp"])
    launch.run(compose_config(["stage=promote", f"serve.source={source}", *common]), experiment="default")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "launch.py", "stage=serve", *common, f"serve.port={port}", "serve.num_cpus=0.25",
         "cluster.include_dashboard=false", "cluster.local_num_cpus=2"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 180
        while not any("until Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines[-30:])
            lines.append(process.stdout.readline())
        status, answer, _ = request(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "def ", "max_tokens": 2})
        assert status == 200 and answer["model_version"] == 1
        os.killpg(process.pid, signal.SIGINT)
        output = "".join(lines) + process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-3000:]
    assert "letting in-flight requests finish" in output
    assert output.rstrip().splitlines()[-1] == f"endpoint: http://127.0.0.1:{port}"
