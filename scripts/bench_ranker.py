"""Ranker training throughput on CPU: samples/s on 1 and on 2 workers, and where a step's time goes.

    python scripts/bench_ranker.py                       # DLRM small as +exp=ranker_dlrm trains it (1024 rows a step)
    python scripts/bench_ranker.py --global-batch 8192 --micro-batch 4096 --steps 100 --warmup-steps 20
    python scripts/bench_ranker.py --model dcn_small --repeats 3

Each leg runs `python launch.py +exp=ranker_dlrm` with the same global batch, so the 2-worker leg splits each
step's rows over two processes (one core each) and the 1-worker leg does them all on one core, in
micro-batches of the same size. From the
legs' metrics.jsonl it reports, over the steady state (log windows after --warmup-steps, before the last
step, which evaluates and checkpoints):
  - samples/s, and the scaling ratio samples/s(2 workers) / samples/s(1 worker) (ideal: 2.0);
  - seconds per step, split into data wait (blocked on the next batch from Ray Data) and compute (the
    rest: forward, backward, gradient sync, optimizer), and the data-wait share (target: under 5%).

--breakdown instead measures, outside Ray and on random inputs, what a bare step costs: one process at
--micro-batch rows and at twice that, and 2 processes with torch DDP over gloo at --micro-batch rows each.

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
    parser.add_argument("--global-batch", type=int, default=1024, help="rows per optimizer step (both legs)")
    parser.add_argument("--micro-batch", type=int, default=512,
                        help="rows per forward pass; the 1-worker leg accumulates global/micro of them")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of both legs; medians are reported")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "slipway-bench-ranker")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a leg may run")
    parser.add_argument("--breakdown", action="store_true", help="only time bare steps outside Ray (see above)")
    args = parser.parse_args(argv)
    if args.global_batch % (2 * args.micro_batch):
        parser.error("--global-batch must be a multiple of 2 x --micro-batch (it is split over 2 workers)")
    if not 1 <= args.warmup_steps < args.steps - 10:
        parser.error(f"--warmup-steps must be at least 1 and below --steps - 10 = {args.steps - 10}")
    return args


def run_leg(args: argparse.Namespace, *, workers: int, root: Path) -> Path:
    """One training run through launch.py; returns its run directory."""
    command = [
        sys.executable, str(REPO_ROOT / "launch.py"), "+exp=ranker_dlrm", f"model={args.model}",
        f"data.rows={args.rows}", f"cluster.num_workers={workers}", f"trainer.max_steps={args.steps}",
        f"trainer.global_batch_size={args.global_batch}", f"trainer.micro_batch_size={args.micro_batch}",
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
    if args.breakdown:
        breakdown(args)
        return 0
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
    print(f"\n{args.model}, global batch {args.global_batch}, micro-batch {args.micro_batch}, "
          f"steps {args.warmup_steps + 1}-{args.steps - 1} (median of {args.repeats} round(s))")
    print(f"{'workers':>8} {'samples/s':>11} {'ms/step':>8} {'data wait ms':>13} {'compute ms':>11} {'wait %':>7}")
    for workers in (1, 2):
        row = report[workers]
        print(f"{workers:>8} {row['samples_per_s']:>11,.0f} {row['step_time_s'] * 1e3:>8.1f} "
              f"{row['data_wait_s'] * 1e3:>13.2f} {row['compute_s'] * 1e3:>11.1f} {row['data_wait_frac']:>7.1%}")
    print(f"scaling ratio (2 workers / 1 worker): {report['scaling_ratio']:.2f}")


def _bare_model(model_name: str):
    """The preset on the default synthetic set's table sizes, outside Ray and launch.py."""
    from omegaconf import OmegaConf

    sys.path.insert(0, str(REPO_ROOT))
    from conf.schema import ClickLogDataConfig, RankerConfig
    from trainers.ranker import build_ranker

    preset = OmegaConf.load(REPO_ROOT / "conf" / "model" / f"{model_name}.yaml")
    preset.pop("defaults", None)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RankerConfig), preset))
    data = OmegaConf.load(REPO_ROOT / "conf" / "data" / "synthetic_clicks.yaml")
    cardinalities = list(data.get("cardinalities", ClickLogDataConfig().cardinalities))
    return build_ranker(cfg, num_dense=13, table_sizes=[card + 1 for card in cardinalities]), cardinalities


def _time_steps(model, cardinalities: list[int], rows: int, steps: int = 100) -> float:
    """Mean milliseconds of forward, backward and AdamW step on one thread, after 10 warmup steps."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dense = torch.randn(rows, 13)
    sparse = torch.stack([torch.randint(0, card, (rows,)) for card in cardinalities], dim=1).int()
    labels = (torch.rand(rows) < 0.3).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for index in range(steps + 10):
        if index == 10:
            started = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(model(dense, sparse), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps * 1e3


def _ddp_worker(rank: int, init_file: str, model_name: str, rows: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, cardinalities = _bare_model(model_name)
    milliseconds = _time_steps(DistributedDataParallel(model, gradient_as_bucket_view=True), cardinalities, rows)
    if rank == 0:
        Path(out).write_text(str(milliseconds))
    dist.destroy_process_group()


def breakdown(args: argparse.Namespace) -> dict:
    import torch
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    model, cardinalities = _bare_model(args.model)
    figures = {f"1 process, {args.micro_batch} rows": _time_steps(model, cardinalities, args.micro_batch),
               f"1 process, {2 * args.micro_batch} rows": _time_steps(model, cardinalities, 2 * args.micro_batch)}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "ddp_ms"
        mp.spawn(_ddp_worker, args=(str(Path(scratch) / "init"), args.model, args.micro_batch, str(out)), nprocs=2)
        figures[f"2 processes, DDP over gloo, {args.micro_batch} rows each"] = float(out.read_text())
    print("\nbare steps outside Ray (forward, backward, AdamW; one thread per process):")
    for name, milliseconds in figures.items():
        print(f"  {name}: {milliseconds:.1f} ms/step")
    return figures


if __name__ == "__main__":
    sys.exit(main())
