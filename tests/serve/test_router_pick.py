"""The router's choice of model version per request (serve/ingress.py: routes_from_aliases and Routes.pick), on
a real registry's aliases and without Ray Serve.

The router draws `random.random()` per request and asks Routes.pick for the version; these tests drive the
same two functions with seeded or hand-placed draws.
"""

import math
import random

import pytest

from conf.schema import ServeConfig
from serve.ingress import Routes, routes_from_aliases
from serve.promote import set_canary, set_shadow
from serve.registry import Registry

MODEL = "ranker"


@pytest.fixture
def registry(tmp_path) -> Registry:
    """A registry with versions 1..3 of MODEL and production on version 1."""
    registry = Registry(tmp_path / "registry")
    for seed in (1, 2, 3):
        export = tmp_path / f"export{seed}"
        export.mkdir()
        (export / "model.safetensors").write_bytes(bytes([seed]) * 64)
        registry.register(MODEL, export, metadata={"family": "ranker"})
    registry.move_alias(MODEL, "production", 1, reason="first")
    return registry


def _canary(registry: Registry, version: int | None, percent: float) -> Routes:
    """Set the canary as `launch.py stage=canary` does, then read the routes as the router does."""
    set_canary(ServeConfig(registry=registry.uri, canary_version=version, canary_percent=percent), model=MODEL)
    return routes_from_aliases(registry.aliases(MODEL), model=MODEL)


def _canary_share(routes: Routes, *, draws: int, seed: int) -> float:
    rng = random.Random(seed)
    return sum(routes.pick(rng.random()) == routes.canary for _ in range(draws)) / draws


def test_without_a_canary_every_request_goes_to_production(registry):
    routes = routes_from_aliases(registry.aliases(MODEL), model=MODEL)
    assert routes == Routes(production=1, canary=None, canary_percent=0.0)
    rng = random.Random(0)
    assert {routes.pick(rng.random()) for _ in range(10_000)} == {1}
    assert routes.pick(0.0) == 1  # the lowest draw too


def test_the_canary_alias_becomes_the_routes(registry):
    assert _canary(registry, 2, 10) == Routes(production=1, canary=2, canary_percent=10.0)


def test_the_shadow_alias_becomes_the_routes_and_never_answers(registry):
    """stage=shadow: the shadow is a route beside production and canary; pick() never returns it (it only gets
    copies of requests, serve/router.py), and percent 0 removes it."""
    _canary(registry, 2, 10)
    set_shadow(ServeConfig(registry=registry.uri, shadow_version=3, shadow_percent=20), model=MODEL)
    routes = routes_from_aliases(registry.aliases(MODEL), model=MODEL)
    assert routes == Routes(production=1, canary=2, canary_percent=10.0, shadow=3, shadow_percent=20.0)
    rng = random.Random(1)
    assert {routes.pick(rng.random()) for _ in range(10_000)} == {1, 2}
    set_shadow(ServeConfig(registry=registry.uri, shadow_percent=0), model=MODEL)
    assert routes_from_aliases(registry.aliases(MODEL), model=MODEL).shadow is None
    with pytest.raises(ValueError, match="serve.shadow_percent needs serve.shadow_version"):
        set_shadow(ServeConfig(registry=registry.uri, shadow_percent=5), model=MODEL)


@pytest.mark.parametrize("percent", [1, 10, 25, 50, 90])
def test_seeded_draws_give_the_canary_its_share(registry, percent):
    routes = _canary(registry, 3, percent)
    draws, p = 40_000, percent / 100
    tolerance = 5 * math.sqrt(p * (1 - p) / draws)  # five standard deviations of a binomial share
    for seed in (0, 1, 2):
        assert abs(_canary_share(routes, draws=draws, seed=seed) - p) < tolerance


@pytest.mark.parametrize("percent, expected", [(10, 100), (33, 330), (0.5, 5), (99.9, 999)])
def test_evenly_spread_draws_give_exactly_the_share(percent, expected):
    """Draws at the midpoints of 1000 equal slices of [0, 1): the canary's slice is exactly percent of them,
    fractional percents included."""
    routes = Routes(production=1, canary=2, canary_percent=percent)
    picks = [routes.pick((i + 0.5) / 1000) for i in range(1000)]
    assert picks.count(2) == expected and picks.count(1) == 1000 - expected


def test_the_canary_takes_the_low_end_of_the_draws():
    routes = Routes(production=1, canary=2, canary_percent=25)
    assert routes.pick(0.0) == 2 and routes.pick(0.2499) == 2
    assert routes.pick(0.25) == 1  # [0, 0.25) is the canary's: exactly a quarter of a uniform draw
    assert routes.pick(0.9999) == 1


def test_canary_at_zero_percent_never_serves():
    routes = Routes(production=1, canary=2, canary_percent=0.0)
    assert routes.pick(0.0) == 1  # not even the lowest draw
    assert _canary_share(routes, draws=10_000, seed=0) == 0.0


def test_canary_at_hundred_percent_always_serves(registry):
    routes = _canary(registry, 2, 100)
    assert routes.pick(math.nextafter(1.0, 0.0)) == 2  # the highest draw random() can return
    assert _canary_share(routes, draws=10_000, seed=0) == 1.0


def test_removing_the_canary_sends_everything_back_to_production(registry):
    assert _canary(registry, 2, 50).canary == 2
    routes = _canary(registry, None, 0)
    assert routes == Routes(production=1) and "canary" not in registry.aliases(MODEL)
    assert _canary_share(routes, draws=1000, seed=0) == 0.0


def test_a_canary_alias_without_percent_gets_no_traffic(registry):
    registry.move_alias(MODEL, "canary", 2, reason="set by hand, no percent")
    routes = routes_from_aliases(registry.aliases(MODEL), model=MODEL)
    assert routes == Routes(production=1, canary=2, canary_percent=0.0)
    assert routes.pick(0.0) == 1


def test_routes_change_only_when_versions_or_share_change(registry):
    """The router re-reads the aliases every refresh_s and warms a version only when Routes differ: an alias
    record that moved in time only (moved_at, reason) must compare equal."""
    before = _canary(registry, 2, 10)
    registry.move_alias(MODEL, "production", 1, reason="re-pointed to the same version")
    assert routes_from_aliases(registry.aliases(MODEL), model=MODEL) == before
    assert _canary(registry, 2, 20) != before
    registry.move_alias(MODEL, "production", 3, reason="promote v3")
    assert routes_from_aliases(registry.aliases(MODEL), model=MODEL).production == 3


def test_a_model_without_production_cannot_be_routed(registry):
    registry.move_alias(MODEL, "production", None, reason="removed")
    with pytest.raises(ValueError, match=f"{MODEL} has no production version.*stage=promote"):
        routes_from_aliases(registry.aliases(MODEL), model=MODEL)
    with pytest.raises(ValueError, match="no production version"):
        routes_from_aliases({"canary": {"version": 2, "percent": 10}}, model=MODEL)
