"""Ray Tune sweeps (DESIGN.md 2.7): each trial is a driver function that runs the same recipe as a plain run
(trainers/run.py: train) and passes its evaluations on to Tune through TuneReportCallback.

Layout: `<paths.root>/sweeps/<exp>-sweep-<hash8>/` is Tune's experiment directory. Each trial's training run
(config.yaml, manifest.json, metrics.jsonl, summary.json, checkpoints) is `<sweep_dir>/<trial_id>/`, which is
also where Tune keeps its files for that trial. The sweep's report is trials.csv, summary.json and trials.png.
Rerunning the same command restores the sweep: finished trials stay finished, and an interrupted trial's
TorchTrainer finds its run's latest checkpoint, as any rerun does.
"""

import logging
import math
import time
from pathlib import Path

from conf.schema import RootConfig, SweepScheduler, SweepSearcher
from trainers import outputs, sweep_report
from trainers.config import config_from_dict
from trainers.distill import TeacherSource
from trainers.families import get_family
from trainers.search_space import Dimension, check_candidates, parse_space, with_values

logger = logging.getLogger(__name__)

# A trial's own actor only launches and watches its Train run: a quarter CPU lets Tune place it anywhere.
TRIAL_DRIVER_CPUS = 0.25
# CPUs no trial may take, so that Ray Data read tasks can always be scheduled next to the training workers.
DATA_RESERVE_CPUS = 1.0
# Keys that change neither what a sweep computes nor which trials it draws.
SWEEP_HASH_EXCLUDED_KEYS = tuple(key for key in outputs.HASH_EXCLUDED_KEYS if key != "sweep") + (
    "sweep.max_concurrent_trials",
)


class SweepFailedError(RuntimeError):
    """Every trial of a sweep failed: there is no result to report."""


def is_sweep(cfg: RootConfig) -> bool:
    return cfg.sweep.name != "none"


def sweep_name(config: dict, *, experiment: str) -> str:
    """`<exp>-sweep-<hash8>`: the same command names the same sweep, so a rerun restores it."""
    return f"{experiment}-sweep-{outputs.config_hash(config, excluded=SWEEP_HASH_EXCLUDED_KEYS)[:8]}"


def metric_and_mode(cfg: RootConfig) -> tuple[str, str]:
    """`sweep.metric`/`sweep.mode`, defaulting to the model family's checkpoint metric and its direction."""
    family = get_family(cfg.model.family)
    metric = cfg.sweep.metric or family.metric
    if metric not in family.sweep_metrics:
        raise ValueError(f"sweep.metric={metric!r} is not a validation metric of model.family={cfg.model.family}; "
                         f"use one of {', '.join(family.sweep_metrics)}")
    return metric, str(cfg.sweep.mode or family.sweep_metrics[metric])


def validate_sweep(cfg: RootConfig, *, config: dict, check_trial) -> list[Dimension]:
    """Every sweep setting and every dimension of the space, checked before Ray starts. `check_trial(cfg)`
    is what a plain run checks of its config (trainers.run.check_config); it runs on the config with each
    dimension at each end of its range or at each of its choices."""
    sweep = cfg.sweep
    if sweep.num_samples < 1 or sweep.max_concurrent_trials < 0:
        raise ValueError(f"sweep.num_samples must be at least 1 and sweep.max_concurrent_trials at least 0 "
                         f"(0 = as many as fit), got {sweep.num_samples} and {sweep.max_concurrent_trials}")
    if not isinstance(cfg.cluster.num_workers, int):
        raise ValueError(f"cluster.num_workers={cfg.cluster.num_workers}: a sweep's trials need a fixed number of "
                         "workers (trials that resize would not be compared like for like)")
    metric_and_mode(cfg)
    if sweep.scheduler == SweepScheduler.asha:
        _check_asha(cfg)
    dimensions = parse_space(sweep, family=cfg.model.family, config=config, typed=cfg)
    for dimension in dimensions:
        if dimension.kind == "grid" and sweep.searcher != SweepSearcher.random:
            raise ValueError(f"{dimension.source}: grid dimensions need sweep.searcher=random; "
                             f"{sweep.searcher} samples its own points (use choice)")
        if dimension.key == "trainer.max_steps" and sweep.scheduler == SweepScheduler.asha:
            raise ValueError(f"{dimension.source}: ASHA compares trials at the same step, so every trial must "
                             "have the same trainer.max_steps")
    check_candidates(dimensions, config, check=lambda trial_config: check_trial(config_from_dict(trial_config)))
    return dimensions


def _check_asha(cfg: RootConfig) -> None:
    """The grace period and evaluation interval left null are derived to fit trainer.max_steps (conf/derived.py),
    so what fails here is a value the user set; they are checked in the order they are derived from."""
    grace, max_steps, every = grace_period(cfg), cfg.trainer.max_steps, cfg.trainer.eval_every_n_steps
    if cfg.sweep.reduction_factor <= 1:
        raise ValueError(f"sweep.reduction_factor must be above 1, got {cfg.sweep.reduction_factor}")
    if max_steps < 2:
        raise ValueError(f"trainer.max_steps={max_steps}: ASHA stops trials between evaluations, so a trial needs "
                         "2 steps at least")
    if every >= max_steps:
        raise ValueError(f"ASHA decides on evaluations: trainer.eval_every_n_steps={every} must be below "
                         f"trainer.max_steps={max_steps}, or no trial could be stopped early (leave it unset to derive "
                         "it from trainer.max_steps)")
    if not 1 <= grace < max_steps:
        raise ValueError(f"sweep.grace_period={grace} must be at least 1 and below trainer.max_steps={max_steps} "
                         "(leave it unset: the first evaluation)")


def check_model_candidates(dimensions: list[Dimension], config: dict, *, data: dict) -> None:
    """Build the model on the meta device (no memory) at each candidate of every model dimension, so that a
    shape no trial could build (heads that do not divide the width...) fails before any trial starts."""
    import torch

    def build(trial_config: dict) -> None:
        cfg = config_from_dict(trial_config)
        get_family(cfg.model.family).build_model(cfg.model, data=data, device=torch.device("meta"))

    check_candidates([d for d in dimensions if d.key.startswith("model.")], config, check=build)


def grace_period(cfg: RootConfig) -> int:
    """sweep.grace_period as set, or as derived when the config was frozen (the first evaluation)."""
    return cfg.sweep.grace_period if cfg.sweep.grace_period is not None else cfg.trainer.eval_every_n_steps


# ------------------------------------------------------------------------------------------------ resources

def trials_in_process(cfg: RootConfig) -> bool:
    """Whether each trial trains in its Tune trial's own process (sweep.in_process_trials: 1-worker trials)."""
    return cfg.sweep.in_process_trials and cfg.cluster.num_workers == 1


def trial_resources(cfg: RootConfig) -> dict[str, float]:
    """What one trial's Train workers hold (a worker-group trial's driver aside)."""
    resources = {"CPU": cfg.cluster.num_workers * cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        resources["GPU"] = cfg.cluster.num_workers * cfg.cluster.gpus_per_worker
    return resources


def trial_process_resources(cfg: RootConfig) -> dict[str, float]:
    """What a trial's own Tune process asks for: the worker's share when it trains there, else a driver's."""
    return trial_resources(cfg) if trials_in_process(cfg) else {"CPU": TRIAL_DRIVER_CPUS}


def _driver_cpus(cfg: RootConfig) -> float:
    return 0.0 if trials_in_process(cfg) else TRIAL_DRIVER_CPUS


def trials_at_once(cfg: RootConfig, *, cluster_resources: dict[str, float]) -> int:
    """How many trials run together: as many as the cluster's resources hold (a 4-GPU trial on 16 GPUs: 4),
    capped by sweep.max_concurrent_trials. Ray Train waits for a whole worker group, so starting more trials
    than fit would only park them, each holding a trial actor."""
    needed = trial_resources(cfg)
    needed["CPU"] += _driver_cpus(cfg)
    spare = dict(cluster_resources)
    spare["CPU"] = spare.get("CPU", 0.0) - DATA_RESERVE_CPUS
    fits = min(math.floor(spare.get(name, 0.0) / amount + 1e-9) for name, amount in needed.items() if amount > 0)
    if fits < 1:
        have = ", ".join(f"{cluster_resources.get(name, 0.0):g} {name}" for name in needed)
        wants = ", ".join(f"{amount:g} {name}" for name, amount in needed.items())
        raise ValueError(
            f"one trial needs {wants} (cluster.num_workers={cfg.cluster.num_workers} workers plus its driver) and "
            f"{DATA_RESERVE_CPUS:g} CPU stays free for data loading, but the Ray cluster has {have}; lower "
            f"cluster.num_workers or cluster.cpus_per_worker"
        )
    wanted = cfg.sweep.max_concurrent_trials
    return min(fits, wanted) if wanted else fits


def local_cpus_for_sweep(cfg: RootConfig, *, cores: int) -> int:
    """Logical CPUs for an embedded Ray that runs this sweep: room for the trials that fit on this machine's
    cores (or sweep.max_concurrent_trials of them), their drivers, and the data reserve."""
    per_trial = trial_resources(cfg)["CPU"]
    wanted = cfg.sweep.max_concurrent_trials or max(1, math.floor(cores / per_trial + 1e-9))
    if wanted * per_trial > cores:
        raise ValueError(
            f"sweep.max_concurrent_trials={wanted} trials of cluster.num_workers={cfg.cluster.num_workers} x "
            f"cluster.cpus_per_worker={cfg.cluster.cpus_per_worker:g} CPU need {wanted * per_trial:g} CPU, but this "
            f"machine has {cores} cores; lower one of them"
        )
    return math.ceil(wanted * (per_trial + _driver_cpus(cfg)) + DATA_RESERVE_CPUS)


# ------------------------------------------------------------------------------------------------ the trial

def train_trial(params: dict, *, base_config: dict, experiment: str, sweep_dir: str,
                teacher: dict | None = None) -> None:
    """One Tune trial: the base config with this trial's values, trained exactly like a plain run (with the
    sweep's teacher, resolved once by its driver: launch.py), in this process or in a worker group."""
    from ray import tune

    from trainers.run import Run, train

    config = with_values(base_config, params)
    cfg = config_from_dict(config)
    run_dir = Path(sweep_dir) / tune.get_context().get_trial_id()
    if _report_ended_run(run_dir, metric=get_family(cfg.model.family).metric):
        return
    outputs.clear_stop_request(run_dir)  # a trial that runs has not been stopped (a resumed sweep reruns it)
    # The driver prepared the base data; only swept data keys build anything here. The sweep's driver has
    # connected to Ray and checked the cluster already.
    in_process = trials_in_process(cfg)
    run = Run(cfg=cfg, config=config, experiment=experiment, run_dir=run_dir,
              teacher=TeacherSource(**teacher) if teacher else None, in_process=in_process)
    train(run, connect=False, callbacks=[_tune_report_callback(in_process=in_process)])


def _tune_report_callback(*, in_process: bool):
    """The Ray Train callback that passes each report on to Tune. Ray's own sends it from the Train controller
    through a queue actor; a run in the trial's own process is already in Tune's session and reports directly."""
    from ray.train import UserCallback
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

    if not in_process:
        return TuneReportCallback()

    class InProcessTuneReport(UserCallback):
        def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
            from ray import tune

            tune.report({**metrics[0], **({CHECKPOINT_PATH_KEY: checkpoint.path} if checkpoint else {})})

    return InProcessTuneReport()


def _report_ended_run(run_dir: Path, *, metric: str) -> bool:
    """A sweep restored after a crash can restart a trial whose Train run had already ended: hand Tune that
    run's last evaluation instead of starting it again."""
    from ray import tune

    if (outputs.read_summary(run_dir) or {}).get("status") not in ("finished", "stopped"):
        return False
    evaluations = [row for row in outputs.read_metrics(run_dir) if metric in row]
    if evaluations:
        tune.report(evaluations[-1])
    return True


def trial_dirname(trial) -> str:
    return trial.trial_id


def release_leftover_placement_groups(run_dirs: list[Path]) -> int:
    """Remove the placement groups that trials' Train runs recorded and that still hold resources: a Train run
    whose driver Tune killed (Ctrl-C, a trial that failed to end) cannot release its own, and Ray keeps a dead
    actor's placement groups until the job ends (see trainers/sweep_scheduler.py)."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    table = ray.util.placement_group_table()
    released = 0
    for run_dir in run_dirs:
        for group_id in outputs.recorded_placement_groups(run_dir):
            if table.get(group_id, {}).get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
                released += 1
    if released:
        logger.info("released %d placement group(s) left by stopped trials", released)
    return released


# ---------------------------------------------------------------------------------------------- the driver

def run_sweep(cfg: RootConfig, *, config: dict, dimensions: list[Dimension], sweep_dir: Path,
              experiment: str, teacher: TeacherSource | None = None) -> dict:
    """Run (or restore and finish) the sweep and write its report; returns summary.json's content.

    Raises KeyboardInterrupt when Ctrl-C stopped the sweep before every trial ended: Tune has saved its
    state by then, and the same command resumes it.
    """
    import ray

    metric, mode = metric_and_mode(cfg)
    at_once = trials_at_once(cfg, cluster_resources=ray.cluster_resources())
    started = time.time()
    tuner = _build_or_restore_tuner(cfg, config=config, dimensions=dimensions, sweep_dir=sweep_dir,
                                    experiment=experiment, metric=metric, mode=mode, at_once=at_once, teacher=teacher)
    try:
        tuner.fit()
    finally:
        release_leftover_placement_groups([path for path in sweep_dir.iterdir() if path.is_dir()])
    summary = sweep_report.write_report(sweep_dir, metric=metric, mode=mode, max_steps=cfg.trainer.max_steps,
                                        keys=[d.key for d in dimensions], wall_s=time.time() - started)
    if summary["status"] == "interrupted":
        raise KeyboardInterrupt
    if summary["status"] == "failed":
        raise SweepFailedError(f"every trial of {sweep_dir.name} failed; the first error: {summary['first_error']} "
                               f"(tracebacks: {sweep_dir}/<trial>/error.txt)")
    return summary


def _build_or_restore_tuner(cfg: RootConfig, *, config: dict, dimensions: list[Dimension], sweep_dir: Path,
                            experiment: str, metric: str, mode: str, at_once: int,
                            teacher: TeacherSource | None = None):
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base_config=_absolute_paths(config), experiment=experiment,
                             sweep_dir=str(sweep_dir), teacher=teacher.to_dict() if teacher else None),
        trial_process_resources(cfg),
    )
    if tune.Tuner.can_restore(str(sweep_dir)):
        logger.info("resuming sweep %s: finished trials are kept, unfinished ones continue from their checkpoints",
                    sweep_dir.name)
        return tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    logger.info("sweep %s: %d trial(s) over %s, %s search, %s scheduler, %d at a time, ranked by %s (%s)",
                sweep_dir.name, cfg.sweep.num_samples, ", ".join(d.key for d in dimensions), cfg.sweep.searcher,
                cfg.sweep.scheduler, at_once, metric, mode)
    return tune.Tuner(
        trainable,
        param_space={dimension.key: dimension.to_tune() for dimension in dimensions},
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, num_samples=cfg.sweep.num_samples, max_concurrent_trials=at_once,
            search_alg=_build_searcher(cfg, at_once=at_once), scheduler=_build_scheduler(cfg, sweep_dir=sweep_dir),
            trial_dirname_creator=trial_dirname,
            # A trial's actor only drives its Train run: the next trial can reuse the process and its imports.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(name=sweep_dir.name, storage_path=str(sweep_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def _build_searcher(cfg: RootConfig, *, at_once: int):
    """Tune applies TuneConfig.max_concurrent_trials to Searchers (Optuna) but not to the random/grid
    generator, which takes its own limit."""
    if cfg.sweep.searcher == SweepSearcher.optuna:
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.sweep.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.sweep.seed, max_concurrent=at_once)


def _build_scheduler(cfg: RootConfig, *, sweep_dir: Path):
    from ray.tune.schedulers import FIFOScheduler

    from trainers.sweep_scheduler import SelfStoppingASHA

    if cfg.sweep.scheduler == SweepScheduler.fifo:
        return FIFOScheduler()
    # Trials report at evaluations, and "step" is the optimizer step of each report.
    return SelfStoppingASHA(sweep_dir=sweep_dir, time_attr="step", max_t=cfg.trainer.max_steps,
                            grace_period=grace_period(cfg), reduction_factor=cfg.sweep.reduction_factor)


def _absolute_paths(config: dict) -> dict:
    """Trials run in Ray worker processes with another working directory: relative paths must not travel."""
    values = {"paths.root": str(Path(config["paths"]["root"]).resolve()),
              "paths.data_cache": str(Path(config["paths"]["data_cache"]).resolve())}
    if config["data"].get("path"):
        values["data.path"] = str(Path(config["data"]["path"]).resolve())
    return with_values(config, values)
