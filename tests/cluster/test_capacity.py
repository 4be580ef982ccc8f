"""Worker counts (fixed and elastic) and placement, checked before Ray starts."""

import pytest
from omegaconf import OmegaConf

from conf.derived import scaling_workers, worker_range
from conf.schema import ClusterConfig
from tests.helpers import TINY_OVERRIDES, compose_config, composition_error
from trainers.run import check_config


def _validated(*overrides: str) -> None:
    check_config(OmegaConf.to_object(compose_config([*TINY_OVERRIDES, *overrides])))


def test_a_fixed_count_and_an_elastic_range():
    assert worker_range(ClusterConfig(num_workers=4)) == (4, 4)
    assert scaling_workers(ClusterConfig(num_workers=4)) == 4
    assert worker_range(ClusterConfig(num_workers=[2, 4])) == (2, 4)
    assert scaling_workers(ClusterConfig(num_workers=[2, 4])) == (2, 4)  # what Ray Train's ScalingConfig takes


@pytest.mark.parametrize("value", [[4, 2], [0, 2], [2], [2, 3, 4], ["a", 2], 0, "two", True])
def test_a_bad_worker_count_names_the_key(value):
    with pytest.raises(ValueError, match="cluster.num_workers"):
        worker_range(ClusterConfig(num_workers=value))


def test_an_elastic_run_must_split_its_batch_at_every_size_it_may_train_at():
    _validated("cluster.num_workers=[1,2]")  # 8 rows = 1 or 2 workers x micro batch 2 x accumulation
    with pytest.raises(ValueError, match="may train on 3 workers"):
        _validated("cluster.num_workers=[2,4]")  # 8 is not a multiple of 3 x 2


def test_elastic_runs_need_a_strategy_whose_checkpoints_load_at_any_size():
    _validated("cluster.num_workers=[1,2]", "strategy=fsdp")
    with pytest.raises(ValueError, match="needs strategy=ddp or fsdp, not strategy=zero3"):
        _validated("cluster.num_workers=[1,2]", "strategy=zero3")


def test_an_unknown_placement_strategy_is_refused_at_composition():
    _validated("cluster.placement_strategy=SPREAD")
    message = composition_error([*TINY_OVERRIDES, "cluster.placement_strategy=SCATTER"])
    assert "cluster.placement_strategy" in message
    assert "Invalid value 'SCATTER', expected one of [PACK, SPREAD, STRICT_PACK, STRICT_SPREAD]" in message
