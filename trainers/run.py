"""Driver side of a training run: validate sizes, build the TorchTrainer, fit, and record the outcome."""

import logging
import os
from functools import partial
from pathlib import Path

from omegaconf import OmegaConf

from cluster.capacity import ELASTIC_STRATEGIES, check_placement, scaling_workers, worker_range
from conf.schema import RootConfig
from trainers import outputs
from trainers.families import get_family
from trainers.loop import CRASH_AT_STEP_ENV, resolve_precision, train_loop
from trainers.strategies import STRATEGY_NAMES
from trainers.tracking import LOGGER_NAMES

logger = logging.getLogger(__name__)


def validate_config(cfg: RootConfig) -> None:
    """Checks that need more than one key, done on the driver before Ray starts."""
    trainer = cfg.trainer
    family = get_family(cfg.model.family)
    _check_family_fits(cfg, family)
    resolve_precision(cfg.trainer.precision, _driver_device(cfg))
    if cfg.strategy.name not in STRATEGY_NAMES:
        raise ValueError(f"strategy.name={cfg.strategy.name!r} is not one of {', '.join(STRATEGY_NAMES)}")
    if cfg.logger.name not in LOGGER_NAMES:
        raise ValueError(f"logger.name={cfg.logger.name!r} is not one of {', '.join(LOGGER_NAMES)}")
    _check_worker_counts(cfg)
    for key in ("max_steps", "log_every_n_steps", "eval_every_n_steps"):
        if getattr(trainer, key) < 1:
            raise ValueError(f"trainer.{key} must be at least 1, got {getattr(trainer, key)}")
    if trainer.eval_batches < 0:
        raise ValueError(
            f"trainer.eval_batches must be 0 (the whole validation split) or more, got {trainer.eval_batches}"
        )
    if cfg.checkpoint.every_n_steps < 1:
        raise ValueError(f"checkpoint.every_n_steps must be at least 1, got {cfg.checkpoint.every_n_steps}")


def _check_worker_counts(cfg: RootConfig) -> None:
    """Every world size the run may train at must split the global batch into whole micro batches: an elastic
    run (`cluster.num_workers=[min, max]`) can resize to any count in between."""
    check_placement(cfg.cluster)
    low, high = worker_range(cfg.cluster)
    trainer = cfg.trainer
    for workers in range(low, high + 1):
        if trainer.global_batch_size % (workers * trainer.micro_batch_size):
            raise ValueError(
                f"trainer.global_batch_size={trainer.global_batch_size} must be a multiple of cluster.num_workers="
                f"{workers} x trainer.micro_batch_size={trainer.micro_batch_size}"
                + (f" (an elastic run of cluster.num_workers={cfg.cluster.num_workers} may train on {workers} "
                   "workers)" if low != high else "")
            )
    if low != high and cfg.strategy.name not in ELASTIC_STRATEGIES:
        raise ValueError(
            f"cluster.num_workers={cfg.cluster.num_workers} (elastic) needs strategy={' or '.join(ELASTIC_STRATEGIES)}"
            f", not strategy={cfg.strategy.name}: DeepSpeed's ZeRO checkpoints cannot be loaded by another number "
            "of workers"
        )


def _check_family_fits(cfg: RootConfig, family) -> None:
    """The data kind, and options that only one family has, must match model.family."""
    if cfg.data.kind != family.data_kind:
        options = {"text": "data=stdlib, text_dir or parquet", "clicklog": "data=synthetic_clicks or criteo_tsv"}
        raise ValueError(
            f"model.family={cfg.model.family} trains on {family.data_kind} data ({options[family.data_kind]}), "
            f"but the data config is data.kind={cfg.data.kind}"
        )
    if cfg.trainer.activation_checkpointing and not family.supports_activation_checkpointing:
        raise ValueError(f"trainer.activation_checkpointing applies to LLMs only, not model.family={cfg.model.family}")
    if cfg.model.family == "llm" and cfg.data.seq_len > cfg.model.max_seq_len:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} is beyond the model's limit model.max_seq_len={cfg.model.max_seq_len}"
        )


def _driver_device(cfg: RootConfig):
    import torch

    return torch.device("cuda" if cfg.cluster.use_gpu else "cpu")


def check_data_fits(cfg: RootConfig, *, train_rows: int, val_rows: int) -> None:
    """An epoch must hold one global batch and validation one eval batch, or training would never step."""
    if train_rows < cfg.trainer.global_batch_size:
        raise ValueError(
            f"the prepared training split has {train_rows} rows, fewer than trainer.global_batch_size="
            f"{cfg.trainer.global_batch_size}; add data (data.max_chars for text, data.rows for click logs) or "
            f"lower the batch size"
        )
    eval_rows = cfg.trainer.micro_batch_size * worker_range(cfg.cluster)[1]
    if val_rows < eval_rows:
        raise ValueError(
            f"the prepared validation split has {val_rows} rows, fewer than one eval batch "
            f"(trainer.micro_batch_size x cluster.num_workers = {eval_rows}); raise data.val_fraction"
        )


# fp32 bytes per parameter that each worker holds for weights, gradients and Adam's two moments: DDP keeps all
# of it, ZeRO-1 shards the moments, ZeRO-2 also the gradients, ZeRO-3 and FSDP2 everything.
def _training_bytes_per_parameter(strategy: str, workers: int) -> float:
    return {"ddp": 16.0, "zero1": 8 + 8 / workers, "zero2": 4 + 12 / workers}.get(strategy, 16 / workers)


def check_memory_fits(cfg: RootConfig, *, data: dict) -> None:
    """A CPU run on this machine must hold its workers' training state in memory: a clear error up front
    instead of the kernel's OOM killer minutes later. GPU and remote clusters are not checked from here."""
    import psutil

    from cluster.connection import resolve_address

    if cfg.cluster.use_gpu or resolve_address(cfg.cluster):
        return
    workers = worker_range(cfg.cluster)[1]
    params = get_family(cfg.model.family).count_parameters(cfg.model, data=data)
    needed = params * _training_bytes_per_parameter(cfg.strategy.name, workers) * workers
    available = psutil.virtual_memory().total
    if needed > available:
        raise ValueError(
            f"model.preset={cfg.model.preset} has {params / 1e9:.2f}B parameters: weights, gradients and Adam "
            f"state on {workers} CPU worker(s) with strategy={cfg.strategy.name} need about {needed / 2**30:.0f} "
            f"GiB, more than this machine's {available / 2**30:.0f} GiB; run it with cluster=gpu_node, or shrink "
            f"the model (for rankers, data.hash_buckets)"
        )


def _worker_env() -> dict[str, str]:
    """Environment variables the workers need from the driver (the test-only fault hook)."""
    return {key: os.environ[key] for key in (CRASH_AT_STEP_ENV,) if key in os.environ}


def build_trainer(cfg: RootConfig, *, config: dict, run_name: str, run_dir: Path, data: dict, datasets: dict,
                  callbacks: list | None = None):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    family = get_family(cfg.model.family)
    worker_env = _worker_env()
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": config, "data": data, "run_dir": str(run_dir), "run_name": run_name},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling_workers(cfg.cluster), use_gpu=cfg.cluster.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.cluster.placement_strategy),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(run_dir.parent),  # Ray Train's experiment directory is the run directory itself
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
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


def fit(cfg: RootConfig, *, run_name: str, run_dir: Path, data: dict, datasets: dict,
        callbacks: list | None = None) -> dict:
    """Train to completion (resuming from the run's latest checkpoint) and write summary.json and loss.png.

    Raises KeyboardInterrupt when the user pressed Ctrl-C: Ray Train's own SIGINT handler aborts the run
    and either returns early or exits the process, and both must not read as a finished run.
    """
    from ray.train import TrainingFailedError

    family = get_family(cfg.model.family)
    config = OmegaConf.to_container(OmegaConf.structured(cfg))
    trainer = build_trainer(cfg, config=config, run_name=run_name, run_dir=run_dir, data=data, datasets=datasets,
                            callbacks=callbacks)
    record = partial(outputs.write_summary, run_dir, metric=family.metric, mode=family.metric_mode,
                     summary_keys=family.summary_keys)
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        record(status="failed", best_checkpoint=None, latest_checkpoint=None,
               error=str(err).splitlines()[0] if str(err) else repr(err))
        outputs.plot_losses(run_dir)
        raise
    except SystemExit as exit_request:  # Ray Train's SIGINT handler, when the controller is already gone
        record(status="interrupted", best_checkpoint=None, latest_checkpoint=None)
        raise KeyboardInterrupt from exit_request
    best = _best_checkpoint_path(result, metric=family.metric, mode=family.metric_mode)
    latest = result.checkpoint.path if result.checkpoint else None
    if outputs.last_logged_step(run_dir) < cfg.trainer.max_steps:
        if outputs.stop_requested(run_dir):  # a sweep's scheduler ended this trial early (trainers/sweep.py)
            summary = record(status="stopped", best_checkpoint=best, latest_checkpoint=latest)
            outputs.plot_losses(run_dir)
            return summary
        record(status="interrupted", best_checkpoint=best, latest_checkpoint=latest)  # Ctrl-C before the end
        raise KeyboardInterrupt
    summary = record(status="finished", best_checkpoint=best, latest_checkpoint=latest)
    outputs.plot_losses(run_dir)
    return summary


def _best_checkpoint_path(result, *, metric: str, mode: str) -> str | None:
    scored = [(metrics[metric], checkpoint.path) for checkpoint, metrics in (result.best_checkpoints or [])
              if metric in metrics]
    if not scored:
        return result.checkpoint.path if result.checkpoint else None
    pick = min if mode == "min" else max
    return pick(scored)[1]
