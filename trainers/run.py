"""The driver recipe of one training run, used by a plain run (launch.py) and by every sweep trial
(trainers/sweep.py) alike: check, prepare the data, write the run files, hand the data to Ray, fit, record.

    run = Run(cfg, config=<the plain, redacted config>, experiment=..., run_dir=...)
    summary = train(run)                       # connects to Ray itself; a sweep trial passes connect=False

The typed config (`cfg`) and the plain one (`config`) come from one derivation (launch.py: plain_config,
config_from_dict, redacted): the plain one is what config.yaml holds, what the run name hashes and what the
workers rebuild their typed config from, so the two cannot drift.
"""

import logging
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from cluster.capacity import WORKER_GROUP_START_TIMEOUT_ENV
from cluster.connection import REPO_ROOT
from conf.derived import (
    check_bounds,
    check_serve,
    is_elastic,
    parse_teacher,
    resolve_address,
    scaling_workers,
    uses_ray,
    worker_range,
)
from conf.schema import ClusterConfig, PlacementStrategy, Precision, ResumePolicy, RootConfig
from trainers import outputs, session, startup
from trainers.distill import TeacherSource, check_teacher_data
from trainers.families import Family, get_family
from trainers.loop import CRASH_AT_STEP_ENV, train_loop
from trainers.strategies import all_strategies, get_strategy

logger = logging.getLogger(__name__)

RAY_START_TIMEOUT_S = 60.0  # Ray Train's own wait for a worker group's placement (DEFAULT_WORKER_GROUP_START_TIMEOUT_S)
# The per-try wait this module exported, told apart from one the user exported (which is kept as it is).
_exported_start_timeout: str | None = None

@dataclass(frozen=True)
class Run:
    """One training run as its driver knows it."""

    cfg: RootConfig  # typed; holds secrets (the serve stage needs serve.api_key)
    config: dict  # plain and redacted: config.yaml, the run name's hash, W&B and the workers
    experiment: str
    run_dir: Path
    # model.teacher resolved to a local export directory (launch.py: resolve_teacher); None without a teacher
    teacher: TeacherSource | None = None
    # Train in this process rather than in a Ray Train worker group: a sweep's 1-worker trial, whose Tune process is
    # reused from trial to trial with its imports (trainers/sweep.py: trials_in_process; trainers/session.py).
    in_process: bool = False


# ------------------------------------------------------------------------------------------------- checks

def preflight(cfg: RootConfig, *, data=None) -> None:
    """Every check a run makes before it starts anything, so that a mistake is an error naming the key, not a
    hang or a traceback minutes later. Without `data`: the config (check_config) and, for a run on an
    embedded Ray, this machine's GPUs (before any data is prepared); with the prepared data: that an epoch
    holds a global batch and this machine holds the workers' training state. (The cluster's capacity and
    shared storage are checked once connected: _connect.)"""
    from cluster.capacity import check_local_gpus

    if data is None:
        check_config(cfg)
        check_local_gpus(cfg.cluster)
        return
    _check_data_fits(cfg, train_rows=data.train_rows, val_rows=data.val_rows)
    check_memory_fits(cfg, data=data.to_dict())


def check_config(cfg: RootConfig) -> None:
    """What the config alone decides, across keys: a plan and a submission check it too, and a sweep checks
    it at every candidate value of its space."""
    # Ranges first (conf/derived.py: BOUNDS): the checks after them divide by batch sizes and head counts.
    check_bounds(cfg)
    check_serve(cfg)  # a train command may serve too (+exp=quickstart): its mistakes surface before training
    family = get_family(cfg.model.family)
    _check_family_fits(cfg, family)
    if cfg.model.teacher is not None:
        parse_teacher(cfg.model.teacher)  # its syntax; what it names is resolved with the registry (launch.py)
    _check_worker_counts(cfg)
    _check_placement(cfg)
    _check_launcher(cfg)


def _check_launcher(cfg: RootConfig) -> None:
    """cluster.launcher=processes trains on this machine without Ray: what needs Ray is refused by name."""
    if uses_ray(cfg):
        return
    cluster, why = cfg.cluster, None
    if resolve_address(cluster) is not None or cfg.submit:
        why = (f"cluster.address={resolve_address(cluster)} (or RAY_ADDRESS) joins a Ray cluster"
               + (" and submit=true sends the run to its Jobs API" if cfg.submit else ""))
    elif is_elastic(cluster) or cluster.autoscaling:
        why = (f"cluster.num_workers={cluster.num_workers} asks for elastic training" if is_elastic(cluster)
               else "cluster.autoscaling=true waits for nodes") + ", which Ray Train does"
    elif cfg.sweep.name != "none":
        why = (f"sweep={cfg.sweep.name} runs its trials under Ray Tune (their 1-worker trials already train in "
               "their trial's own process, without a worker group)")
    elif cluster.use_gpu and cluster.gpus_per_worker != 1:
        why = f"each local process takes one whole GPU, not cluster.gpus_per_worker={cluster.gpus_per_worker:g}"
    if why:
        raise ValueError(f"cluster.launcher=processes trains on this machine without Ray, but {why}; use "
                         "cluster.launcher=ray (the default)")


def _check_worker_counts(cfg: RootConfig) -> None:
    """Every world size the run may train at must split the global batch into whole micro batches: an elastic
    run (`cluster.num_workers=[min, max]`) can resize to any count in between."""
    low, high = worker_range(cfg.cluster)
    trainer, strategy = cfg.trainer, get_strategy(cfg.strategy.name)
    for workers in range(low, high + 1):
        strategy.check_world(cfg.strategy, workers)
        if trainer.global_batch_size % (workers * trainer.micro_batch_size):
            raise ValueError(
                f"trainer.global_batch_size={trainer.global_batch_size} must be a multiple of cluster.num_workers="
                f"{workers} x trainer.micro_batch_size={trainer.micro_batch_size}"
                + (f" (an elastic run of cluster.num_workers={cfg.cluster.num_workers} may train on {workers} "
                   "workers)" if low != high else "")
            )
    if is_elastic(cfg.cluster) and not strategy.elastic:
        elastic = [name for name, spec in all_strategies().items() if spec.elastic]
        raise ValueError(
            f"cluster.num_workers={cfg.cluster.num_workers} (elastic) needs strategy={' or '.join(elastic)}, not "
            f"strategy={cfg.strategy.name}: its checkpoints cannot be loaded by another number of workers"
        )


def _check_placement(cfg: RootConfig) -> None:
    """What the workers' placement can never get: an embedded local Ray is one node, so STRICT_SPREAD (one
    worker per node) cannot place two workers and Ray Train would wait for a second node forever. A plan sizes a
    cluster that is not this machine, and a cluster's own nodes are checked once connected (build_trainer)."""
    cluster = cfg.cluster
    if cluster.use_gpu and not cluster.gpus_per_worker > 0:
        raise ValueError(f"cluster.gpus_per_worker={cluster.gpus_per_worker} must be above 0 with cluster.use_gpu=true")
    low = worker_range(cluster)[0]
    embedded = resolve_address(cluster) is None and not cfg.plan
    if embedded and cluster.placement_strategy == PlacementStrategy.STRICT_SPREAD and low > 1:
        raise ValueError(
            f"cluster.placement_strategy=STRICT_SPREAD puts each of the cluster.num_workers={cluster.num_workers} "
            f"workers on its own node, but the embedded local Ray is one node; use cluster.placement_strategy=PACK "
            f"or SPREAD, or set cluster.address to a cluster of {low} nodes or more"
        )


def _check_family_fits(cfg: RootConfig, family: Family) -> None:
    """The data kind, and options that only one family has, must match model.family."""
    if cfg.data.kind not in family.data_schemas:
        raise ValueError(
            f"model.family={family.name} trains on {' or '.join(family.data_schemas)} data ({family.data_choices}), "
            f"but the data config is data.kind={cfg.data.kind}"
        )
    if cfg.trainer.activation_checkpointing and not family.supports_activation_checkpointing:
        raise ValueError(f"trainer.activation_checkpointing does not apply to model.family={family.name}: "
                         "it has no blocks worth recomputing")
    if cfg.trainer.compile:
        _check_compile_applies(cfg, family)
    family.check_config(cfg.model, cfg.data)


def _check_compile_applies(cfg: RootConfig, family: Family) -> None:
    """trainer.compile=true compiles transformer blocks: a ranker's blocks are embedding tables, and ZeRO-3's
    parameter hooks run inside each block's submodules, where they break the graph (StrategySpec.compiles_blocks)."""
    if not family.supports_activation_checkpointing:
        raise ValueError(f"trainer.compile=true does not apply to model.family={family.name}: it compiles "
                         "transformer blocks, and this family has none")
    if not get_strategy(cfg.strategy.name).compiles_blocks:
        able = [name for name, spec in all_strategies().items() if spec.compiles_blocks]
        raise ValueError(f"trainer.compile=true is not supported with strategy={cfg.strategy.name}; use "
                         f"strategy={' or '.join(able)}, or trainer.compile=false")


def _check_data_fits(cfg: RootConfig, *, train_rows: int, val_rows: int) -> None:
    """An epoch must hold one global batch, or training would never step, and validation one row at least.
    A validation split smaller than one eval batch (micro_batch_size x workers) is fine: the evaluation pads
    its short last batch and masks the padding out (trainers/loop.py: evaluate)."""
    if train_rows < cfg.trainer.global_batch_size:
        raise ValueError(
            f"the prepared training split has {train_rows} rows, fewer than trainer.global_batch_size="
            f"{cfg.trainer.global_batch_size}; add data (data.max_chars for text, data.rows for click logs) or "
            f"lower the batch size"
        )
    if val_rows < 1:
        raise ValueError(
            f"the prepared validation split is empty ({train_rows} training rows, 0 validation rows): there is "
            f"nothing to evaluate checkpoints on; raise data.val_fraction or add data"
        )


def check_memory_fits(cfg: RootConfig, *, data: dict) -> None:
    """A CPU run on this machine must hold its workers' training state in memory: a clear error up front
    instead of the kernel's OOM killer minutes later. GPU and remote clusters are not checked from here
    (plan=true sizes them)."""
    import psutil

    from cluster.memory import ModelShape

    if cfg.cluster.use_gpu or resolve_address(cfg.cluster):
        return
    workers = worker_range(cfg.cluster)[1]
    params = get_family(cfg.model.family).count_parameters(cfg.model, data=data)
    # What stays resident (weights, gradients, optimizer states) depends only on the parameter count; counting
    # it from the config spares the driver building the model (the first meta-device build costs about 1 s).
    shape = ModelShape(total=params, embedding=0, largest_layer=0, largest_block=0)
    states = get_strategy(cfg.strategy.name).model_states(
        cfg.strategy, shape=shape, world=workers, precision=Precision.fp32, accum_steps=1, checkpointing=False)
    needed = states.resident * workers
    available = psutil.virtual_memory().total
    if needed > available:
        raise ValueError(
            f"model.preset={cfg.model.preset} has {params / 1e9:.2f}B parameters: weights, gradients and "
            f"Adam state on {workers} CPU worker(s) with strategy={cfg.strategy.name} need about "
            f"{needed / 2**30:.0f} GiB, more than this machine's {available / 2**30:.0f} GiB; run it with "
            f"cluster=gpu_node, or shrink the model (for rankers, data.hash_buckets)"
        )


# ----------------------------------------------------------------------------------------------- the run

def prepare_data(cfg: RootConfig):
    """The prepared data for the run (built once and cached under paths.data_cache), checked against it."""
    family = get_family(cfg.model.family)
    prepared = family.prepare_data(cfg.model, cfg.data, cache_root=Path(cfg.paths.data_cache).resolve())
    preflight(cfg, data=prepared)
    return prepared


def train(run: Run, *, connect: bool = True, callbacks: list | None = None) -> dict:
    """The whole recipe for one run; returns summary.json's content. A run that already finished is not
    trained again. A sweep trial passes connect=False (its driver connected and checked the cluster) and the
    callbacks that report to Tune."""
    from datasets.pipeline import build_local_datasets, build_ray_datasets

    preflight(run.cfg)
    outputs.check_writable(Path(run.cfg.paths.data_cache), key="paths.data_cache")
    outputs.check_writable(run.run_dir.parent, key="paths.root")
    prepared = prepare_data(run.cfg)
    _check_teacher(run, data=prepared.to_dict())
    with outputs.run_lock(run.run_dir):
        identity = _data_identity(run, prepared)
        _check_resumable(run, identity)
        outputs.write_run_files(run.run_dir, config=run.config, experiment=run.experiment, data_identity=identity,
                                repo=REPO_ROOT, teacher=run.teacher.to_dict() if run.teacher else None)
        previous = outputs.read_summary(run.run_dir)
        if previous and previous.get("status") == "finished":
            logger.info("%s already finished (%d steps); not training again", run.run_dir.name, previous["steps"])
            return previous
        startup.mark("data_ready")
        if uses_ray(run.cfg):
            if connect:
                _connect(run.cfg)
            startup.mark("ray_ready")
            datasets = build_ray_datasets(prepared, in_memory_limit_mb=run.cfg.data.in_memory_limit_mb)
        else:
            datasets = build_local_datasets(prepared)
        startup.mark("datasets_ready")
        startup.write_driver_marks(run.run_dir)
        summary = fit(run, data=prepared.to_dict(), datasets=datasets, callbacks=callbacks)
    logger.info("finished %s: %s", run.run_dir.name, outputs.headline(summary, keys=_family(run).headline_keys))
    if startup.is_marking() and (breakdown := startup.describe(run.run_dir)):
        logger.info("start-up: %s", breakdown)
    return summary


def _check_teacher(run: Run, *, data: dict) -> None:
    """A run with model.teacher needs it resolved (launch.py does it, with the registry) and fitting the student's
    prepared data: a teacher with another vocabulary or other tables would give logits of other classes."""
    if run.cfg.model.teacher is None:
        assert run.teacher is None, "a resolved teacher without model.teacher"
        return
    if run.teacher is None:
        raise ValueError(f"model.teacher={run.cfg.model.teacher} was not resolved to an export directory: runs "
                         "with a teacher start from launch.py, which resolves it")
    family = _family(run)
    check_teacher_data(run.teacher, family=family, payload=family.checkpoint_payload(run.cfg.model, data))


def _data_identity(run: Run, prepared) -> dict:
    files = _family(run).checkpoint_payload(run.cfg.model, prepared.to_dict())["files"]
    identity = outputs.data_identity(prepared.fingerprint, files)
    if run.teacher is not None:  # what a distilled run learned from besides its data
        identity["teacher"] = run.teacher.identity
    return identity


def _check_resumable(run: Run, identity: dict) -> None:
    """A rerun resumes its checkpoints only if they were trained on the same data and side files: weights
    trained on other token ids (an edited corpus, another Python's stdlib, a retrained tokenizer) would go on
    training, or a finished run would be promoted and scored on rows it never saw."""
    policy, run_dir = run.cfg.checkpoint.resume, run.run_dir
    if not outputs.has_training_state(run_dir):
        return
    if policy == ResumePolicy.fresh:
        logger.warning("checkpoint.resume=fresh: moved the previous %s to %s; training starts at step 0",
                       run_dir.name, outputs.set_aside(run_dir))
        return
    changes = outputs.identity_changes(run_dir, identity)
    if not changes:
        return
    if policy == ResumePolicy.anyway:
        logger.warning("checkpoint.resume=anyway: resuming %s although %s changed", run_dir.name, " and ".join(changes))
        return
    raise ValueError(
        f"{run_dir} was trained on other data: {' and '.join(changes)} changed since its last launch, so its "
        "checkpoints would resume on other rows and token ids. Rerun with checkpoint.resume=fresh to set that "
        "directory aside and start again, or checkpoint.resume=anyway to continue from its checkpoints on purpose"
    )


def _connect(cfg: RootConfig) -> None:
    from cluster.capacity import check_capacity, check_shared_storage
    from cluster.connection import connect

    connect(cfg.cluster)
    check_capacity(cfg.cluster)
    check_shared_storage(Path(cfg.paths.root).resolve())


def _family(run: Run) -> Family:
    return get_family(run.cfg.model.family)


def _worker_env() -> dict[str, str]:
    """Environment variables the workers need from the driver (the test-only fault hook)."""
    return {key: os.environ[key] for key in (CRASH_AT_STEP_ENV,) if key in os.environ}


def build_trainer(run: Run, *, data: dict, datasets: dict, callbacks: list | None = None):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, family = run.cfg, _family(run)
    worker_env = _worker_env()
    resources = _worker_resources(cfg.cluster)
    _check_nodes_can_place(cfg.cluster, resources=resources)
    startup_retries = _startup_retries(cfg.cluster)
    logger.info("asking Ray for %s; a placement not met within cluster.scale_up_timeout_s=%gs fails the run",
                placement_request(cfg.cluster), cfg.cluster.scale_up_timeout_s)
    return TorchTrainer(
        train_loop,
        train_loop_config=_loop_config(run, data=data),
        scaling_config=ray.train.ScalingConfig(num_workers=scaling_workers(cfg.cluster), use_gpu=cfg.cluster.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.cluster.placement_strategy.value),
        run_config=ray.train.RunConfig(
            name=run.run_dir.name,
            storage_path=str(run.run_dir.parent),  # Ray Train's experiment directory is the run directory itself
            # Ray Train retries a worker group that cannot be placed as a controller failure, forever by default
            # (-1): bounded here, a placement that can never be met fails within cluster.scale_up_timeout_s.
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures,
                                                   controller_failure_limit=startup_retries),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep_top_k, checkpoint_score_attribute=family.metric,
                checkpoint_score_order=family.metric_mode,
            ),
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
            callbacks=callbacks,  # a sweep trial passes its evaluations on to Tune (trainers/sweep.py)
        ),
        # Every worker reads the whole ordered stream and takes its rows (see trainers/loop.py).
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
    )


def _loop_config(run: Run, *, data: dict) -> dict:
    """What train_loop is called with: plain data only (Ray ships it to every worker)."""
    return {"cfg": run.config, "data": data, "run_dir": str(run.run_dir), "run_name": run.run_dir.name,
            "teacher": run.teacher.to_dict() if run.teacher else None, "mark_startup": startup.is_marking()}


def _worker_resources(cluster: ClusterConfig) -> dict[str, float]:
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    return resources


def placement_request(cluster: ClusterConfig) -> str:
    """What the run asks Ray to place and what the connected cluster has, in words, e.g. "2 worker(s) x
    {CPU: 1} with cluster.placement_strategy=STRICT_SPREAD; the Ray cluster has 1 alive node(s) with 2 CPU (2
    free)": logged before Ray Train starts, and for an error when the placement cannot be met."""
    import ray

    low, high = worker_range(cluster)
    workers = f"{low}" if low == high else f"{low} to {high}"
    resources = _worker_resources(cluster)
    per_worker = ", ".join(f"{name}: {amount:g}" for name, amount in resources.items())
    alive = [node for node in ray.nodes() if node["Alive"]]
    total, free = ray.cluster_resources(), ray.available_resources()
    has = ", ".join(f"{total.get(name, 0.0):g} {name} ({free.get(name, 0.0):g} free)" for name in resources)
    return (f"{workers} worker(s) x {{{per_worker}}} with cluster.placement_strategy={cluster.placement_strategy}; "
            f"the Ray cluster has {len(alive)} alive node(s) with {has}")


def _check_nodes_can_place(cluster: ClusterConfig, *, resources: dict[str, float]) -> None:
    """A strict placement that the connected cluster's nodes can never hold fails now, naming both sides,
    unless an autoscaler may add nodes (then the wait is bounded by cluster.scale_up_timeout_s instead)."""
    import ray

    if cluster.autoscaling or cluster.placement_strategy not in (PlacementStrategy.STRICT_SPREAD,
                                                                 PlacementStrategy.STRICT_PACK):
        return
    low = worker_range(cluster)[0]
    # How many workers each alive node could hold on its own.
    capacities = [min(math.floor(node["Resources"].get(name, 0.0) / amount + 1e-9)
                      for name, amount in resources.items() if amount > 0)
                  for node in ray.nodes() if node["Alive"]]
    if cluster.placement_strategy == PlacementStrategy.STRICT_SPREAD:
        placeable, wants = sum(capacity >= 1 for capacity in capacities) >= low, f"{low} nodes with a worker each"
    else:
        placeable, wants = max(capacities, default=0) >= low, f"one node with all {low} workers"
    if not placeable:
        raise ValueError(f"cluster.placement_strategy={cluster.placement_strategy} needs {wants}, which this "
                         f"cluster's nodes cannot hold: {placement_request(cluster)}; use PACK or SPREAD, or set "
                         "cluster.autoscaling=true if the cluster adds nodes")


def _startup_retries(cluster: ClusterConfig) -> int:
    """Ray Train's controller_failure_limit: how many more times it may try to place the worker group, each try
    waiting RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, so that all tries together take cluster.scale_up_timeout_s.
    A wait the user exported is kept; otherwise one try lasts the whole timeout while an autoscaler adds nodes,
    and Ray's own 60 s without one (an elastic run resizes to what the cluster has between tries)."""
    global _exported_start_timeout
    exported = os.environ.get(WORKER_GROUP_START_TIMEOUT_ENV)
    if exported is not None and exported != _exported_start_timeout:
        try:
            attempt = float(exported)
        except ValueError:
            raise ValueError(f"{WORKER_GROUP_START_TIMEOUT_ENV}={exported!r} must be a number of seconds") from None
    else:
        attempt = cluster.scale_up_timeout_s
        if not cluster.autoscaling:
            attempt = min(RAY_START_TIMEOUT_S, attempt)
        # Ray Train's driver passes it on to its controller, which reads it when it starts the workers.
        _exported_start_timeout = os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = f"{attempt:g}"
    retries = max(0, math.ceil(cluster.scale_up_timeout_s / max(attempt, 1e-3)) - 1)
    # An elastic run's next try asks for what the cluster has left after a lost node, not for the same again.
    return max(retries, 1) if is_elastic(cluster) else retries


def fit(run: Run, *, data: dict, datasets: dict, callbacks: list | None = None) -> dict:
    """Train to completion (resuming from the run's latest checkpoint) and write summary.json and loss.png.

    Raises KeyboardInterrupt when the user pressed Ctrl-C: Ray Train's own SIGINT handler aborts the run
    and either returns early or exits the process, and both must not read as a finished run.
    """
    if run.in_process or not uses_ray(run.cfg):
        return _fit_without_ray(run, data=data, datasets=datasets, callbacks=callbacks)
    from ray.train import TrainingFailedError

    family, run_dir = _family(run), run.run_dir
    trainer = build_trainer(run, data=data, datasets=datasets, callbacks=callbacks)
    record = _summary_writer(run)
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        record(status="failed", best_checkpoint=None, latest_checkpoint=None,
               error=str(err).splitlines()[0] if str(err) else repr(err))
        outputs.plot_losses(run_dir)
        named = _named_placement_timeout(err, cluster=run.cfg.cluster)
        if named is err:
            raise
        raise named from err
    except SystemExit as exit_request:  # Ray Train's SIGINT handler, when the controller is already gone
        record(status="interrupted", best_checkpoint=None, latest_checkpoint=None)
        raise KeyboardInterrupt from exit_request
    best = _best_checkpoint_path(result, metric=family.metric, mode=family.metric_mode)
    latest = result.checkpoint.path if result.checkpoint else None
    return _record_end(run, record, best=best, latest=latest)


def _summary_writer(run: Run):
    family = _family(run)
    return partial(outputs.write_summary, run.run_dir, metric=family.metric, mode=family.metric_mode,
                   summary_keys=family.summary_keys)


def _record_end(run: Run, record, *, best: str | None, latest: str | None) -> dict:
    """summary.json and loss.png for a run whose training returned: finished, stopped by a sweep's scheduler, or
    (short of trainer.max_steps otherwise) interrupted by Ctrl-C, which raises KeyboardInterrupt."""
    run_dir = run.run_dir
    if outputs.last_logged_step(run_dir) < run.cfg.trainer.max_steps:
        if outputs.stop_requested(run_dir):  # a sweep's scheduler ended this trial early (trainers/sweep.py)
            summary = record(status="stopped", best_checkpoint=best, latest_checkpoint=latest)
            outputs.plot_losses(run_dir)
            return summary
        record(status="interrupted", best_checkpoint=best, latest_checkpoint=latest)  # Ctrl-C before the end
        raise KeyboardInterrupt
    summary = record(status="finished", best_checkpoint=best, latest_checkpoint=latest)
    outputs.plot_losses(run_dir)
    return summary


def _fit_without_ray(run: Run, *, data: dict, datasets: dict, callbacks: list | None) -> dict:
    """Train in this process (a sweep's 1-worker trial; cluster.launcher=processes with one worker) or in local
    processes (cluster.launcher=processes), the checkpoint manager doing a Train controller's work with the reports
    (trainers/session.py, trainers/local.py); then record the run as fit() does. Under the processes launcher a
    failure restarts from the latest checkpoint up to checkpoint.max_failures times, as Ray Train restarts its
    worker group; a sweep's trial fails at once, as Tune's trials do (trainers/sweep.py)."""
    family, cfg = _family(run), run.cfg
    record = _summary_writer(run)
    storage = {"run_dir": run.run_dir, "keep_top_k": cfg.checkpoint.keep_top_k, "metric": family.metric,
               "mode": family.metric_mode, "callbacks": list(callbacks or [])}
    loop_config = {**_loop_config(run, data=data), "in_process": True}
    restarts = 0 if run.in_process else cfg.checkpoint.max_failures
    for attempt in range(restarts + 1):
        session.clear_staging(run.run_dir)  # parts of a checkpoint that a failed attempt did not finish
        try:
            _train_without_ray(cfg, loop_config=loop_config, storage=storage, datasets=datasets)
            break
        except KeyboardInterrupt:
            record(status="interrupted", best_checkpoint=None, latest_checkpoint=None)
            raise
        except Exception as err:
            if attempt < restarts:
                logger.warning("training failed (%s: %s); restarting from the latest checkpoint (restart %d of "
                               "checkpoint.max_failures=%d)", type(err).__name__, str(err).splitlines()[0],
                               attempt + 1, restarts)
                continue
            record(status="failed", best_checkpoint=None, latest_checkpoint=None,
                   error=f"{type(err).__name__}: {err}")
            outputs.plot_losses(run.run_dir)
            if run.in_process:
                raise  # a sweep's trial: Tune reports it
            from trainers.local import WorkersFailedError

            raise WorkersFailedError(f"{type(err).__name__}: {err}") from err
    kept = session.InProcessRun(**storage, datasets={}, device=torch.device("cpu"))
    best, latest = kept.best() or kept.latest(), kept.latest()
    return _record_end(run, record, best=str(best) if best else None, latest=str(latest) if latest else None)


def _train_without_ray(cfg: RootConfig, *, loop_config: dict, storage: dict, datasets: dict) -> None:
    from trainers import local

    workers = cfg.cluster.num_workers
    if workers == 1:
        # A GPU trial's process holds its GPU: Ray exposes it as the only visible device.
        device = local.worker_device(use_gpu=cfg.cluster.use_gpu, rank=0)
        had_group = torch.distributed.is_initialized()
        try:
            with session.in_process(session.InProcessRun(**storage, datasets=datasets, device=device)):
                train_loop(loop_config)
        finally:
            # A sweep's trial process keeps its group for the next trial (trainers/loop.py); a launch's run does not.
            if not uses_ray(cfg) and not had_group and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return
    local.run_processes(local.train_worker, world_size=workers, run_dir=storage["run_dir"],
                        use_gpu=cfg.cluster.use_gpu, args=(loop_config, {**storage, "callbacks": []}, datasets))


def _named_placement_timeout(error, *, cluster: ClusterConfig):
    """Ray Train's error for a worker group it could not place names neither the request nor the cluster: say
    both (the run failed within cluster.scale_up_timeout_s). Any other failure is returned as it was."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    if not isinstance(getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError):
        return error
    return ControllerError(RuntimeError(
        f"the workers could not be placed within cluster.scale_up_timeout_s={cluster.scale_up_timeout_s:g}s: "
        f"{placement_request(cluster)} ({error.controller_failure})"))


def _best_checkpoint_path(result, *, metric: str, mode: str) -> str | None:
    scored = [(metrics[metric], checkpoint.path) for checkpoint, metrics in (result.best_checkpoints or [])
              if metric in metrics]
    if not scored:
        return result.checkpoint.path if result.checkpoint else None
    pick = min if mode == "min" else max
    return pick(scored)[1]


# ------------------------------------------------------------------------------------------------ the plan

def plan(cfg: RootConfig):
    """The launch plan (cluster/plan.py) for `cfg`, sized with its model family and every strategy."""
    from cluster.plan import build_plan
    from trainers.strategies import all_strategies

    return build_plan(cfg, family=get_family(cfg.model.family), strategies=all_strategies())
