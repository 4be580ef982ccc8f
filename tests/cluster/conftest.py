"""One separate Ray head (`ray start --head`, with the dashboard and its Jobs API) shared by the tests of
existing clusters and of job submission: starting one costs ~10 s on 2 cores, so the session starts it once,
on first use."""

import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.cluster.ray_nodes import RayNode, free_ports, start_head

HEAD_START_TIMEOUT_S = 90


@dataclass(frozen=True)
class RayHead:
    address: str  # the GCS address, what ray.init and cluster.address take
    dashboard_url: str  # the Jobs API, what submit=true takes
    temp_dir: Path  # --temp-dir: session_*/ holds the head's logs and uploaded working_dir packages
    env: dict[str, str] = field(default_factory=dict)  # what a client needs: token auth mode and the token


def _wait_for_jobs_api(head: RayNode, url: str, headers: dict) -> None:
    # The GCS port opens seconds before the dashboard serves; submissions need the dashboard.
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while True:
        try:
            if requests.get(f"{url}/api/version", headers=headers, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if not head.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"ray start --head did not bring up the Jobs API at {url}:\n"
                               f"{head.log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop_running_jobs(url: str, headers: dict) -> None:
    # A job's driver runs in a session of its own, outside the head's process group: stop it through the API.
    try:
        jobs = requests.get(f"{url}/api/jobs/", headers=headers, timeout=5).json()
        running = [job["submission_id"] for job in jobs if job["status"] in ("PENDING", "RUNNING")]
        for job_id in running:
            requests.post(f"{url}/api/jobs/{job_id}/stop", headers=headers, timeout=5)
        deadline = time.monotonic() + 15
        while running and time.monotonic() < deadline:
            jobs = requests.get(f"{url}/api/jobs/", headers=headers, timeout=5).json()
            running = [job["submission_id"] for job in jobs if job["status"] in ("PENDING", "RUNNING")]
            time.sleep(0.5)
    except (requests.RequestException, ValueError, KeyError):
        pass  # the head is going away anyway; a stray driver exits once its GCS is gone


@pytest.fixture(scope="session")
def ray_head():
    """A separate Ray head with its own loopback ports, its own short temp dir (unix socket paths must stay
    within 107 characters) and its own token, in its own session so it can be killed as a group."""
    base = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    temp_dir = base / "ray"
    temp_dir.mkdir()
    # A token of its own: the head and its clients do not depend on ~/.ray/auth_token, and a client
    # without this env gets the refusal a user without the token would get.
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    # The job's entrypoint runs `python` from the head's PATH: make it this venv's.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    (dashboard_port,) = free_ports(1)
    head, address = start_head(temp_dir, num_cpus=4, dashboard_port=dashboard_port,
                               env={**os.environ, **env, "PATH": path})
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_jobs_api(head, dashboard_url, {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
        yield RayHead(address=address, dashboard_url=dashboard_url, temp_dir=temp_dir, env=env)
    finally:
        _stop_running_jobs(dashboard_url, {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
        head.kill()  # SIGKILL: SIGTERM would make it drain for 30 s first, with nothing left to drain
        shutil.rmtree(base, ignore_errors=True)
