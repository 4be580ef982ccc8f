"""HSDP: FSDP2 on a 2-D device mesh. Parameters, gradients and optimizer states are sharded within groups of
`strategy.hsdp_shard_size` workers and replicated across the groups; the usual layout shards within a node over
NVLink and replicates across nodes, where only a 1/shard_size slice of the gradients crosses the network.

Not a strategy of its own design: the same `fully_shard` units as FSDP (trainers/strategies/fsdp.py) on a
(replicate, shard) mesh, as torchtitan does. FSDP2 reduce-scatters each gradient within the shard group and
then all-reduces the scattered shard across the replicate group (torch 2.13,
_fsdp_collectives.foreach_reduce), both averaging, so a step sees the mean over every worker's rows.
Checkpoints are DCP's, which stores each replicated shard once and reshards on load.
"""

from dataclasses import dataclass

from cluster.memory import FP32, ModelShape, ModelStates
from conf.schema import Precision, StrategyName
from trainers.strategies import StrategySpec
from trainers.strategies.common import ring_share
from trainers.strategies.fsdp import (
    DCP_FORMAT,
    FSDPConfig,
    FSDPStrategy,
    check_options,
    shard_group_payloads,
    sharded_model_states,
)


@dataclass
class HSDPConfig(FSDPConfig):
    name: StrategyName = "hsdp"
    # Workers per shard group; cluster.num_workers must be a multiple of it (the number of replicas). The GPUs
    # of one node is the usual choice (8 on an H100 node).
    hsdp_shard_size: int = 2


def _groups(cfg: HSDPConfig, world: int) -> tuple[int, int]:
    """(replicas, shard size) of `world` workers."""
    check_world(cfg, world)
    return world // cfg.hsdp_shard_size, cfg.hsdp_shard_size


def check_world(cfg: HSDPConfig, world: int) -> None:
    check_options(cfg, world)
    shard = cfg.hsdp_shard_size
    if shard < 1 or world % shard:
        raise ValueError(f"strategy.hsdp_shard_size={shard} must be at least 1 and divide cluster.num_workers="
                         f"{world} (the workers form replicas of shard groups of that size)")


class HSDPStrategy(FSDPStrategy):
    def device_mesh(self):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        # FSDP2 reads a 2-D mesh as (replicate, shard). Ranks r * shard .. (r + 1) * shard - 1 form replica r, so
        # each shard group is consecutive ranks: one node's workers under Ray Train's PACK placement.
        replicas, shard = _groups(self.cfg, dist.get_world_size())
        return init_device_mesh(self.device.type, (replicas, shard), mesh_dim_names=("replicate", "shard"))


def model_states(cfg: HSDPConfig, *, shape: ModelShape, world: int, precision: Precision, accum_steps: int,
                 checkpointing: bool) -> ModelStates:
    """FSDP2's model states with the shard group as the world: replicas do not divide memory."""
    _, shard = _groups(cfg, world)
    return sharded_model_states(shape, shards=shard, precision=precision, accum_steps=accum_steps,
                                reshard_after_forward=cfg.fsdp_reshard_after_forward,
                                prefetch_blocks=cfg.fsdp_prefetch_blocks)


def communication_bytes(cfg: HSDPConfig, *, params: int, world: int, accum_steps: int,
                        precision: Precision) -> float:
    """FSDP2's traffic within the shard group, plus one fp32 ring all-reduce of the reduce-scattered gradient
    shard (params / shard) across the replicas per step."""
    replicas, shard = _groups(cfg, world)
    within = shard_group_payloads(accum_steps=accum_steps, precision=precision,
                                  reshard_after_forward=cfg.fsdp_reshard_after_forward) * params * ring_share(shard)
    across = 2 * FP32 * (params / shard) * ring_share(replicas)
    return within + across


def network_bytes(cfg: HSDPConfig, *, params: int, world: int, accum_steps: int, precision: Precision,
                  workers_per_node: int) -> float:
    """Only the all-reduce across replicas leaves a node when each shard group fits inside one."""
    replicas, shard = _groups(cfg, world)
    if workers_per_node % shard:  # shard groups straddle nodes: their collectives cross the network too
        return communication_bytes(cfg, params=params, world=world, accum_steps=accum_steps, precision=precision)
    return 2 * FP32 * (params / shard) * ring_share(replicas)


SPECS = (StrategySpec(
    name="hsdp", summary="HSDP: FSDP2 sharded within groups of workers and replicated across them",
    schema=HSDPConfig, build=HSDPStrategy, checkpoint=DCP_FORMAT,
    meta_init=True,  # as FSDP: fully_shard first, then materialize only this rank's shards
    elastic=False,  # a range of worker counts always holds one that the shard size does not divide
    model_states=model_states, communication_bytes=communication_bytes, network_bytes=network_bytes,
    check_world=check_world,
    startup_peak_note="start-up is the peak: the whole fp32 model is built on each worker before fully_shard "
                      "shards it (model.init_device=meta builds only the shards)",
),)
