"""Issue 14, the config: every numeric key out of range, and every shape the model cannot be built with, is a
ValueError naming the key from the checks a run, a sweep candidate, a plan and a submission all make
(trainers/run.py: check_config), before data preparation and Ray. No Ray here; the launches are in
tests/test_bad_inputs_launch.py."""

import dataclasses

import pytest

from conf.derived import BOUNDS, Bound
from conf.schema import RootConfig
from tests.helpers import RANKER_OVERRIDES, TINY_OVERRIDES, compose_config
from trainers.config import config_from_dict, plain_config
from trainers.run import check_config


def typed(overrides: list[str], *, base: list[str] = TINY_OVERRIDES) -> RootConfig:
    return config_from_dict(plain_config(compose_config([*base, *overrides])))


def refusal(overrides: list[str], *, base: list[str] = TINY_OVERRIDES) -> str:
    with pytest.raises(ValueError) as error:
        check_config(typed(overrides, base=base))
    return str(error.value)


REFUSED = [
    # (override, what the message must say); the ones that used to divide by zero, hang or fail in the workers
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0 must be at least 1"),
    ("trainer.micro_batch_size=-2", "trainer.micro_batch_size=-2 must be at least 1"),
    ("trainer.global_batch_size=-8", "trainer.global_batch_size=-8 must be at least 1"),
    ("model.n_heads=0", "model.n_heads=0 must be at least 1"),
    ("model.n_heads=3", "model.n_heads=3 must divide model.dim=128"),
    ("model.n_kv_heads=3", "model.n_kv_heads=3 must divide model.n_heads=4"),
    ("model.n_kv_heads=0", "model.n_kv_heads=0 must be at least 1"),
    ("model.dim=136", "model.dim=136 / model.n_heads=4 = 34"),  # fine so far: 34 is even; see the next one
    ("model.dim=132", "33 channels per head must be even"),
    ("checkpoint.keep_top_k=0", "checkpoint.keep_top_k=0 must be at least 1"),
    ("checkpoint.max_failures=-1", "checkpoint.max_failures=-1 must be at least 0"),
    ("trainer.lr=-0.001", "trainer.lr=-0.001 must be at least 0"),
    ("trainer.lr=nan", "trainer.lr=nan must be at least 0"),
    ("serve.refresh_s=0", "serve.refresh_s=0.0 must be above 0"),
    ("serve.refresh_s=-1", "serve.refresh_s=-1.0 must be above 0"),
    ("trainer.warmup_steps=-1", "trainer.warmup_steps=-1 must be at least 0"),
    ("trainer.eval_every_n_steps=0", "trainer.eval_every_n_steps=0 must be at least 1"),
    ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps=0 must be at least 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0 must be at least 1"),
    ("trainer.beta2=1.0", "trainer.beta2=1.0 must be in [0, 1)"),
    ("model.max_seq_len=0", "model.max_seq_len=0 must be at least 1"),
    ("data.seq_len=0", "data.seq_len=0 must be at least 1"),
    ("data.vocab_size=0", "data.vocab_size=0 must be at least 1"),
    ("data.vocab_size=100", "data.vocab_size=100 is too small"),
    ("data.val_fraction=0", "data.val_fraction=0.0 must be in (0, 1)"),
    ("cluster.cpus_per_worker=0", "cluster.cpus_per_worker=0.0 must be above 0"),
    ("cluster.scale_up_timeout_s=0", "cluster.scale_up_timeout_s=0.0 must be above 0"),
    ("serve.max_replicas=0", "serve.max_replicas=0 must be at least 1"),
]


@pytest.mark.parametrize("override, message", REFUSED, ids=[override for override, _ in REFUSED])
def test_a_value_out_of_range_is_refused_naming_the_key(override, message):
    if override == "model.dim=136":  # a width the heads divide into even channels is fine
        check_config(typed([override]))
        return
    assert message in refusal([override])


RANKER_REFUSED = [
    ("model.embedding_dim=0", "model.embedding_dim=0 must be at least 1"),
    ("model.top_mlp=[64,0]", "model.top_mlp=[64, 0] must each be at least 1"),
    ("model.bottom_mlp=[64,8]", "model.bottom_mlp=[64, 8] must end with model.embedding_dim=16"),
    ("data.rows=0", "data.rows=0 must be at least 1"),
    ("data.cardinalities=[0]", "data.cardinalities=[0] must each be at least 1"),
]


@pytest.mark.parametrize("override, message", RANKER_REFUSED, ids=[override for override, _ in RANKER_REFUSED])
def test_a_ranker_value_out_of_range_is_refused_naming_the_key(override, message):
    assert message in refusal([override], base=RANKER_OVERRIDES)


def test_dcn_needs_a_cross_layer_and_dlrm_ignores_them():
    assert "model.cross_layers=0 must be at least 1 for model.arch=dcn" in refusal(
        ["model=dcn_small", "model.cross_layers=0"], base=RANKER_OVERRIDES)
    check_config(typed(["model.cross_layers=0"], base=RANKER_OVERRIDES))


def test_strict_spread_on_the_embedded_one_node_ray_is_refused_naming_the_key():
    message = refusal(["cluster.placement_strategy=STRICT_SPREAD"])
    assert "cluster.placement_strategy=STRICT_SPREAD" in message and "embedded local Ray is one node" in message
    check_config(typed(["cluster.placement_strategy=STRICT_SPREAD", "cluster.num_workers=1",
                        "trainer.global_batch_size=8"]))  # one worker: one node is enough
    # a plan sizes a cluster, and a cluster's address means its own nodes are checked once connected
    check_config(typed(["cluster.placement_strategy=STRICT_SPREAD", "plan=true"]))
    check_config(typed(["cluster.placement_strategy=STRICT_SPREAD", "cluster.address=127.0.0.1:6379"]))


def test_every_bounded_key_is_a_key_of_its_section():
    """A typo in BOUNDS would silently check nothing."""
    from conf.schema import ClickLogDataConfig, LLMConfig, RankerConfig, TextDataConfig

    sections = {field.name: field.type for field in dataclasses.fields(RootConfig)}
    schemas = {"model": (LLMConfig, RankerConfig), "data": (TextDataConfig, ClickLogDataConfig)}
    for key in BOUNDS:
        section, name = key.split(".", 1)
        owners = schemas.get(section) or (sections[section],)
        assert any(name in {field.name for field in dataclasses.fields(owner)} for owner in owners), key


def test_a_bound_describes_itself_and_refuses_nan():
    assert Bound(1).describe() == "at least 1" and Bound(0, low_open=True).describe() == "above 0"
    assert Bound(0, 1, high_open=True).describe() == "in [0, 1)"
    assert not Bound(0, low_open=True).holds(float("nan"))
