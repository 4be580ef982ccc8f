"""A run that asks for more workers than the cluster has, on Ray's real autoscaler with its fake multi-node
provider (nodes are real raylets started on this machine on the autoscaler's demand)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from tests.cluster.ray_nodes import RAY_ENV, active_nodes, free_ports, start_head, wait_for_nodes
from tests.helpers import REPO_ROOT, TINY_OVERRIDES, assert_output_contract

WORKER_TYPE = "cpu_worker"


def _autoscaling_config(*, gcs_address: str, max_nodes: int) -> dict:
    """A cluster-launcher config for the fake provider (the Ray wheel does not ship its example.yaml): a head
    with no CPUs for training and a 1-CPU worker type the autoscaler may add up to `max_nodes` of."""
    return {
        "cluster_name": "slipway-fake", "max_workers": max_nodes, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": max_nodes},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _kill_processes_under(marker: str) -> None:
    """The fake provider starts its nodes from the autoscaler's process; find them by our temp dir's path."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in command and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def autoscaling_head():
    base = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp"))
    temp_dir = base / "ray"
    temp_dir.mkdir()
    (gcs,) = free_ports(1)
    config = base / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(_autoscaling_config(gcs_address=f"127.0.0.1:{gcs}", max_nodes=2)))
    env = {**RAY_ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    head, address = start_head(temp_dir, num_cpus=0, port=gcs, env=env, extra=[f"--autoscaling-config={config}"])
    try:
        yield address, temp_dir
    finally:
        head.kill()
        _kill_processes_under(str(temp_dir))
        shutil.rmtree(base, ignore_errors=True)


def test_a_run_larger_than_the_cluster_makes_the_autoscaler_add_nodes(autoscaling_head, tmp_path):
    """The run also carries the output contract (run directory, manifest, metrics, summary, plot, W&B offline
    run, last line): on a cluster, where workers on other nodes write it, is where it is easiest to break."""
    address, temp_dir = autoscaling_head
    wait_for_nodes(address, 1)
    # serve.api_key: no file of the run, of W&B or of Ray's session holds it (made here, as the shipped copy of
    # this file is in the session too)
    secret = f"sk-{uuid.uuid4().hex}"
    run = subprocess.run(
        [sys.executable, "launch.py", *TINY_OVERRIDES, f"paths.root={tmp_path}", f"cluster.address={address}",
         "cluster.autoscaling=true", "cluster.num_workers=2", "logger=wandb", f"serve.api_key={secret}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=400,
        env={**RAY_ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "needs 2 CPU and the cluster has 0 now: waiting for the autoscaler to add nodes" in output
    assert_output_contract(run.stdout, run.stderr, root=tmp_path)
    assert secret not in output
    holding = [path for directory in (tmp_path, temp_dir) for path in Path(directory).rglob("*")
               if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes()]
    assert not holding, holding
    # The autoscaler, not the test, started the two nodes the workers ran on.
    assert active_nodes(address).get(WORKER_TYPE) == 2
