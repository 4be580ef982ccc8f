"""Tokens/s, MFU and peak memory of the training speed options, one short run per setting on one warm Ray.

    python scripts/bench_mfu.py --preset 1b                     # on a GPU machine: Llama-3.2-1B shape, FSDP2
    python scripts/bench_mfu.py --preset 8b --settings eager compiled selective
    python scripts/bench_mfu.py --smoke                         # llm_tiny on CPU: eager against compiled

Every setting runs the preset's model, data and batch through launch.py's own code (`launch.run`, in this
process, on an embedded Ray started once), changing only the options it names:

    eager       trainer.compile=false trainer.fused_optimizer=false: the loop as it ran before these options
    fused       + fused AdamW
    compiled    + torch.compile per block (trainer.compile=true): the GPU default
    no-ckpt     compiled, activation checkpointing off
    selective   compiled, selective activation checkpointing (matmul and attention outputs kept)
    full        compiled, full activation checkpointing (only each block's input kept)
    prefetch2   compiled, FSDP2 gathering two blocks ahead (strategy.fsdp_prefetch_blocks=2)
    gathered    compiled, FSDP2 not resharding after forward (strategy.fsdp_reshard_after_forward=false)

Presets, sized to one GPU of 80 GB or more: 1b is llm_1b_fsdp as it ships (micro batch 4 of 2,048 tokens);
8b keeps Llama-3-8B's width (dim 4096, FFN 14336, GQA 32/8) with 8 of its 32 layers on FSDP2, so that the fp32
master weights, gradients and Adam moments (16 bytes per parameter, 2.0B parameters) fit beside the
activations. Its llm_8b_zero3 preset's strategy is measured as one more setting (zero3-eager): ZeRO-3 cannot
compile its blocks (trainers/strategies/zero.py). On one GPU, prefetching and resharding move nothing between
GPUs, so those two settings show only their own cost there; run them with --workers N on N GPUs.

Figures per setting: the median of the logged windows after --skip-steps (compilation and allocator growth
happen in the first steps), tokens/s, MFU (the model's training FLOPs per token x tokens/s / the GPU's dense bf16
peak, cluster.peak_tflops_per_gpu: 6N + attention, no recomputation counted) and the peak memory the
allocator held; and the last training loss, which must agree across settings (they change how a step runs,
never what it computes).
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
TARGET_MFU_8B = 0.45

logger = logging.getLogger("bench_mfu")

# Each setting: the overrides it adds to the preset's.
COMPILED = ["trainer.compile=true", "trainer.fused_optimizer=true"]
SETTINGS = {
    "eager": ["trainer.compile=false", "trainer.fused_optimizer=false"],
    "fused": ["trainer.compile=false", "trainer.fused_optimizer=true"],
    "compiled": COMPILED,
    "no-ckpt": [*COMPILED, "trainer.activation_checkpointing=false"],
    "selective": [*COMPILED, "trainer.activation_checkpointing=true",
                  "trainer.activation_checkpointing_policy=selective"],
    "full": [*COMPILED, "trainer.activation_checkpointing=true", "trainer.activation_checkpointing_policy=full"],
    "prefetch2": [*COMPILED, "strategy.fsdp_prefetch_blocks=2"],
    "gathered": [*COMPILED, "strategy.fsdp_reshard_after_forward=false"],
    "zero3-eager": ["strategy=zero3", "trainer.compile=false", "trainer.fused_optimizer=false"],
}
GPU_RUN = ["cluster=gpu_node", "cluster.include_dashboard=false", "checkpoint.enabled=false",
           "trainer.eval_batches=1", "trainer.log_every_n_steps=5"]
PRESETS = {
    "1b": {"overrides": ["+exp=llm_1b_fsdp", *GPU_RUN, "trainer.global_batch_size=16",
                         "trainer.micro_batch_size=4"],
           "settings": ["eager", "fused", "compiled", "selective", "full", "prefetch2", "gathered"]},
    "8b": {"overrides": ["+exp=llm_8b_zero3", "strategy=fsdp", *GPU_RUN, "model.n_layers=8", "data.seq_len=4096",
                         "trainer.global_batch_size=8", "trainer.micro_batch_size=2"],
           "settings": ["zero3-eager", "eager", "compiled", "no-ckpt", "selective", "full"]},
    # CPU smoke: the tiny model, on one worker, eager against everything on.
    "tiny": {"overrides": ["+exp=llm_tiny", "cluster.include_dashboard=false", "checkpoint.enabled=false",
                           "data.max_chars=400000", "data.seq_len=64", "data.val_fraction=0.2",
                           "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.eval_batches=1",
                           "trainer.log_every_n_steps=1", "trainer.warmup_steps=1"],
             "settings": ["eager", "selective"]},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS),
                        help="which settings, in order (default: the preset's list)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per setting")
    parser.add_argument("--skip-steps", type=int, default=10, help="steps left out of the steady state")
    parser.add_argument("--workers", type=int, default=1, help="GPUs (Ray Train workers) per run")
    parser.add_argument("--smoke", action="store_true",
                        help="the CPU check: --preset tiny --steps 4 --skip-steps 1 on one worker")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every setting")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "slipway-bench-mfu",
                        help="output folder; each invocation writes a new bench-<time>/ inside it")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.steps, args.skip_steps = "tiny", 4, 1
    args.settings = args.settings or PRESETS[args.preset]["settings"]
    if args.steps <= args.skip_steps + 1:
        parser.error(f"--steps={args.steps} leaves no logged window after --skip-steps={args.skip_steps}")
    return args


def build_overrides(args: argparse.Namespace, setting: str, *, root: Path) -> list[str]:
    return [*PRESETS[args.preset]["overrides"], *SETTINGS[setting], f"cluster.num_workers={args.workers}",
            f"trainer.max_steps={args.steps}", f"trainer.eval_every_n_steps={args.steps}",
            f"paths.root={root / setting}", f"paths.data_cache={args.out.resolve() / 'data'}", *args.overrides]


def start_ray(dict_cfg) -> None:
    """The embedded Ray launch.py would start, started once for every setting."""
    from omegaconf import OmegaConf

    from cluster.connection import connect

    connect(OmegaConf.to_object(dict_cfg).cluster)


def steady_figures(run_dir: Path, *, skip_steps: int) -> dict:
    """Medians over the logged windows after `skip_steps`, and the last training loss."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [row for row in rows if "tokens_per_s" in row and row["step"] > skip_steps]
    if not windows:
        raise SystemExit(f"{run_dir}: no logged window after step {skip_steps}; raise --steps")
    last_loss = [row["train_loss"] for row in rows if "train_loss" in row][-1]

    def median(key: str) -> float | None:
        values = [row[key] for row in windows if key in row]
        return statistics.median(values) if values else None  # mfu and memory are logged on GPUs only

    return {"tokens_per_s": median("tokens_per_s"), "mfu": median("mfu"), "max_memory_gb": median("max_memory_gb"),
            "step_time_s": median("step_time_s"), "train_loss": last_loss, "windows": len(windows)}


def run_setting(dict_cfg, *, setting: str, skip_steps: int) -> dict:
    import launch

    logger.info("== %s ==", setting)
    started = time.time()
    _, run_dir = launch.run(dict_cfg, experiment=f"bench_mfu_{setting}")[0]
    figures = steady_figures(Path(run_dir), skip_steps=skip_steps)
    return {"setting": setting, "run_dir": str(run_dir), "wall_s": time.time() - started, **figures}


def print_table(results: list[dict], *, preset: str) -> None:
    baseline = results[0]["tokens_per_s"]
    print(f"\npreset {preset}: steady state per setting (vs {results[0]['setting']})")
    print(f"{'setting':<14}{'tokens/s':>12}{'ratio':>8}{'MFU':>8}{'peak GB':>9}{'s/step':>9}{'last loss':>11}")
    for result in results:
        mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
        memory = f"{result['max_memory_gb']:.1f}" if result["max_memory_gb"] is not None else "n/a"
        print(f"{result['setting']:<14}{result['tokens_per_s']:>12,.0f}{result['tokens_per_s'] / baseline:>8.2f}"
              f"{mfu:>8}{memory:>9}{result['step_time_s']:>9.3f}{result['train_loss']:>11.5f}")
    losses = [result["train_loss"] for result in results]
    spread = (max(losses) - min(losses)) / max(abs(min(losses)), 1e-12)
    print(f"last training loss: relative spread {spread:.1e} across settings (the same computation each)")
    best = max((result for result in results if result["mfu"] is not None), key=lambda r: r["mfu"], default=None)
    if best is not None:
        target = f" (target >= {TARGET_MFU_8B:.0%} for the 8b shape)" if preset == "8b" else ""
        print(f"best MFU: {best['mfu']:.1%} with {best['setting']}{target}")
    else:
        print("MFU: n/a (no CUDA worker: MFU is logged against a GPU's peak only)")


def main(argv: list[str] | None = None) -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # scripts/ is not a package: conf/ and trainers/ live at the root
    from trainers.config import compose

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    bench_dir = (args.out / time.strftime("bench-%Y%m%d-%H%M%S")).resolve()
    configs = {setting: compose(build_overrides(args, setting, root=bench_dir)) for setting in args.settings}
    start_ray(configs[args.settings[0]])
    results = [run_setting(configs[setting], setting=setting, skip_steps=args.skip_steps)
               for setting in args.settings]
    print_table(results, preset=args.preset)
    bench_dir.mkdir(parents=True, exist_ok=True)
    summary = {"args": {key: str(value) for key, value in vars(args).items()}, "results": results}
    (bench_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results: {bench_dir / 'results.json'}")


if __name__ == "__main__":
    main()
