"""Ranker training throughput on CPU: samples/s on 1 and on 2 workers, and where a step's time goes.

    python scripts/bench_ranker.py                       # DLRM small, 300 steps of 2048 rows, 5M-row data set
    python scripts/bench_ranker.py --model dcn_small --steps 200 --repeats 3

Each leg runs `python launch.py +exp=ranker_dlrm` with the same global batch, so the 2-worker leg splits each
step's rows over two processes (one core each) and the 1-worker leg does them all on one core. From the
legs' metrics.jsonl it reports, over the steady state (log windows after --warmup-steps, before the last
step, which evaluates and checkpoints):
  - samples/s, and the scaling ratio samples/s(2 workers) / samples/s(1 worker) (ideal: 2.0);
  - seconds per step, split into data wait (blocked on the next batch from Ray Data) and compute (the
    rest: forward, backward, gradient sync, optimizer), and the data-wait share (target: under 5%).

The data set is prepared once (as `python scripts/prepare_clicklog.py rows=...` would) in <out>/data.
--repeats N alternates the legs (1 2 1 2 ...) and reports medians: this machine's load moves single runs.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per leg")
    parser.add_argument("--warmup-steps", type=int, default=50, help="first steps left out of the steady state")
    parser.add_argument("--rows", type=int, default=5_000_000, help="synthetic rows (data.rows)")
    parser.add_argument("--model", default="dlrm_small", help="a conf/model/ ranker preset")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of both legs; medians are reported")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "slipway-bench-ranker")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a leg may run")
    args = parser.parse_args(argv)
    if not 1 <= args.warmup_steps < args.steps - 10:
        parser.error(f"--warmup-steps must be at least 1 and below --steps - 10 = {args.steps - 10}")
    return args


def run_leg(args: argparse.Namespace, *, workers: int, root: Path) -> Path:
    """One training run through launch.py; returns its run directory."""
    command = [
        sys.executable, str(REPO_ROOT / "launch.py"), "+exp=ranker_dlrm", f"model={args.model}",
        f"data.rows={args.rows}", f"cluster.num_workers={workers}", f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=10", f"trainer.eval_every_n_steps={args.steps}",
        f"checkpoint.every_n_steps={args.steps}", "checkpoint.enabled=false", "cluster.include_dashboard=false",
        f"paths.root={root}", f"paths.data_cache={args.out / 'data'}",
    ]
    log = root / "launch.log"
    root.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=args.timeout, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"the {workers}-worker leg failed (exit {done.returncode}); see {log}")
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("run_dir: "):
            return Path(line.removeprefix("run_dir: "))
    raise RuntimeError(f"no run_dir line in {log}")


def steady_state(run_dir: Path, *, warmup_steps: int, last_step: int) -> dict:
    """Means over the log windows that start after warmup and end before the last (evaluating) step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [row for row in rows if "samples_per_s" in row and warmup_steps < row["step"] < last_step]
    if not windows:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no log rows between steps {warmup_steps} and {last_step}")
    step_time = statistics.fmean(row["step_time_s"] for row in windows)
    wait = statistics.fmean(row["data_wait_s"] for row in windows)
    return {"samples_per_s": statistics.fmean(row["samples_per_s"] for row in windows), "step_time_s": step_time,
            "data_wait_s": wait, "compute_s": step_time - wait, "data_wait_frac": wait / step_time}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench_dir = args.out / time.strftime("bench-%Y%m%d-%H%M%S")
    results: dict[int, list[dict]] = {1: [], 2: []}
    for round_index in range(args.repeats):
        for workers in (1, 2):
            print(f"round {round_index + 1}/{args.repeats}: {workers} worker(s), {args.steps} steps ...", flush=True)
            run_dir = run_leg(args, workers=workers, root=bench_dir / f"round-{round_index}" / f"workers-{workers}")
            figures = steady_state(run_dir, warmup_steps=args.warmup_steps, last_step=args.steps)
            results[workers].append(figures)
            print(f"  {figures['samples_per_s']:,.0f} samples/s, {figures['step_time_s'] * 1e3:.1f} ms/step "
                  f"({figures['data_wait_frac']:.1%} data wait)", flush=True)
    report = {workers: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
              for workers, runs in results.items()}
    report["scaling_ratio"] = report[2]["samples_per_s"] / report[1]["samples_per_s"]
    print_report(report, args)
    (bench_dir / "results.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                         "runs": results, "report": report}, indent=2))
    print(f"results: {bench_dir / 'results.json'}")
    return 0


def print_report(report: dict, args: argparse.Namespace) -> None:
    print(f"\n{args.model}, global batch 2048, steps {args.warmup_steps + 1}-{args.steps - 1} "
          f"(median of {args.repeats} round(s))")
    print(f"{'workers':>8} {'samples/s':>11} {'ms/step':>8} {'data wait ms':>13} {'compute ms':>11} {'wait %':>7}")
    for workers in (1, 2):
        row = report[workers]
        print(f"{workers:>8} {row['samples_per_s']:>11,.0f} {row['step_time_s'] * 1e3:>8.1f} "
              f"{row['data_wait_s'] * 1e3:>13.2f} {row['compute_s'] * 1e3:>11.1f} {row['data_wait_frac']:>7.1%}")
    print(f"scaling ratio (2 workers / 1 worker): {report['scaling_ratio']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
