"""Issue 14, shortened runs: step counts left unset are derived from trainer.max_steps when the config is frozen
(conf/derived.py), so `sweep=asha trainer.max_steps=24` runs; a value the user set that cannot work is refused
naming it. No Ray here."""

import pytest
from omegaconf import OmegaConf

from tests.helpers import TINY_OVERRIDES, compose_config
from trainers.config import config_from_dict, plain_config
from trainers.outputs import config_hash
from trainers.run import check_config
from trainers.sweep import grace_period, validate_sweep


def frozen(*overrides: str):
    """(typed, plain) for +exp=llm_tiny with `overrides`: what a user types, without the test's intervals."""
    plain = plain_config(compose_config(["+exp=llm_tiny", *overrides]))
    return config_from_dict(plain), plain


def validate(*overrides: str):
    cfg, plain = frozen(*overrides)
    check_config(cfg)
    return validate_sweep(cfg, config=plain, check_trial=check_config), cfg


def test_asha_on_a_shortened_run_derives_its_grace_period_and_evaluations():
    dimensions, cfg = validate("sweep=asha", "trainer.max_steps=24")
    assert dimensions  # the default space, checked at each candidate (warmup_steps 50 included: a whole-run ramp)
    # two rungs before the last step: 24 / reduction_factor^2 = 6, then 12
    assert cfg.trainer.eval_every_n_steps == 6 and grace_period(cfg) == 6
    assert cfg.checkpoint.every_n_steps == 6 and cfg.trainer.warmup_steps == 2
    _, cfg = validate("sweep=asha", "trainer.max_steps=24", "sweep.reduction_factor=3")
    assert cfg.trainer.eval_every_n_steps == 2  # rungs at 2, 6 and 18


def test_a_plain_run_evaluates_four_times_and_warms_up_over_a_tenth():
    cfg, _ = frozen("trainer.max_steps=24")
    assert (cfg.trainer.eval_every_n_steps, cfg.checkpoint.every_n_steps, cfg.trainer.warmup_steps) == (6, 6, 2)
    cfg, _ = frozen()  # llm_tiny's own 200 steps: the intervals it used to spell out
    assert (cfg.trainer.eval_every_n_steps, cfg.checkpoint.every_n_steps, cfg.trainer.warmup_steps) == (50, 50, 20)
    cfg, _ = frozen("trainer.max_steps=1")
    assert (cfg.trainer.eval_every_n_steps, cfg.checkpoint.every_n_steps, cfg.trainer.warmup_steps) == (1, 1, 0)
    check_config(cfg)


def test_derived_values_stay_out_of_the_plain_config_and_the_run_name():
    cfg, plain = frozen("trainer.max_steps=24")
    assert plain["trainer"]["eval_every_n_steps"] is None and plain["checkpoint"]["every_n_steps"] is None
    assert config_from_dict(plain).trainer.eval_every_n_steps == 6  # the workers derive the same from it
    explicit = plain_config(compose_config(["+exp=llm_tiny", "trainer.max_steps=24", "trainer.eval_every_n_steps=6"]))
    assert config_hash(plain) != config_hash(explicit)  # what the user typed is what names the run
    assert OmegaConf.to_object(compose_config(["+exp=llm_tiny", "trainer.max_steps=24"])).trainer.warmup_steps == 2


def test_a_value_the_user_set_is_kept_as_set():
    cfg, _ = frozen("trainer.max_steps=24", "trainer.eval_every_n_steps=5", "trainer.warmup_steps=30")
    assert (cfg.trainer.eval_every_n_steps, cfg.checkpoint.every_n_steps, cfg.trainer.warmup_steps) == (5, 5, 30)
    check_config(cfg)  # a warmup longer than the run ramps the learning rate for the whole run
    _, cfg = validate("sweep=asha", "trainer.max_steps=24", "trainer.eval_every_n_steps=4")
    assert grace_period(cfg) == 4


@pytest.mark.parametrize("overrides, message", [
    (["trainer.eval_every_n_steps=50"], "trainer.eval_every_n_steps=50 must be below trainer.max_steps=24"),
    (["sweep.grace_period=30"], "sweep.grace_period=30 must be at least 1 and below trainer.max_steps=24"),
    (["sweep.grace_period=0"], "sweep.grace_period=0 must be at least 1"),
    (["sweep.reduction_factor=1"], "sweep.reduction_factor=1.0 must be above 1"),
    (["trainer.max_steps=1"], "trainer.max_steps=1: ASHA stops trials between evaluations"),
])
def test_asha_refuses_what_the_user_set_naming_it(overrides, message):
    base = [] if any(item.startswith("trainer.max_steps") for item in overrides) else ["trainer.max_steps=24"]
    with pytest.raises(ValueError) as error:
        validate("sweep=asha", *base, *overrides)
    assert message in str(error.value)


def test_the_tiny_test_runs_keep_their_explicit_intervals():
    cfg = config_from_dict(plain_config(compose_config(TINY_OVERRIDES)))
    assert (cfg.trainer.eval_every_n_steps, cfg.checkpoint.every_n_steps, cfg.trainer.warmup_steps) == (3, 3, 2)
