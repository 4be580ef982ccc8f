"""FSDP2 (`fully_shard` per block): parameters, gradients and optimizer states sharded over every worker.

The pieces here take a device mesh and a shard count, so HSDP (trainers/strategies/hsdp.py) is this strategy
on a 2-D mesh rather than a class of its own design.
"""

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cluster.memory import ADAM_MOMENTS, BF16, FP32, ModelShape, ModelStates, dtype_name, human_count
from conf.schema import Precision, StrategyConfig, StrategyName
from trainers.safe_loading import dcp_tensor_shapes, load_dcp, load_tensors
from trainers.strategies import CheckpointFormat, StrategySpec, check_stored
from trainers.strategies.common import TorchStrategy, is_on_meta, ring_share

DCP_DIR = "dcp"


@dataclass
class FSDPConfig(StrategyConfig):
    name: StrategyName = "fsdp"
    # Free each block's gathered parameters after its forward and gather again in backward (less memory, one
    # more all-gather per block and micro batch). The last block is never resharded after forward: its
    # backward comes right after, so it would only be gathered again at once.
    fsdp_reshard_after_forward: bool = True
    # Blocks whose all-gather is issued ahead of the one computing, in forward and in backward: 1 is FSDP2's own
    # implicit prefetch; more overlaps more communication with compute, holding that many more blocks gathered.
    fsdp_prefetch_blocks: int = 1


def apply_fsdp(model: nn.Module, *, blocks: nn.ModuleList, mesh, reshard_after_forward: bool,
               precision: Precision, prefetch_blocks: int = 1) -> None:
    """One FSDP unit per block, then the root: parameters are all-gathered block by block, so peak memory
    holds one block in full (and those prefetched), and the embedding/output projections stay in the root
    unit. A 1-D `mesh` shards over all of it; a 2-D (replicate, shard) mesh shards within groups and replicates
    across them (HSDP)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == Precision.bf16 else MixedPrecisionPolicy()
    last = len(blocks) - 1
    for index, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward and index < last,
                    mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    if prefetch_blocks > 1:
        set_prefetch(list(blocks), ahead=prefetch_blocks)


def set_prefetch(blocks: list[nn.Module], *, ahead: int) -> None:
    """Each block issues the all-gathers of the next `ahead` blocks in its forward, and of the `ahead` before
    it in its backward (explicit prefetching replaces FSDP2's implicit one-block lookahead)."""
    for index, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[index + 1:index + 1 + ahead])
        block.set_modules_to_backward_prefetch(blocks[max(0, index - ahead):index][::-1])


class FSDPStrategy(TorchStrategy):
    def device_mesh(self):
        """None: fully_shard's default, one dimension over every worker."""
        return None

    def setup(self, model: nn.Module, *, blocks: nn.ModuleList, build_optimizer, build_scheduler,
              weight_decay: float, prepare_blocks=None, load_weights=None) -> None:
        if prepare_blocks is not None:
            prepare_blocks(blocks)
        apply_fsdp(model, blocks=blocks, mesh=self.device_mesh(),
                   reshard_after_forward=self.cfg.fsdp_reshard_after_forward, precision=self.precision,
                   prefetch_blocks=self.cfg.fsdp_prefetch_blocks)
        if is_on_meta(model):
            # Materialize only this rank's shards, then fill them in place (pretrained weights or a fresh init).
            model.to_empty(device=self.device)
            if load_weights is None:
                model.init_weights()
        else:
            model.to(self.device)
        if load_weights is not None:
            load_weights(model)  # each rank reads the slices of its own shards
        self.model = model
        self._finish_setup(build_optimizer=build_optimizer, build_scheduler=build_scheduler,
                           weight_decay=weight_decay)

    def micro_step(self, *, is_last: bool):
        self.model.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()

    def unwrapped_model(self) -> nn.Module:
        return self.model

    def save_state(self, directory: Path, *, rank: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state},
                 storage_writer=dcp.FileSystemWriter(str(directory / DCP_DIR)))
        if rank == 0:
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")

    def load_state(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        load_dcp(state, directory / DCP_DIR)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(load_tensors(directory / "scheduler.pt"))


def consolidate_groups(checkpoint_dir: Path, template: dict, *, groups: list[list[str]]) -> Iterator[dict]:
    """Read DCP's shards into full fp32 CPU tensors shaped like the plain model's (no process group needed),
    one group per dcp.load: a load asks only for the group's keys, and DCP reads only the byte ranges of the
    items those keys cover (FileSystemReader.read_data), so the rest of the model and the optimizer state stay
    on disk. DCP reshards on load, so this reads what any mesh wrote (HSDP included)."""
    directory = checkpoint_dir / DCP_DIR
    stored = {name.removeprefix("model."): shape for name, shape in dcp_tensor_shapes(directory).items()
              if name.startswith("model.")}
    check_stored(stored, template, source=directory)
    for names in groups:
        state = {"model": {name: torch.empty(template[name].shape, dtype=torch.float32) for name in names}}
        with warnings.catch_warnings():  # DCP warns that it runs without a process group, which is the point
            warnings.simplefilter("ignore", UserWarning)
            load_dcp(state, directory, no_dist=True)
        group = state.pop("model")
        yield group
        del group
DCP_FORMAT = CheckpointFormat(name="fsdp", marker=DCP_DIR, consolidate_groups=consolidate_groups)


def sharded_model_states(shape: ModelShape, *, shards: int, precision: Precision, accum_steps: int,
                         reshard_after_forward: bool, prefetch_blocks: int = 1) -> ModelStates:
    """FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), parameters sharded `shards` ways:
    the sharded parameters stay fp32 and are the masters (4/S), sharded fp32 grads (4/S), moments (8/S).
    Blocks are gathered in bf16 one at a time, the next `prefetch_blocks` prefetched; the root unit (embeddings, output,
    norms) for the whole forward and backward. A block's bf16 gradient is upcast into an fp32 reduce-scatter
    input (_fsdp_collectives.foreach_reduce). Gradient accumulation with set_requires_gradient_sync(False)
    (micro_step) keeps every unit's unsharded gradient, upcast to fp32 (_fsdp_param.to_accumulated_grad_if_needed):
    4 per parameter, unsharded, whenever trainer.global_batch_size needs more than one micro batch per worker."""
    shard, block, root = shape.total / shards, shape.largest_block, shape.root_unit
    compute = BF16 if precision == Precision.bf16 else FP32
    # The root unit's forward spans the whole model, so it stays gathered through forward and again through
    # backward, where its gradient waits for the end. Blocks: the gathered one and the prefetched ones, the
    # block's gradient in compute dtype and the fp32 reduce-scatter input of the one before (in flight).
    # Without resharding after forward every unit stays gathered until its backward.
    gathered = 2 * compute * root + (compute + FP32) * block
    gathered += (1 + prefetch_blocks) * compute * block if reshard_after_forward else compute * (shape.total - root)
    notes = {"params": f"fp32 shards (the masters), 1/{shards}", "grads": f"fp32 shards, 1/{shards}",
             "optimizer": f"Adam moments, fp32, 1/{shards}", "step": "AdamW temporary",
             "gathered": f"root unit {human_count(root)} and {1 + prefetch_blocks} blocks of {human_count(block)} in "
                         f"{dtype_name(compute)}, with gradients"}
    accumulated = FP32 * shape.total if accum_steps > 1 else 0.0
    if accumulated:
        notes["grads"] += f", + unsharded fp32 grads kept across {accum_steps} micro batches (no-sync)"
    return ModelStates(params=FP32 * shard, grads=FP32 * shard, optimizer=ADAM_MOMENTS * shard, gathered=gathered,
                       accumulated=accumulated, step_temp=FP32 * shard, notes=notes)


def model_states(cfg: FSDPConfig, *, shape: ModelShape, world: int, precision: Precision, accum_steps: int,
                 checkpointing: bool) -> ModelStates:
    return sharded_model_states(shape, shards=world, precision=precision, accum_steps=accum_steps,
                                reshard_after_forward=cfg.fsdp_reshard_after_forward,
                                prefetch_blocks=cfg.fsdp_prefetch_blocks)


def check_options(cfg: FSDPConfig, world: int) -> None:
    if cfg.fsdp_prefetch_blocks < 1:
        raise ValueError(f"strategy.fsdp_prefetch_blocks={cfg.fsdp_prefetch_blocks} must be at least 1 (1 is "
                         "FSDP2's own one-block lookahead)")


def shard_group_payloads(*, accum_steps: int, precision: Precision, reshard_after_forward: bool) -> float:
    """Payloads (bytes per parameter) of the collectives within a shard group per step: a bf16 all-gather per
    micro batch in forward (and again in backward when resharding) and one fp32 reduce-scatter."""
    low = BF16 if precision == Precision.bf16 else FP32
    return accum_steps * (2 if reshard_after_forward else 1) * low + FP32


def communication_bytes(cfg: FSDPConfig, *, params: int, world: int, accum_steps: int,
                        precision: Precision) -> float:
    payloads = shard_group_payloads(accum_steps=accum_steps, precision=precision,
                                    reshard_after_forward=cfg.fsdp_reshard_after_forward)
    return payloads * params * ring_share(world)


SPECS = (StrategySpec(
    name="fsdp", summary="FSDP2 (fully_shard per block): parameters, gradients and optimizer states sharded",
    schema=FSDPConfig, build=FSDPStrategy, checkpoint=DCP_FORMAT,
    meta_init=True,  # fully_shard first, then materialize and initialize only this rank's shards
    elastic=True,  # DCP reshards on load
    model_states=model_states, communication_bytes=communication_bytes, check_world=check_options,
    startup_peak_note="start-up is the peak: the whole fp32 model is built on each worker before fully_shard "
                      "shards it (model.init_device=meta builds only the shards)",
),)
