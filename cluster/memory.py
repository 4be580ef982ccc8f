"""Per-GPU (per-worker) memory of training under each strategy, from counts alone: the memory half of the launch
plan (cluster/plan.py). Activations are in cluster/activations.py; this module holds the model states and
the sum.

What each strategy keeps was read from the code that runs: trainers/strategies.py, torch 2.13's FSDP2 and
AdamW, and DeepSpeed 0.19.8 with the config DeepSpeedStrategy.deepspeed_config builds (bf16 on, no
data_types.grad_accum_dtype, every other ZeRO knob at its default). Per parameter, in bytes, on GPU (bf16):

  ddp    fp32 weights 4 (the model is never cast: autocast does bf16 compute), fp32 grads 4 (DDP's buckets
         are the .grad tensors: gradient_as_bucket_view=True), Adam's moments 8; plus the bf16 copies of the
         matmul weights autocast makes, kept for backward by each matmul.
  fsdp   FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the sharded parameters stay
         fp32 and are the masters (4/N), sharded fp32 grads (4/N), moments (8/N). Blocks are gathered in bf16
         one at a time, the next one prefetched; the root unit (embeddings, output, norms) for the whole
         forward and backward. A block's bf16 gradient is upcast into an fp32 reduce-scatter input
         (_fsdp_collectives.foreach_reduce). Gradient accumulation with set_requires_gradient_sync(False)
         (FSDPStrategy.micro_step) keeps every unit's unsharded gradient, upcast to fp32
         (_fsdp_param.to_accumulated_grad_if_needed): 4 per parameter, unsharded, whenever
         trainer.global_batch_size needs more than one micro batch per worker.
  zero1  stage_1_and_2.DeepSpeedZeroOptimizer with partition_grads=False: the bf16 model (2), its full bf16
         .grad until the reduce at the accumulation boundary (2, freed in step) and the reduced partition
         (averaged_gradients, 2/N); fp32 master partition single_partition_of_fp32_groups (4/N), moments (8/N).
  zero2  the same with partition_grads=True: gradients are reduced bucket by bucket during backward into
         grads_in_partition (bf16, 2/N); a parameter's full .grad lives until its bucket is reduced.
         stage_1_and_2.estimate_zero2_model_states_mem_needs: 2P + 18P/N, i.e. these plus the step's fp32
         gradient partition (below).
  zero3  stage3.DeepSpeedZeroOptimizer_Stage3, persistently per rank: the bf16 parameter partition
         (_create_fp16_partitions_with_defragmentation, lp_param_buffer: 2/N), the gradient partition
         (_setup_for_real_optimizer, grad_partitions_flat_buffer, in gradient_accumulation_dtype, which the
         engine's get_data_types makes bf16 when grad_accum_dtype is unset: 2/N), the fp32 master partition
         (_create_fp32_partitions: 4/N) and the moments (8/N). fp32 gradients are not kept: step() ->
         _prepare_fp32_grad_for_sub_group makes them one sub-group (sub_group_size, 1e9) at a time and
         _release_sub_group drops them. estimate_zero3_model_states_mem_needs says 4L + 18P/N (L the largest
         layer): it leaves out the bf16 parameter partition (2/N) and counts the fp32 gradients of the whole
         partition, which the code bounds by the sub-group. On top, during forward and backward: the
         partitioned_param_coordinator keeps a gathered parameter whose next use is within
         stage3_max_reuse_distance (1e9 parameters) and prefetches stage3_prefetch_bucket_size (5e7) ahead, so
         around the forward/backward turn up to ~1e9 parameters stay gathered; and the reduce bucket (ipg
         buffer, reduce_bucket_size 5e8 elements, bf16) is allocated once and kept.

The optimizer step of every strategy runs torch's AdamW (foreach on GPU): torch.optim.adam._multi_tensor_adam
makes one temporary the size of what it updates (exp_avg_sq_sqrt, fp32). ZeRO's step also makes the fp32
gradients of what it updates (stage_1_and_2.step: flat_grad_partition.to(fp32)). Neither coexists with
activations, so the peak is the larger of the forward/backward and the step.

DeepSpeedStrategy builds the whole fp32 model on each GPU before deepspeed.initialize partitions it
(supports_meta_init = False): 4 bytes per parameter at start-up, checked as its own peak. FSDP2 builds large
models on the meta device (trainers/families.py, META_INIT_THRESHOLD).

ZeRO-3 also keeps parameters under stage3_param_persistence_threshold (1e5 elements: norms, biases) whole on
every rank; they are a fraction of a percent here and ignored. tests/cluster/test_memory.py compares these
figures with DeepSpeed's estimators.
"""

from dataclasses import dataclass, field

from cluster.activations import Activations

GB = 1e9  # vendors' GB, as node.gpu_memory_gb states it
# An assumption, not a measurement: per GPU, about 1 GB for the CUDA context, kernels and cuBLAS workspaces,
# about 1 GB for NCCL's communication buffers (NCCL_BUFFSIZE 4 MiB per channel and peer) and 1 GB of slack
# for the caching allocator's fragmentation.
GPU_OVERHEAD_BYTES = 3 * GB
CPU_WORKER_OVERHEAD_BYTES = 1 * GB  # a Ray Train worker process with torch and Ray loaded (an assumption)
# DeepSpeed 0.19.8 defaults (deepspeed/runtime/zero/config.py)
ZERO_REDUCE_BUCKET = 500_000_000  # reduce_bucket_size, elements
ZERO3_SUB_GROUP = 1_000_000_000  # sub_group_size, elements
ZERO3_MAX_REUSE_DISTANCE = 1_000_000_000  # stage3_max_reuse_distance, elements
ZERO3_PREFETCH = 50_000_000  # stage3_prefetch_bucket_size, elements
FP32, BF16, ADAM_MOMENTS = 4, 2, 8
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")


def worker_overhead(*, on_gpu: bool) -> float:
    return GPU_OVERHEAD_BYTES if on_gpu else CPU_WORKER_OVERHEAD_BYTES


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a model, counted without allocating it (cluster/plan.py)."""

    total: int  # parameters
    embedding: int  # in embedding tables: looked up, not multiplied, so autocast does not cast them
    largest_layer: int  # the largest module's own parameters: what ZeRO-3 gathers at once ("largest layer")
    largest_block: int  # the largest of the family's blocks: FSDP2 units (LLM layers, ranker tables)
    root_unit: int = 0  # what FSDP2's root unit holds: everything outside the blocks (embeddings, output, MLPs)
    matmul: int = 0  # parameters of nn.Linear modules: what autocast casts to bf16
    matmul_in_blocks: int = 0  # of those, inside the family's blocks (recomputed under checkpointing)
    blocks: int = 1


def count_shape(family, model_cfg, *, data: dict) -> ModelShape:
    """The ModelShape of a model family's model (trainers/families.py), built on the meta device: nothing is
    allocated, and the counts are those of the very modules training builds."""
    from torch import nn

    model = family.build_model(model_cfg, data=data, device="meta")

    def own(module: nn.Module) -> int:
        return sum(param.numel() for param in module.parameters(recurse=False))

    def linear(module: nn.Module) -> int:
        return sum(own(sub) for sub in module.modules() if isinstance(sub, nn.Linear))

    blocks = family.blocks(model)
    block_sizes = [sum(param.numel() for param in block.parameters()) for block in blocks]
    total = sum(param.numel() for param in model.parameters())
    embedding = sum(own(sub) for sub in model.modules() if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)))
    return ModelShape(total=total, embedding=embedding, largest_layer=max(own(sub) for sub in model.modules()),
                      largest_block=max(block_sizes, default=0), root_unit=total - sum(block_sizes),
                      matmul=linear(model), matmul_in_blocks=sum(linear(block) for block in blocks),
                      blocks=max(len(blocks), 1))


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU for what training keeps besides activations, split the way the plan prints them."""

    params: float
    grads: float
    optimizer: float  # fp32 masters (where separate from the parameters) and Adam's moments
    gathered: float = 0.0  # transient during forward/backward: gathered units and their full gradients
    accumulated: float = 0.0  # gradients kept across micro batches and reduced before the step (FSDP2 no-sync)
    buffers: float = 0.0  # communication buffers kept for the whole run (ZeRO's reduce bucket)
    step_grads: float = 0.0  # fp32 gradients made only for the optimizer step (ZeRO)
    step_temp: float = 0.0  # AdamW's foreach temporary during the step
    host: float = 0.0  # bytes in host memory per worker (ZeRO optimizer offload)
    notes: dict = field(default_factory=dict, compare=False)  # row -> what it holds, for the printed table

    @property
    def resident(self) -> float:
        return self.params + self.grads + self.optimizer + self.buffers

    @property
    def step(self) -> float:
        return self.step_grads + self.step_temp


def model_states(strategy: str, *, shape: ModelShape, world: int, precision: str = "bf16",
                 offload_optimizer: bool = False, accum_steps: int = 1, reshard_after_forward: bool = True,
                 checkpointing: bool = False) -> ModelStates:
    """Model-state bytes per GPU for `shape` trained on `world` workers with `strategy` in `precision`
    (bf16: mixed precision on GPU; fp32: CPU runs). offload_optimizer: ZeRO keeps masters and moments in host
    memory. checkpointing: DDP's autocast keeps only one recomputed block's bf16 weight copies."""
    if world < 1:
        raise ValueError(f"cluster.num_workers must be at least 1, got {world}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"trainer.precision={precision!r} is not one of bf16, fp32")
    if strategy == "ddp":
        return _ddp(shape, precision=precision, checkpointing=checkpointing)
    if strategy == "fsdp":
        return _fsdp(shape, world=world, precision=precision, accum_steps=accum_steps,
                     reshard_after_forward=reshard_after_forward)
    if strategy in ("zero1", "zero2"):
        return _zero12(shape, stage=int(strategy[-1]), world=world, precision=precision, offload=offload_optimizer)
    if strategy == "zero3":
        return _zero3(shape, world=world, precision=precision, offload=offload_optimizer)
    raise ValueError(f"strategy.name={strategy!r} is not one of {', '.join(STRATEGIES)}")


def _ddp(shape: ModelShape, *, precision: str, checkpointing: bool) -> ModelStates:
    params = shape.total
    notes = {"params": "fp32, whole", "grads": "fp32, whole", "optimizer": "Adam moments, fp32, whole",
             "step": "AdamW temporary"}
    casts = 0.0
    if precision == "bf16":
        held = shape.matmul
        if checkpointing:  # recomputed blocks cast again in backward, one block at a time (measured)
            held = shape.matmul - shape.matmul_in_blocks + shape.matmul_in_blocks / max(shape.blocks, 1)
        casts = BF16 * held
        notes["params"] = "fp32, whole, + bf16 autocast copies of matmul weights"
    return ModelStates(params=FP32 * params + casts, grads=FP32 * params, optimizer=ADAM_MOMENTS * params,
                       step_temp=FP32 * params, notes=notes)


def _fsdp(shape: ModelShape, *, world: int, precision: str, accum_steps: int,
          reshard_after_forward: bool) -> ModelStates:
    shard, block, root = shape.total / world, shape.largest_block, shape.root_unit
    compute = BF16 if precision == "bf16" else FP32
    # The root unit's forward spans the whole model, so it stays gathered through forward and again through
    # backward, where its gradient waits for the end. Blocks: the gathered one and the prefetched next, the
    # block's gradient in compute dtype and the fp32 reduce-scatter input of the one before (in flight).
    # Without resharding after forward every unit stays gathered until its backward.
    gathered = 2 * compute * root + (compute + FP32) * block
    gathered += 2 * compute * block if reshard_after_forward else compute * (shape.total - root)
    notes = {"params": f"fp32 shards (the masters), 1/{world}", "grads": f"fp32 shards, 1/{world}",
             "optimizer": f"Adam moments, fp32, 1/{world}", "step": "AdamW temporary",
             "gathered": f"root unit {human_count(root)} and 2 blocks of {human_count(block)} in "
                         f"{_dtype(compute)}, with gradients"}
    accumulated = FP32 * shape.total if accum_steps > 1 else 0.0
    if accumulated:
        notes["grads"] += f", + unsharded fp32 grads kept across {accum_steps} micro batches (no-sync)"
    return ModelStates(params=FP32 * shard, grads=FP32 * shard, optimizer=ADAM_MOMENTS * shard, gathered=gathered,
                       accumulated=accumulated, step_temp=FP32 * shard, notes=notes)


def _zero12(shape: ModelShape, *, stage: int, world: int, precision: str, offload: bool) -> ModelStates:
    total, part = shape.total, shape.total / world
    low = BF16 if precision == "bf16" else FP32
    grads = 0.0 if stage == 2 and offload else low * part  # with offload, reduced gradients go to host buffers
    # ZeRO-1 keeps every full .grad until the reduce at the accumulation boundary; step() frees them.
    accumulated = low * total if stage == 1 else 0.0
    gathered = low * shape.largest_layer if stage == 2 else 0.0  # one full .grad awaiting its bucket
    # A separate fp32 master partition is made even in fp32 runs (a clone of the partition).
    optimizer = 0.0 if offload else (FP32 + ADAM_MOMENTS) * part
    step_grads = 0.0 if offload else FP32 * part
    notes = {"params": f"{_dtype(low)}, whole", "optimizer": f"fp32 master + Adam moments, 1/{world}",
             "grads": f"{_dtype(low)}, 1/{world}" if stage == 2 else
             f"{_dtype(low)}: whole until the boundary reduce, then a 1/{world} partition",
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


def _zero3(shape: ModelShape, *, world: int, precision: str, offload: bool) -> ModelStates:
    total, part, layer = shape.total, shape.total / world, shape.largest_layer
    low = BF16 if precision == "bf16" else FP32
    # The largest layer gathered with its full gradient (DeepSpeed's largest_layer_memory, 4L in bf16), plus
    # what the coordinator keeps gathered for reuse and prefetches.
    window = min(ZERO3_MAX_REUSE_DISTANCE + ZERO3_PREFETCH, max(total - layer, 0))
    gathered = 2 * low * layer + low * window
    sub_group = min(ZERO3_SUB_GROUP, part)
    # In fp32 runs the partition itself is the master (_create_fp32_partitions reuses a same-dtype partition).
    masters = 0.0 if precision == "fp32" else FP32 * part
    notes = {"params": f"{_dtype(low)} partition, 1/{world}", "grads": f"{_dtype(low)} partition, 1/{world}",
             "optimizer": f"fp32 master + Adam moments, 1/{world}",
             "gathered": f"largest layer {human_count(layer)} + reuse window and prefetch ({human_count(window)})",
             "buffers": f"reduce bucket {human_count(ZERO_REDUCE_BUCKET)} elements",
             "step": f"fp32 grads + AdamW temporary of one sub-group ({human_count(sub_group)})"}
    if offload:
        notes["grads"] = notes["optimizer"] = "in host memory (offload)"
        return ModelStates(params=low * part, grads=0.0, optimizer=0.0, gathered=gathered,
                           buffers=low * _bucket(total), host=(FP32 + ADAM_MOMENTS + low + FP32) * part,
                           notes=notes)
    return ModelStates(params=low * part, grads=low * part, optimizer=masters + ADAM_MOMENTS * part,
                       gathered=gathered, buffers=low * _bucket(total), step_grads=FP32 * sub_group,
                       step_temp=FP32 * sub_group, notes=notes)


def _bucket(total: int) -> int:
    return min(ZERO_REDUCE_BUCKET, total)


def build_bytes(strategy: str, *, shape: ModelShape, on_meta: bool) -> float:
    """Bytes on each GPU while the model is built, before any sharding: the whole fp32 model unless FSDP2
    builds it on the meta device and materializes only its shards."""
    if strategy == "fsdp" and on_meta:
        return 0.0
    return FP32 * shape.total


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU (or per CPU worker) bytes: model states, activations, a fixed overhead, and the start-up build."""

    states: ModelStates
    activations: Activations
    overhead: float
    build: float = 0.0  # the whole model while it is built (see build_bytes)

    @property
    def forward_backward(self) -> float:
        states = self.states
        return states.resident + self.overhead + states.gathered + states.accumulated + self.activations.peak

    @property
    def optimizer_step(self) -> float:
        return self.states.resident + self.overhead + self.states.step

    @property
    def startup(self) -> float:
        return self.build + self.overhead

    @property
    def peak(self) -> float:
        return max(self.forward_backward, self.optimizer_step, self.startup)


def _dtype(nbytes: int) -> str:
    return {BF16: "bf16", FP32: "fp32"}[nbytes]


def human_count(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"
