"""Rollback walks back through the versions production held (issue 14 item 4): production's history is a stack,
a promotion pushes, a rollback pops, and an explicit serve.to_version move pushes."""

import json
from pathlib import Path

import pytest

from conf.schema import ServeConfig
from serve import promote
from serve.registry import Registry

MODEL = "tiny"


def _write_export(directory: Path, *, seed: int) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 4 + seed.to_bytes(4, "little"))
    (directory / "model_config.json").write_text(json.dumps({"hidden": 8, "seed": seed}))
    return directory


@pytest.fixture
def registry_dir(tmp_path) -> Path:
    """v1, v2, v3, each made production in turn, as three promotions leave them."""
    registry = Registry(tmp_path / "registry")
    for seed in (1, 2, 3):
        version = registry.register(MODEL, _write_export(tmp_path / f"export{seed}", seed=seed), metadata={})
        registry.move_alias(MODEL, "production", version["version"], reason=f"promoted v{seed}")
    return tmp_path / "registry"


def _rollback(registry_dir: Path, **settings) -> int:
    return promote.rollback(ServeConfig(registry=str(registry_dir), **settings), model=MODEL)["to"]


def test_repeated_rollbacks_walk_back_and_never_return_to_a_version_left_by_rollback(registry_dir):
    assert [_rollback(registry_dir), _rollback(registry_dir)] == [2, 1]
    with pytest.raises(ValueError, match="v1 has no earlier version"):
        _rollback(registry_dir)
    assert Registry(registry_dir).resolve(MODEL, "production") == 1
    moves = [event for event in Registry(registry_dir).history(MODEL) if event["event"] == "alias"]
    assert [event.get("rollback", False) for event in moves] == [False, False, False, True, True]


def test_a_promotion_after_a_rollback_pushes_and_an_explicit_version_counts_as_a_push(registry_dir, tmp_path):
    registry = Registry(registry_dir)
    assert _rollback(registry_dir) == 2  # held: 1, 2
    v4 = registry.register(MODEL, _write_export(tmp_path / "export4", seed=4), metadata={})["version"]
    registry.move_alias(MODEL, "production", v4, reason="promoted v4")  # held: 1, 2, 4
    assert _rollback(registry_dir, to_version=3, reason="hotfix") == 3  # held: 1, 2, 4, 3
    assert [_rollback(registry_dir) for _ in range(3)] == [4, 2, 1]
    assert promote.previous_production(registry, MODEL) is None


def test_removing_production_starts_its_stack_over(registry_dir):
    registry = Registry(registry_dir)
    registry.move_alias(MODEL, "production", None, reason="taken down")
    registry.move_alias(MODEL, "production", 2, reason="back up")
    # Removing production starts over: what it held before the removal is no longer a rollback target.
    assert promote.previous_production(registry, MODEL) is None
