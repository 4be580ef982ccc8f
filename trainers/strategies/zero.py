"""DeepSpeed ZeRO stages 1-3 through `deepspeed.initialize`, with a DeepSpeed config generated from ours.

Model states per GPU were read from DeepSpeed 0.19.8 with the config `deepspeed_config` builds (bf16 on, no
data_types.grad_accum_dtype, every other ZeRO knob at its default); tests/cluster/test_memory.py compares
them with DeepSpeed's own estimators.
"""

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cluster.memory import ADAM_MOMENTS, BF16, FP32, ModelShape, ModelStates, dtype_name, human_count
from conf.schema import Precision, StrategyConfig, StrategyName
from trainers.safe_loading import check_deepspeed_files, install_safe_deepspeed_loader, weights_only_loads
from trainers.strategies import CheckpointFormat, StrategySpec, check_stored
from trainers.strategies.common import parameter_groups, ring_share

STATE_DIR = "deepspeed"
# DeepSpeed 0.19.8 defaults (deepspeed/runtime/zero/config.py)
ZERO_REDUCE_BUCKET = 500_000_000  # reduce_bucket_size, elements
ZERO3_SUB_GROUP = 1_000_000_000  # sub_group_size, elements
ZERO3_MAX_REUSE_DISTANCE = 1_000_000_000  # stage3_max_reuse_distance, elements
ZERO3_PREFETCH = 50_000_000  # stage3_prefetch_bucket_size, elements


@dataclass
class ZeroConfig(StrategyConfig):
    name: StrategyName = "zero2"
    zero_offload_optimizer: bool = False  # keep optimizer states in host memory


class DeepSpeedStrategy:
    # Built whole on each worker's device, then partitioned by deepspeed.initialize: fine while the full
    # fp32 model fits one device (an 8B model is 32 GB). Larger ZeRO-3 models need deepspeed.zero.Init.

    def __init__(self, cfg: ZeroConfig, *, device: torch.device, precision: Precision, accum_steps: int,
                 grad_clip: float, micro_batch_size: int):
        self.cfg, self.device, self.precision = cfg, device, precision
        self.stage = _stage(cfg.name)
        self.accum_steps, self.grad_clip, self.micro_batch_size = accum_steps, grad_clip, micro_batch_size
        self.model = None  # the DeepSpeed engine
        self.scheduler = None
        self._last_grad_norm = torch.tensor(float("nan"))

    def deepspeed_config(self) -> dict:
        zero: dict = {"stage": self.stage}
        if self.cfg.zero_offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        if self.stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = False
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.accum_steps,
            "train_batch_size": self.micro_batch_size * self.accum_steps * dist.get_world_size(),
            "gradient_clipping": self.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision == Precision.bf16},
            "steps_per_print": 10**9,  # our progress line replaces DeepSpeed's
            "wall_clock_breakdown": False,
        }

    def init_context(self, *, pretrained: bool):
        """ZeRO-3 with pretrained weights builds the model inside deepspeed.zero.Init: each parameter is cut into
        partitions as its module is created, so no rank holds the whole model, and each rank then reads only its
        partitions from the checkpoint. A fresh model keeps the whole build below (its initialization needs the
        whole tensors, and the same seed on every rank gives every rank the same weights)."""
        if self.stage == 3 and pretrained:
            import deepspeed

            # zero.Init reads the world size from DeepSpeed's communicator, which initialize() would set up only
            # later: attach it to Ray Train's process group now.
            deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
            return deepspeed.zero.Init(config_dict_or_path=self.deepspeed_config())
        return contextlib.nullcontext()

    def setup(self, model: nn.Module, *, blocks: nn.ModuleList, build_optimizer, build_scheduler,
              weight_decay: float, prepare_blocks=None, load_weights=None) -> None:
        import deepspeed

        if prepare_blocks is not None:
            prepare_blocks(blocks)
        model.to(self.device)
        if load_weights is not None:
            load_weights(model)  # before initialize copies the parameters into the optimizer's fp32 partitions
        optimizer = build_optimizer(parameter_groups(model, weight_decay=weight_decay))
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=build_scheduler, config=self.deepspeed_config(),
            dist_init_required=False,
        )

    def micro_step(self, *, is_last: bool):
        # DeepSpeed counts micro-batches itself and syncs gradients at the accumulation boundary.
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # engine.backward divides by gradient_accumulation_steps; engine.step only steps on the boundary,
        # and DeepSpeed expects it after every micro-batch.
        self.model.backward(loss)
        at_boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()
        if at_boundary:
            norm = self.model.get_global_grad_norm()
            self._last_grad_norm = torch.as_tensor(norm if norm is not None else float("nan"))

    def step(self) -> torch.Tensor:
        return self._last_grad_norm

    def current_lr(self) -> float:
        return self.model.get_lr()[0]

    def unwrapped_model(self) -> nn.Module:
        return self.model.module

    def save_state(self, directory: Path, *, rank: int) -> None:
        # DeepSpeed's optimizer partitions are per rank and the module states come from rank 0, so each rank's
        # local directory holds its own files and the merged directory holds them all.
        self.model.save_checkpoint(str(directory / STATE_DIR), tag="state", save_latest=False)

    def load_state(self, directory: Path) -> None:
        install_safe_deepspeed_loader(self.model)
        load_path, _ = self.model.load_checkpoint(str(directory / STATE_DIR), tag="state",
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise ValueError(f"DeepSpeed found no checkpoint under {directory / STATE_DIR}")


def _stage(name: str) -> int:
    return int(name.removeprefix("zero"))


def consolidate_groups(checkpoint_dir: Path, template: dict, *, groups: list[list[str]]) -> Iterator[dict]:
    """Merge ZeRO-1/2/3 partitions from the fp32 master weights in the optimizer files (bf16 runs included),
    one group at a time.

    DeepSpeed's zero_to_fp32 maps the optimizer files (torch.load(mmap=True)) and, in lazy mode, gives ZeRO-3
    parameters as GatheredTensor, gathered from every rank's partition only when asked (.contiguous()). For
    ZeRO-1/2 its lazy mode still concatenates each param group's partitions into one whole fp32 vector, so
    those are read through _lazy_zero12 instead. Touched pages of a mapped file count in RSS while it stays
    mapped, so each group maps the files afresh and drops them (see ddp.consolidate_groups)."""
    from deepspeed.utils import zero_to_fp32

    directory = checkpoint_dir / STATE_DIR
    check_deepspeed_files(directory)  # before DeepSpeed's loader runs, so a refusal names the file
    with weights_only_loads(), contextlib.redirect_stdout(None):
        # Once: ZeRO-1/2's model-states file holds the whole module in the training dtype, read whole (and
        # dropped once its buffers and parameter shapes are taken).
        model_states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(str(directory / "state")))
    check_stored(_lazy_state(directory, model_states), template, source=directory)
    for names in groups:
        state = _lazy_state(directory, model_states)
        group = {name: state[name].contiguous() for name in names}
        del state
        yield group
        del group


def _lazy_state(directory: Path, model_states: list) -> dict:
    """{name: full fp32 tensor, or a lazy one whose .contiguous() gathers it}, the optimizer files mapped and
    loaded tensors-only (their pickles are read again on each call: small next to the tensors)."""
    from deepspeed.utils import zero_to_fp32

    state_dir = str(directory / "state")
    with weights_only_loads(), contextlib.redirect_stdout(None):  # the tool prints its progress
        files = zero_to_fp32.get_optim_files(state_dir)
        stage, world, fp32_groups, paddings = zero_to_fp32.parse_optim_states(files, state_dir)
        if stage == 3:
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(directory), tag="state",
                                                                         lazy_mode=True)
        state = dict(model_states[0].buffers)
        zero_to_fp32._zero2_merge_frozen_params(state, model_states)  # none in our models; small where there are
    state.update(_lazy_zero12(model_states[0].param_shapes, fp32_groups, paddings, world=world))
    for name, source in model_states[0].shared_params:  # a tied output projection is the embedding
        if source in state:
            state[name] = state[source]
    return state


class _FlatSlice:
    """A ZeRO-1/2 parameter: `shape.numel()` elements from `offset` of its param group's fp32 master vector,
    which is every rank's partition end to end; gathered (copied) from the partitions when asked."""

    def __init__(self, partitions: list[torch.Tensor], offset: int, shape: torch.Size):
        self.partitions, self.offset, self.shape = partitions, offset, torch.Size(shape)

    def contiguous(self) -> torch.Tensor:
        start, end, base, pieces = self.offset, self.offset + self.shape.numel(), 0, []
        for part in self.partitions:
            low, high = max(start, base), min(end, base + part.numel())
            if low < high:
                pieces.append(part[low - base:high - base])
            base += part.numel()
        return torch.cat(pieces).view(self.shape) if pieces else torch.empty(self.shape, dtype=torch.float32)


def _lazy_zero12(param_shapes: list[dict], fp32_groups: list[list[torch.Tensor]], paddings, *, world: int) -> dict:
    """zero_to_fp32._zero2_merge_trainable_params without concatenating: the same offsets (each parameter
    after the previous one, plus its alignment padding where recorded) and the same closing check."""
    state, align = {}, 2 * world
    for index, shapes in enumerate(param_shapes):
        partitions = [rank_groups[index] for rank_groups in fp32_groups]
        offset = 0
        for position, (name, shape) in enumerate(shapes.items()):
            state[name] = _FlatSlice(partitions, offset, shape)
            offset += math.prod(shape)
            if paddings is not None:
                offset += paddings[index][position]
        available = sum(part.numel() for part in partitions)
        if align * math.ceil(offset / align) != align * math.ceil(available / align):
            raise ValueError(f"ZeRO param group {index}: its parameters cover {offset} elements of {available}")
    return state


DEEPSPEED_FORMAT = CheckpointFormat(name="deepspeed", marker=STATE_DIR, consolidate_groups=consolidate_groups)


# ----------------------------------------------------------------------------------------- memory, traffic

def _zero12_states(cfg: ZeroConfig, *, shape: ModelShape, world: int, precision: Precision, accum_steps: int,
                   checkpointing: bool) -> ModelStates:
    """stage_1_and_2.DeepSpeedZeroOptimizer. ZeRO-1 (partition_grads=False): the bf16 model (2), its full bf16
    .grad until the reduce at the accumulation boundary (2, freed in step) and the reduced partition
    (averaged_gradients, 2/N); fp32 master partition single_partition_of_fp32_groups (4/N), moments (8/N).
    ZeRO-2 (partition_grads=True): gradients are reduced bucket by bucket during backward into
    grads_in_partition (bf16, 2/N); a parameter's full .grad lives until its bucket is reduced.
    estimate_zero2_model_states_mem_needs: 2P + 18P/N, i.e. these plus the step's fp32 gradient partition.
    The step makes the fp32 gradients of what it updates (stage_1_and_2.step: flat_grad_partition.to(fp32))."""
    stage, offload = _stage(cfg.name), cfg.zero_offload_optimizer
    total, part = shape.total, shape.total / world
    low = BF16 if precision == Precision.bf16 else FP32
    grads = 0.0 if stage == 2 and offload else low * part  # with offload, reduced gradients go to host buffers
    # ZeRO-1 keeps every full .grad until the reduce at the accumulation boundary; step() frees them.
    accumulated = low * total if stage == 1 else 0.0
    gathered = low * shape.largest_layer if stage == 2 else 0.0  # one full .grad awaiting its bucket
    # A separate fp32 master partition is made even in fp32 runs (a clone of the partition).
    optimizer = 0.0 if offload else (FP32 + ADAM_MOMENTS) * part
    step_grads = 0.0 if offload else FP32 * part
    notes = {"params": f"{dtype_name(low)}, whole", "optimizer": f"fp32 master + Adam moments, 1/{world}",
             "grads": f"{dtype_name(low)}, 1/{world}" if stage == 2 else
             f"{dtype_name(low)}: whole until the boundary reduce, then a 1/{world} partition",
             "buffers": f"reduce bucket {human_count(ZERO_REDUCE_BUCKET)} elements",
             "step": "fp32 grad partition + AdamW temporary"}
    if stage == 2:
        notes["gathered"] = f"largest parameter's full gradient ({human_count(shape.largest_layer)}) before its reduce"
    if offload:
        notes["optimizer"] = "in host memory (offload)"
    return ModelStates(params=low * total, grads=grads, optimizer=optimizer, gathered=gathered,
                       accumulated=accumulated, buffers=low * _bucket(total), step_grads=step_grads,
                       step_temp=step_grads,
                       host=(FP32 + ADAM_MOMENTS + FP32) * part if offload else 0.0, notes=notes)


def _zero3_states(cfg: ZeroConfig, *, shape: ModelShape, world: int, precision: Precision, accum_steps: int,
                  checkpointing: bool) -> ModelStates:
    """stage3.DeepSpeedZeroOptimizer_Stage3, persistently per rank: the bf16 parameter partition
    (_create_fp16_partitions_with_defragmentation, lp_param_buffer: 2/N), the gradient partition
    (_setup_for_real_optimizer, grad_partitions_flat_buffer, in gradient_accumulation_dtype, which the engine's
    get_data_types makes bf16 when grad_accum_dtype is unset: 2/N), the fp32 master partition
    (_create_fp32_partitions: 4/N) and the moments (8/N). fp32 gradients are not kept: step() ->
    _prepare_fp32_grad_for_sub_group makes them one sub-group (sub_group_size, 1e9) at a time and
    _release_sub_group drops them. estimate_zero3_model_states_mem_needs says 4L + 18P/N (L the largest layer):
    it leaves out the bf16 parameter partition (2/N) and counts the fp32 gradients of the whole partition,
    which the code bounds by the sub-group. On top, during forward and backward: the
    partitioned_param_coordinator keeps a gathered parameter whose next use is within
    stage3_max_reuse_distance (1e9 parameters) and prefetches stage3_prefetch_bucket_size (5e7) ahead, so
    around the forward/backward turn up to ~1e9 parameters stay gathered; and the reduce bucket (ipg buffer,
    reduce_bucket_size 5e8 elements, bf16) is allocated once and kept. Parameters under
    stage3_param_persistence_threshold (1e5 elements: norms, biases) stay whole on every rank; they are a
    fraction of a percent here and ignored."""
    total, part, layer = shape.total, shape.total / world, shape.largest_layer
    low = BF16 if precision == Precision.bf16 else FP32
    # The largest layer gathered with its full gradient (DeepSpeed's largest_layer_memory, 4L in bf16), plus
    # what the coordinator keeps gathered for reuse and prefetches.
    window = min(ZERO3_MAX_REUSE_DISTANCE + ZERO3_PREFETCH, max(total - layer, 0))
    gathered = 2 * low * layer + low * window
    sub_group = min(ZERO3_SUB_GROUP, part)
    # In fp32 runs the partition itself is the master (_create_fp32_partitions reuses a same-dtype partition).
    masters = 0.0 if precision == Precision.fp32 else FP32 * part
    notes = {"params": f"{dtype_name(low)} partition, 1/{world}", "grads": f"{dtype_name(low)} partition, 1/{world}",
             "optimizer": f"fp32 master + Adam moments, 1/{world}",
             "gathered": f"largest layer {human_count(layer)} + reuse window and prefetch ({human_count(window)})",
             "buffers": f"reduce bucket {human_count(ZERO_REDUCE_BUCKET)} elements",
             "step": f"fp32 grads + AdamW temporary of one sub-group ({human_count(sub_group)})"}
    if cfg.zero_offload_optimizer:
        notes["grads"] = notes["optimizer"] = "in host memory (offload)"
        return ModelStates(params=low * part, grads=0.0, optimizer=0.0, gathered=gathered,
                           buffers=low * _bucket(total), host=(FP32 + ADAM_MOMENTS + low + FP32) * part,
                           notes=notes)
    return ModelStates(params=low * part, grads=low * part, optimizer=masters + ADAM_MOMENTS * part,
                       gathered=gathered, buffers=low * _bucket(total), step_grads=FP32 * sub_group,
                       step_temp=FP32 * sub_group, notes=notes)


def _bucket(total: int) -> int:
    return min(ZERO_REDUCE_BUCKET, total)


def communication_bytes(cfg: ZeroConfig, *, params: int, world: int, accum_steps: int,
                        precision: Precision) -> float:
    """zero1: a bf16 reduce at the boundary and an all-gather of the updated parameters; zero2 reduces every
    micro batch; zero3 gathers twice and reduce-scatters every micro batch."""
    low = BF16 if precision == Precision.bf16 else FP32
    payloads = {1: 2 * low, 2: (accum_steps + 1) * low, 3: accum_steps * 3 * low}[_stage(cfg.name)]
    return payloads * params * ring_share(world)


def _plan_notes(cfg: ZeroConfig) -> list[str]:
    if cfg.zero_offload_optimizer:
        return ["DeepSpeed 0.19.8 refuses ZeRO-Offload with a torch optimizer (trainers/optim.py builds "
                "torch.optim.AdamW) unless the DeepSpeed config sets zero_force_ds_cpu_optimizer=false"]
    return []


def _spec(stage: int, summary: str, model_states) -> StrategySpec:
    return StrategySpec(
        name=f"zero{stage}", summary=summary, schema=ZeroConfig, build=DeepSpeedStrategy,
        checkpoint=DEEPSPEED_FORMAT, meta_init=False,
        elastic=False,  # its checkpoints are partitioned per rank: another number of workers cannot load them
        model_states=model_states, communication_bytes=communication_bytes,
        startup_note="peak: whole fp32 model on each GPU until deepspeed.initialize partitions it",
        startup_peak_note="start-up is the peak: DeepSpeedStrategy builds the whole fp32 model on each GPU before "
                          "deepspeed.initialize partitions it (deepspeed.zero.Init would avoid it)",
        plan_notes=_plan_notes,
        # ZeRO-3 gathers each submodule's parameters in hooks that DeepSpeed marks torch.compiler.disable, so a
        # compiled block breaks its graph at every one of them: on a 2-block model one graph was captured in all
        # (CPU, measured), against one per block under the other strategies.
        compiles_blocks=stage < 3,
    )


SPECS = (
    _spec(1, "DeepSpeed ZeRO-1: optimizer states sharded", _zero12_states),
    _spec(2, "DeepSpeed ZeRO-2: optimizer states and gradients sharded", _zero12_states),
    _spec(3, "DeepSpeed ZeRO-3: parameters, gradients and optimizer states sharded", _zero3_states),
)
