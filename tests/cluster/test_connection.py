import pytest

from cluster.connection import REPO_ROOT, build_runtime_env, local_cpu_count
from conf.derived import resolve_address
from conf.schema import ClusterConfig


def test_remote_runtime_env_ships_the_repo_without_outputs_or_git():
    env = build_runtime_env(ClusterConfig(), remote=True, env_vars={"A": "1"})
    assert env["working_dir"] == str(REPO_ROOT)
    assert {".git", "outputs", ".venv"} <= set(env["excludes"])
    assert env["env_vars"] == {"A": "1"}


def test_address_comes_from_config_then_environment(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(ClusterConfig()) is None
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert resolve_address(ClusterConfig()) == "ray://head:10001"
    assert resolve_address(ClusterConfig(address="ray://other:10001")) == "ray://other:10001"


def test_embedded_ray_leaves_room_for_data_tasks_and_refuses_oversubscription(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert local_cpu_count(ClusterConfig(num_workers=2, cpus_per_worker=1)) == 4
    with pytest.raises(ValueError, match="cluster.num_workers=8 x cluster.cpus_per_worker=1 needs 8 CPU"):
        local_cpu_count(ClusterConfig(num_workers=8, cpus_per_worker=1))
    assert local_cpu_count(ClusterConfig(num_workers=8, local_num_cpus=16)) == 16
