"""The one entry point: compose -> validate -> prepare data -> connect -> train (or sweep).

    python launch.py +exp=llm_tiny [overrides]
    python launch.py +exp=llm_tiny sweep=asha          # a Ray Tune sweep of training runs
    python launch.py --cfg job +exp=llm_tiny        # print the resolved config and exit (Hydra's flag)
"""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from conf.schema import RootConfig, register_configs

logger = logging.getLogger("slipway")

REPO_ROOT = Path(__file__).resolve().parent


def run(dict_cfg: DictConfig, *, experiment: str) -> tuple[str, Path]:
    """Run every stage for a composed config; returns ("run_dir", path) or, for a sweep, ("sweep_dir", path)."""
    from trainers.run import validate_config
    from trainers.sweep import is_sweep

    cfg: RootConfig = OmegaConf.to_object(dict_cfg)
    validate_config(cfg)
    config = OmegaConf.to_container(dict_cfg, resolve=True)
    if is_sweep(cfg):
        return "sweep_dir", sweep(cfg, config=config, experiment=experiment)
    return "run_dir", train(cfg, config=config, experiment=experiment)


def train(cfg: RootConfig, *, config: dict, experiment: str) -> Path:
    """One training run; returns its run directory."""
    from cluster.connection import check_capacity, connect
    from datasets.pipeline import build_ray_datasets
    from datasets.prepare import prepare_data
    from trainers import outputs
    from trainers.run import check_data_fits, check_memory_fits, fit

    root = Path(cfg.paths.root).resolve()
    run_dir = root / "runs" / outputs.run_name(config, experiment=experiment)
    previous = outputs.read_summary(run_dir)
    if previous and previous.get("status") == "finished":
        logger.info("%s already finished (%d steps); not training again", run_dir.name, previous["steps"])
        return run_dir
    prepared = prepare_data(cfg)
    check_data_fits(cfg, train_rows=prepared.train_rows, val_rows=prepared.val_rows)
    check_memory_fits(cfg, data=prepared.to_dict())
    outputs.write_run_files(run_dir, config=config, experiment=experiment, data_fingerprint=prepared.fingerprint,
                            repo=REPO_ROOT)
    connect(cfg.cluster)
    check_capacity(cfg.cluster)
    datasets = build_ray_datasets(prepared, in_memory_limit_mb=cfg.data.in_memory_limit_mb)
    summary = fit(cfg, run_name=run_dir.name, run_dir=run_dir, data=prepared.to_dict(), datasets=datasets)
    logger.info("finished %s: %s", run_dir.name, outputs.headline(summary))
    return run_dir


def sweep(cfg: RootConfig, *, config: dict, experiment: str) -> Path:
    """A Ray Tune sweep of training runs; returns the sweep directory."""
    from cluster.connection import connect, resolve_address
    from datasets.prepare import prepare_data
    from trainers import outputs, sweep_report
    from trainers.run import check_data_fits, check_memory_fits, validate_config
    from trainers.sweep import check_model_candidates, local_cpus_for_sweep, run_sweep, sweep_name, validate_sweep

    dimensions = validate_sweep(cfg, config=config, check_trial=validate_config)
    sweep_dir = Path(cfg.paths.root).resolve() / "sweeps" / sweep_name(config, experiment=experiment)
    previous = outputs.read_summary(sweep_dir)
    if previous and previous.get("status") == "finished":
        logger.info("%s already finished (%d trials); not sweeping again", sweep_dir.name, previous["trials"])
        return sweep_dir
    prepared = prepare_data(cfg)  # once, here: trials reuse it unless the space changes data keys
    check_data_fits(cfg, train_rows=prepared.train_rows, val_rows=prepared.val_rows)
    check_memory_fits(cfg, data=prepared.to_dict())
    check_model_candidates(dimensions, config, data=prepared.to_dict())
    local_cpus = None
    if resolve_address(cfg.cluster) is None:
        local_cpus = cfg.cluster.local_num_cpus or local_cpus_for_sweep(cfg, cores=os.cpu_count() or 1)
    connect(cfg.cluster, num_cpus=local_cpus)
    summary = run_sweep(cfg, config=config, dimensions=dimensions, sweep_dir=sweep_dir, experiment=experiment)
    logger.info("finished %s: %s", sweep_dir.name, sweep_report.headline(summary))
    return sweep_dir


def experiment_name() -> str:
    return HydraConfig.get().runtime.choices.get("exp") or "default"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    from ray.train import TrainingFailedError

    from trainers.sweep import SweepFailedError

    try:
        kind, directory = run(dict_cfg, experiment=experiment_name())
    except (ValueError, FileNotFoundError) as err:
        logger.error("error: %s", err)
        sys.exit(2)
    except TrainingFailedError as err:
        logger.error("error: training failed after all retries: %s", err)
        sys.exit(1)
    except SweepFailedError as err:
        logger.error("error: %s", err)
        sys.exit(1)
    except KeyboardInterrupt:
        logger.error("interrupted: rerun the same command to resume from the latest checkpoint")
        sys.exit(130)
    print(f"{kind}: {directory}", flush=True)


if __name__ == "__main__":
    register_configs()  # the schemas must be in Hydra's ConfigStore before main() composes
    main()
