"""What a Ray Tune sweep costs beyond its trials' training: sweeps of short llm_tiny trials on a warm local Ray.

    python scripts/bench_sweep.py                      # 8 trials of 20 steps, one at a time: 1-worker trials, then 2
    python scripts/bench_sweep.py --workers 2 --trials 8 --concurrent 2 --cpus-per-worker 0.5
    python scripts/bench_sweep.py --bare-fits 3       # also: TorchTrainer.fit() of a no-op, the floor of a trial

Ray is started first and warmed up (one throwaway task), so the figures leave out starting Ray itself, which
a sweep pays once. Each sweep is launch.py's own (`sweep=asha sweep.scheduler=fifo`: random search, every trial
to the end) over the learning rate, run in this process, one per --workers value on the same Ray. A 1-worker
trial trains in its Tune trial's own process, reused from trial to trial (sweep.in_process_trials); a trial of
more workers starts a Ray Train worker group, as a plain run does.

Per trial, from the files each trial writes (mtimes and metrics.jsonl rows):
  schedule  previous trial's end (or the sweep's start) -> this trial's config.yaml: Tune placing the trial,
            starting (or resetting) its actor, checking the prepared data
  startup   config.yaml -> the start of step 1: the Train run's controller and worker processes (none in process),
            the process group, the Ray Data iterators, building the model
  training  start of step 1 -> the last step's evaluation and checkpoint (the trial's own training time)
  teardown  -> summary.json: the final report, Ray Train shutting the workers down
Overhead per trial = (wall x trials at once - sum of training) / trials.
"""

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_OVERHEAD_S = 3.0

logger = logging.getLogger("bench_sweep")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8, help="trials in the sweep")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per trial")
    parser.add_argument("--concurrent", type=int, default=1, help="trials at once (sweep.max_concurrent_trials)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="Ray Train workers per trial: one sweep per value")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="cluster.cpus_per_worker")
    parser.add_argument("--bare-fits", type=int, default=0,
                        help="before the sweep, time this many TorchTrainer.fit() calls of a no-op train function")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "slipway-bench-sweep",
                        help="output folder; each invocation writes a new bench-<time>/ inside it")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.steps < 2 or args.concurrent < 1 or min(args.workers) < 1:
        parser.error("--trials, --concurrent and --workers must be at least 1, --steps at least 2")
    return args


def build_overrides(args: argparse.Namespace, *, root: Path, workers: int) -> list[str]:
    return [
        "+exp=llm_tiny", "sweep=asha", "sweep.scheduler=fifo", f"sweep.num_samples={args.trials}",
        f"sweep.max_concurrent_trials={args.concurrent}",
        "~sweep.family_space.llm", "+sweep.space.trainer.lr=[loguniform,1e-3,1e-2]",
        "data.max_chars=400000", "data.seq_len=64", "data.val_fraction=0.2",
        "trainer.global_batch_size=16", "trainer.micro_batch_size=8",
        f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=1", f"trainer.eval_every_n_steps={args.steps}",
        f"checkpoint.every_n_steps={args.steps}", "trainer.eval_batches=2", "trainer.warmup_steps=2",
        f"cluster.num_workers={workers}", f"cluster.cpus_per_worker={args.cpus_per_worker}",
        f"paths.root={root}", f"paths.data_cache={args.out.resolve() / 'data'}", *args.overrides,
    ]


def start_warm_ray(dict_cfg) -> None:
    """The embedded Ray launch.py would start for this sweep, started here and given one task to run."""
    import os

    import ray
    from omegaconf import OmegaConf

    from cluster.connection import connect
    from trainers.sweep import local_cpus_for_sweep

    cfg = OmegaConf.to_object(dict_cfg)
    connect(cfg.cluster, num_cpus=local_cpus_for_sweep(cfg, cores=os.cpu_count() or 1))
    ray.get(ray.remote(lambda: None).remote())


def time_bare_fits(count: int, *, workers: int, cpus_per_worker: float, storage: Path) -> list[float]:
    """Seconds for TorchTrainer.fit() of a train function that only reports once: Ray Train's own cost."""
    import ray.train
    from ray.train.torch import TorchTrainer

    def report_once(_config):
        ray.train.report({"done": 1})

    seconds = []
    for index in range(count):
        started = time.time()
        TorchTrainer(report_once, scaling_config=ray.train.ScalingConfig(
                         num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}),
                     run_config=ray.train.RunConfig(name=f"bare-{index}", storage_path=str(storage))).fit()
        seconds.append(time.time() - started)
    print(f"bare TorchTrainer.fit(): {', '.join(f'{s:.1f}' for s in seconds)} s")
    return seconds


def trial_phases(run_dir: Path, *, previous_end: float) -> dict:
    from trainers import outputs

    rows = [row for row in outputs.read_metrics(run_dir) if "step_time_s" in row]
    first, last = rows[0], max(outputs.read_metrics(run_dir), key=lambda row: row["time"])
    started = (run_dir / "config.yaml").stat().st_mtime
    first_step_start = first["time"] - first["step_time_s"]
    ended = (run_dir / "summary.json").stat().st_mtime
    return {"trial": run_dir.name, "schedule": started - previous_end, "startup": first_step_start - started,
            "training": last["time"] - first_step_start, "teardown": ended - last["time"], "ended": ended}


def print_report(phases: list[dict], *, wall: float, concurrent: int, workers: int) -> float:
    training = sum(phase["training"] for phase in phases)
    overhead = (wall * concurrent - training) / len(phases)
    print(f"\n{workers}-worker trials: {len(phases)} trials, {concurrent} at a time: wall {wall:.1f} s, trials' own "
          f"training {training:.1f} s")
    target = f" (target < {TARGET_OVERHEAD_S:g} s)" if workers == 1 else ""
    print(f"overhead per {workers}-worker trial: {overhead:.2f} s{target}")
    if concurrent == 1:
        print("median seconds per phase:")
        for name in ("schedule", "startup", "training", "teardown"):
            values = [phase[name] for phase in phases]
            print(f"  {name:9s} {statistics.median(values):6.2f}  (min {min(values):.2f}, max {max(values):.2f})")
    return overhead


def run_sweep(dict_cfg, *, args: argparse.Namespace, workers: int) -> dict:
    """One sweep of `workers`-worker trials through launch.py's own code; its figures."""
    import launch

    started = time.time()
    _, sweep_dir = launch.run(dict_cfg, experiment="bench_sweep")[0]
    wall = time.time() - started
    summary = json.loads((sweep_dir / "summary.json").read_text())
    run_dirs = sorted(_trial_dirs(sweep_dir), key=lambda path: (path / "config.yaml").stat().st_mtime)
    phases, previous_end = [], started
    for run_dir in run_dirs:
        phases.append(trial_phases(run_dir, previous_end=previous_end))
        previous_end = phases[-1]["ended"]
    overhead = print_report(phases, wall=wall, concurrent=args.concurrent, workers=workers)
    return {"workers": workers, "wall_s": wall, "overhead_per_trial_s": overhead, "trials": phases,
            "best_trial": summary["best_trial"]}


def main(argv: list[str] | None = None) -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # scripts/ is not a package: conf/ and trainers/ live at the root
    from trainers.config import compose

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    bench_dir = (args.out / time.strftime("bench-%Y%m%d-%H%M%S")).resolve()
    configs = {workers: compose(build_overrides(args, root=bench_dir, workers=workers)) for workers in args.workers}
    start_warm_ray(configs[max(args.workers)])  # sized for the largest trials
    bare = time_bare_fits(args.bare_fits, workers=max(args.workers), cpus_per_worker=args.cpus_per_worker,
                          storage=bench_dir / "bare") if args.bare_fits else []
    sweeps = [run_sweep(configs[workers], args=args, workers=workers) for workers in args.workers]
    print("\noverhead per trial: " + ", ".join(f"{item['overhead_per_trial_s']:.2f} s with {item['workers']} "
                                             f"worker(s)" for item in sweeps))
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "sweeps": sweeps, "bare_fit_s": bare}
    (bench_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {bench_dir / 'results.json'}")


def _trial_dirs(sweep_dir: Path) -> list[Path]:
    return [path for path in sweep_dir.iterdir() if (path / "config.yaml").exists()]


if __name__ == "__main__":
    main()
