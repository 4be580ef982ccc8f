"""Plain torchrun DDP training of the LLM family: the baseline scripts/bench_overhead.py holds Ray Train against.

    python launch.py --cfg job +exp=llm_tiny [overrides] > cfg.yaml      # or the config bench_overhead.py writes
    torchrun --standalone --nproc_per_node=2 scripts/torchrun_llm.py \
        --config cfg.yaml --data <prepared dir> --out steps.jsonl

`--data` is a directory written by `datasets.text.prepare_text` for that config (the `text-<fingerprint>`
folder under paths.data_cache). Each step does what trainers/loop.py does with strategy=ddp and the same
config: the same model and initialization seed, optimizer, LR schedule, thread count, global batch split,
gradient accumulation (no_sync on all but the last micro-batch) and clipping, and an all-reduced train loss
(the Ray loop reduces one on every logged step; the bench logs every step). Nothing else: no Ray, no Ray Data,
no eval, no checkpoint. Rank 0 appends {"step", "time", "train_loss"} per step to `--out`.
"""

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# Modules of this repo (trainers/, datasets/) are imported inside functions: they resolve only once main()
# has put the repo root on sys.path.
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="resolved config YAML (launch.py --cfg job)")
    parser.add_argument("--data", type=Path, required=True, help="prepared text directory (holds meta.json)")
    parser.add_argument("--out", type=Path, required=True, help="jsonl that rank 0 writes one line per step to")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads per process; default: the Ray worker's rule, "
                             "trainer.torch_threads or cluster.cpus_per_worker (1 for llm_tiny)")
    return parser.parse_args(argv)


def load_config(path: Path):
    from omegaconf import OmegaConf

    from trainers.config import config_from_dict

    return config_from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def setup_distributed(cfg) -> tuple[int, int, torch.device]:
    """Join torchrun's process group: nccl on one GPU per process when cluster.use_gpu, else gloo on the CPU."""
    if "RANK" not in os.environ:
        raise ValueError("run this script under torchrun (it reads RANK, WORLD_SIZE and LOCAL_RANK)")
    if cfg.cluster.use_gpu and not torch.cuda.is_available():
        raise ValueError("cluster.use_gpu=true but torch sees no CUDA device; set cluster.use_gpu=false")
    if cfg.cluster.use_gpu:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def load_train_rows(prepared) -> torch.Tensor:
    """Every training row of the prepared shards, in shard order, as an int32 tensor (rows, seq_len + 1).

    The Ray path reads the same shards in the same order (preserve_order) and batches across shard
    boundaries, so concatenating them gives it exactly the same stream of global batches.
    """
    files = sorted(Path(prepared.train_dir).glob("part-*.parquet"))
    if not files:
        raise ValueError(f"{prepared.train_dir} has no part-*.parquet shards; prepare the data again")
    column = pa.concat_tables(pq.read_table(file, columns=["tokens"]) for file in files)["tokens"].combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False, writable=True)  # torch refuses read-only memory
    return torch.from_numpy(flat.reshape(len(column), prepared.seq_len + 1))


def global_batches(rows: torch.Tensor, *, batch_size: int) -> Iterator[torch.Tensor]:
    """Global batches in order, epoch after epoch, dropping each epoch's last partial batch like the Ray loop."""
    if len(rows) < batch_size:
        raise ValueError(f"{len(rows)} training rows hold no trainer.global_batch_size={batch_size} batch")
    while True:
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            yield rows[start:start + batch_size]


def build_training(cfg, *, data: dict, device: torch.device):
    """DDP-wrapped model, AdamW and schedule, built in the order and with the seed the Ray worker uses.

    `data` is the prepared data's plain dict, the one trainers/run.py hands the Ray workers; the model is
    built through the family interface as trainers/loop.py builds it, so the two legs cannot drift apart.
    """
    from trainers.families import get_family, init_device_for
    from trainers.optim import build_optimizer, build_scheduler
    from trainers.strategies.common import parameter_groups

    if cfg.model.family != "llm":
        raise ValueError(f"model.family={cfg.model.family!r}: this script trains only the llm family")
    family = get_family("llm")
    # DDP cannot materialize a model built on the meta device: this raises for model.init_device=meta.
    init_device = init_device_for(family, cfg.model, data=data, device=device, meta_supported=False)
    torch.manual_seed(cfg.trainer.seed)  # the same seed on every rank, as in trainers/loop.py
    model = family.build_model(cfg.model, data=data, device=init_device)
    model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(parameter_groups(model, weight_decay=cfg.trainer.weight_decay), cfg.trainer)
    return model, optimizer, build_scheduler(optimizer, cfg.trainer)


def train_step(model, optimizer, scheduler, rows: torch.Tensor, *, micro: int, grad_clip: float,
               device: torch.device, autocast) -> float:
    """One optimizer step over this rank's rows; returns this rank's mean micro-batch loss."""
    from trainers.families import get_family

    loss_fn = get_family("llm").loss
    accum_steps = len(rows) // micro
    losses = []
    for index in range(accum_steps):
        # A family's loss takes a batch as Ray Data yields it: a dict of column -> tensor.
        batch = {"tokens": rows[index * micro:(index + 1) * micro].to(device, non_blocking=True)}
        # Gradients are all-reduced only on the last micro-batch of the accumulation window.
        sync = contextlib.nullcontext() if index == accum_steps - 1 else model.no_sync()
        with sync:
            with autocast():
                loss = loss_fn(model, batch)
            (loss / accum_steps).backward()
        losses.append(loss.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return float(torch.stack(losses).mean())


def mean_over_ranks(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor[0] / dist.get_world_size())


def autocast_for(cfg, device: torch.device):
    """bf16 autocast where the Ray DDP strategy uses it (precision auto on GPU, or bf16), else nothing."""
    from conf.derived import resolve_precision
    from conf.schema import Precision

    if resolve_precision(cfg.trainer.precision, on_gpu=device.type == "cuda") == Precision.bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def train(cfg, *, rows: torch.Tensor, rank: int, world: int, device: torch.device, out: Path,
          data: dict) -> None:
    trainer = cfg.trainer
    if trainer.global_batch_size % (world * trainer.micro_batch_size):
        raise ValueError(f"trainer.global_batch_size={trainer.global_batch_size} must be a multiple of "
                         f"{world} processes x trainer.micro_batch_size={trainer.micro_batch_size}")
    per_rank = trainer.global_batch_size // world
    model, optimizer, scheduler = build_training(cfg, data=data, device=device)
    autocast = autocast_for(cfg, device)
    log = out.open("w") if rank == 0 else None
    try:
        batches = global_batches(rows, batch_size=trainer.global_batch_size)
        for step in range(1, trainer.max_steps + 1):
            mine = next(batches)[rank * per_rank:(rank + 1) * per_rank].long()
            loss = train_step(model, optimizer, scheduler, mine, micro=trainer.micro_batch_size,
                              grad_clip=trainer.grad_clip, device=device, autocast=autocast)
            finished = time.time()  # taken where trainers/loop.py stamps its metrics row: before the loss reduce
            mean_loss = mean_over_ranks(loss, device)
            if log:
                log.write(json.dumps({"step": step, "time": finished, "train_loss": mean_loss}) + "\n")
                log.flush()
    finally:
        if log:
            log.close()


def main(argv: list[str] | None = None) -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # scripts/ is not a package: trainers/ and datasets/ live at the root
    from datasets.text import load_prepared_text

    args = parse_args(argv)
    cfg = load_config(args.config)
    torch.set_num_threads(args.threads or cfg.trainer.torch_threads or max(1, int(cfg.cluster.cpus_per_worker)))
    rank, world, device = setup_distributed(cfg)
    try:
        prepared = load_prepared_text(args.data)
        if prepared.seq_len != cfg.data.seq_len:
            raise ValueError(f"{args.data} holds rows of seq_len {prepared.seq_len}, the config has "
                             f"data.seq_len={cfg.data.seq_len}; pass the data prepared for this config")
        rows = load_train_rows(prepared)
        train(cfg, rows=rows, rank=rank, world=world, device=device, out=args.out, data=prepared.to_dict())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
