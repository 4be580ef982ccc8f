"""Per-GPU (per-worker) memory of training, from counts alone: the memory half of the launch plan
(cluster/plan.py). Activations are in cluster/activations.py; what each strategy keeps (its ModelStates) is
its own formula in its module under trainers/strategies/, read from the code that runs (torch 2.13's FSDP2 and
AdamW, DeepSpeed 0.19.8); this module holds the parts they fill in, the shared constants and the sum.

The optimizer step of every strategy runs torch's AdamW (foreach on GPU): torch.optim.adam._multi_tensor_adam
makes one temporary the size of what it updates (exp_avg_sq_sqrt, fp32). ZeRO's step also makes the fp32
gradients of what it updates. Neither coexists with activations, so the peak is the larger of the
forward/backward and the step.

A strategy that cannot build the model on the meta device (trainers/strategies/: meta_init) builds the whole
fp32 model on each GPU before wrapping it: 4 bytes per parameter at start-up, checked as its own peak. FSDP2
builds large models on the meta device (META_INIT_THRESHOLD). tests/cluster/test_memory.py compares the
ZeRO figures with DeepSpeed's estimators.
"""

from dataclasses import dataclass, field

from cluster.activations import Activations

GB = 1e9  # vendors' GB, as node.gpu_memory_gb states it
# An assumption, not a measurement: per GPU, about 1 GB for the CUDA context, kernels and cuBLAS workspaces,
# about 1 GB for NCCL's communication buffers (NCCL_BUFFSIZE 4 MiB per channel and peer) and 1 GB of slack
# for the caching allocator's fragmentation.
GPU_OVERHEAD_BYTES = 3 * GB
CPU_WORKER_OVERHEAD_BYTES = 1 * GB  # a Ray Train worker process with torch and Ray loaded (an assumption)
FP32, BF16, ADAM_MOMENTS = 4, 2, 8
# Above this many parameters a model is built on the meta device (model.init_device=auto) by a strategy that
# can materialize only its shards.
META_INIT_THRESHOLD = 500_000_000


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


def build_bytes(*, shape: ModelShape, on_meta: bool) -> float:
    """Bytes on each GPU while the model is built, before any sharding: the whole fp32 model unless it is
    built on the meta device and only its shards are materialized."""
    return 0.0 if on_meta else FP32 * shape.total


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


def dtype_name(nbytes: int) -> str:
    return {BF16: "bf16", FP32: "fp32"}[nbytes]


def human_count(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"
