"""A rollout's state in the registry (serve/rollout.py), without serving: one rollout per model, continued by a
restarted command once the last one went silent, never by a second live one; a rollout whose canary was removed
by hand while nobody ran it is over; and serve.rollout's keys are checked with their names."""

import time

import pytest

from conf.schema import RolloutConfig
from serve.registry import Registry
from serve.rollout import RUNNING, RolloutError, _claim, _save

MODEL = "ranker"


@pytest.fixture
def registry(tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry")
    for seed in range(3):
        export = tmp_path / f"export{seed}"
        export.mkdir()
        (export / "model.safetensors").write_bytes(bytes([seed]) * 64)
        registry.register(MODEL, export, metadata={"family": "ranker"})
    registry.move_alias(MODEL, "production", 1, reason="test")
    return registry


CFG = RolloutConfig(steps=[10.0, 50.0, 100.0], max_looks=4, look_interval_s=1.0, lease_s=5.0)


def test_a_rollout_starts_once_and_a_second_is_refused(registry):
    state = _claim(registry, MODEL, canary=2, cfg=CFG, owner="a")
    assert (state["status"], state["production"], state["step"], state["planned_looks"]) == (RUNNING, 1, 0, 8)
    with pytest.raises(RolloutError, match="has a rollout of v2 under way"):
        _claim(registry, MODEL, canary=3, cfg=CFG, owner="b")
    with pytest.raises(RolloutError, match="is being run by a"):
        _claim(registry, MODEL, canary=2, cfg=CFG, owner="b")
    with pytest.raises(RolloutError, match="is already ranker's production version"):
        registry.update_rollout(MODEL, lambda current: {**current, "status": "rolled_back"})
        _claim(registry, MODEL, canary=1, cfg=CFG, owner="c")


def test_a_silent_rollout_is_continued_where_it_stopped_and_its_old_command_stops(registry):
    state = _save(registry, {**_claim(registry, MODEL, canary=2, cfg=CFG, owner="a"), "step": 1, "look": 2,
                             "looks_done": 6, "window_start": 100.0})
    registry.move_alias(MODEL, "canary", 2, reason="step 2", alias_fields={"percent": 50.0})
    registry.update_rollout(MODEL, lambda current: {**current, "heartbeat_at": time.time() - CFG.lease_s - 1})
    continued = _claim(registry, MODEL, canary=2, cfg=CFG, owner="b")
    assert (continued["owner"], continued["step"], continued["look"], continued["looks_done"]) == ("b", 1, 2, 6)
    with pytest.raises(RolloutError, match="taken over or ended by another command"):
        _save(registry, state)  # the first command, back from a pause: it must not write over b's state


def test_a_rollout_whose_canary_was_removed_while_nobody_ran_it_is_over(registry):
    _save(registry, {**_claim(registry, MODEL, canary=2, cfg=CFG, owner="a"), "window_start": 100.0})
    registry.move_alias(MODEL, "canary", 2, reason="step 1", alias_fields={"percent": 10.0})
    registry.update_rollout(MODEL, lambda current: {**current, "heartbeat_at": time.time() - CFG.lease_s - 1})
    with pytest.raises(RolloutError, match="under way"):  # silent, but its canary still serves: it may go on
        _claim(registry, MODEL, canary=3, cfg=CFG, owner="b")
    registry.move_alias(MODEL, "canary", None, reason="ended by hand")
    fresh = _claim(registry, MODEL, canary=3, cfg=CFG, owner="b")
    assert (fresh["canary"], fresh["step"], fresh["owner"]) == (3, 0, "b")


@pytest.mark.parametrize(("fields", "key"), [
    ({"steps": [10.0, 50.0]}, "steps"), ({"steps": [50.0, 10.0, 100.0]}, "steps"), ({"steps": []}, "steps"),
    ({"alpha": 0.0}, "alpha"), ({"max_looks": 0}, "max_looks"), ({"bake_s": -1.0}, "bake_s"),
    ({"critical": ["latency", "cost"]}, "critical"), ({"lease_s": 10.0, "look_interval_s": 30.0}, "lease_s")])
def test_bad_rollout_settings_name_their_key(fields, key):
    with pytest.raises(ValueError, match=f"serve.rollout.{key}"):
        RolloutConfig(**fields)
