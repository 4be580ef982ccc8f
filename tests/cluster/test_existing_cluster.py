"""launch.py against an existing Ray cluster: a head started with `ray start`, the repo shipped as working_dir."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, TINY_OVERRIDES


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture
def ray_temp_dir():
    # Short on purpose: Ray's unix socket paths under the temp dir must stay within 107 characters.
    path = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ray_head(ray_temp_dir):
    """A separate Ray head with its own ports, in its own session so it can be stopped as a group."""
    gcs, client, agent, agent_grpc, metrics, env_agent, node_manager, object_manager = _free_ports(8)
    command = [
        os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4", "--include-dashboard=false",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}", f"--temp-dir={ray_temp_dir}", "--disable-usage-stats",
    ]
    head = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    while socket.socket().connect_ex(("127.0.0.1", gcs)) != 0:
        assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
        time.sleep(0.5)
    yield f"127.0.0.1:{gcs}"
    # Only this head's session: SIGTERM would make it drain for 30 s first, with nothing left to drain.
    os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=60)


def test_training_on_an_existing_cluster_ships_the_repo(ray_head, ray_temp_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "launch.py", *TINY_OVERRIDES, f"paths.root={tmp_path / 'out'}", f"cluster.address={ray_head}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=400,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "connecting to the Ray cluster at 127.0.0.1" in output
    assert "starting an embedded local Ray" not in output
    assert "step 6/6 | loss" in output
    # Workers imported our code from the uploaded working_dir package, not from this checkout.
    assert list(ray_temp_dir.glob("session_*/runtime_resources/working_dir_files/*"))
    assert result.stdout.strip().splitlines()[-1].startswith("run_dir: ")
