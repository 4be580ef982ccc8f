"""Typed schemas for the config groups.

Hydra merges the YAML files of conf/ into these dataclasses, so an unknown key, a wrong type or a value outside
a key's choices fails at composition, before Ray starts, with a message that names the key. The schemas of the
model, data and strategy groups are chosen per file (a family's, a kind of data's, a strategy's own options);
trainers/config.py registers them and rebuilds the typed config from the plain one, after which no
DictConfig travels further. Values derived from the config alone are in conf/derived.py, except the step
counts left null, which freezing the config fills in (fill_derived_steps, below), and the numeric keys' ranges
are conf/derived.py's BOUNDS.
"""

import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from omegaconf import MISSING

CONF_DIR = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ choices
# A key with a fixed set of values is an enum, so composition itself refuses anything else and names the
# allowed values (OmegaConf: "Invalid value 'fp16', expected one of [auto, fp32, bf16]"). StrEnum members are
# str: they compare, format, hash and serialize as their values.


def _group_options(group: str) -> dict[str, str]:
    """The options of a config group are its YAML files, as Hydra's `group=NAME` choice sees them."""
    return {path.stem: path.stem for path in sorted((CONF_DIR / group).glob("*.yaml"))}


# A strategy is one of conf/strategy/*.yaml (each backed by a module of trainers/strategies/): adding a
# strategy adds its file, and `strategy.name` accepts it without an edit here.
StrategyName = StrEnum("StrategyName", _group_options("strategy"), module=__name__)


class Precision(StrEnum):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


class CheckpointingPolicy(StrEnum):
    full = "full"  # a block keeps only its input; backward runs its whole forward again
    selective = "selective"  # it also keeps its matmul and attention outputs; backward recomputes the rest


class InitDevice(StrEnum):
    auto = "auto"
    device = "device"
    meta = "meta"


class RankerArch(StrEnum):
    dlrm = "dlrm"
    dcn = "dcn"


class TextSource(StrEnum):
    stdlib = "stdlib"
    text_dir = "text_dir"
    parquet = "parquet"


class ChatFormat(StrEnum):
    chat_jsonl = "chat_jsonl"  # {"messages": [{"role": ..., "content": ...}, ...]} per line
    prompt_completion_jsonl = "prompt_completion_jsonl"  # {"prompt": ..., "completion": ...} per line


class ClickLogSource(StrEnum):
    synthetic = "synthetic"
    criteo_tsv = "criteo_tsv"


class PlacementStrategy(StrEnum):  # Ray placement group strategies
    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


class Launcher(StrEnum):  # what starts the training workers (trainers/local.py)
    ray = "ray"  # a Ray Train worker group: dashboard, Train state, restarts, many nodes, elastic
    processes = "processes"  # no Ray: this process (one worker) or local processes joined like torchrun's


class LoggerName(StrEnum):
    none = "none"
    wandb = "wandb"


class SweepScheduler(StrEnum):
    fifo = "fifo"  # every trial runs to trainer.max_steps
    asha = "asha"  # stops bad trials early


class SweepSearcher(StrEnum):
    random = "random"  # random draws (and grid points)
    optuna = "optuna"  # TPE


class ResumePolicy(StrEnum):
    auto = "auto"
    fresh = "fresh"
    anyway = "anyway"


class MetricMode(StrEnum):
    min = "min"
    max = "max"


class DistillLoss(StrEnum):
    forward_kl = "forward_kl"  # KL(teacher || student): the student covers everything the teacher thinks likely
    reverse_kl = "reverse_kl"  # KL(student || teacher): the student picks the teacher's main modes
    mixture = "mixture"  # distill.mixture_weight x forward + (1 - distill.mixture_weight) x reverse


class ServeEngine(StrEnum):
    native = "native"  # Slipway's continuous-batching engine (serve/engine.py): CPU or GPU, any family
    vllm = "vllm"  # LLMs on GPUs: vLLM through Ray Serve LLM, one engine per version (serve/vllm_app.py)


@dataclass
class Llama3RopeScaling:
    """Llama 3.1's long-context rotary scaling (`rope_scaling` of type llama3 in a Hugging Face config.json):
    wavelengths longer than original_max_seq_len / low_freq_factor are stretched by `factor`, those shorter
    than original_max_seq_len / high_freq_factor are kept, and the band between is interpolated."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass
class LLMConfig:
    """A decoder-only transformer (family `llm`). Presets live in conf/model/llm_*.yaml."""

    family: str = "llm"
    preset: str = "tiny"
    # A local Hugging Face checkpoint directory (Llama family) to start from: its config.json sets the sizes
    # below and the vocabulary, its weights initialize the model and its tokenizer replaces BPE training.
    init_from: str | None = None
    # Rows of the embedding table; null = the tokenizer's size (data.vocab_size when BPE is trained). A checkpoint
    # (init_from) sets it to its own, which may exceed its tokenizer's (padded for fast matmuls).
    vocab_size: int | None = None
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 344
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # the output projection shares the token embedding matrix
    init_std: float = 0.02
    # "auto" builds on the meta device when the model is too big to build whole and the strategy can
    # materialize shards (fsdp); otherwise on the worker's device.
    init_device: InitDevice = InitDevice.auto
    # Distillation: the teacher whose logits this model learns from (the `distill` block says how), as
    # registry:MODEL@ALIAS, registry:MODEL@vN or the path of an export directory. null trains on the data alone.
    teacher: str | None = None


@dataclass
class RankerConfig:
    """A click-through model (family `ranker`): DLRM or DCN-v2. Presets live in conf/model/ranker_*.yaml.

    The embedding tables' sizes are not set here: they come from the data (one table per categorical
    feature, as many rows as its hash buckets).
    """

    family: str = "ranker"
    preset: str = "small"
    arch: RankerArch = RankerArch.dlrm
    embedding_dim: int = 16
    bottom_mlp: list[int] = field(default_factory=lambda: [64, 16])  # dlrm: dense features -> embedding_dim
    top_mlp: list[int] = field(default_factory=lambda: [128, 64])  # dlrm: interactions -> hidden layers -> 1
    cross_layers: int = 3  # dcn: cross layers x_{l+1} = x_0 * (W x_l + b) + x_l
    cross_rank: int = 0  # dcn: 0 = full-rank W; r > 0 factorizes W = U V^T with rank r (DCN-v2's low-rank cross)
    deep_mlp: list[int] = field(default_factory=lambda: [256, 128])  # dcn: the deep network after the cross network
    init_device: InitDevice = InitDevice.auto  # as for the LLM
    teacher: str | None = None  # as for the LLM: registry:MODEL@ALIAS, registry:MODEL@vN or an export directory


@dataclass
class TextDataConfig:
    """Where the text comes from and how it becomes packed token sequences (family `llm`)."""

    kind: str = "text"
    source: TextSource = TextSource.stdlib
    path: str | None = None  # required for text_dir and parquet
    column: str = "text"  # the text column of a parquet source or the field of jsonl records
    # A pretrained tokenizer: a directory with tokenizer.json (and tokenizer_config.json), e.g. a Hugging Face
    # checkpoint's. null trains a byte-level BPE on the corpus; model.init_from sets it to the checkpoint.
    tokenizer: str | None = None
    vocab_size: int = 4096  # byte-level BPE vocabulary trained on the corpus (unused with data.tokenizer)
    seq_len: int = 256  # tokens per training sequence
    val_fraction: float = 0.05  # share of documents held out for validation
    max_chars: int | None = None  # cap on corpus characters (first documents in sorted order)
    rows_per_shard: int = 2048  # packed sequences per parquet shard
    # Prepared splits up to this size are read once by the driver into Ray's object store; larger ones are
    # streamed from the shards by Ray Data read tasks each epoch.
    in_memory_limit_mb: int = 512
    seed: int = 0  # shuffle order of the packed training rows


@dataclass
class ChatDataConfig:
    """Fine-tuning examples in a JSON-lines file (family `llm`, with model.init_from naming the tokenizer and its
    chat template). The loss covers only what the assistant (or the completion) says."""

    kind: str = "chat"
    format: ChatFormat = ChatFormat.chat_jsonl
    path: str | None = None  # the .jsonl file; required
    # The directory with tokenizer.json and tokenizer_config.json (its chat template and EOS); model.init_from
    # sets it to the checkpoint, which is where it should come from.
    tokenizer: str | None = None
    seq_len: int = 512  # tokens per training sequence; longer examples are dropped (and counted in the log)
    # true: several examples share a row, each attending only to itself (block-diagonal mask, positions that
    # restart per example); false: one example per row, padded.
    packing: bool = True
    val_fraction: float = 0.05  # share of examples held out for validation (by a hash of each line)
    # Where each line keeps its conversation (chat_jsonl) or its prompt and completion (prompt_completion_jsonl).
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    rows_per_shard: int = 2048  # rows per parquet shard
    in_memory_limit_mb: int = 512  # as for text: splits up to this size go straight into Ray's object store
    seed: int = 0  # shuffle order of the training examples


@dataclass
class ClickLogDataConfig:
    """Click logs in Criteo's shape: a 0/1 label, 13 dense and 26 categorical features (family `ranker`)."""

    kind: str = "clicklog"
    source: ClickLogSource = ClickLogSource.synthetic
    path: str | None = None  # criteo_tsv: one TSV file (plain or .gz) or a directory of them
    # synthetic: rows to generate; criteo_tsv: the first rows to read (null = every row of every file)
    rows: int | None = 4_000_000
    val_fraction: float = 0.1
    # Buckets each categorical column is hashed into (bucket 0 holds missing values): one number for every
    # table, or a list of 26. Required for criteo_tsv; for synthetic, null keeps one row per category.
    hash_buckets: Any = None
    # synthetic: categories per feature (26 numbers) and the Zipf exponent of their frequencies
    cardinalities: list[int] = field(default_factory=lambda: [100] * 26)
    zipf_exponent: float = 1.1
    rows_per_shard: int = 65536  # rows per parquet shard; training rows are shuffled within a shard
    in_memory_limit_mb: int = 512  # as for text: splits up to this size go straight into Ray's object store
    seed: int = 0  # the synthetic ground truth and sample, the split and the shuffle


@dataclass
class TrainerConfig:
    max_steps: int = 100
    global_batch_size: int = 16  # sequences per optimizer step, summed over workers and accumulation
    micro_batch_size: int = 4  # sequences per forward pass on one worker
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    # Step counts left null are derived from max_steps when the config is frozen (fill_derived_steps), so that a
    # shortened run (trainer.max_steps=24) keeps sensible intervals; a value you set is checked as set.
    warmup_steps: int | None = None  # null = a tenth of max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    seed: int = 0
    precision: Precision = Precision.auto
    activation_checkpointing: bool = False
    # What a checkpointed block keeps (trainers/strategies/common.py): full keeps only the block's input;
    # selective also keeps its matmul and attention outputs and recomputes only norms, RoPE and SwiGLU's
    # pointwise ops, for more memory and far less recomputation. Read only with activation_checkpointing.
    activation_checkpointing_policy: CheckpointingPolicy = CheckpointingPolicy.full
    # torch.compile (Inductor) each transformer block before the strategy wraps the model. null = on where it
    # helps and works: CUDA workers, a family with transformer blocks (LLMs), a strategy that supports it (not
    # zero3, whose parameter hooks sit inside the blocks). Compiling takes seconds to a minute at the first step.
    compile: bool | None = None
    # AdamW's fused kernel: one kernel updates every parameter of a group. null = on for CUDA workers.
    fused_optimizer: bool | None = None
    log_every_n_steps: int = 10
    # null = a quarter of max_steps (with sweep.scheduler=asha, max_steps / reduction_factor^2: two rungs)
    eval_every_n_steps: int | None = None
    eval_batches: int = 4  # eval batches (micro_batch_size x workers rows) per evaluation; 0 = all
    torch_threads: int = 0  # intra-op threads per worker; 0 = the worker's CPU share


@dataclass
class DistillConfig:
    """How a student learns from model.teacher (trainers/distill.py); read only when model.teacher is set. The
    training loss is (1 - weight) x the family's own loss on the data + weight x the distillation term."""

    # LLMs: the divergence between the softened token distributions. Rankers compare two-class distributions
    # (click, no click), where forward_kl is the cross-entropy against the teacher's softened probability.
    loss: DistillLoss = DistillLoss.forward_kl
    mixture_weight: float = 0.5  # loss=mixture: the share of forward KL
    # Both models' logits are divided by it; the term is scaled by its square so that its gradients keep their
    # size as it changes (Hinton et al., 2015).
    temperature: float = 2.0
    weight: float = 0.5  # the distillation term's share of the loss, in [0, 1]


@dataclass
class StrategyConfig:
    """What every strategy's schema has. Each strategy extends it with its own options in its module
    (trainers/strategies/), and its YAML file names that schema first in its defaults list."""

    name: StrategyName = MISSING


@dataclass
class CheckpointConfig:
    enabled: bool = True  # false only for throughput checks: nothing is saved, so nothing can resume
    # A rerun resumes its run directory's checkpoints (auto) unless they were trained on other data or another
    # tokenizer, which is refused; fresh sets the old directory aside and starts at step 0; anyway resumes
    # regardless of what changed.
    resume: ResumePolicy = ResumePolicy.auto
    every_n_steps: int | None = None  # null = at every evaluation (trainer.eval_every_n_steps)
    keep_top_k: int = 2  # ranked by val_loss; the latest checkpoint is always kept for resuming
    max_failures: int = 1  # worker-group restarts from the latest checkpoint before the run fails


@dataclass
class NodeConfig:
    """One machine type of a cluster (conf/cluster/*.yaml): what plan=true sizes against and what the cluster
    manifests in cluster/ request. Zeros mean "not described" (the embedded local Ray)."""

    instance_type: str | None = None  # the cloud's name for it, e.g. p5.48xlarge
    gpu_type: str | None = None  # e.g. H100-SXM-80GB; null for CPU nodes
    gpus: int = 0
    gpu_memory_gb: float = 0.0  # per GPU, as the vendor states it (GB = 1e9 bytes)
    cpus: int = 0
    memory_gb: float = 0.0  # host memory
    nvlink_gb_per_s: float = 0.0  # GPU-to-GPU bandwidth within the node, per GPU and direction
    network_gbit_per_s: float = 0.0  # node-to-node bandwidth, per node
    price_per_hour: float = 0.0  # USD, on-demand, for the whole node
    price_source: str | None = None  # where the price comes from, and when


@dataclass
class ClusterConfig:
    name: str = "local"
    # Ray address: none (and no RAY_ADDRESS) starts an embedded local Ray; host:port or ray://host:10001 joins a
    # running cluster; with submit=true, the head's Jobs API (http://HEAD:8265).
    address: str | None = None
    # ray: a Ray Train worker group. processes: no Ray at all, for quick runs on this machine: one worker trains
    # in the launching process, several in local processes (trainers/local.py); seconds sooner to step 1, without
    # the dashboard, Train state, other nodes or elastic resizing.
    launcher: Launcher = Launcher.ray
    # Training workers: an int, or [min, max] for elastic training (Ray Train V2 starts with what is available
    # between them and resizes on failures and as capacity arrives). ddp and fsdp only.
    num_workers: Any = 2
    # How Ray places the workers: PACK (fewest nodes), SPREAD (across nodes), STRICT_PACK or STRICT_SPREAD.
    placement_strategy: PlacementStrategy = PlacementStrategy.PACK
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only read when use_gpu is true
    local_num_cpus: int | None = None  # embedded Ray only; None = this machine's core count
    include_dashboard: bool = True
    peak_tflops_per_gpu: float = 989.0  # dense bf16 peak used for MFU (H100 SXM datasheet)
    # The cluster adds nodes on demand (cluster launcher or KubeRay autoscaler): a run may ask for more workers
    # than are up now, and Ray Train waits for them instead of the capacity check refusing the run.
    autoscaling: bool = False
    # How long a run waits for its workers to be placed (nodes to come up, a busy cluster to free resources)
    # before it fails, naming what it asked for: a placement that can never be met must not wait forever.
    # With autoscaling it is Ray Train's wait per attempt (its own default, 60 s, is shorter than a GPU node
    # takes to boot); without, Ray Train retries every 60 s until this has passed.
    scale_up_timeout_s: float = 900.0
    max_nodes: int = 1  # worker nodes the autoscaler may add; plan=true checks num_workers against it
    node: NodeConfig = field(default_factory=NodeConfig)
    assumed_mfu: float = 0.4  # plan=true: model FLOPs utilization assumed for step time and cost
    image: str | None = None  # container image of the cluster manifests (cluster/aws.yaml, cluster/kuberay/)
    runtime_env_excludes: list = field(
        default_factory=lambda: [".git", ".venv", "outputs", "wandb", "**/__pycache__", ".pytest_cache"]
    )


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    project: str = "slipway"
    entity: str | None = None
    mode: str | None = None  # None: offline unless WANDB_MODE or WANDB_API_KEY say otherwise


@dataclass
class PathsConfig:
    root: str = "outputs"  # relative paths resolve against the directory launch.py was started in
    data_cache: str = "${paths.root}/data"  # prepared corpora, keyed by content fingerprint


@dataclass
class SweepConfig:
    """A Ray Tune sweep (conf/sweep/). `name: none` trains once; anything else runs a sweep of trials.

    The search space maps config keys to one dimension each, a list with its kind first: [loguniform, low,
    high], [uniform, low, high], [quniform, low, high, q], [randint, low, high], [choice, a, b, ...] or
    [grid, a, b, ...]. Keys may be nested (`trainer: {lr: [...]}`) or dotted (`trainer.lr: [...]`).
    """

    name: str = "none"  # none | the sweep file's name (asha, optuna, ...)
    scheduler: SweepScheduler = SweepScheduler.fifo
    searcher: SweepSearcher = SweepSearcher.random
    num_samples: int = 8  # trials drawn; with grid dimensions, draws per grid point
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's resources fit at once
    metric: str | None = None  # None = the model family's (val_loss for llm, auc for ranker)
    mode: MetricMode | None = None  # None = the metric's natural direction
    grace_period: int | None = None  # asha: steps before a trial can be stopped; null = the first evaluation
    reduction_factor: float = 2.0  # asha: keep the best 1/reduction_factor of trials at each rung
    seed: int = 0  # the searcher's random state: the same sweep draws the same trials
    # A trial of one worker (cluster.num_workers=1) trains in its Tune trial's own process (Ray Train's local mode),
    # which Tune reuses from trial to trial: no Train controller and worker process to start per trial, and torch
    # and the model code stay imported. false: every trial starts a worker group, as a plain run does. Trials of
    # several workers always do: each worker needs a process of its own.
    in_process_trials: bool = True
    space: dict[str, Any] = field(default_factory=dict)  # for every family; wins over family_space
    family_space: dict[str, Any] = field(default_factory=dict)  # model.family -> its own dimensions


@dataclass
class MonitorConfig:
    """Watching what is served (serve/monitoring.py): each registered version's reference profile of the held-out
    split, the live profiles its replicas fill, and the drift between the two."""

    profile_rows: int = 20000  # held-out rows a version's reference profile is built from (stage=promote); 0 = all
    drift_window_s: float = 300.0  # a replica compares the rows of the last this many seconds with the reference
    publish_interval_s: float = 5.0  # how often a replica turns what it counted into Prometheus metrics
    # The per-bin row counters (ray_slipway_profile_bin_rows_total: exact live histograms from Prometheus) cost a
    # series per feature, bin, version, arm and replica: about 500 per ranker replica and version. Ray's metrics
    # agent keeps at most 2000 series per metric (OpenTelemetry's default limit) for its whole life and folds the
    # rest into one overflow series, so a long-lived cluster serving many versions may turn them off; the PSI
    # gauges and the drift alerts stay.
    bin_counters: bool = True
    # Delayed labels (POST /v1/feedback, serve/feedback.py): an answer waits this long for its feedback, and at most
    # this many answers wait at once (the oldest are dropped first); live quality covers this window of feedback.
    feedback_ttl_s: float = 3600.0
    max_predictions: int = 200_000
    quality_window_s: float = 900.0
    # Test-only: POST /v1/faults adds latency and errors to one version (scripts/replay_traffic.py --fault), to show
    # that the rollout judge and the alerts catch them. Never on in production.
    fault_injection: bool = False
    # Where stage=rollout and stage=monitor read the served model (GET /v1/monitor); None = the endpoint that
    # stage=serve starts from this config (http://serve.host:serve.port + serve.route_prefix)
    url: str | None = None
    # stage=monitor reads drift and firing alerts from this Prometheus (one that scrapes Ray's metrics and loads
    # cluster/monitoring/slipway_rules.yml); None = drift scraped from the local Ray's metrics agents, no alerts
    prometheus_url: str | None = None

    def __post_init__(self) -> None:
        if self.profile_rows < 0:
            raise ValueError(f"serve.monitor.profile_rows={self.profile_rows}: expected 0 (all) or more rows")
        if self.max_predictions < 1:
            raise ValueError(f"serve.monitor.max_predictions={self.max_predictions}: expected at least 1")
        for key in ("drift_window_s", "publish_interval_s", "feedback_ttl_s", "quality_window_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"serve.monitor.{key}={getattr(self, key)}: expected a positive number of seconds")
        if self.drift_window_s < self.publish_interval_s:
            raise ValueError(f"serve.monitor.drift_window_s={self.drift_window_s} is shorter than "
                             f"serve.monitor.publish_interval_s={self.publish_interval_s}: a window holds whole "
                             "publishing intervals")


@dataclass
class RolloutConfig:
    """stage=rollout (serve/rollout.py): the canary's traffic share steps up while the judge (serve/judge.py)
    compares it with production serving at the same time; it ends promoted or rolled back by itself."""

    steps: list[float] = field(default_factory=lambda: [1.0, 5.0, 25.0, 50.0, 100.0])  # canary %; 100 = promote
    bake_s: float = 60.0  # at each step, traffic this long before the judge's first look
    look_interval_s: float = 30.0  # between the judge's looks at one step
    max_looks: int = 10  # a step still inconclusive at its last look rolls the canary back
    min_samples: int = 200  # requests (and labelled rows) each arm needs before a metric is judged
    alpha: float = 0.05  # the chance of rolling back a canary as good as production, over the whole rollout
    latency_tolerance_ms: float = 10.0  # the canary may be this much slower (median shift) ...
    latency_tolerance_ratio: float = 0.2  # ... or this share of production's median, whichever is more
    error_tolerance: float = 0.005  # extra share of 5xx answers the canary may have
    quality_tolerance: float = 0.01  # AUC (rankers) or mean feedback score (LLMs) the canary may lose
    critical: list[str] = field(default_factory=lambda: ["latency", "errors", "quality"])  # fail alone, at once
    resamples: int = 1000  # bootstrap resamples of the quality interval
    lease_s: float = 300.0  # a rollout whose command wrote nothing for this long may be continued by another

    def __post_init__(self) -> None:
        steps = list(self.steps)
        if not steps or any(not 0 < step <= 100 for step in steps) or steps != sorted(set(steps)) or steps[-1] != 100:
            raise ValueError(f"serve.rollout.steps={steps}: expected increasing percentages in (0, 100] ending at 100 "
                             "(the promotion)")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"serve.rollout.alpha={self.alpha}: expected a probability in (0, 0.5)")
        for key in ("max_looks", "min_samples", "resamples"):
            if getattr(self, key) < 1:
                raise ValueError(f"serve.rollout.{key}={getattr(self, key)}: expected at least 1")
        for key in ("bake_s", "look_interval_s", "latency_tolerance_ms", "latency_tolerance_ratio", "error_tolerance",
                    "quality_tolerance"):
            if getattr(self, key) < 0:
                raise ValueError(f"serve.rollout.{key}={getattr(self, key)}: expected 0 or more")
        unknown = sorted(set(self.critical) - {"latency", "errors", "quality"})
        if unknown:
            raise ValueError(f"serve.rollout.critical names {unknown}; the metrics are latency, errors and quality")
        if not self.lease_s > self.look_interval_s:
            raise ValueError(f"serve.rollout.lease_s={self.lease_s} must be longer than serve.rollout.look_interval_s="
                             f"{self.look_interval_s}: a running rollout writes its state at every look")


@dataclass
class ServeConfig:
    """Promotion and serving (conf/serve/): export the best checkpoint, gate it against production, register it,
    and serve the registry's aliases with Ray Serve."""

    model: str | None = None  # the registry's model name; None = the experiment's name (+exp=NAME)
    source: str | None = None  # stage=promote: a run_dir or sweep_dir; None = what this command trained
    registry: str = "${paths.root}/registry"  # a pyarrow filesystem URI: a local path, file://, s3://, gs://
    # The eval gate: both models are scored on the challenger's held-out split.
    min_improvement: float = 0.0  # the challenger must beat production by more than this, in metric units
    force: bool = False  # promote even if the gate says no (the decision is still recorded)
    eval_rows: int | None = None  # held-out rows scored; None = the rows training evaluated on; 0 = all
    # What the gate compares: None = the family's metric on the held-out split (val_loss, auc); or an
    # lm-evaluation-harness score of a local task, "lm_eval:TASK:METRIC[,FILTER]" (e.g. lm_eval:slipway_choice:acc),
    # with the task's YAML in gate_tasks (an LLM only; eval_rows, when > 0, is lm-eval's limit of documents)
    gate_metric: str | None = None
    gate_tasks: str | None = None  # a directory of lm-eval task YAML files (and their local data files)
    gate_mode: MetricMode | None = None  # max or min; None = the metric's own direction (acc, exact_match: max)
    reason: str | None = None  # recorded with the alias move; None = a generated one
    # stage=rollback: production goes back to this version; None = the version production held before
    to_version: int | None = None
    canary_version: int | None = None  # a registered version that gets canary_percent of the traffic
    canary_percent: float = 0.0
    # Shadow traffic: this share of requests is also sent to shadow_version, whose answers only the watcher sees
    # (stage=shadow, or stage=serve with these set); 0 removes the shadow
    shadow_version: int | None = None
    shadow_percent: float = 0.0
    # The endpoint
    host: str = "127.0.0.1"  # localhost only unless you say otherwise
    port: int = 8000
    route_prefix: str = "/"  # where this model's API lives; give each model its own to serve several at once
    api_key: str | None = None  # set: every request but GET /healthz needs `Authorization: Bearer <api_key>`
    block: bool = True  # stage=serve keeps serving until Ctrl-C; false returns once the endpoint answers
    refresh_s: float = 2.0  # how often replicas re-read the registry's aliases (rollback from anywhere)
    # Replicas of each model deployment, autoscaled by Ray Serve
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0
    max_ongoing_requests: int = 16  # ranker requests a replica works on at once (LLMs: max_running_requests)
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; a fraction shares a GPU between replicas
    health_check_period_s: float = 5.0
    graceful_shutdown_timeout_s: float = 20.0  # in-flight requests get this long to finish on a swap or stop
    # Requests a replica holds waiting beyond those it works on (an LLM's: in its engine's queue); more get 503
    # with Retry-After rather than an ever longer wait
    max_queued_requests: int = 64
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before they are read (256 Criteo rows: ~0.2 MiB)
    # Exports (stage=promote): weights in this dtype (auto: bf16 if the run trained on GPUs, else fp32), in
    # safetensors files of at most this many GB (LLMs; a larger single tensor gets a file of its own)
    export_dtype: Precision = Precision.auto
    export_shard_gb: float = 5.0
    # stage=export: copy a registered version (serve.version, default production) out to this directory
    export_dir: str | None = None
    version: int | None = None
    # LLM requests
    max_tokens_limit: int = 256  # the largest max_tokens a request may ask for
    # The batching engine (serve/engine.py), per loaded version: sequences generated together (KV-cache slots of
    # max_seq_len each), and tokens per forward step (decode tokens first, then chunks of new prompts)
    max_running_requests: int = 16
    max_batched_tokens: int = 256
    # Which engine runs an LLM's versions. vllm needs GPUs and the vllm group (SLIPWAY_EXTRAS=vllm bash
    # scripts/setup.sh); it takes the same limits above (vLLM's max_num_seqs and max_num_batched_tokens), and
    # vllm_engine_kwargs go to vLLM's engine on top of ours (e.g. {dtype: bfloat16, tensor_parallel_size: 2}).
    engine: ServeEngine = ServeEngine.native
    vllm_engine_kwargs: dict[str, Any] = field(default_factory=dict)
    accelerator_type: str | None = None  # vllm: the GPU type its replicas need, in Ray's names (H100, A100, L4)
    sample_prompt: str = "def "  # printed with its completion once the endpoint is up
    # Ranker requests
    max_candidates: int = 256
    max_batch_size: int = 64  # candidates of many requests are scored together by @serve.batch
    batch_wait_timeout_s: float = 0.005  # waited only while other requests are being ranked on the replica
    # stage=optimize (serve/optimize.py): one child version per method (trainers/optimizations/) derived from
    # serve.version (default production), measured, and registered only if its gate metric on the held-out split
    # is at most optimize_max_quality_loss worse than the parent's, relative to it (0.01: 1%; for an AUC of 0.78,
    # a drop of up to 0.0078). Speed is the replica's forward at optimize_batch_sizes (null: the family's serving
    # sizes), timed for optimize_time_s each; Wanda pruning reads optimize_calibration_rows training rows.
    optimize: list[str] = field(default_factory=list)
    optimize_max_quality_loss: float = 0.01
    optimize_batch_sizes: list[int] | None = None
    optimize_time_s: float = 2.0
    optimize_calibration_rows: int = 64
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    def __post_init__(self) -> None:
        # Checked at composition, before any stage runs: an empty key is an unset variable or a typo, and reading
        # it as "auth off" would serve openly what the user meant to protect. No key at all is `null`.
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("serve.api_key is empty: set a key, or leave serve.api_key unset (null) to serve "
                             "without authentication")


# The model, data and strategy groups hold one schema per model family, kind of data and strategy: each YAML
# file of conf/model/, conf/data/ and conf/strategy/ names its schema first in its defaults list, so
# `model.cross_layers` is a known key for a ranker and an error for an LLM. trainers/config.py registers them
# from the model families (trainers/families/) and strategies (trainers/strategies/) that own them.
@dataclass
class RootConfig:
    model: Any = MISSING  # a model family's schema (LLMConfig, RankerConfig)
    data: Any = MISSING  # its kind of data's schema (TextDataConfig, ClickLogDataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: Any = MISSING  # a strategy's schema: StrategyConfig and the strategy's own options
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # used with model.teacher only
    # What this command does, in order: train | sweep | promote | canary | rollback | registry | serve (launch.py
    # checks them together: which may follow which); `train` means the sweep when one is set.
    stages: list[str] = field(default_factory=lambda: ["train"])
    stage: str | None = None  # one stage: `stage=promote` is `stages=[promote]`
    plan: bool = False  # print the launch plan (memory, FLOPs, time, cost, fit) and start nothing
    submit: bool = False  # run this command on cluster.address through the Ray Jobs API and follow its logs

    def __post_init__(self):
        # Freezing the config (OmegaConf.to_object, on the driver and on every worker alike) fills the keys
        # left null to be derived; the plain config keeps them null, so the run name does not change with them.
        fill_derived_steps(self)


# ------------------------------------------------------------------------------------------- step counts
# Here rather than in conf/derived.py because freezing RootConfig calls it, and conf/derived.py imports this.
# A run evaluates (and checkpoints) about EVALUATIONS_PER_RUN times and warms the learning rate up over
# 1 / WARMUP_PARTS of its steps, however long it is.
EVALUATIONS_PER_RUN = 4
WARMUP_PARTS = 10


def fill_derived_steps(cfg: RootConfig) -> None:
    """Fill the step counts left null from trainer.max_steps (RootConfig.__post_init__ calls it when the config
    is frozen). A default must never make a shortened run invalid (`sweep=asha trainer.max_steps=24` used to be
    refused for a grace period of 50), so the defaults scale with the run; a value the user set stays as set
    and is checked as such (trainers/run.py: check_config, trainers/sweep.py: validate_sweep)."""
    trainer, sweep = cfg.trainer, cfg.sweep
    steps = trainer.max_steps
    if trainer.warmup_steps is None:
        trainer.warmup_steps = max(0, steps // WARMUP_PARTS)
    if trainer.eval_every_n_steps is None:
        trainer.eval_every_n_steps = _derived_eval_interval(steps, sweep)
    if cfg.checkpoint.every_n_steps is None:  # at evaluations: a checkpoint is ranked by the metric reported with it
        cfg.checkpoint.every_n_steps = trainer.eval_every_n_steps
    if sweep.scheduler == SweepScheduler.asha and sweep.grace_period is None:
        sweep.grace_period = trainer.eval_every_n_steps  # a trial can be judged from its first evaluation on


def _derived_eval_interval(steps: int, sweep: SweepConfig) -> int:
    # With ASHA an evaluation lands on each rung (grace_period x reduction_factor^k) and two rungs come before
    # the last step: grace = max_steps / reduction_factor^2. Otherwise EVALUATIONS_PER_RUN evaluations.
    divisor = EVALUATIONS_PER_RUN
    if sweep.scheduler == SweepScheduler.asha and sweep.reduction_factor > 1:
        divisor = sweep.reduction_factor ** 2
    return max(1, math.floor(steps / divisor))
