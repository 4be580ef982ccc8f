"""Ray Train's overhead against plain torchrun: the same model, data and steps trained both ways.

    python scripts/bench_overhead.py                          # llm_tiny, 120 steps, 2 workers
    python scripts/bench_overhead.py --steps 200 --model llm_125m --overrides data.seq_len=256
    python scripts/bench_overhead.py --launchers ray          # leave out the launch without Ray

Leg A runs `python launch.py +exp=llm_tiny ...` (Ray Train, strategy=ddp); leg A' runs the same command with
cluster.launcher=processes (no Ray: local processes, trainers/local.py); leg B runs scripts/torchrun_llm.py
under `torchrun --standalone --nproc_per_node=<workers>` with the same composed config and prepared data.
For each leg it reports the seconds from spawning the process to the end of step 1 (imports, Ray, worker
processes, data, model: what a user waits for), and the steady-state tokens/s from step --warmup-steps to
step steps - 1. The last step is left out because the Ray run evaluates and checkpoints there, and only
there (eval and checkpoint intervals are set to --steps). The train losses at the last step should agree
closely: both legs train on the same rows from the same initial weights with the same optimizer.

On a shared machine the figures move with whatever else runs: --repeats N alternates the legs N times
(A A' B A A' B ...) and reports the median of each figure.

Two breakdowns explain the launch.py legs' figures: where their seconds to the first step went (launch.py's start-up
milestones, trainers/startup.py), and which of its processes used the CPU during the steady state (every process
of the leg's tree is sampled once a second: Ray's own, the Train controller, the workers, the driver), as a
share of one core, beside the same for torchrun's processes.

Outputs go to <out>/bench-<time>/round-<i>/ (logs, the torchrun step file, the Ray run directory) and
<out>/bench-<time>/results.json; prepared data is cached in <out>/data, so only the first invocation pays for
preparing it.
"""

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TORCHRUN_SCRIPT = REPO_ROOT / "scripts" / "torchrun_llm.py"
EXPERIMENT = "llm_tiny"
# Keys the bench sets itself to keep the two legs comparable; use its flags instead.
CONTROLLED_KEYS = {
    "trainer.max_steps": "--steps", "trainer.log_every_n_steps": None, "trainer.eval_every_n_steps": None,
    "checkpoint.every_n_steps": None, "cluster.num_workers": "--workers", "paths.root": "--out",
    "cluster.launcher": "--launchers",
    "strategy": None, "strategy.name": None, "model": "--model", "exp": None,
}
LAUNCHERS = ("ray", "processes")  # cluster.launcher values, each a launch.py leg
LEG_TITLES = {"ray": "ray train", "processes": "processes", "torchrun": "torchrun"}
STARTUP_TARGET = 2.0  # issue 19: launch.py's seconds to step 1 under 2x torchrun's
SECONDS_TO_KILL = 10  # after SIGTERM, before SIGKILL, when a leg overruns --timeout

logger = logging.getLogger("bench_overhead")


@dataclass
class LegResult:
    name: str
    spawned_at: float  # time.time() just before the process was started
    wall_s: float  # spawn to exit
    rows: dict[int, dict]  # step -> the step's metrics row; every row holds "time"
    cpu_samples: dict  # pid -> [(time, CPU seconds so far, kind)]: ProcessSampler's
    startup: dict | None = None  # phase -> seconds (trainers/startup.py); launch.py's legs only


# What a process of a leg's tree is, by a piece of its command line, first match wins: the raylet and the GCS by
# their binaries (their arguments name worker scripts), then the titles Ray gives its workers (ray::<Actor>).
PROCESS_KINDS = (
    ("ray/raylet/raylet", "raylet"), ("ray/gcs/gcs_server", "gcs_server"),
    ("ray::RayTrainWorker", "train workers"), ("torchrun_llm.py", "train workers"),
    ("spawn_main", "train workers"),  # cluster.launcher=processes: multiprocessing's spawned children
    ("ray::TrainController", "Train controller"), ("ray::DashboardAgent", "dashboard agent"),
    ("ray::RuntimeEnvAgent", "runtime_env agent"), ("ray::IDLE", "idle Ray workers"),
    ("default_worker.py", "Ray workers, starting"),
    ("ray-dashboard-", "dashboard modules"), ("dashboard/dashboard.py", "dashboard"),
    ("log_monitor.py", "log monitor"), ("monitor.py", "autoscaler monitor"),
    ("launch.py", "driver (launch.py)"), ("torch.distributed.run", "torchrun agent"),
    ("multiprocessing", "multiprocessing helpers"),
)


def process_kind(command_line: str) -> str:
    kind = next((kind for piece, kind in PROCESS_KINDS if piece in command_line), None)
    if kind is None and command_line.startswith("ray::"):  # another actor (Train's helpers, Ray Data's): its name
        kind = command_line.split()[0].split(".")[0]
    return kind or command_line[:40] or "?"


class ProcessSampler(threading.Thread):
    """Samples the CPU seconds of every process in a leg's tree once a second, until stopped."""

    def __init__(self, pid: int, *, interval_s: float = 1.0):
        super().__init__(daemon=True)
        self.root, self.interval_s, self.samples = pid, interval_s, {}
        self.stopped = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stopped.wait(self.interval_s):
            try:
                root = psutil.Process(self.root)
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            now = time.time()
            for process in processes:
                try:
                    times, command_line = process.cpu_times(), " ".join(process.cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                # A worker's title changes once it runs an actor: its latest kind is the one that counts.
                self.samples.setdefault(process.pid, []).append((now, times.user + times.system,
                                                                 process_kind(command_line)))


def cpu_shares(samples: dict, *, start: float, end: float) -> dict[str, float]:
    """Share of one core each kind of process used between `start` and `end` (from the samples nearest them)."""
    shares: dict[str, float] = {}
    for points in samples.values():
        inside = [point for point in points if start <= point[0] <= end]
        if len(inside) >= 2:
            kind = points[-1][2]
            shares[kind] = shares.get(kind, 0.0) + (inside[-1][1] - inside[0][1]) / (end - start)
    return dict(sorted(shares.items(), key=lambda item: -item[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per leg")
    parser.add_argument("--warmup-steps", type=int, default=20, help="first steps left out of the steady state")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers = torchrun processes")
    parser.add_argument("--launchers", nargs="+", choices=LAUNCHERS, default=list(LAUNCHERS),
                        help="launch.py legs: cluster.launcher=ray and/or processes (torchrun always runs)")
    parser.add_argument("--model", default=None, help="model preset (a conf/model/ name, e.g. llm_125m)")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for both legs")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "slipway-bench-overhead",
                        help="output folder; each invocation writes a new bench-<time>/ inside it")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of both legs; medians are reported")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a leg may run before it is killed")
    args = parser.parse_args(argv)
    if not 1 <= args.warmup_steps < args.steps - 1:
        parser.error(f"--warmup-steps must be at least 1 and below --steps - 1 = {args.steps - 1}")
    if args.workers < 1 or args.repeats < 1:
        parser.error("--workers and --repeats must be at least 1")
    for key in (override_key(override) for override in args.overrides):
        if key in CONTROLLED_KEYS:
            hint = f"use {CONTROLLED_KEYS[key]}" if CONTROLLED_KEYS[key] else "the bench sets it"
            parser.error(f"--overrides may not set {key} ({hint}): both legs must do the same work")
    return args


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def build_overrides(args: argparse.Namespace, *, run_root: Path) -> list[str]:
    """Hydra overrides for both legs: logging every step, eval and checkpoint only at the very end.

    Each round needs a run root of its own: launch.py names a run by its config hash and would resume (or
    skip, when finished) a run of the same config found under the same root.
    """
    data_cache = [] if any(override_key(o) == "paths.data_cache" for o in args.overrides) else [
        f"paths.data_cache={args.out.resolve() / 'data'}"]
    return [
        f"+exp={EXPERIMENT}",
        *([f"model={args.model}"] if args.model else []),
        *args.overrides,
        f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=1",
        f"trainer.eval_every_n_steps={args.steps}",
        f"checkpoint.every_n_steps={args.steps}",
        f"cluster.num_workers={args.workers}",
        f"paths.root={run_root}",
        *data_cache,
    ]


def run_leg(name: str, command: list[str], *, log_path: Path, timeout: float) -> tuple[float, float, dict]:
    """Run one leg with its output in `log_path`; returns (spawned_at, wall seconds, its processes' CPU samples).
    Raises if it fails."""
    logger.info("leg %s: %s\n  log: %s", name, " ".join(command), log_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        spawned_at = time.time()
        # A session of its own, so a timeout or Ctrl-C can end the leg's whole process tree (torchrun's workers).
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        sampler = ProcessSampler(process.pid)
        sampler.start()
        try:
            code = process.wait(timeout=timeout)
        except BaseException:
            _end_process_group(process)
            raise
        finally:
            sampler.stopped.set()
            sampler.join()
    wall = time.time() - spawned_at
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"leg {name} exited with status {code}; last lines of {log_path}:\n{tail}")
    logger.info("leg %s finished in %.1f s", name, wall)
    return spawned_at, wall, sampler.samples


def _end_process_group(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=SECONDS_TO_KILL)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def read_step_rows(path: Path) -> dict[int, dict]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row
    return rows


def ray_run_dir(log_path: Path) -> Path:
    """The run directory named by launch.py's final `run_dir: <path>` line."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith("run_dir: ")]
    if not lines:
        raise RuntimeError(f"launch.py printed no 'run_dir: <path>' line; see {log_path}")
    return Path(lines[-1].removeprefix("run_dir: ").strip())


def run_launch_leg(launcher: str, overrides: list[str], *, round_dir: Path, timeout: float) -> LegResult:
    from trainers import startup

    log_path = round_dir / f"{launcher}.log"
    command = [sys.executable, str(REPO_ROOT / "launch.py"), *overrides, f"cluster.launcher={launcher}"]
    spawned_at, wall, samples = run_leg(f"launch.py, cluster.launcher={launcher}", command, log_path=log_path,
                                        timeout=timeout)
    run_dir = ray_run_dir(log_path)
    return LegResult(name=launcher, spawned_at=spawned_at, wall_s=wall,
                     rows=read_step_rows(run_dir / "metrics.jsonl"), cpu_samples=samples,
                     startup=startup.phases(run_dir))


def run_torchrun_leg(config_path: Path, *, data_dir: Path, workers: int, round_dir: Path,
                     timeout: float) -> LegResult:
    steps_path = round_dir / "torchrun_steps.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
               str(TORCHRUN_SCRIPT), "--config", str(config_path), "--data", str(data_dir), "--out", str(steps_path)]
    spawned_at, wall, samples = run_leg("B (torchrun)", command, log_path=round_dir / "torchrun.log", timeout=timeout)
    return LegResult(name="torchrun", spawned_at=spawned_at, wall_s=wall, rows=read_step_rows(steps_path),
                     cpu_samples=samples)


def summarize(leg: LegResult, *, first: int, last: int, tokens_per_step: int) -> dict:
    """Start-up and steady-state figures of one leg; the window runs from the end of step `first` to `last`."""
    missing = [step for step in (1, *range(first, last + 1)) if step not in leg.rows]
    if missing:
        raise RuntimeError(f"leg {leg.name} has no metrics row for steps {missing[:10]}")
    times = {step: leg.rows[step]["time"] for step in range(first, last + 1)}
    step_seconds = [times[step] - times[step - 1] for step in range(first + 1, last + 1)]
    shares = cpu_shares(leg.cpu_samples, start=times[first], end=times[last])
    return {
        "seconds_to_first_step": leg.rows[1]["time"] - leg.spawned_at,
        "tokens_per_s": (last - first) * tokens_per_step / (times[last] - times[first]),
        "mean_step_ms": 1000 * statistics.fmean(step_seconds),
        "median_step_ms": 1000 * statistics.median(step_seconds),
        "wall_s": leg.wall_s,
        **{f"cpu {kind}": share for kind, share in shares.items()},
        **{f"startup {phase}": seconds for phase, seconds in (leg.startup or {}).items()},
    }


def last_common_loss(ray: LegResult, torchrun: LegResult) -> tuple[int, float, float] | None:
    common = [step for step in ray.rows if "train_loss" in ray.rows[step]
              and "train_loss" in torchrun.rows.get(step, {})]
    if not common:
        return None
    step = max(common)
    return step, ray.rows[step]["train_loss"], torchrun.rows[step]["train_loss"]


def median_figures(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per leg, the median over rounds of each figure (a process kind a round did not see counts as 0)."""
    medians = {}
    for leg in rounds[0]:
        keys = list(dict.fromkeys(key for figures in rounds for key in figures[leg]))
        medians[leg] = {key: statistics.median(figures[leg].get(key, 0.0) for figures in rounds) for key in keys}
    return medians


def print_breakdowns(figures: dict[str, dict]) -> None:
    """The launch.py legs' start-up phases, and each leg's CPU use by process kind in the steady state."""
    for leg, figure in figures.items():
        phases = {key.removeprefix("startup "): value for key, value in figure.items() if key.startswith("startup ")}
        if phases:
            total = phases.pop("total")
            print(f"\n{LEG_TITLES[leg]}: {total:.1f} s from spawn to the end of step 1 (launch.py's milestones, "
                  "trainers/startup.py)")
            for phase, seconds in phases.items():
                print(f"  {phase:40}{seconds:6.1f} s")
    for leg, figure in figures.items():
        shares = {key.removeprefix("cpu "): value for key, value in figure.items() if key.startswith("cpu ")}
        others = sum(share for kind, share in shares.items() if kind != "train workers")
        print(f"\n{leg}: CPU in the steady state, share of one core (all but the workers: {others:.1%})")
        for kind, share in sorted(shares.items(), key=lambda item: -item[1]):
            print(f"  {kind:40}{share:7.1%}")


def print_report(figures: dict[str, dict], *, losses: dict, first: int, last: int, tokens_per_step: int,
                 round_ratios: dict[str, list[float]]) -> dict[str, dict]:
    """The legs side by side, then each launch.py leg's ratios to torchrun; returns those ratios."""
    torchrun = figures["torchrun"]
    repeats = len(next(iter(round_ratios.values())))
    rounds = f", median of {repeats} rounds" if repeats > 1 else ""
    print(f"\nsteady state: steps {first + 1}..{last}, {tokens_per_step} tokens per step{rounds}")
    print(f"{'':28}" + "".join(f"{LEG_TITLES[leg]:>14}" for leg in figures))
    table = [("seconds to first step", "seconds_to_first_step", "{:14.1f}"),
             ("steady-state tokens/s", "tokens_per_s", "{:14,.0f}"),
             ("mean step (ms)", "mean_step_ms", "{:14.1f}"),
             ("median step (ms)", "median_step_ms", "{:14.1f}"),
             ("wall, spawn to exit (s)", "wall_s", "{:14.1f}")]
    for label, key, fmt in table:
        print(f"{label:28}" + "".join(fmt.format(figure[key]) for figure in figures.values()))
    ratios = {}
    for launcher, loss in losses.items():
        if loss:
            step, ours, theirs = loss
            relative = abs(ours - theirs) / max(abs(theirs), 1e-12)
            print(f"{launcher} train_loss at step {step}: {ours:.6f} against torchrun's {theirs:.6f} "
                  f"(relative difference {relative:.2e})")
        else:
            print(f"{launcher} train_loss: no step logged by both it and torchrun")
        if repeats > 1:
            print(f"{launcher} ratio per round: " + ", ".join(f"{ratio:.2f}" for ratio in round_ratios[launcher]))
        steady = figures[launcher]["tokens_per_s"] / torchrun["tokens_per_s"]
        start = figures[launcher]["seconds_to_first_step"] / torchrun["seconds_to_first_step"]
        print(f"ratio {launcher}/torchrun steady-state tokens/s: {steady:.2f} (target >= 0.97)")
        print(f"ratio {launcher}/torchrun seconds to first step: {start:.2f} (target < {STARTUP_TARGET:g})")
        ratios[launcher] = {"tokens_per_s": steady, "seconds_to_first_step": start}
    return ratios


def run_round(index: int, args: argparse.Namespace, *, bench_dir: Path, config_path: Path,
              data_dir: Path) -> list[LegResult]:
    round_dir = bench_dir / f"round-{index}"
    round_dir.mkdir()
    if args.repeats > 1:
        logger.info("round %d of %d", index, args.repeats)
    legs = [run_launch_leg(launcher, build_overrides(args, run_root=round_dir / launcher), round_dir=round_dir,
                           timeout=args.timeout) for launcher in args.launchers]
    legs.append(run_torchrun_leg(config_path, data_dir=data_dir, workers=args.workers, round_dir=round_dir,
                                 timeout=args.timeout))
    return legs


def main(argv: list[str] | None = None) -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # scripts/ is not a package: conf/ and datasets/ live at the root
    from omegaconf import OmegaConf

    from datasets.text import prepare_text
    from trainers.config import compose

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    bench_dir = (args.out / time.strftime("bench-%Y%m%d-%H%M%S")).resolve()
    bench_dir.mkdir(parents=True)
    # Composed once for the torchrun leg and the data; each round's Ray leg composes the same overrides itself.
    dict_cfg = compose(build_overrides(args, run_root=bench_dir))
    config_path = bench_dir / "torchrun_config.yaml"
    config_path.write_text(OmegaConf.to_yaml(dict_cfg, resolve=True))
    cfg = OmegaConf.to_object(dict_cfg)
    # Prepared here, once, so that neither leg's start-up includes tokenizing the corpus.
    prepared = prepare_text(cfg.data, cache_root=Path(cfg.paths.data_cache).resolve(),
                            max_seq_len=cfg.model.max_seq_len)
    first, last = args.warmup_steps, args.steps - 1
    tokens_per_step = cfg.trainer.global_batch_size * prepared.seq_len
    rounds, losses = [], None
    for index in range(1, args.repeats + 1):
        legs = run_round(index, args, bench_dir=bench_dir, config_path=config_path, data_dir=Path(prepared.root))
        rounds.append({leg.name: summarize(leg, first=first, last=last, tokens_per_step=tokens_per_step)
                       for leg in legs})
        losses = {leg.name: last_common_loss(leg, legs[-1]) for leg in legs[:-1]}
    round_ratios = {launcher: [figures[launcher]["tokens_per_s"] / figures["torchrun"]["tokens_per_s"]
                               for figures in rounds] for launcher in args.launchers}
    figures = median_figures(rounds)
    print_breakdowns(figures)
    ratios = print_report(figures, losses=losses, first=first, last=last, tokens_per_step=tokens_per_step,
                          round_ratios=round_ratios)
    results = {"overrides": build_overrides(args, run_root=bench_dir), "window": [first, last],
               "tokens_per_step": tokens_per_step, "legs": figures, "ratios": ratios, "rounds": rounds,
               "last_common_loss": losses}
    (bench_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {bench_dir / 'results.json'}")


if __name__ == "__main__":
    main()
