"""Exporting a checkpoint: wall seconds and peak RSS of serve/export.py's streamed export against the whole-dict
path it replaced, on a mid-size LLM, to the Hugging Face layout in bf16.

    python scripts/bench_export.py                  # llm_1b's shape, vocabulary 32000: 1.1B parameters, 4.4 GB fp32
    python scripts/bench_export.py --shard-mb 500   # smaller shards: smaller groups
    python scripts/bench_export.py --smoke          # 20M parameters, for tests

The checkpoint is what FSDP2 writes (the fsdp strategy's format: DCP under <checkpoint>/dcp, model_config.json,
tokenizer.json), written here by one process: the model is built on the meta device, materialized with
to_empty, initialized (model.init_weights) and saved with torch.distributed.checkpoint. Then each leg exports
it in a fresh process, so that each peak RSS (getrusage's ru_maxrss: the most resident memory the process ever
had) is the leg's own:
  - streamed: serve.export.export_checkpoint, as promotion runs it: the layout plans shards of at most
    --shard-mb in bf16, and each shard's tensors are read from DCP (only their keys), cast, written and freed
    before the next shard is read. Expected peak over the start: one shard's tensors in fp32 (2x the shard in
    bf16) and one cast tensor.
  - whole-dict: the path before streaming: every tensor consolidated at once in fp32
    (consolidated_from_checkpoint), then written by the same layout, one shard cast at a time. Expected: the
    whole model in fp32 plus one shard in bf16.
"Start" is the RSS after imports, before the export; "peak over start" is what the export itself cost. Both
exports must hold the same weights (the index's weights digest). The checkpoint and the exports are deleted at
the end unless --keep. Results also go to <out>/bench-<time>/results.json.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
# conf/model/llm_1b.yaml (Llama 3.2 1B's shape) with a 32000-token vocabulary, untied (1.1B parameters).
LLM_1B = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_hidden": 8192, "max_seq_len": 4096,
          "rope_theta": 500000.0, "tie_embeddings": False, "vocab_size": 32000}
# The same architecture at 20M parameters (80 MB in fp32, 6 shards of 8 MB in bf16): large enough that the two
# legs' memory figures stand clear of the allocator's noise.
SMOKE = {**LLM_1B, "dim": 512, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 2048, "max_seq_len": 256,
         "vocab_size": 4096}
LEGS = ("streamed", "whole-dict")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a small model of the same architecture (tests)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "slipway-bench-export",
                        help="output folder; each invocation writes a new bench-<time>/ inside it")
    parser.add_argument("--shard-mb", type=float, default=None,
                        help="export shard size in MB (serve.export_shard_gb; default 1000, smoke 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each process")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the exports")
    parser.add_argument("--leg", choices=("write", *LEGS), help=argparse.SUPPRESS)  # internal: run one leg, print JSON
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--export", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shape = SMOKE if args.smoke else LLM_1B
    args.shard_bytes = int((args.shard_mb or (8 if args.smoke else 1000)) * 1e6)
    return args


def rss_now() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------- the checkpoint

def model_config(shape: dict) -> dict:
    from omegaconf import OmegaConf

    from conf.schema import LLMConfig

    shape = dict(shape)
    vocab_size = shape.pop("vocab_size")
    model = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(LLMConfig), shape))
    return {"family": "llm", "model": model, "vocab_size": vocab_size, "seq_len": 128, "tokenizer": "tokenizer.json"}


def write_checkpoint(directory: Path, shape: dict, *, threads: int, shard_bytes: int) -> dict:
    """A DCP checkpoint of the model as FSDP2's format lays it out, with its model config and a tokenizer."""
    import torch
    import torch.distributed.checkpoint as dcp

    from datasets.tokenizer import train_tokenizer
    from serve.export import build_model_from_config
    from trainers.checkpointing import MODEL_CONFIG_FILE
    from trainers.strategies.fsdp import DCP_DIR

    torch.set_num_threads(threads)
    directory.mkdir(parents=True)
    config = model_config(shape)
    # Only the special tokens are read from it (the export's config.json), not its vocabulary.
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(200)]
    train_tokenizer(texts, vocab_size=512).save(str(directory / "tokenizer.json"))
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    torch.manual_seed(0)
    model = build_model_from_config(config, device="meta")
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    state = model.state_dict()
    dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(str(directory / DCP_DIR)), no_dist=True)
    return {"parameters": sum(t.numel() for t in state.values()), "tensors": len(state),
            "largest_group_fp32_bytes": largest_group_bytes(config, shard_bytes=shard_bytes)}


# ----------------------------------------------------------------------------------------------- the legs

def run_leg(args: argparse.Namespace) -> None:
    """One export in this (fresh) process; prints its figures as one JSON line."""
    import torch

    from serve.export import consolidated_from_checkpoint, export_checkpoint, family_of, read_model_config
    from trainers.checkpointing import checkpoint_format

    torch.set_num_threads(args.threads)
    # What both legs do before reading any weight, done once first so that "start" is past it: the modules the
    # export imports on first use, and the model built on the meta device (its names and shapes).
    import safetensors.torch  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    from conf.pretrained import checkpoint_config_json  # noqa: F401
    from serve.export import model_template

    model_template(read_model_config(args.checkpoint))
    start = rss_now()
    started = time.perf_counter()
    if args.leg == "streamed":
        export_checkpoint(args.checkpoint, args.export, info={}, dtype=torch.bfloat16, shard_bytes=args.shard_bytes)
    else:  # the whole-dict path: everything consolidated in fp32 first, then the same layout writes it
        config = read_model_config(args.checkpoint)
        state = consolidated_from_checkpoint(args.checkpoint, model_config=config,
                                             stored=checkpoint_format(args.checkpoint))
        args.export.mkdir(parents=True)
        shutil.copyfile(args.checkpoint / "tokenizer.json", args.export / "tokenizer.json")
        family_of(config).export_layout.write(state, args.export, model_config=config, dtype=torch.bfloat16,
                                              shard_bytes=args.shard_bytes)
        del state
    seconds = time.perf_counter() - started
    index = json.loads((args.export / "model.safetensors.index.json").read_text())
    print(json.dumps({"leg": args.leg, "seconds": seconds, "start_rss": start, "peak_rss": peak_rss(),
                      "shards": len(set(index["weight_map"].values())),
                      "digest": index["metadata"]["slipway_weights_sha256"]}), flush=True)


def spawn_leg(args: argparse.Namespace, leg: str, *, checkpoint: Path, export: Path | None = None) -> dict:
    """`leg` in a fresh process. Spawned from this one, which imports no torch and stays small: Linux carries
    the parent's peak RSS into the child's ru_maxrss through fork and exec."""
    command = [sys.executable, __file__, "--leg", leg, "--checkpoint", str(checkpoint),
               "--shard-mb", str(args.shard_bytes / 1e6), "--threads", str(args.threads)]
    if export is not None:
        command += ["--export", str(export)]
    if args.smoke:
        command.append("--smoke")
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {leg} leg exited with {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- the report

def largest_group_bytes(config: dict, *, shard_bytes: int) -> int:
    """The largest group the streamed export reads at once, in fp32: the largest planned shard's tensors."""
    import math

    import torch

    from serve.export import family_of, model_template

    template = model_template(config)
    plan = family_of(config).export_layout.plan({name: tuple(t.shape) for name, t in template.items()},
                                                model_config=config, dtype=torch.bfloat16, shard_bytes=shard_bytes)
    return max(sum(4 * math.prod(template[name].shape) for name in group) for group in plan)


def report(args, facts: dict, legs: dict) -> dict:
    fp32, bf16, group_bytes = 4 * facts["parameters"], 2 * facts["parameters"], facts["largest_group_fp32_bytes"]
    print(f"model: {facts['parameters']:,} parameters, {fp32 / MIB:,.0f} MiB in fp32, {bf16 / MIB:,.0f} MiB in bf16; "
          f"shards of at most {args.shard_bytes / 1e6:,.0f} MB in bf16, the largest group {group_bytes / MIB:,.0f} "
          f"MiB in fp32")
    print(f"{'leg':<12}{'seconds':>10}{'shards':>8}{'start MiB':>12}{'peak MiB':>11}{'peak over start':>17}"
          f"{'/ fp32 model':>14}{'/ bf16 export':>15}")
    for leg, figures in legs.items():
        over = figures["peak_rss"] - figures["start_rss"]
        figures["peak_over_start"] = over
        print(f"{leg:<12}{figures['seconds']:>10.1f}{figures['shards']:>8}{figures['start_rss'] / MIB:>12,.0f}"
              f"{figures['peak_rss'] / MIB:>11,.0f}{over / MIB:>17,.0f}{over / fp32:>14.2f}{over / bf16:>15.2f}")
    streamed, whole = legs["streamed"]["peak_over_start"], legs["whole-dict"]["peak_over_start"]
    print(f"ratio peak over start, streamed / whole-dict: {streamed / whole:.2f}")
    same = legs["streamed"]["digest"] == legs["whole-dict"]["digest"]
    print(f"weights identical (index digest): {'yes' if same else 'NO'}")
    # An 8B model (Llama 3 8B's shape, 8.03e9 parameters) at the default 5 GB shards, by the same arithmetic.
    print("8B in bf16 at 5 GB shards: whole-dict ~32.1 GB fp32 + 5 GB shard; streamed ~10 GB (one shard in fp32) "
          "+ one cast tensor")
    if not same:
        raise SystemExit("the streamed export's weights differ from the whole-dict export's")
    return {"model": facts, "shard_bytes": args.shard_bytes, "legs": legs}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    if args.leg == "write":
        print(json.dumps(write_checkpoint(args.checkpoint, args.shape, threads=args.threads,
                                          shard_bytes=args.shard_bytes)), flush=True)
        return
    if args.leg:
        run_leg(args)
        return
    out = args.out / time.strftime("bench-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    checkpoint = out / "checkpoint"
    try:
        started = time.perf_counter()
        facts = spawn_leg(args, "write", checkpoint=checkpoint)
        print(f"wrote the DCP checkpoint in {time.perf_counter() - started:.1f} s: {checkpoint}", flush=True)
        legs = {leg: spawn_leg(args, leg, checkpoint=checkpoint, export=out / leg) for leg in LEGS}
        results = report(args, facts, legs)
    finally:
        if not args.keep:
            for path in (checkpoint, *(out / leg for leg in LEGS)):
                shutil.rmtree(path, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
