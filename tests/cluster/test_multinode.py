"""Training on a real multi-node Ray cluster on this machine: a head and two worker nodes, each its own raylet.

Worker node B runs in a private mount namespace with its own empty filesystem over one directory, so that
directory is local-only storage as far as B is concerned: what a path on one machine's disk is to the others.
"""

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster.ray_nodes import FAST_NODE_DEATH, RAY_ENV, start_head, start_worker, wait_for_nodes
from tests.helpers import REPO_ROOT, TINY_OVERRIDES


def _private_mount_over(directory: Path) -> list[str] | None:
    """A command prefix that runs the rest in a new mount namespace with a fresh tmpfs over `directory`."""
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    mount = f"mount -t tmpfs slipway-node-local {directory} && exec \"$@\""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh"]


@pytest.fixture(scope="module")
def three_nodes():
    """(address, node B, the directory node B cannot see, the head's temp dir). Head 0 CPUs (it runs the driver
    and Train's controller, as on a real cluster), nodes A and B 1 CPU each, so two workers need both nodes."""
    base = Path(tempfile.mkdtemp(prefix="mn-", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
    hidden_from_b = base / "local-only"
    hidden_from_b.mkdir()
    wrap = _private_mount_over(hidden_from_b)
    if wrap is None:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip("needs `unshare --mount` (root or user namespaces) to give node B a filesystem of its own")
    (base / "ray").mkdir()
    head, address = start_head(base / "ray", num_cpus=0, extra=[f"--system-config={FAST_NODE_DEATH}"])
    nodes = [head]
    try:
        # One at a time: two raylets registering at once on 2 busy cores can miss Ray's node start-up timeout.
        nodes.append(start_worker(address, num_cpus=1, log=base / "node-a.log"))
        wait_for_nodes(address, 2)
        nodes.append(start_worker(address, num_cpus=1, log=base / "node-b.log", wrap=wrap))
        wait_for_nodes(address, 3)
        yield address, nodes[2], hidden_from_b, base / "ray"
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(base, ignore_errors=True)


def _launch(overrides: list[str], *, address: str, timeout: float = 400, **popen) -> subprocess.Popen:
    # A dead node's workers are noticed at once, but Train's first retry may still ask for the old size; it
    # gives up on that after this long (default 60 s) and resizes to what the cluster has.
    env = {**RAY_ENV, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
    return subprocess.Popen([sys.executable, "launch.py", *TINY_OVERRIDES, f"cluster.address={address}", *overrides],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            **popen)


def test_local_only_storage_on_several_nodes_is_refused_naming_the_key(three_nodes):
    address, _, hidden_from_b, _ = three_nodes
    started = time.monotonic()
    run = _launch([f"paths.root={hidden_from_b / 'out'}"], address=address)
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 2, output[-3000:]
    assert f"paths.root={hidden_from_b / 'out'} is not shared storage" in output
    # exactly one node is named: B, the one with its own filesystem there
    assert re.search(r"node\(s\) [\d.]+ [0-9a-f]{8} of this 3-node cluster cannot see it", output), output[-2000:]
    assert "step 1/" not in output  # refused before any training
    assert time.monotonic() - started < 120


def _last_step(run_dir_root: Path) -> int:
    steps = [json.loads(line).get("step", 0)
             for metrics in run_dir_root.glob("runs/*/metrics.jsonl") for line in metrics.read_text().splitlines()
             if line.strip()]
    return max(steps, default=0)


def test_training_survives_losing_a_node_and_resizes_to_what_is_left(three_nodes, tmp_path):
    """Two workers spread over A and B; B dies a step after the step-6 checkpoint (one more checkpoint interval
    than needed: Train registers a checkpoint once every rank's report has arrived); the elastic run goes on with one
    worker on A from its latest checkpoint and finishes. The driver joins by address and ships the repo."""
    address, node_b, _, head_temp_dir = three_nodes
    root = tmp_path / "shared"
    run = _launch([f"paths.root={root}", "trainer.max_steps=12", "cluster.num_workers=[1,2]",
                   "cluster.placement_strategy=SPREAD", "checkpoint.max_failures=3"], address=address)
    deadline = time.monotonic() + 300
    while run.poll() is None and _last_step(root) < 7:
        assert time.monotonic() < deadline, "training did not reach step 7"
        time.sleep(0.3)
    assert run.poll() is None, run.stdout.read()[-3000:]
    node_b.kill()
    output, _ = run.communicate(timeout=400)
    assert run.returncode == 0, output[-4000:]
    assert "training tiny with ddp on 2 worker(s) from step 0 to 12" in output
    # Killing B failed the worker group (one worker must run on B: A and B have 1 CPU each, the head none) and
    # Train retried. How it words the cause depends on which comes first: the GCS marking B dead, a health
    # check to B's worker failing, or gloo on A losing its peer.
    assert "[FailurePolicy] RETRY" in output, output[-4000:]
    restored = [line for line in output.splitlines() if "training tiny with ddp on 1 worker(s) from step" in line]
    assert restored, output[-4000:]
    resumed_at = int(restored[0].split("from step ")[1].split()[0])
    # A checkpoint, not step 0: the latest one Train had registered when it noticed the loss. Stopping B's raylet
    # and workers takes a moment, in which the two workers may still finish steps 8 and 9 (CI once saw 9).
    assert resumed_at in (3, 6, 9)
    summary = json.loads(next(root.glob("runs/*/summary.json")).read_text())
    assert summary["status"] == "finished" and summary["steps"] == 12
    assert output.strip().splitlines()[-1].startswith("run_dir: ")
    assert "connecting to the Ray cluster at 127.0.0.1" in output
    # Workers imported our code from the uploaded working_dir package, not from this checkout.
    assert list(head_temp_dir.glob("session_*/runtime_resources/working_dir_files/*"))
