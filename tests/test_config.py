"""The config's own checks: a key with a fixed set of values refuses anything else at composition, naming the
key and the values it allows, and the plain config a run derives keeps no secret."""

import pytest

from conf.schema import (
    ClickLogSource,
    InitDevice,
    LoggerName,
    PlacementStrategy,
    Precision,
    RankerArch,
    StrategyName,
    SweepScheduler,
    SweepSearcher,
    TextSource,
)
from tests.helpers import RANKER_OVERRIDES, TINY_OVERRIDES, compose_config, composition_error

CHOICES = [
    ("strategy.name=zero9", StrategyName, TINY_OVERRIDES),
    ("sweep.scheduler=pbt", SweepScheduler, TINY_OVERRIDES),
    ("sweep.searcher=hyperopt", SweepSearcher, TINY_OVERRIDES),
    ("trainer.precision=fp16", Precision, TINY_OVERRIDES),
    ("logger.name=mlflow", LoggerName, TINY_OVERRIDES),
    ("model.init_device=disk", InitDevice, TINY_OVERRIDES),
    ("data.source=s3", TextSource, TINY_OVERRIDES),
    ("data.source=kaggle", ClickLogSource, RANKER_OVERRIDES),
    ("cluster.placement_strategy=SCATTER", PlacementStrategy, TINY_OVERRIDES),
    ("model.arch=wide_and_deep", RankerArch, RANKER_OVERRIDES),
]


@pytest.mark.parametrize("override, choices, base", CHOICES, ids=[item[0] for item in CHOICES])
def test_a_value_outside_a_keys_choices_is_refused_at_composition(override, choices, base):
    key, value = override.split("=")
    message = composition_error([*base, override])
    assert f"full_key: {key}" in message
    assert f"Invalid value '{value}', expected one of [{', '.join(choices)}]" in message


def test_the_strategy_choices_are_the_strategy_group_files():
    """strategy.name accepts what `strategy=NAME` accepts: a file in conf/strategy/ (and its module)."""
    from tests.helpers import REPO_ROOT

    files = sorted(path.stem for path in (REPO_ROOT / "conf" / "strategy").glob("*.yaml"))
    assert sorted(StrategyName) == files


def test_the_plain_config_is_redacted_once_and_the_typed_one_keeps_the_secret():
    from trainers.config import config_from_dict, plain_config, redacted

    plain = plain_config(compose_config([*TINY_OVERRIDES, "serve.api_key=s3cret", "strategy=fsdp"]))
    config = redacted(plain)
    assert config["serve"]["api_key"] == "<redacted>" and plain["serve"]["api_key"] == "s3cret"
    assert config_from_dict(plain).serve.api_key == "s3cret"
    typed = config_from_dict(config)  # what the workers rebuild: the same run, without the secret
    assert typed.serve.api_key == "<redacted>" and typed.strategy.fsdp_reshard_after_forward is True
    assert type(config["strategy"]["name"]) is str  # plain data: enums travel as their names
