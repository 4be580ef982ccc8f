"""The launch plan (issue 6): memory, FLOPs, time and cost from the config alone, and what would fit when a run
does not. Most checks call build_plan in process; four run `python launch.py ... plan=true` as users do."""

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from cluster.plan import format_plan
from tests.helpers import REPO_ROOT, compose_config
from trainers.families import get_family
from trainers.run import plan as build_plan

LLM_8B = ["+exp=llm_8b_zero3", "cluster=gpu_node"]
RANKER_LARGE = ["+exp=ranker_dlrm_large", "cluster=gpu_node"]


def config(overrides: list[str]):
    return OmegaConf.to_object(compose_config(overrides))


def plan_for(overrides: list[str]):
    return build_plan(config(overrides))


def overrides_of(suggestion: str) -> list[str]:
    return suggestion.split(" with ")


def test_the_8b_preset_fits_on_one_node_with_hand_checkable_flops():
    cfg = config(LLM_8B)
    plan = build_plan(cfg)
    family = get_family("llm")
    data = family.plan_data(cfg.model, cfg.data)
    assert plan.fits, plan.verdict
    assert plan.verdict.startswith("fits: ") and "(zero3, 8 x H100-SXM-80GB)" in plan.verdict
    assert plan.shape.total == family.count_parameters(cfg.model, data=data) == 7_241_732_096
    tokens = 64 * 4096
    assert plan.items_per_step == tokens
    assert plan.throughput.flops == family.flops_per_item(cfg.model, data=data) * tokens
    # By hand: 6 x 7.24B parameters x 262,144 tokens, plus attention's 12 x layers x dim x seq per token.
    by_hand = 6 * 7.24e9 * tokens + 12 * 32 * 4096 * 4096 * tokens
    assert plan.throughput.flops == pytest.approx(by_hand, rel=0.02)
    # Step time at 40% of 989 TFLOP/s on 8 GPUs, and the run's cost at $55.04/h for one node.
    step = plan.throughput.flops / (8 * 989e12 * 0.4)
    assert plan.throughput.step_s == pytest.approx(step)
    assert plan.nodes == 1


def test_ddp_cannot_hold_the_8b_model_and_every_suggestion_fits():
    plan = plan_for([*LLM_8B, "strategy=ddp"])
    assert not plan.fits
    assert plan.verdict.startswith("does not fit: needs ") and "has 80" in plan.verdict
    assert "strategy=zero3" in plan.suggestions
    for suggestion in plan.suggestions:
        assert plan_for([*LLM_8B, "strategy=ddp", *overrides_of(suggestion)]).fits, suggestion


def test_activations_without_checkpointing_suggest_checkpointing_or_a_smaller_micro_batch():
    overrides = [*LLM_8B, "strategy=fsdp", "trainer.activation_checkpointing=false", "trainer.micro_batch_size=8"]
    plan = plan_for(overrides)
    assert not plan.fits
    assert plan.memory.activations.peak > 80e9
    assert "trainer.activation_checkpointing=true" in plan.suggestions
    for suggestion in plan.suggestions:
        changed = dict(item.split("=") for item in overrides_of(suggestion))
        micro = int(changed.get("trainer.micro_batch_size", 8))
        assert 64 % (int(changed.get("cluster.num_workers", 8)) * micro) == 0
        assert plan_for([*overrides, *overrides_of(suggestion)]).fits, suggestion


def test_selective_checkpointing_keeps_more_than_full_and_less_than_none():
    kept = {}
    for name, overrides in {"off": ["trainer.activation_checkpointing=false"],
                            "full": ["trainer.activation_checkpointing=true"],
                            "selective": ["trainer.activation_checkpointing=true",
                                          "trainer.activation_checkpointing_policy=selective"]}.items():
        plan = plan_for([*LLM_8B, *overrides])
        assert f"checkpointing {name}:" in format_plan(plan)
        kept[name] = plan.memory.activations.stored
    assert kept["full"] < kept["selective"] < kept["off"]


def test_the_large_ranker_is_planned_from_its_hash_buckets_without_data(tmp_path):
    cfg = config([*RANKER_LARGE, f"paths.root={tmp_path}"])
    data = get_family("ranker").plan_data(cfg.model, cfg.data)
    assert data["table_sizes"] == list(cfg.data.hash_buckets) and data["num_dense"] == 13
    plan = build_plan(cfg)
    assert plan.shape.total == 11_394_368_897 and plan.shape.embedding == 89_000_000 * 128
    assert plan.fits, plan.verdict
    assert plan.item == "samples" and plan.items_per_step == 65536
    assert list(tmp_path.iterdir()) == []  # nothing prepared, nothing written
    ddp = plan_for([*RANKER_LARGE, "strategy=ddp"])
    assert not ddp.fits and ddp.memory.states.resident > 160e9  # every worker holds all 11.4B parameters


def test_workers_beyond_the_cluster_do_not_fit_and_more_nodes_cost_more():
    plan = plan_for([*LLM_8B, "cluster.num_workers=16"])
    assert not plan.fits
    assert any("cluster.max_nodes=1" in problem for problem in plan.problems)
    assert plan.suggestions[:2] == ("cluster.max_nodes=2", "cluster.num_workers=8")
    two_nodes = plan_for([*LLM_8B, "cluster.num_workers=16", "cluster.max_nodes=2"])
    assert two_nodes.fits and two_nodes.nodes == 2
    assert "$110.08/h (2 nodes" in format_plan(two_nodes)


def test_a_model_too_large_for_one_node_names_how_many_nodes_would_hold_it():
    seventy_b = ["model.dim=8192", "model.n_layers=80", "model.n_heads=64", "model.ffn_hidden=28672"]
    plan = plan_for([*LLM_8B, *seventy_b])
    assert not plan.fits and plan.memory.startup > 250e9  # DeepSpeedStrategy builds the whole fp32 model first
    assert plan.suggestions == ("strategy=fsdp with cluster.num_workers=32 with cluster.max_nodes=4",)
    assert plan_for([*LLM_8B, *seventy_b, *overrides_of(plan.suggestions[0])]).fits


def test_an_elastic_run_is_planned_at_its_maximum():
    plan = plan_for([*LLM_8B, "strategy=fsdp", "cluster.num_workers=[8,16]", "cluster.max_nodes=2"])
    assert plan.setup.workers == 16 and plan.nodes == 2


def test_hsdp_is_planned_per_shard_group_and_sends_only_the_replica_all_reduce_across_nodes():
    """HSDP's per-GPU memory is that of its shard group, not the world; across nodes only the all-reduce of the
    gradient shard leaves a node, where FSDP over every GPU runs its collectives at the network's speed."""
    two_nodes = [*LLM_8B, "cluster.num_workers=16", "cluster.max_nodes=2"]
    hsdp = plan_for([*two_nodes, "strategy=hsdp", "strategy.hsdp_shard_size=8"])
    one_node_fsdp = plan_for([*LLM_8B, "strategy=fsdp", "trainer.micro_batch_size=2", "cluster.num_workers=8"])
    fsdp = plan_for([*two_nodes, "strategy=fsdp"])
    assert hsdp.fits and hsdp.nodes == 2
    shard_group = one_node_fsdp.memory.states
    assert (hsdp.memory.states.params, hsdp.memory.states.optimizer) == (shard_group.params, shard_group.optimizer)
    assert hsdp.memory.states.params == 2 * fsdp.memory.states.params  # sharded 8 ways, not 16
    across = 2 * 4 * hsdp.shape.total / 8 * (2 - 1) / 2  # fp32 ring all-reduce of the 1/8 shard over 2 replicas
    within = hsdp.throughput.comm_bytes - across
    assert hsdp.throughput.comm_s == pytest.approx(within / 450e9 + across / 50e9)
    assert fsdp.throughput.comm_s == pytest.approx(fsdp.throughput.comm_bytes / 50e9)
    assert hsdp.throughput.comm_s < fsdp.throughput.comm_s / 5


def test_hsdp_needs_a_shard_size_that_divides_the_workers():
    from trainers.run import check_config

    with pytest.raises(ValueError, match="hsdp_shard_size=3 must be at least 1 and divide cluster.num_workers=8"):
        check_config(config([*LLM_8B, "strategy=hsdp", "strategy.hsdp_shard_size=3"]))
    from trainers.strategies import get_strategy
    from trainers.strategies.hsdp import HSDPConfig

    # What the plan asks before it sizes a candidate (cluster/plan.py: _trains_on): 9 workers are 3 replicas of 3,
    # 8 workers cannot be split that way.
    hsdp = get_strategy("hsdp")
    hsdp.check_world(HSDPConfig(hsdp_shard_size=3), 9)
    with pytest.raises(ValueError, match="hsdp_shard_size=3"):
        hsdp.check_world(HSDPConfig(hsdp_shard_size=3), 8)


def test_a_gpu_cluster_must_describe_its_gpus():
    plan = plan_for([*LLM_8B, "cluster.node.gpus=0"])
    assert not plan.fits and "cluster.node.gpus" in plan.verdict


def test_a_local_cpu_run_plans_against_host_memory_without_cost():
    plan = plan_for(["+exp=llm_tiny"])
    text = format_plan(plan)
    assert plan.fits and plan.precision == "fp32" and not plan.hardware.on_gpu
    assert "per node" in plan.verdict and "CPU worker" in plan.verdict
    assert "cost" not in text and "not estimated" in text


def test_the_printed_table_is_aligned_and_uses_human_units():
    text = format_plan(plan_for(LLM_8B))
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("memory per GPU"))
    rows = lines[start + 1:lines.index("", start)]
    names = ("parameters", "gradients", "optimizer states", "gathered", "activations", "overhead", "needed")
    assert all(any(row.strip().startswith(name) for row in rows) for name in names)
    assert len({row.index(".") for row in rows}) == 1  # the GB column is aligned on the decimal point
    assert lines[start].index("GB") == rows[0].index(".")
    for unit in ("PFLOP", "tokens/s", "TFLOP/s", "$55.04/h", "price source", "checkpointing full"):
        assert unit in text


# --------------------------------------------------------------------- launch.py as users run it


# The ranker with strategy=ddp is checked in process above; each launch spends ~5 s importing.
LAUNCHES = {
    "llm": [*LLM_8B],
    "llm_ddp": [*LLM_8B, "strategy=ddp"],
    "ranker": [*RANKER_LARGE],
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The plan commands, run side by side."""
    roots = {name: tmp_path_factory.mktemp(name) for name in LAUNCHES}
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    processes = {name: subprocess.Popen([sys.executable, "launch.py", *args, "plan=true", f"paths.root={roots[name]}"],
                                        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
                 for name, args in LAUNCHES.items()}
    results = {}
    for name, process in processes.items():
        output, _ = process.communicate(timeout=120)
        results[name] = (process.returncode, output, roots[name])
    return results


@pytest.mark.parametrize("name", ["llm", "ranker"])
def test_a_plan_that_fits_prints_the_table_and_starts_nothing(launched, name):
    code, output, root = launched[name]
    assert code == 0, output
    assert output.strip().splitlines()[-1].startswith("plan: fits: ")
    for row in ("parameters", "optimizer states", "activations", "needed", "per step", "cost"):
        assert row in output
    assert "starting an embedded local Ray" not in output
    assert list(root.iterdir()) == []  # no run directory, no prepared data


def test_a_plan_that_does_not_fit_exits_non_zero_naming_what_would(launched):
    code, output, root = launched["llm_ddp"]
    assert code == 2, output
    error = output.strip().splitlines()[-1]
    assert error.startswith("error: does not fit: needs ") and "would fit: strategy=zero3" in error
    assert list(root.iterdir()) == []


def test_a_one_gpu_plan_has_no_communication_to_time():
    """One worker sends nothing, so there is no bandwidth to divide by (it once raised ZeroDivisionError)."""
    plan = plan_for([*LLM_8B, "strategy=fsdp", "model.n_layers=8", "cluster.num_workers=1",
                     "trainer.global_batch_size=8", "trainer.micro_batch_size=2"])
    assert plan.fits, plan.verdict
    assert plan.throughput.comm_bytes == 0
    assert "communication   none (one worker)" in format_plan(plan)
