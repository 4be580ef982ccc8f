"""Issue 14, placements that can never be met, on a Ray cluster joined by address (a one-node `ray start --head`
of 2 CPUs): a strict placement its nodes cannot hold is refused before Ray Train starts, and a request that
waits on nodes that do not come (an autoscaler that cannot add them, a busy cluster) fails within
cluster.scale_up_timeout_s instead of Ray Train retrying forever. (STRICT_SPREAD on the embedded one-node Ray
is refused before Ray starts: tests/test_bad_inputs_launch.py.)"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster.ray_nodes import RAY_ENV, start_head
from tests.helpers import REPO_ROOT, TINY_OVERRIDES


@pytest.fixture(scope="module")
def one_node_cluster():
    base = Path(tempfile.mkdtemp(prefix="pl-", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
    (base / "ray").mkdir()
    head, address = start_head(base / "ray", num_cpus=2)
    try:
        yield address
    finally:
        head.kill()
        shutil.rmtree(base, ignore_errors=True)


def _launch(overrides: list[str], *, address: str, root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "launch.py", *TINY_OVERRIDES, f"cluster.address={address}",
                             f"paths.root={root}", "cluster.scale_up_timeout_s=5", *overrides],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=RAY_ENV)


def test_placements_that_cannot_be_met_fail_fast_naming_the_request(one_node_cluster, tmp_path):
    started = time.monotonic()
    # Both launches side by side: each spends most of its time importing and preparing the tiny corpus.
    strict = _launch(["cluster.placement_strategy=STRICT_SPREAD"], address=one_node_cluster, root=tmp_path / "a")
    waiting = _launch(["cluster.autoscaling=true", "cluster.num_workers=4", "trainer.global_batch_size=8"],
                      address=one_node_cluster, root=tmp_path / "b")
    try:
        strict_output, _ = strict.communicate(timeout=300)
        # Before the fix Ray Train retried the worker group's placement forever: this would time out.
        waiting_output, _ = waiting.communicate(timeout=300)
    finally:
        for process in (strict, waiting):
            if process.poll() is None:
                process.kill()
    assert time.monotonic() - started < 300

    assert strict.returncode == 2, strict_output[-3000:]
    assert ("cluster.placement_strategy=STRICT_SPREAD needs 2 nodes with a worker each, which this cluster's nodes "
            "cannot hold") in strict_output
    assert "the Ray cluster has 1 alive node(s) with 2 CPU" in strict_output
    assert "Traceback" not in strict_output

    assert waiting.returncode == 1, waiting_output[-3000:]
    assert ("asking Ray for 4 worker(s) x {CPU: 1} with cluster.placement_strategy=PACK; the Ray cluster has 1 "
            "alive node(s) with 2 CPU") in waiting_output
    assert "a placement not met within cluster.scale_up_timeout_s=5s fails the run" in waiting_output
    assert "timed out after 5.0 seconds waiting for 4 workers" in waiting_output, waiting_output[-3000:]
    assert "training failed" in waiting_output
    assert "the workers could not be placed within cluster.scale_up_timeout_s=5s: 4 worker(s) x {CPU: 1}" in \
        waiting_output
