"""The one entry point: compose -> validate -> prepare data -> connect -> stages (train or sweep, promote, serve).

    python launch.py +exp=llm_tiny [overrides]
    python launch.py +exp=llm_tiny sweep=asha          # a Ray Tune sweep of training runs
    python launch.py +exp=quickstart                  # train, promote and serve the tiny LLM
    python launch.py +exp=llm_tiny sweep=asha stages=[sweep,promote,serve]
    python launch.py stage=rollback serve.model=llm_tiny
    python launch.py stage=rollout serve.model=ranker_dlrm serve.canary_version=5   # judged, step by step
    python launch.py stage=monitor serve.model=ranker_dlrm      # traffic, latency, quality, drift, alerts
    python launch.py +exp=llm_8b_zero3 cluster=aws_p5 plan=true    # memory, time and cost; starts nothing
    python launch.py +exp=llm_tiny cluster=remote cluster.address=http://HEAD:8265 submit=true
    python launch.py --cfg job +exp=llm_tiny        # print the resolved config and exit (Hydra's flag)
"""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from conf.schema import RootConfig
from trainers.config import config_from_dict, plain_config, redacted, register_configs

logger = logging.getLogger("slipway")

STAGES = ("train", "sweep", "promote", "optimize", "canary", "shadow", "rollout", "rollback", "registry", "export",
          "serve", "monitor")
# Whether Hydra got as far as calling main(): before that, a failure is a config that does not compose.
_composed = False


def stages_of(cfg: RootConfig) -> list[str]:
    """The stages to run, in order: `stage=X` alone, else `stages`; `train` means the sweep when one is set."""
    from trainers.sweep import is_sweep

    key = "stage" if cfg.stage else "stages"
    stages = [cfg.stage] if cfg.stage else list(cfg.stages)
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages:
        raise ValueError(f"{key}={stages} must name stages from {', '.join(STAGES)}")
    if "sweep" in stages and not is_sweep(cfg):
        raise ValueError(f"{key} has a sweep stage but sweep=none: add sweep=asha or sweep=optuna")
    stages = ["sweep" if stage == "train" and is_sweep(cfg) else stage for stage in stages]
    if len(set(stages)) != len(stages):
        raise ValueError(f"{key}={stages} names a stage twice (with a sweep set, train is the sweep)")
    trained = [i for i, stage in enumerate(stages) if stage in ("train", "sweep")]
    if trained and "promote" in stages and stages.index("promote") < trained[0]:
        raise ValueError(f"{key}={stages}: promote must come after {stages[trained[0]]}, which it promotes")
    return stages


def run(dict_cfg: DictConfig, *, experiment: str, command_line: list[str] = ()) -> list[tuple[str, str | Path]]:
    """Run the config's stages; returns what each produced, e.g. [("run_dir", path), ("endpoint", url)].
    `command_line` holds the overrides as typed: a model size among them may not contradict model.init_from."""
    from conf.derived import check_serve
    from conf.pretrained import adopt_checkpoint_config
    from trainers.run import check_config

    # Derived once: the typed config (with secrets, for the stages) and the plain one, redacted once (for run
    # files, the run name, W&B and the workers). A pretrained checkpoint's shape replaces the experiment's first.
    plain = adopt_checkpoint_config(plain_config(dict_cfg), command_line=list(command_line))
    cfg = config_from_dict(plain)
    config = redacted(plain)
    stages = stages_of(cfg)
    if {"train", "sweep"} & set(stages):
        check_config(cfg)  # the serve block included
    else:
        check_serve(cfg)  # promote, canary, rollback or serve alone: e.g. serve.refresh_s=0 is a busy loop
    if cfg.plan:
        return [("plan", plan(cfg))]
    if cfg.submit:
        from cluster.submit import submit_job

        if not Path(cfg.paths.root).is_absolute():  # it would resolve inside the job's temporary working_dir
            raise ValueError(f"paths.root={cfg.paths.root} is relative: a submitted run would write into the job's "
                             "temporary working directory on the head; set paths.root to storage that every node "
                             "mounts, e.g. paths.root=/mnt/shared/slipway")
        return [("job", submit_job(cfg.cluster, overrides=command_overrides(), experiment=experiment))]
    results: list[tuple[str, str | Path]] = []
    for stage in stages:
        results.append(_run_stage(stage, cfg, config=config, experiment=experiment, produced=results))
    return results


def _run_stage(stage: str, cfg: RootConfig, *, config: dict, experiment: str, produced: list) -> tuple:
    if stage == "train":
        return "run_dir", train(cfg, config=config, experiment=experiment)
    if stage == "sweep":
        return "sweep_dir", sweep(cfg, config=config, experiment=experiment)
    from serve import promote

    model = registry_model_name(cfg, experiment=experiment)
    if stage == "promote":
        source = cfg.serve.source or next((str(path) for kind, path in produced if kind.endswith("_dir")), None)
        if source is None:
            raise ValueError("stage=promote needs serve.source=<run_dir or sweep_dir> (or a train stage before it)")
        event = promote.promote(cfg.serve, model=model, source=Path(source), experiment=experiment,
                                cache_dir=Path(cfg.paths.root).resolve() / "registry_cache")
        return "promotion", f"{model} v{event['challenger']} {event['decision']}"
    if stage == "canary":
        promote.set_canary(cfg.serve, model=model)
        return "canary", f"{model} {describe_aliases(cfg, model)}"
    if stage == "shadow":
        promote.set_shadow(cfg.serve, model=model)
        return "shadow", f"{model} {describe_aliases(cfg, model)}"
    if stage == "rollout":
        from serve.rollout import rollout

        state = rollout(cfg.serve, model=model)
        return "rollout", f"{model} v{state['canary']} {state['status'].replace('_', ' ')}: {state['reason']}"
    if stage == "monitor":
        from serve.monitor_report import monitor

        return "monitor", monitor(cfg.serve, model=model, out_root=Path(cfg.paths.root).resolve())
    if stage == "optimize":
        from serve.optimize import optimize

        root = Path(cfg.paths.root).resolve()
        return "optimize_dir", optimize(cfg.serve, model=model, root=root, cache_dir=root / "registry_cache")
    if stage == "rollback":
        event = promote.rollback(cfg.serve, model=model)
        return "production", f"{model} v{event['to']}"
    if stage == "export":
        out_dir = promote.copy_version_out(cfg.serve, model=model,
                                           cache_dir=Path(cfg.paths.root).resolve() / "registry_cache")
        return "export_dir", out_dir
    if stage == "registry":
        from serve.registry import Registry

        print(promote.format_registry(Registry(cfg.serve.registry), model), flush=True)
        return "registry", f"{model} {describe_aliases(cfg, model)}"
    from serve.deploy import serve_endpoint

    return "endpoint", serve_endpoint(cfg, model=model)


def plan(cfg: RootConfig) -> str:
    """Print the launch plan; a run that does not fit is an error that names what would fit."""
    from cluster.plan import format_plan
    from trainers.run import plan as build_plan

    launch_plan = build_plan(cfg)
    print(format_plan(launch_plan), flush=True)
    if not launch_plan.fits:
        raise ValueError(launch_plan.verdict)
    return launch_plan.verdict


def command_overrides() -> list[str]:
    """This command's overrides as typed (the submitted job reruns them on the cluster)."""
    return list(HydraConfig.get().overrides.task)


def registry_model_name(cfg: RootConfig, *, experiment: str) -> str:
    if cfg.serve.model:
        return cfg.serve.model
    if experiment == "default":
        raise ValueError("name the registry model: serve.model=NAME (or run an experiment, +exp=NAME)")
    return experiment


def describe_aliases(cfg: RootConfig, model: str) -> str:
    from serve.registry import Registry

    aliases = Registry(cfg.serve.registry).aliases(model)
    return ", ".join(f"{alias} v{record['version']}" for alias, record in sorted(aliases.items())) or "no aliases"


def train(cfg: RootConfig, *, config: dict, experiment: str) -> Path:
    """One training run; returns its run directory."""
    from trainers import outputs
    from trainers.run import Run
    from trainers.run import train as train_run

    run_dir = Path(cfg.paths.root).resolve() / "runs" / outputs.run_name(config, experiment=experiment)
    train_run(Run(cfg=cfg, config=config, experiment=experiment, run_dir=run_dir, teacher=resolve_teacher(cfg)))
    return run_dir


def resolve_teacher(cfg: RootConfig):
    """model.teacher as a local export directory of the student's family (trainers/distill.py: TeacherSource), or
    None without one. Resolved here, on the driver, because only this layer may read the registry; the workers get
    the directory. A registry version is fetched into paths.root (storage every node reads) and verified."""
    from conf.derived import TEACHER_SYNTAX, parse_teacher
    from trainers.distill import TeacherSource, read_teacher_config

    if cfg.model.teacher is None:
        return None
    reference = parse_teacher(cfg.model.teacher)
    if reference.path is not None:
        directory = Path(reference.path).expanduser().resolve()
        if not directory.is_dir():
            raise ValueError(f"model.teacher={reference.text}: {directory} is not a directory; expected "
                             f"{TEACHER_SYNTAX}")
        teacher = TeacherSource(reference=reference.text, directory=str(directory))
    else:
        teacher = _fetch_teacher(cfg, reference)
    read_teacher_config(Path(teacher.directory), reference=reference.text, family=cfg.model.family)
    return teacher


def _fetch_teacher(cfg: RootConfig, reference):
    from serve.registry import Registry
    from trainers.distill import TeacherSource

    registry, model, text = Registry(cfg.serve.registry), reference.model, reference.text
    committed = [record["version"] for record in registry.versions(model)]
    if not committed:
        raise ValueError(f"model.teacher={text}: the registry {registry.uri} (serve.registry) has no model {model!r}; "
                         f"its models: {', '.join(registry.models()) or 'none'}")
    version = reference.version
    if version is None:
        version = registry.resolve(model, reference.alias)
        if version is None:
            aliases = ", ".join(sorted(registry.aliases(model))) or "none"
            raise ValueError(f"model.teacher={text}: model {model!r} has no alias {reference.alias!r} (its aliases: "
                             f"{aliases}); name one, or a version: registry:{model}@v{committed[-1]}")
    elif version not in committed:
        raise ValueError(f"model.teacher={text}: model {model!r} has no version {version}; its versions: "
                         f"{', '.join(f'v{number}' for number in committed)}")
    directory = registry.fetch(model, version, cache_dir=Path(cfg.paths.root).resolve() / "registry_cache")
    return TeacherSource(reference=text, directory=str(directory), model=model, version=version)


def sweep(cfg: RootConfig, *, config: dict, experiment: str) -> Path:
    """A Ray Tune sweep of training runs; returns the sweep directory."""
    from cluster.capacity import check_shared_storage
    from cluster.connection import connect
    from conf.derived import resolve_address
    from trainers import outputs, sweep_report
    from trainers.run import check_config, preflight, prepare_data
    from trainers.sweep import check_model_candidates, local_cpus_for_sweep, run_sweep, sweep_name, validate_sweep

    dimensions = validate_sweep(cfg, config=config, check_trial=check_config)
    if any(dimension.key == "model.teacher" for dimension in dimensions):
        raise ValueError("sweep.space has model.teacher: the teacher is resolved once, for the whole sweep; sweep "
                         "the distill block instead, or run one sweep per teacher")
    sweep_dir = Path(cfg.paths.root).resolve() / "sweeps" / sweep_name(config, experiment=experiment)
    previous = outputs.read_summary(sweep_dir)
    if previous and previous.get("status") == "finished":
        logger.info("%s already finished (%d trials); not sweeping again", sweep_dir.name, previous["trials"])
        return sweep_dir
    preflight(cfg)
    teacher = resolve_teacher(cfg)  # once, for every trial: an alias moving mid-sweep does not split the trials
    prepared = prepare_data(cfg)  # once, here: trials reuse it unless the space changes data keys
    check_model_candidates(dimensions, config, data=prepared.to_dict())
    local_cpus = None
    if resolve_address(cfg.cluster) is None:
        local_cpus = cfg.cluster.local_num_cpus or local_cpus_for_sweep(cfg, cores=os.cpu_count() or 1)
    connect(cfg.cluster, num_cpus=local_cpus)
    check_shared_storage(Path(cfg.paths.root).resolve())
    summary = run_sweep(cfg, config=config, dimensions=dimensions, sweep_dir=sweep_dir, experiment=experiment,
                        teacher=teacher)
    logger.info("finished %s: %s", sweep_dir.name, sweep_report.headline(summary))
    return sweep_dir


def training_failures() -> tuple[type[Exception], ...]:
    """What a run raises when it failed after checkpoint.max_failures restarts. Ray's is imported only where Ray
    Train ran: a run without Ray (cluster.launcher=processes) must not pay for importing it."""
    from trainers.local import WorkersFailedError

    if "ray.train" not in sys.modules:
        return (WorkersFailedError,)
    from ray.train import TrainingFailedError

    return (WorkersFailedError, TrainingFailedError)


def experiment_name() -> str:
    return HydraConfig.get().runtime.choices.get("exp") or "default"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    import psutil

    from cluster.submit import JobFailedError
    from trainers import startup
    from trainers.sweep import SweepFailedError

    global _composed
    _composed = True
    startup.begin(process_start=psutil.Process().create_time())
    try:
        results = run(dict_cfg, experiment=experiment_name(), command_line=command_overrides())
    except (ValueError, FileNotFoundError) as err:
        logger.error("error: %s", err)
        sys.exit(2)
    except training_failures() as err:
        logger.error("error: training failed after all retries: %s", err)
        sys.exit(1)
    except (SweepFailedError, JobFailedError) as err:
        logger.error("error: %s", err)
        sys.exit(1)
    except KeyboardInterrupt:
        logger.error("interrupted: rerun the same command to resume from the latest checkpoint")
        sys.exit(130)
    for kind, value in results:  # the last line names what the last stage produced (DESIGN.md section 3)
        print(f"{kind}: {value}", flush=True)


if __name__ == "__main__":
    register_configs()  # the schemas must be in Hydra's ConfigStore before main() composes
    try:
        main()
    except SystemExit as exit_request:
        # Hydra prints why a config does not compose (an unknown key, a wrong type, a value outside a key's
        # choices) and exits 1; that is bad input, which exits 2 like every other.
        if exit_request.code == 1 and not _composed:
            sys.exit(2)
        raise
