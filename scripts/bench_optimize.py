"""What each way of making a model cheaper buys and costs: stage=optimize's table for a small DLRM, a small DCN-v2
and the tiny LLM, trained here, plus decode speed of int8 at a larger LLM shape (random weights), and a
quality-against-latency plot of every child (optimize.png).

    python scripts/bench_optimize.py                 # about 10 minutes on 2 cores
    python scripts/bench_optimize.py --smoke         # a few steps each, short timings
    python scripts/bench_optimize.py --run dlrm=outputs/runs/ranker_dlrm-1a2b3c4d --models dlrm

Each model is trained, promoted and optimized by one launch.py command into a registry under --out (or, with
--run NAME=RUN_DIR, a finished run is promoted and optimized): `stage=optimize` derives one child per method,
measures parent and children on the same held-out rows and batches, and registers the children within the
quality bound (serve.optimize_max_quality_loss). Its tables are printed as it prints them.
Then, for the LLM, the pruning comparison of the Wanda paper (perplexity at 50% unstructured and 2:4, Wanda
against magnitude), and the int8 decode speed at the --large-llm preset's shape: tiny models spend their
decode step in Python and small kernels, where int8's per-call quantization costs more than its smaller GEMMs
save, so the tiny LLM alone would not show what int8 does for a real one.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# (experiment, registry model, training overrides, methods, quality bound)
RANKER_TRAINING = ["data.rows=400000", "trainer.max_steps=700", "trainer.eval_every_n_steps=350",
                   "checkpoint.every_n_steps=350", "trainer.warmup_steps=10"]
MODELS = {
    "dlrm": ("ranker_dlrm", RANKER_TRAINING, ["int8_dynamic", "int8_weight_only", "int8_tables", "compile"], 0.01),
    "dcn": ("ranker_dcn", RANKER_TRAINING, ["int8_dynamic", "int8_weight_only", "int8_tables", "compile"], 0.01),
    "llm": ("llm_tiny", ["trainer.max_steps=300"],
            ["int8_dynamic", "int8_weight_only", "compile", "prune_wanda_50", "prune_magnitude_50", "prune_2of4",
             "prune_magnitude_2of4"], 0.05),
}
SMOKE_TRAINING = {"dlrm": ["data.rows=20000", "trainer.max_steps=20", "trainer.global_batch_size=256",
                           "trainer.micro_batch_size=128"],
                  "llm": ["trainer.max_steps=10", "data.max_chars=400000", "data.seq_len=64", "data.val_fraction=0.2"]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per version and batch size")
    parser.add_argument("--large-llm", default="llm_125m", help="conf/model preset whose shape int8 decode is timed at")
    parser.add_argument("--smoke", action="store_true", help="a few training steps, short timings, no large LLM")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="optimize this finished run (launch.py's run_dir) rather than training NAME's")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "slipway-bench-optimize")
    args = parser.parse_args(argv)
    args.run = _run_dirs(args.run)
    return args


def launch(overrides: list[str], *, log: Path) -> str:
    """launch.py with `overrides`; its output goes to `log` and the tables it prints to ours."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "launch.py", *overrides], cwd=REPO_ROOT, env=env, text=True,
                            capture_output=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"launch.py {' '.join(overrides)} failed ({result.returncode}); see {log}:\n"
                         f"{result.stderr[-3000:]}")
    return result.stdout


def train_and_optimize(name: str, args) -> dict:
    """One launch.py command: train (or take --run's finished run), promote, optimize; returns optimize.json."""
    experiment, training, methods, bound = MODELS[name]
    if args.smoke:
        training = SMOKE_TRAINING.get("llm" if name == "llm" else "dlrm")
        methods = [method for method in methods if method not in ("compile", "prune_magnitude_2of4")]
    optimize = [f"paths.root={args.out}", f"serve.model=bench_{name}", f"serve.registry={args.out / 'registry'}",
                "serve.force=true", f"serve.optimize=[{','.join(methods)}]",
                f"serve.optimize_max_quality_loss={bound}", f"serve.optimize_time_s={args.seconds}"]
    if name in args.run:
        print(f"== {name}: promoting {args.run[name]} and optimizing it", flush=True)
        command = [f"serve.source={args.run[name]}", "stages=[promote,optimize]", *optimize]
    else:
        print(f"== {name}: training +exp={experiment}, promoting and optimizing it", flush=True)
        command = [f"+exp={experiment}", *training, "stages=[train,promote,optimize]", *optimize]
    stdout = launch(command, log=args.out / f"{name}.log")
    print("\n".join(line for line in stdout.splitlines() if not line.startswith(("optimize_dir", "run_dir",
                                                                                   "promotion"))), flush=True)
    optimize_dir = Path(stdout.strip().splitlines()[-1].removeprefix("optimize_dir: "))
    return json.loads((optimize_dir / "optimize.json").read_text())


def _run_dirs(values: list[str]) -> dict[str, Path]:
    runs = {}
    for value in values:
        name, _, directory = value.partition("=")
        if name not in MODELS or not directory:
            raise SystemExit(f"--run {value}: expected NAME=RUN_DIR with NAME one of {', '.join(MODELS)}")
        runs[name] = Path(directory)
    return runs


def pruning_summary(table: dict) -> list[str]:
    """Perplexity (exp of the held-out loss) of each pruned child against the dense parent."""
    rows = {row["label"]: row for row in table["rows"]}
    lines = ["LLM pruning (perplexity on the held-out split; zeros in dense matrices: no speed-up on CPU kernels)"]
    for label in ("parent", "prune_wanda_50", "prune_magnitude_50", "prune_2of4", "prune_magnitude_2of4"):
        if label in rows:
            lines.append(f"  {label:<22} perplexity {math.exp(rows[label]['metrics']['val_loss']):8.2f}")
    return lines


def large_llm_decode(preset: str, seconds: float) -> dict:
    """Decode tokens/s of a random-weight LLM of `preset`'s shape against its int8 children (one process, the
    same probe stage=optimize uses)."""
    import torch
    import yaml

    from serve.optimize import measure_speeds
    from trainers.exported import build_model_from_config
    from trainers.families import get_family
    from trainers.optimizations import get_method

    shape = {key: value for key, value in yaml.safe_load((REPO_ROOT / "conf" / "model" / f"{preset}.yaml")
                                                         .read_text()).items() if key != "defaults"}
    config = {"family": "llm", "model": shape, "vocab_size": 8192}
    family = get_family("llm")
    models = {"fp32": build_model_from_config(config).eval()}
    for method in ("int8_dynamic", "int8_weight_only"):
        child = build_model_from_config(config).eval()
        child.load_state_dict(models["fp32"].state_dict())
        models[method] = get_method(method).derive(child, family=family, settings={})
    sample = {"tokens": torch.randint(0, 8192, (8, 32))}
    speeds = measure_speeds(models, family="llm", sample=sample, batch_sizes=[1, 8], seconds=seconds)
    return {label: [vars(speed) for speed in rows] for label, rows in speeds.items()}


KERNEL_SHAPES = [(768, 768, 1), (2048, 768, 1), (768, 768, 8), (128, 128, 1), (429, 429, 512)]  # (out, in, batch)


def kernel_comparison(seconds: float) -> list[dict]:
    """One linear layer per shape: fp32 against our int8 modules (fbgemm dynamic, weight-only) and, when the
    torchao package is importable, torchao's int8 configs in eager mode: what chose the kernels
    (trainers/optimizations/quantize.py)."""
    import time

    import torch
    from torch import nn

    from trainers.optimizations.quantize import Int8Linear

    def per_call_us(layer: nn.Module, x: torch.Tensor) -> float:
        with torch.inference_mode():
            for _ in range(10):
                layer(x)
            calls, start = 0, time.perf_counter()
            while calls < 20 or time.perf_counter() - start < seconds / 10:
                layer(x)
                calls += 1
        return (time.perf_counter() - start) / calls * 1e6

    rows = []
    for out_features, in_features, batch in KERNEL_SHAPES:
        torch.manual_seed(0)
        linear, x = nn.Linear(in_features, out_features), torch.randn(batch, in_features)
        layers = {"fp32": linear, "int8_dynamic": Int8Linear.from_linear(linear, dynamic=True),
                  "int8_weight_only": Int8Linear.from_linear(linear, dynamic=False), **_torchao_layers(linear)}
        rows.append({"shape": [out_features, in_features, batch],
                     "us": {name: per_call_us(layer, x) for name, layer in layers.items()}})
    return rows


def _torchao_layers(linear) -> dict:
    import copy

    from torch import nn

    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return {}
    layers = {}
    for name, config in (("torchao_int8_dynamic", Int8DynamicActivationInt8WeightConfig()),
                         ("torchao_int8_weight_only", Int8WeightOnlyConfig())):
        layer = nn.Sequential(copy.deepcopy(linear))  # quantize_ swaps the linear layers inside a module
        quantize_(layer, config)
        layers[name] = layer
    return layers


def plot(tables: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    for axis, (name, table) in zip(axes[0], tables.items(), strict=True):
        metric = table["metric"]
        for row in table["rows"]:
            latency = row["speeds"][-1]["p50_ms"]
            marker = "*" if row["decision"] == "parent" else "o" if row["decision"] == "registered" else "x"
            axis.scatter(latency, row["metrics"][metric], marker=marker, s=80)
            axis.annotate(row["label"], (latency, row["metrics"][metric]), textcoords="offset points",
                          xytext=(4, 3), fontsize=7)
        batch = table["rows"][0]["speeds"][-1]["batch_size"]
        axis.set_title(f"{name} (o registered, x refused)")
        axis.set_xlabel(f"p50 ms of one forward at batch {batch}")
        axis.set_ylabel(metric + (" (higher is better)" if metric == "auc" else " (lower is better)"))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.models, args.seconds = ["dlrm", "llm"], min(args.seconds, 0.3)
    tables = {name: train_and_optimize(name, args) for name in args.models}
    results = {"tables": tables}
    if "llm" in tables:
        print("\n".join(pruning_summary(tables["llm"])), flush=True)
    if not args.smoke:
        decode = large_llm_decode(args.large_llm, args.seconds)
        results["large_llm_decode"] = decode
        print(f"int8 decode at the {args.large_llm} shape (random weights; tokens/s, x against fp32)", flush=True)
        for label, rows in decode.items():
            cells = "  ".join(f"batch {row['batch_size']}: {row['items_per_s']:8.0f} "
                              f"({row['items_per_s'] / decode['fp32'][i]['items_per_s']:.2f}x)"
                              for i, row in enumerate(rows))
            print(f"  {label:<18} {cells}", flush=True)
    kernels = kernel_comparison(args.seconds)
    results["kernels"] = kernels
    print("int8 kernels, one linear layer (microseconds per call; x: speed-up over fp32)", flush=True)
    for row in kernels:
        fp32 = row["us"]["fp32"]
        cells = "  ".join(f"{name} {us:8.1f} ({fp32 / us:.2f}x)" for name, us in row["us"].items())
        print(f"  out {row['shape'][0]:>4} in {row['shape'][1]:>4} batch {row['shape'][2]:>3}: {cells}", flush=True)
    plot(tables, args.out / "optimize.png")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"plot: {args.out / 'optimize.png'}\nresults: {args.out / 'results.json'}", flush=True)


if __name__ == "__main__":
    main()
