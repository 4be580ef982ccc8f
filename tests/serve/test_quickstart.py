"""The Quickstart's main job as a user runs it, at test size: `python launch.py +exp=quickstart` trains,
promotes into the registry, serves on localhost with a sample answer and a curl command that works, and stops
cleanly on Ctrl-C."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from tests.helpers import REPO_ROOT, TINY_OVERRIDES
from tests.serve.conftest import free_port
from tests.serve.http_client import request


def read_until(process: subprocess.Popen, marker: str, *, timeout_s: float) -> str:
    lines, deadline = [], time.monotonic() + timeout_s
    while not any(marker in line for line in lines):
        assert time.monotonic() < deadline and process.poll() is None, "".join(lines[-40:])
        lines.append(process.stdout.readline())
    return "".join(lines)


def test_the_quickstart_command_trains_promotes_serves_and_stops_on_ctrl_c(tmp_path, data_cache):
    assert TINY_OVERRIDES[0] == "+exp=llm_tiny"
    port = free_port()
    command = [sys.executable, "launch.py", "+exp=quickstart", *TINY_OVERRIDES[1:], f"paths.root={tmp_path}",
               f"paths.data_cache={data_cache}", f"serve.port={port}", "serve.num_cpus=0.25", "serve.max_replicas=1",
               "serve.api_key=qs-secret", "cluster.include_dashboard=false"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        printed = read_until(process, "until Ctrl-C", timeout_s=300)
        assert "eval gate: no production version yet" in printed
        assert "sample /v1/completions answered by quickstart v1" in printed
        curl = re.search(r"^\s*(curl .*)$", printed, re.M).group(1)
        assert 'Authorization: Bearer $SLIPWAY_API_KEY' in curl  # the key itself is never printed
        assert "qs-secret" not in printed
        words = shlex.split(curl)
        url, body = words[2], json.loads(words[words.index("-d") + 1])
        assert url == f"http://127.0.0.1:{port}/v1/completions"
        assert request(url, body)[0] == 401
        status, answer, _ = request(url, body, headers={"authorization": "Bearer qs-secret"})
        assert status == 200 and answer["model_version"] == 1 and answer["choices"][0]["text"]
        os.killpg(process.pid, signal.SIGINT)
        output = printed + process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-3000:]
    assert "letting in-flight requests finish" in output
    run_dir = next((tmp_path / "runs").glob("quickstart-*"))
    assert output.rstrip().splitlines()[-3:] == [
        f"run_dir: {run_dir}", "promotion: quickstart v1 promoted", f"endpoint: http://127.0.0.1:{port}"]
    assert "qs-secret" not in (run_dir / "config.yaml").read_text()
