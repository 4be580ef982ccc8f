"""Sweep configs checked before Ray starts: the space's keys and values, the sweep's settings, its name and
how many trials fit at once. No Ray here."""

import pytest
from omegaconf import OmegaConf

from conf.schema import RootConfig
from tests.helpers import RANKER_OVERRIDES, TINY_OVERRIDES, compose_config
from trainers.run import check_config
from trainers.search_space import parse_space
from trainers.sweep import (
    local_cpus_for_sweep,
    sweep_name,
    trial_process_resources,
    trials_at_once,
    trials_in_process,
    validate_sweep,
)


def composed(*overrides: str, base=TINY_OVERRIDES) -> tuple[RootConfig, dict]:
    dict_cfg = compose_config([*base, *overrides])
    return OmegaConf.to_object(dict_cfg), OmegaConf.to_container(dict_cfg, resolve=True)


def check(*overrides: str, base=TINY_OVERRIDES):
    cfg, config = composed(*overrides, base=base)
    return validate_sweep(cfg, config=config, check_trial=check_config)


def test_the_default_spaces_map_each_family_to_its_own_keys():
    llm = {d.key: d for d in check("sweep=asha")}
    assert set(llm) == {"trainer.lr", "trainer.warmup_steps", "model.n_layers"}
    assert llm["trainer.lr"].kind == "loguniform" and llm["model.n_layers"].args == (1, 2, 3)
    ranker = {d.key for d in check("sweep=optuna", base=RANKER_OVERRIDES)}
    assert ranker == {"trainer.lr", "trainer.warmup_steps", "trainer.beta2"}


def test_space_overrides_family_space_and_nested_and_dotted_keys_mean_the_same():
    dimensions = check("sweep=asha", "+sweep.space.trainer.lr=[uniform,1e-3,2e-3]",
                       "+sweep.space={model.n_heads: [choice, 2, 4]}")
    by_key = {d.key: d for d in dimensions}
    assert by_key["trainer.lr"].kind == "uniform" and by_key["trainer.lr"].source == "sweep.space.trainer.lr"
    assert by_key["model.n_heads"].args == (2, 4)


def test_each_kind_becomes_the_matching_tune_distribution():
    from ray.tune.search.sample import Categorical, Float, Integer

    dimensions = {d.key: d.to_tune() for d in check(
        "sweep=asha", "~sweep.family_space.llm", "+sweep.space.trainer.lr=[loguniform,1e-4,1e-2]",
        "+sweep.space.trainer.beta2=[quniform,0.9,0.99,0.01]", "+sweep.space.trainer.warmup_steps=[quniform,0,6,2]",
        "+sweep.space.trainer.seed=[randint,0,100]", "+sweep.space.model.n_layers=[grid,1,2]",
        "+sweep.space.trainer.weight_decay=[choice,0.0,0.1]",
    )}
    assert isinstance(dimensions["trainer.lr"], Float)
    assert isinstance(dimensions["trainer.warmup_steps"], Integer)  # an int key: quniform draws whole numbers
    assert isinstance(dimensions["trainer.seed"], Integer)
    assert isinstance(dimensions["trainer.weight_decay"], Categorical)
    assert dimensions["model.n_layers"] == {"grid_search": [1, 2]}


@pytest.mark.parametrize("overrides, message", [
    (["+sweep.space.trainer.lrr=[loguniform,1e-4,1e-2]"], "sweep.space.trainer.lrr: trainer.lrr is not a config key"
                                                           " (trainer has no 'lrr'); did you mean trainer.lr?"),
    (["+sweep.space.trainer=[choice,1,2]"], "trainer is a config section"),
    (["+sweep.space.cluster.num_workers=[choice,1,2]"], "cluster.num_workers cannot be swept"),
    (["+sweep.space.trainer.lr=[lognormal,1,2]"], "expected a list with its kind first"),
    (["+sweep.space.trainer.lr=0.01"], "expected a list with its kind first"),
    (["+sweep.space.trainer.lr=[loguniform,0,1e-2]"], "loguniform needs low > 0"),
    (["+sweep.space.trainer.lr=[uniform,1e-2,1e-3]"], "needs low < high"),
    (["+sweep.space.trainer.warmup_steps=[uniform,0,10]"], "the key holds an integer"),
    (["+sweep.space.trainer.micro_batch_size=[choice,2,3]"], "with trainer.micro_batch_size=3: trainer.global_batch"),
    (["+sweep.space.trainer.lr=[choice,fast,slow]"], "with trainer.lr='fast'"),
    (["+sweep.space.model.n_heads=[choice,4,3]"], "sweep.space.model.n_heads: with model.n_heads=3"),
    (["sweep.searcher=optuna", "sweep.family_space.llm.model.n_layers=[grid,1,2]"], "grid dimensions need"),
    (["sweep.metric=auc"], "sweep.metric='auc' is not a validation metric of model.family=llm"),
    (["sweep.grace_period=6"], "sweep.grace_period=6 must be at least 1 and below trainer.max_steps=6"),
    (["+sweep.space.trainer.max_steps=[choice,4,6]"], "every trial must have the same trainer.max_steps"),
    (["+sweep.family_space.mlp={trainer:{lr:[choice,1]}}"], "sweep.family_space.mlp: not a model family"),
    (["~sweep.family_space.llm"], "has nothing to search"),
])
def test_a_bad_sweep_config_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ValueError) as error:
        check("sweep=asha", *overrides)
        # model dimensions are also built on the meta device once the data is known (launch.py)
        from trainers.sweep import check_model_candidates

        cfg, config = composed("sweep=asha", *overrides)
        check_model_candidates(parse_space(cfg.sweep, family="llm", config=config), config,
                               data={"vocab_size": 512, "seq_len": 64})
    assert message in str(error.value)


def test_a_bad_space_key_stops_launch_before_ray_starts(tmp_path):
    from tests.test_launch import launch

    result = launch("+exp=llm_tiny", "sweep=asha", f"paths.root={tmp_path}", "+sweep.space.model.n_layer=[choice,1,2]")
    assert result.returncode == 2
    assert "did you mean model.n_layers?" in result.stdout + result.stderr
    assert "Started a local Ray" not in result.stdout + result.stderr and not tmp_path.joinpath("sweeps").exists()


def test_the_sweep_name_is_stable_and_ignores_concurrency_but_not_the_space():
    _, config = composed("sweep=asha")
    _, more_at_once = composed("sweep=asha", "sweep.max_concurrent_trials=3")
    _, other_space = composed("sweep=asha", "sweep.family_space.llm.trainer.lr=[loguniform,1e-3,1e-2]")
    name = sweep_name(config, experiment="llm_tiny")
    assert name.startswith("llm_tiny-sweep-") and len(name) == len("llm_tiny-sweep-") + 8
    assert sweep_name(more_at_once, experiment="llm_tiny") == name
    assert sweep_name(other_space, experiment="llm_tiny") != name


def test_trials_at_once_follow_the_cluster_resources():
    gpu_trial, _ = composed("sweep=asha", "cluster.use_gpu=true", "cluster.num_workers=4", "cluster.cpus_per_worker=2")
    assert trials_at_once(gpu_trial, cluster_resources={"CPU": 128, "GPU": 16}) == 4  # 4-GPU trials on 16 GPUs
    capped, _ = composed("sweep=asha", "cluster.use_gpu=true", "cluster.num_workers=4", "sweep.max_concurrent_trials=2")
    assert trials_at_once(capped, cluster_resources={"CPU": 128, "GPU": 16}) == 2
    cpu_trial, _ = composed("sweep=asha", "cluster.cpus_per_worker=0.5")  # 2 workers of half a CPU
    assert trials_at_once(cpu_trial, cluster_resources={"CPU": 4}) == 2  # (4 - 1 for data) // (1 + 0.25)
    assert local_cpus_for_sweep(cpu_trial, cores=2) == 4
    with pytest.raises(ValueError, match="one trial needs 2.25 CPU"):
        trials_at_once(composed("sweep=asha")[0], cluster_resources={"CPU": 3})
    too_many, _ = composed("sweep=asha", "sweep.max_concurrent_trials=4")
    with pytest.raises(ValueError, match="sweep.max_concurrent_trials=4"):
        local_cpus_for_sweep(too_many, cores=2)


def test_a_one_worker_trial_trains_in_its_own_process_and_asks_only_for_the_workers_share():
    one_worker, _ = composed("sweep=asha", "cluster.num_workers=1")
    assert trials_in_process(one_worker) and trial_process_resources(one_worker) == {"CPU": 1.0}
    assert trials_at_once(one_worker, cluster_resources={"CPU": 4}) == 3  # (4 - 1 for data) // 1: no driver share
    assert local_cpus_for_sweep(one_worker, cores=2) == 3  # two trials and the data reserve
    gpu, _ = composed("sweep=asha", "cluster.num_workers=1", "cluster.use_gpu=true", "cluster.cpus_per_worker=4")
    assert trial_process_resources(gpu) == {"CPU": 4.0, "GPU": 1.0}
    for workers_instead in (composed("sweep=asha", "cluster.num_workers=1", "sweep.in_process_trials=false")[0],
                            composed("sweep=asha")[0]):  # asked for, or 2 workers
        assert not trials_in_process(workers_instead)
        assert trial_process_resources(workers_instead) == {"CPU": 0.25}  # the trial only drives its Train run
