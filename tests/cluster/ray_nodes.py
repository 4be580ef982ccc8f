"""Real Ray nodes on this machine for cluster tests: a head and worker nodes, each a separate `ray start` with
its own raylet, loopback ports and process group (so a test can kill one node the way a machine dies)."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# Ray 2.60 clusters started with `ray start` use token authentication; clients and joining nodes need the mode set,
# and `ray start` needs a token: a token of the test session's own, so the tests do not depend on a
# ~/.ray/auth_token being on the machine (a new machine has none).
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(16)}
# Notice a dead node in about 3 s instead of 30 (GCS health checks: period x failure threshold).
FAST_NODE_DEATH = '{"health_check_period_ms":1000,"health_check_failure_threshold":3}'


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _node_ports() -> list[str]:
    agent, agent_grpc, metrics, env_agent, node_manager, object_manager = free_ports(6)
    return [
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
    ]


class RayNode:
    """One `ray start --block` process group. `wrap` prefixes the command (e.g. `unshare` for a private mount)."""

    def __init__(self, args: list[str], *, log: Path, wrap: list[str] | None = None, env: dict | None = None):
        self.log = log
        command = [*(wrap or []), RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                   *_node_ports(), *args]
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True, env=env or RAY_ENV)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole node (ray start, raylet, its workers): a machine lost, no goodbye to the GCS."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)


def start_head(temp_dir: Path, *, num_cpus: int, port: int | None = None, dashboard_port: int | None = None,
               extra: list[str] = (), env: dict | None = None) -> tuple[RayNode, str]:
    """A head node; returns it and its GCS address once the GCS port accepts connections."""
    gcs, client = free_ports(2)
    gcs = port or gcs
    dashboard = (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
                 if dashboard_port else ["--include-dashboard=false"])
    head = RayNode(["--head", f"--port={gcs}", f"--num-cpus={num_cpus}", f"--ray-client-server-port={client}",
                    f"--temp-dir={temp_dir}", *dashboard, *extra], log=temp_dir.parent / f"{temp_dir.name}-head.log",
                   env=env)
    _wait_for_port(gcs, node=head)
    return head, f"127.0.0.1:{gcs}"


def start_worker(address: str, *, num_cpus: int, log: Path, wrap: list[str] | None = None) -> RayNode:
    return RayNode([f"--address={address}", f"--num-cpus={num_cpus}"], log=log, wrap=wrap)


def active_nodes(address: str) -> dict[str, int]:
    """Alive nodes by id (or by node type, on an autoscaling cluster), as `ray status` reports them: a driver
    of our own would join the cluster and change what it reports."""
    status = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True, env=RAY_ENV,
                            timeout=60)
    active = status.stdout.split("Active:")[-1].split("Pending:")[0]  # lines "<count> <node id or type>"
    return {line.split()[1]: int(line.split()[0]) for line in active.splitlines() if line.strip()[:1].isdigit()}


def wait_for_nodes(address: str, count: int, *, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while sum(active_nodes(address).values()) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} Ray nodes did not come up at {address}: {active_nodes(address)}")
        time.sleep(1)


def _wait_for_port(port: int, *, node: RayNode, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        if not node.alive() or time.monotonic() > deadline:
            raise AssertionError(f"ray start did not come up; its log:\n{node.log.read_text()[-3000:]}")
        time.sleep(0.5)
