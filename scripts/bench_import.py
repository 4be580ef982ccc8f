"""Importing a Hugging Face Llama checkpoint: seconds and peak RSS per rank for Slipway on 2 gloo workers under
FSDP2, against transformers' `from_pretrained` in one process.

    python scripts/bench_import.py                         # Llama-3.2-1B's shape, random bf16 weights (2.3 GiB)
    python scripts/bench_import.py --dir /data/llama-1b-random --threads 2
    python scripts/bench_import.py --smoke                 # 23M parameters (43 MiB), for tests

The checkpoint has the shape of Meta's Llama-3.2-1B (the config.json of meta-llama/Llama-3.2-1B on the Hub:
hidden 2048, 16 layers, 32 heads, 8 key/value heads, intermediate 8192, vocabulary 128256, tied embeddings,
rope_theta 500000 with llama3 scaling factor 32, low 1, high 4, original 8192) and random bf16 weights. It is
written once into --dir with safetensors directly, shard by shard (~1 GB each, transformers' LlamaForCausalLM
tensor names, an index) beside a config.json written here: no model is built to write it, so writing holds one
shard in memory. A --dir that already holds a checkpoint of this shape (this script's, or a real download of
Llama-3.2-1B) is reused; one holding anything else is an error.

Every leg runs in fresh processes, so each peak RSS (getrusage's ru_maxrss: the most resident memory the process
ever had) is the leg's own:
  - slipway: 2 ranks (torch.multiprocessing spawn, gloo, CPU), the model built on the meta device, FSDP2 applied
    by the fsdp strategy's setup, which materializes only each rank's shards and calls `load_pretrained`: each
    rank reads the slices its shards hold. Per rank: setup seconds (build on meta, fully_shard, materialize,
    optimizer: setup without the load) and load seconds; RSS at the start (after imports and the process group),
    just before the load, and at the peak; the load's increment (peak - before the load) and the peak over the
    start (all the rank's model costs).
  - transformers: `AutoModelForCausalLM.from_pretrained(dir, dtype=...)` in one process, in bf16 (the
    checkpoint's dtype) and in fp32, which is what Slipway holds: FSDP2's sharded parameters are the fp32 master
    weights. Its seconds are the whole call (it builds the model and loads it). In the files' dtype its parameters
    are views of the mmapped files whose pages nothing has read yet, so a second row per dtype ("weights read")
    adds one pass reading every parameter: the figures of a model that has been used. The ratios use those.

Imports (torch's meta kernels included) are done before any figure on both sides. RSS includes the checkpoint
pages a process has touched through safetensors' mmap, not only its own tensors; those pages are shared page
cache, so the two ranks' figures overstate their sum. The files are read once before the legs so that no leg
pays for the disk. --threads sets torch's threads per process (default 1: the two ranks then use 2 cores,
transformers 1). Results also go to <out>/bench-<time>/results.json.
"""

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
# Meta's Llama-3.2-1B config.json (meta-llama/Llama-3.2-1B), in our model keys (conf/pretrained.py ADOPTED_KEYS).
LLAMA_3_2_1B = {
    "dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_hidden": 8192, "max_seq_len": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192},
    "norm_eps": 1e-5, "tie_embeddings": True, "vocab_size": 128256,
}
# The same architecture at 22.7M parameters (43 MiB in bf16, several shards) for the tests: it loads in a second,
# and is large enough that a rank's memory figures stand clear of the allocator's noise (a few MiB of freed heap
# that is already resident and reused) when the test holds them to the whole model in fp32.
SMOKE = {**LLAMA_3_2_1B, "dim": 512, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 1536,
         "max_seq_len": 256, "rope_scaling": {**LLAMA_3_2_1B["rope_scaling"], "original_max_seq_len": 64},
         "vocab_size": 32000}
BOS_ID, EOS_ID = 128000, 128001  # Llama 3's <|begin_of_text|> and <|end_of_text|>; no tokenizer is written
WORLD = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny model of the same architecture (tests)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "slipway-bench-import",
                        help="output folder; each invocation writes a new bench-<time>/ inside it")
    parser.add_argument("--dir", type=Path, default=None,
                        help="the checkpoint, written when absent (default: <out>/llama-3.2-1b-shape)")
    parser.add_argument("--shard-mb", type=float, default=None, help="safetensors shard size (default 1000; smoke 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a leg may run before it is killed")
    args = parser.parse_args(argv)
    args.shape = SMOKE if args.smoke else LLAMA_3_2_1B
    args.dir = args.dir or args.out / ("smoke-shape" if args.smoke else "llama-3.2-1b-shape")
    args.shard_bytes = int((args.shard_mb or (8 if args.smoke else 1000)) * 1e6)
    if args.threads < 1 or args.shard_bytes < 1:
        parser.error("--threads and --shard-mb must be positive")
    return args


def llm_config(shape: dict):
    from conf.schema import Llama3RopeScaling, LLMConfig

    scaling = shape["rope_scaling"]
    return LLMConfig(**{**shape, "rope_scaling": Llama3RopeScaling(**scaling) if scaling else None})


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MIB


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# ------------------------------------------------------------------------------------------ the checkpoint

def ensure_checkpoint(directory: Path, shape: dict, *, shard_bytes: int) -> str:
    """Write the checkpoint unless `directory` already holds this shape; returns "written" or "reused". A
    directory holding something else is an error, never overwritten."""
    from conf.pretrained import read_checkpoint_config
    from trainers.pretrained import check_checkpoint_tensors

    if directory.exists():
        try:
            found = read_checkpoint_config(directory)
            if found != shape:
                raise ValueError(f"its config.json describes {found}, not {shape}")
            check_checkpoint_tensors(directory, llm_config(shape), vocab_size=shape["vocab_size"])
        except ValueError as err:
            raise SystemExit(f"--dir {directory} exists but is not this benchmark's checkpoint ({err}); "
                             "remove it or pass another --dir") from None
        return "reused"
    write_checkpoint(directory, shape, shard_bytes=shard_bytes)
    check_checkpoint_tensors(directory, llm_config(shape), vocab_size=shape["vocab_size"])
    return "written"


def shard_groups(shapes: dict[str, tuple[int, ...]], *, shard_bytes: int) -> list[list[str]]:
    """Tensor names in files of at most `shard_bytes` of bf16 (a larger tensor gets a file of its own)."""
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return [*groups, current]


def write_checkpoint(directory: Path, shape: dict, *, shard_bytes: int, seed: int = 0) -> None:
    """Random bf16 weights under transformers' names, one shard in memory at a time, into a sibling folder that
    is renamed into place at the end: an interrupted write is never mistaken for a checkpoint."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from conf.pretrained import checkpoint_config_json
    from trainers.pretrained import INDEX_FILE, SHARD_NAME, expected_shapes

    shapes = expected_shapes(llm_config(shape), vocab_size=shape["vocab_size"])
    groups = shard_groups(shapes, shard_bytes=shard_bytes)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for index, names in enumerate(groups, start=1):
        file_name = SHARD_NAME.format(index=index, count=len(groups))
        shard = {name: _random_tensor(name, shapes[name], generator) for name in names}
        save_file(shard, str(partial / file_name), metadata={"format": "pt"})  # transformers checks "format"
        weight_map.update(dict.fromkeys(names, file_name))
        print(f"  wrote {file_name} ({len(names)} tensors, {sum(t.nbytes for t in shard.values()) / MIB:,.0f} MiB)",
              flush=True)
        del shard
    total = sum(2 * _numel(s) for s in shapes.values())
    (partial / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    special = {key: (token if token < shape["vocab_size"] else None)  # the smoke vocabulary is too small for them
               for key, token in (("bos_token_id", BOS_ID), ("eos_token_id", EOS_ID))}
    config = checkpoint_config_json(shape, vocab_size=shape["vocab_size"], dtype="bfloat16", **special)
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    partial.rename(directory)


def _random_tensor(name: str, shape: tuple[int, ...], generator):
    import torch

    if name.endswith("norm.weight"):  # RMSNorm scales start at one in trained models too; values are not judged
        return torch.ones(shape, dtype=torch.bfloat16)
    # Drawn in bf16 directly: an fp32 draw of the embedding alone would be another 1 GB.
    return torch.randn(shape, generator=generator, dtype=torch.bfloat16).mul_(0.02)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def warm_page_cache(directory: Path) -> None:
    """Read every file once, so that the first leg does not pay for the disk and the others not for the cache."""
    for path in sorted(directory.iterdir()):
        with path.open("rb") as handle:
            while handle.read(64 * MIB):
                pass


# ---------------------------------------------------------------------------------------- slipway leg

def _slipway_rank(rank: int, port: int, directory: str, out: str, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    # What setup and load import is imported here, before any figure is taken: the figures are memory, not modules.
    import safetensors.torch  # noqa: F401
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint import HuggingFaceStorageReader  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    from conf.pretrained import read_checkpoint_config
    from conf.schema import Precision, TrainerConfig
    from trainers import optim
    from trainers.llm import build_llm
    from trainers.pretrained import load_pretrained
    from trainers.strategies import build_strategy
    from trainers.strategies.fsdp import FSDPConfig

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cfg = llm_config(read_checkpoint_config(directory))
    # The first operations on the meta device import ~75 MiB of torch's meta kernels: a model of one tiny layer
    # pays for that before the start figure.
    build_llm(replace(cfg, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=8, max_seq_len=8), vocab_size=8,
              device="meta")
    figures = {"rank": rank, "rss_start_mib": current_rss_mib()}

    def load(model) -> None:
        figures["rss_before_mib"] = current_rss_mib()
        started = time.perf_counter()
        load_pretrained(model, directory)
        figures["load_s"] = time.perf_counter() - started
        figures["peak_after_load_mib"] = peak_rss_mib()

    started = time.perf_counter()
    strategy = build_strategy(FSDPConfig(), device=torch.device("cpu"), precision=Precision.fp32, accum_steps=1,
                              grad_clip=1.0, micro_batch_size=1)
    # As trainers/loop.py does for a pretrained FSDP2 run: on meta, so each rank only ever allocates its shards.
    with strategy.init_context(pretrained=True):
        model = build_llm(cfg, vocab_size=cfg.vocab_size, device="meta")
    trainer = TrainerConfig(lr=0.0, warmup_steps=0)
    strategy.setup(model, blocks=model.layers, weight_decay=0.0,
                   build_optimizer=lambda groups: optim.build_optimizer(groups, trainer),
                   build_scheduler=lambda opt: optim.build_scheduler(opt, trainer), load_weights=load)
    figures["setup_s"] = time.perf_counter() - started - figures["load_s"]
    figures["peak_rss_mib"] = peak_rss_mib()
    figures["held_params"] = sum(p.to_local().numel() for p in strategy.model.parameters())
    figures["param_dtype"] = str(next(strategy.model.parameters()).dtype).removeprefix("torch.")
    Path(out, f"slipway-rank{rank}.json").write_text(json.dumps(figures) + "\n")
    dist.destroy_process_group()


def run_slipway_leg(directory: Path, *, bench_dir: Path, threads: int, timeout: float) -> list[dict]:
    import torch.multiprocessing as mp

    context = mp.start_processes(_slipway_rank, args=(_free_port(), str(directory), str(bench_dir), threads),
                                 nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):  # raises, with the rank's traceback, when a rank fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            raise RuntimeError(f"the slipway leg ran past --timeout {timeout:.0f} s and was stopped")
    return [json.loads((bench_dir / f"slipway-rank{rank}.json").read_text()) for rank in range(WORLD)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------- transformers leg

def _transformers_leg(directory: str, dtype_name: str, out: str, threads: int) -> None:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the figures, as above)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar redrawn per tensor would bury the table in the output
    torch.set_num_threads(threads)
    rss_start = current_rss_mib()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype_name))
    figures = {"dtype": dtype_name, "load_s": time.perf_counter() - started, "rss_start_mib": rss_start,
               "rss_before_mib": rss_start, "peak_rss_mib": peak_rss_mib(),
               "held_params": sum(p.numel() for p in model.parameters()),
               "param_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    # Parameters in the files' dtype are views of the mmapped files: from_pretrained has read none of their pages,
    # the first forward would. Reading every weight once gives the figures of a model that has been used.
    with torch.no_grad():
        for param in model.parameters():
            param.max()
    figures["read_s"] = time.perf_counter() - started
    figures["peak_read_rss_mib"] = peak_rss_mib()
    Path(out, f"transformers-{dtype_name}.json").write_text(json.dumps(figures) + "\n")


def run_transformers_leg(directory: Path, *, dtype_name: str, bench_dir: Path, threads: int,
                         timeout: float) -> dict:
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(
        target=_transformers_leg, args=(str(directory), dtype_name, str(bench_dir), threads))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.terminate()
        process.join()
        raise RuntimeError(f"the transformers {dtype_name} leg ran past --timeout {timeout:.0f} s and was stopped")
    if process.exitcode != 0:
        raise RuntimeError(f"the transformers {dtype_name} leg failed (exit {process.exitcode}); see its traceback")
    return json.loads((bench_dir / f"transformers-{dtype_name}.json").read_text())


# ---------------------------------------------------------------------------------------------- report

def report_rows(ranks: list[dict], hf: dict[str, dict]) -> list[tuple[str, float | None, float, float, float, float]]:
    """(label, setup s, load s, RSS start, RSS before load, peak RSS) per table row."""
    rows = [(f"slipway rank {r['rank']} (fsdp2, {r['param_dtype']})", r["setup_s"], r["load_s"], r["rss_start_mib"],
             r["rss_before_mib"], r["peak_rss_mib"]) for r in ranks]
    for name, leg in hf.items():
        rows.append((f"transformers {name} (1 process)", None, leg["load_s"], leg["rss_start_mib"],
                     leg["rss_before_mib"], leg["peak_rss_mib"]))
        rows.append((f"transformers {name}, weights read", None, leg["read_s"], leg["rss_start_mib"],
                     leg["rss_before_mib"], leg["peak_read_rss_mib"]))
    return rows


def print_report(ranks: list[dict], hf: dict[str, dict], *, params: int) -> dict:
    print(f"\n{'leg':34}{'setup s':>9}{'load s':>9}{'RSS start':>11}{'before load':>13}{'peak RSS':>11}"
          f"{'load increment':>16}{'over start':>12}   (RSS in MiB)")
    for label, setup, load, start, before, peak in report_rows(ranks, hf):
        setup_column = f"{setup:9.2f}" if setup is not None else f"{'-':>9}"
        print(f"{label:34}{setup_column}{load:9.2f}{start:11,.1f}{before:13,.1f}{peak:11,.1f}{peak - before:16,.1f}"
              f"{peak - start:12,.1f}")
    print(f"\nfull model: {params:,} parameters, {4 * params / MIB:,.1f} MiB in fp32 (what Slipway's FSDP2 holds: its "
          f"sharded parameters are the fp32 master weights), {2 * params / MIB:,.1f} MiB in bf16 (the files)")
    for r in ranks:
        print(f"slipway rank {r['rank']} holds {r['held_params']:,} of them ({r['held_params'] / params:.1%})")
    print("RSS start: after imports (and, for slipway, the process group), before the model; load increment: peak "
          "- RSS before load; over start: peak - RSS start.\nslipway setup: model on meta, fully_shard, shards "
          "materialized, optimizer. transformers' load is its whole from_pretrained call (build and load); "
          "'weights read' adds one pass reading every parameter:\nfrom_pretrained leaves parameters in the files' "
          "dtype as views of the mmapped files, unread until first used.")
    slowest = max(r["setup_s"] + r["load_s"] for r in ranks)
    ratios = {}
    for name, leg in hf.items():
        ratios[name] = {"peak_rss": [r["peak_rss_mib"] / leg["peak_read_rss_mib"] for r in ranks],
                        "seconds": slowest / leg["load_s"], "seconds_with_read": slowest / leg["read_s"]}
        print(f"ratio peak RSS, slipway per rank / transformers {name} (weights read): "
              + ", ".join(f"rank {r['rank']} {peak:.2f}" for r, peak in zip(ranks, ratios[name]["peak_rss"],
                                                                            strict=True)))
    for name, ratio in ratios.items():
        print(f"ratio seconds, slipway slowest rank setup + load / transformers {name}: {ratio['seconds']:.2f} "
              f"(against from_pretrained and weights read: {ratio['seconds_with_read']:.2f})")
    return ratios


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # before torch is imported here or in a leg
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # scripts/ is not a package: conf/ and trainers/ live at the root
    bench_dir = (args.out / time.strftime("bench-%Y%m%d-%H%M%S")).resolve()
    bench_dir.mkdir(parents=True)
    directory = args.dir.resolve()
    what = "a tiny Llama" if args.smoke else "Llama-3.2-1B's shape"
    print(f"checkpoint {directory} ({what}, random bf16) ...", flush=True)
    state = ensure_checkpoint(directory, args.shape, shard_bytes=args.shard_bytes)
    files = sorted(directory.glob("*.safetensors"))
    print(f"  {state}: {len(files)} safetensors files, {sum(f.stat().st_size for f in files) / MIB:,.1f} MiB",
          flush=True)
    warm_page_cache(directory)
    print(f"slipway: {WORLD} gloo ranks, FSDP2, built on meta, load_pretrained ...", flush=True)
    ranks = run_slipway_leg(directory, bench_dir=bench_dir, threads=args.threads, timeout=args.timeout)
    hf = {}
    for dtype_name in ("bfloat16", "float32"):
        print(f"transformers: from_pretrained(dtype=torch.{dtype_name}) in one process ...", flush=True)
        hf[dtype_name] = run_transformers_leg(directory, dtype_name=dtype_name, bench_dir=bench_dir,
                                              threads=args.threads, timeout=args.timeout)
    hf = {"bf16": hf["bfloat16"], "fp32": hf["float32"]}
    params = hf["bf16"]["held_params"]
    ratios = print_report(ranks, hf, params=params)
    results = {"checkpoint": str(directory), "shape": args.shape, "threads": args.threads, "params": params,
               "slipway": ranks, "transformers": hf, "ratios": ratios}
    (bench_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {bench_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
