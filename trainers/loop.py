"""`train_loop`: what every Ray Train worker runs (and a sweep's 1-worker trial, in its own process: what it asks
of whoever runs it goes through trainers/session.py).

Rebuild the typed config, build the model, apply the strategy, restore the latest checkpoint, then train
on this rank's slice of each global batch, evaluating, logging and checkpointing on schedule.

Data order: every worker reads the same ordered stream of global batches and takes rows
[rank * per_rank, (rank + 1) * per_rank) of each. The run then sees exactly the data a single process with
the same global batch would see, and resuming is "skip the batches already trained on". The price is that
each worker reads every token row; rows are a few KB against a step of compute, so it does not show.
"""

import logging
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from conf.derived import resolve_precision
from conf.schema import CheckpointingPolicy, Precision, RootConfig
from trainers import checkpointing, distill, optim, outputs, session, startup
from trainers.checkpointing import TrainState
from trainers.config import config_from_dict
from trainers.distill import Objective
from trainers.families import Batch, Family, get_family, init_device_for
from trainers.strategies import Strategy, build_strategy, get_strategy
from trainers.strategies.common import block_preparer
from trainers.tracking import Tracker

logger = logging.getLogger("slipway.train")

CRASH_AT_STEP_ENV = "SLIPWAY_TEST_CRASH_AT_STEP"  # test-only fault hook; see _maybe_inject_crash


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    precision: Precision
    accum_steps: int
    rows_per_rank: int  # rows of each global batch this rank trains on


def configure_worker_logging() -> None:
    """Our progress at INFO; Ray Train's per-report and Ray Data's per-execution lines only when they warn."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    for noisy in ("ray.data", "ray.train", "deepspeed", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if "ray.train" not in sys.modules:
        return  # a run without Ray (cluster.launcher=processes) does not import it for this
    # Ray Train names its per-report logger after its file path, outside the "ray.train" hierarchy; its
    # INFO line repeats every checkpoint's metrics, which our progress lines already show.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _setup_worker(cfg: RootConfig) -> WorkerContext:
    rank, world = session.rank_and_world()
    device = session.device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and DeepSpeed use the current device, not the tensor's
    per_rank = cfg.trainer.global_batch_size // world
    threads = cfg.trainer.torch_threads or max(1, int(cfg.cluster.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.trainer.seed)  # same seed on every rank: identical initial weights
    return WorkerContext(rank=rank, world_size=world, device=device,
                         precision=resolve_precision(cfg.trainer.precision, on_gpu=device.type == "cuda"),
                         accum_steps=per_rank // cfg.trainer.micro_batch_size, rows_per_rank=per_rank)


def _setup_strategy(cfg: RootConfig, family: Family, data: dict, ctx: WorkerContext) -> Strategy:
    strategy = build_strategy(cfg.strategy, device=ctx.device, precision=ctx.precision,
                              accum_steps=ctx.accum_steps, grad_clip=cfg.trainer.grad_clip,
                              micro_batch_size=cfg.trainer.micro_batch_size)
    load_weights = _pretrained_loader(cfg, family)
    device = init_device_for(family, cfg.model, data=data, device=ctx.device,
                             meta_supported=get_strategy(cfg.strategy.name).meta_init)
    if load_weights is not None and device.type != "meta":
        # Weights about to be loaded need no initialization: build on meta where the strategy materializes it.
        device = torch.device("meta") if get_strategy(cfg.strategy.name).meta_init else device
    with strategy.init_context(pretrained=load_weights is not None):
        model = family.build_model(cfg.model, data=data, device=device)
    on_gpu = ctx.device.type == "cuda"
    compiled, fused = compiles_blocks(cfg, family, on_gpu=on_gpu), fuses_optimizer(cfg, on_gpu=on_gpu)
    checkpointed, policy = cfg.trainer.activation_checkpointing, cfg.trainer.activation_checkpointing_policy
    strategy.setup(
        model, blocks=family.blocks(model),
        build_optimizer=partial(optim.build_optimizer, cfg=cfg.trainer, fused=fused),
        build_scheduler=partial(optim.build_scheduler, cfg=cfg.trainer),
        weight_decay=cfg.trainer.weight_decay,
        prepare_blocks=block_preparer(checkpointing=checkpointed, selective=policy == CheckpointingPolicy.selective,
                                      compile=compiled),
        load_weights=load_weights,
    )
    if ctx.rank == 0:
        logger.info("blocks: %s, %s; optimizer: %s AdamW", "compiled" if compiled else "eager",
                    f"{policy} activation checkpointing" if checkpointed else "no activation checkpointing",
                    "fused" if fused else "foreach")
    return strategy


def compiles_blocks(cfg: RootConfig, family: Family, *, on_gpu: bool) -> bool:
    """trainer.compile, where null: on for CUDA workers, for a family whose blocks are compute (transformer
    blocks, not a ranker's embedding tables) under a strategy that can compile them. run.py refuses an explicit
    true where it cannot apply. On CPU it stays off unless asked: Inductor's C++ build costs more start-up than
    a short CPU run gains."""
    if cfg.trainer.compile is not None:
        return cfg.trainer.compile
    return on_gpu and family.supports_activation_checkpointing and get_strategy(cfg.strategy.name).compiles_blocks


def fuses_optimizer(cfg: RootConfig, *, on_gpu: bool) -> bool:
    """trainer.fused_optimizer, where null: on for CUDA workers, where one kernel per step replaces a launch per
    parameter group and tensor list (torch's default there is the multi-tensor foreach kernel)."""
    return on_gpu if cfg.trainer.fused_optimizer is None else cfg.trainer.fused_optimizer


def _pretrained_loader(cfg: RootConfig, family: Family):
    """Loads the run's pretrained weights into a model, or None: no checkpoint to start from, or a checkpoint of
    this run to resume (which replaces them anyway)."""
    source = family.pretrained_from(cfg.model)
    if source is None or checkpointing.has_checkpoint():
        return None
    return partial(family.load_pretrained, directory=source)


def _all_reduce_mean(values: list[torch.Tensor], device: torch.device) -> list[float]:
    """Mean over ranks of scalar tensors, with one collective and one device-to-host copy."""
    tensor = torch.stack([value.to(device=device, dtype=torch.float64) for value in values])
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def slice_rows(batch: Batch, start: int, stop: int) -> Batch:
    return {key: column[start:stop] for key, column in batch.items()}


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: column.to(device, non_blocking=True) for key, column in batch.items()}


def train_step(strategy: Strategy, objective: Objective, rows: Batch, ctx: WorkerContext,
               micro: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step over this rank's rows; returns (this rank's mean loss, grad norm before clipping, the
    objective's other terms averaged alike, e.g. distill_loss), all as device tensors so the step never waits on
    the GPU just to log. `objective` is the family's loss, or its mix with a teacher's (trainers/distill.py)."""
    losses, terms = [], {}
    for index in range(ctx.accum_steps):
        batch = to_device(slice_rows(rows, index * micro, (index + 1) * micro), ctx.device)
        with strategy.micro_step(is_last=index == ctx.accum_steps - 1):
            with strategy.autocast():
                loss, extra = objective(strategy.model, batch)
            strategy.backward(loss)
        losses.append(loss.detach())
        for key, value in extra.items():
            terms.setdefault(key, []).append(value)
    grad_norm = strategy.step()
    return torch.stack(losses).mean(), grad_norm, {key: torch.stack(values).mean() for key, values in terms.items()}


VALID_KEY = "_valid"  # evaluation's mask of real (not padding) rows, gathered with the family's outputs


@torch.no_grad()
def evaluate(strategy: Strategy, family: Family, val_shard, ctx: WorkerContext, *, micro: int,
             max_batches: int) -> dict[str, float]:
    """The family's metrics over the first `max_batches` eval batches (0: the whole validation split).

    Each eval batch of micro x world rows is split evenly over the ranks; a short last batch is padded with
    repeated rows that are masked out, because every rank must run the forward pass (FSDP gathers
    parameters collectively). The per-row outputs of all ranks are gathered before the metrics are
    computed, so a metric like AUC sees the whole set at once.
    """
    strategy.model.eval()
    outputs: dict[str, list[torch.Tensor]] = {}
    batch_rows = micro * ctx.world_size
    for index, batch in enumerate(val_shard.iter_torch_batches(batch_size=batch_rows, drop_last=False)):
        if max_batches and index >= max_batches:
            break
        rows, valid = _padded_rank_slice(batch, ctx)
        with strategy.autocast():
            predicted = family.predict(strategy.model, to_device(rows, ctx.device))
        for key, value in {**predicted, VALID_KEY: valid.to(ctx.device)}.items():
            outputs.setdefault(key, []).append(value.detach().float())
    strategy.model.train()
    gathered = _gather_from_ranks({key: torch.cat(values) for key, values in outputs.items()})
    keep = gathered.pop(VALID_KEY) > 0.5
    return family.eval_metrics({key: values[keep] for key, values in gathered.items()})


def _padded_rank_slice(batch: Batch, ctx: WorkerContext) -> tuple[Batch, torch.Tensor]:
    """This rank's ceil(rows / world) rows of an eval batch, padded by repeating the batch's first row."""
    total = len(next(iter(batch.values())))
    per_rank = -(-total // ctx.world_size)
    start = min(ctx.rank * per_rank, total)
    stop = min(start + per_rank, total)
    index = torch.cat([torch.arange(start, stop), torch.zeros(per_rank - (stop - start), dtype=torch.long)])
    valid = torch.arange(per_rank) < stop - start
    return {key: column[index] for key, column in batch.items()}, valid


def _gather_from_ranks(local: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every rank's rows, concatenated; every rank holds the same number of rows (see _padded_rank_slice)."""
    gathered = {}
    for key, values in local.items():
        parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, values.contiguous())
        gathered[key] = torch.cat(parts).cpu().numpy()
    return gathered


def _maybe_inject_crash(step: int, run_dir: Path, rank: int) -> None:
    """Test-only: crash rank 1 (or 0 when alone) once at the step named by SLIPWAY_TEST_CRASH_AT_STEP."""
    crash_at = os.environ.get(CRASH_AT_STEP_ENV)
    if not crash_at or step != int(crash_at) or rank != min(1, dist.get_world_size() - 1):
        return
    marker = run_dir / f".crash_injected_at_{step}"
    if marker.exists():
        return
    marker.touch()
    raise RuntimeError(f"injected crash at step {step} ({CRASH_AT_STEP_ENV})")


class Progress:
    """Throughput and ETA over the steps since the last log line, counting data wait but not eval/checkpoint,
    and how much of the step time went to waiting for the next batch."""

    def __init__(self, *, max_steps: int, items_per_step: int, throughput_key: str):
        self.max_steps, self.items_per_step, self.throughput_key = max_steps, items_per_step, throughput_key
        self.busy_seconds, self.wait_seconds, self.steps = 0.0, 0.0, 0
        self.mark = time.perf_counter()

    def waited(self, seconds: float) -> None:
        self.wait_seconds += seconds

    def step_done(self) -> None:
        now = time.perf_counter()
        self.busy_seconds += now - self.mark
        self.steps += 1
        self.mark = now

    def pause_ended(self) -> None:
        """Call after eval or checkpointing so their time is not charged to training steps."""
        self.mark = time.perf_counter()

    def window(self, step: int) -> dict:
        step_time = self.busy_seconds / max(1, self.steps)
        figures = {"step_time_s": step_time,
                   self.throughput_key: self.items_per_step / step_time if step_time else 0.0,
                   "data_wait_s": self.wait_seconds / max(1, self.steps),
                   "data_wait_frac": self.wait_seconds / self.busy_seconds if self.busy_seconds else 0.0,
                   "eta_s": step_time * (self.max_steps - step)}
        self.busy_seconds, self.wait_seconds, self.steps = 0.0, 0.0, 0
        return figures


def _format_progress(metrics: dict, max_steps: int, family: Family) -> str:
    eta = time.strftime("%H:%M:%S", time.gmtime(metrics["eta_s"]))
    line = (f"step {metrics['step']}/{max_steps} | loss {metrics['train_loss']:.4f} | "
            f"{metrics[family.throughput_key]:,.0f} {family.throughput_unit} | "
            f"{metrics['step_time_s']:.3f} s/step | data wait {metrics['data_wait_frac']:.0%} | eta {eta}")
    if "mfu" in metrics:
        line += f" | mfu {metrics['mfu']:.1%} | {metrics['max_memory_gb']:.1f} GB peak"
    if "distill_loss" in metrics:
        line += f" | distill {metrics['distill_loss']:.4f}"
    return line


def _format_eval(metrics: dict, family: Family) -> str:
    return f"step {metrics['step']} | val_loss {metrics['val_loss']:.4f}" + family.eval_summary(metrics)


def train_loop(config: dict) -> None:
    """Per-worker entry. `config` holds plain data: the resolved config, run facts and the prepared data."""
    entered_at = time.time()  # the start-up milestone train_fn_start: Ray's worker set-up ends here
    configure_worker_logging()
    cfg = config_from_dict(config["cfg"])
    if config.get("in_process"):
        _join_one_process_group(cfg)
        try:
            _train_worker(config, cfg, entered_at=entered_at)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the process trains the next trial: return what this one cached
    else:
        _train_worker(config, cfg, entered_at=entered_at)


def _join_one_process_group(cfg: RootConfig) -> None:
    """An in-process run (a sweep's 1-worker trial) has no Ray Train to start a process group, but the strategies'
    wrappers and the loop's collectives need one: a group of this process alone, over an in-memory store (no
    port). It stays for the process's later trials: DeepSpeed caches the world group it first sees
    (deepspeed.utils.groups), so a group taken down and made again breaks the next ZeRO trial."""
    if dist.is_initialized():  # this process's group: its own, kept from a trial before, or its local launcher's
        return
    session.join_process_group(dist.HashStore(), rank=0, world_size=1, use_gpu=cfg.cluster.use_gpu)


def _train_worker(config: dict, cfg: RootConfig, *, entered_at: float) -> None:
    data, run_dir = config["data"], Path(config["run_dir"])
    ctx = _setup_worker(cfg)
    startup_mark = partial(startup.mark_in_worker, run_dir) if config.get("mark_startup") and ctx.rank == 0 else None
    if startup_mark:
        import psutil

        startup_mark("worker_process_start", at=psutil.Process().create_time())
        startup_mark("train_fn_start", at=entered_at)
        startup_mark("worker_loop_start")
    family = get_family(cfg.model.family)
    strategy = _setup_strategy(cfg, family, data, ctx)
    # The teacher stays beside the strategy's model (never wrapped, trained or checkpointed), so a resumed run
    # loads it again from its export.
    teacher = distill.load_teacher(config.get("teacher"), device=ctx.device)
    objective = distill.build_objective(family, teacher=teacher, cfg=cfg.distill)
    state = checkpointing.restore_latest(strategy, rank=ctx.rank) or TrainState()
    if startup_mark:
        startup_mark("model_ready")
    state.strategy = cfg.strategy.name  # recorded in every checkpoint: what export reads it back with
    tracker = None
    if ctx.rank == 0:
        if not config.get("in_process"):  # an in-process run's group is its Tune trial's, which Tune releases
            outputs.record_placement_group(run_dir)
        tracker = Tracker(cfg.logger, run_dir=run_dir, run_name=config["run_name"], config=config["cfg"],
                          resume_step=state.step)
    try:
        _train(cfg, family=family, objective=objective, strategy=strategy, state=state, ctx=ctx, data=data,
               run_dir=run_dir, tracker=tracker, startup_mark=startup_mark)
    finally:
        if tracker:
            tracker.finish()


def _train(cfg: RootConfig, *, family: Family, objective: Objective, strategy: Strategy, state: TrainState,
           ctx: WorkerContext, data: dict, run_dir: Path, tracker: Tracker | None, startup_mark=None) -> None:
    trainer = cfg.trainer
    if state.step >= trainer.max_steps:
        logger.info("checkpoint is at step %d = trainer.max_steps: nothing to train", state.step)
        return
    train_shard, val_shard = session.dataset_shard("train"), session.dataset_shard("val")
    items_per_step = trainer.global_batch_size * family.items_per_row(data)
    flops_per_item = family.flops_per_item(cfg.model, data=data)
    progress = Progress(max_steps=trainer.max_steps, items_per_step=items_per_step,
                        throughput_key=family.throughput_key)
    payload = family.checkpoint_payload(cfg.model, data)
    if ctx.rank == 0:
        logger.info("training %s with %s on %d worker(s) from step %d to %d, %d micro-batch(es) of %d per step",
                    cfg.model.preset, cfg.strategy.name, ctx.world_size, state.step, trainer.max_steps,
                    ctx.accum_steps, trainer.micro_batch_size)
    while state.step < trainer.max_steps:
        batches = _timed(train_shard.iter_torch_batches(batch_size=trainer.global_batch_size, drop_last=True))
        for index, (batch, wait_seconds) in enumerate(batches):
            if index < state.batches_in_epoch:
                continue  # trained on before the checkpoint we resumed from
            if index == state.batches_in_epoch and index > 0 and progress.steps == 0:
                progress.pause_ended()  # do not charge the skipped batches to the first step
            else:
                progress.waited(wait_seconds)
            rows = slice_rows(batch, ctx.rank * ctx.rows_per_rank, (ctx.rank + 1) * ctx.rows_per_rank)
            _maybe_inject_crash(state.step + 1, run_dir, ctx.rank)
            if startup_mark:  # start-up milestones (trainers/startup.py): this launch's first step
                startup_mark("first_batch")
            loss, grad_norm, terms = train_step(strategy, objective, rows, ctx, trainer.micro_batch_size)
            if startup_mark:
                startup_mark("first_step")
                startup_mark = None
            state.step += 1
            state.batches_in_epoch += 1
            progress.step_done()
            stop = _after_step(cfg, family=family, strategy=strategy, state=state, ctx=ctx, loss=loss,
                               grad_norm=grad_norm, terms=terms, val_shard=val_shard, progress=progress,
                               tracker=tracker, flops_per_item=flops_per_item, payload=payload, run_dir=run_dir)
            if stop and ctx.rank == 0:
                logger.info("step %d: the sweep's scheduler stopped this trial; ending the run here", state.step)
            if stop or state.step >= trainer.max_steps:
                return
        else:
            state.epoch += 1
            state.batches_in_epoch = 0


def _timed(iterable):
    """Yield (item, seconds spent waiting for it): the data-wait part of a step."""
    iterator = iter(iterable)
    while True:
        started = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        yield item, time.perf_counter() - started


def _after_step(cfg: RootConfig, *, family: Family, strategy: Strategy, state: TrainState, ctx: WorkerContext,
                loss: torch.Tensor, grad_norm: torch.Tensor, terms: dict[str, torch.Tensor], val_shard,
                progress: Progress, tracker: Tracker | None, flops_per_item: float, payload: dict,
                run_dir: Path) -> bool:
    """Log, evaluate, checkpoint and report as scheduled after an optimizer step. Returns whether a sweep
    asked this run to stop: rank 0's answer, shared through the log step's all-reduce so that every rank
    stops at the same step."""
    trainer, step = cfg.trainer, state.step
    is_last = step >= trainer.max_steps
    do_log = step % trainer.log_every_n_steps == 0 or is_last or step == 1
    do_checkpoint = cfg.checkpoint.enabled and (step % cfg.checkpoint.every_n_steps == 0 or is_last)
    do_eval = step % trainer.eval_every_n_steps == 0 or do_checkpoint or is_last
    metrics: dict = {"step": step, "time": time.time()}
    stop = False
    if do_log:
        # The norm is already global; averaging it (and the stop flag) with the loss saves extra syncs.
        asked = torch.tensor(float(ctx.rank == 0 and outputs.stop_requested(run_dir)))
        mean_loss, grad_norm, stop_votes, *term_means = _all_reduce_mean([loss, grad_norm, asked, *terms.values()],
                                                                         ctx.device)
        stop = stop_votes > 0
        metrics.update(train_loss=mean_loss, grad_norm=grad_norm, lr=strategy.current_lr(), epoch=state.epoch,
                       **dict(zip(terms, term_means, strict=True)), **progress.window(step))
        if ctx.device.type == "cuda":
            peak = cfg.cluster.peak_tflops_per_gpu * 1e12 * ctx.world_size
            metrics["mfu"] = metrics[family.throughput_key] * flops_per_item / peak
            # This rank's peak so far (the allocator's count, not the driver's): what the speed options trade
            metrics["max_memory_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 1e9
    if do_eval:
        metrics.update(evaluate(strategy, family, val_shard, ctx, micro=trainer.micro_batch_size,
                                max_batches=trainer.eval_batches))
    if ctx.rank == 0 and (do_log or do_eval):
        if do_log:
            logger.info(_format_progress(metrics, trainer.max_steps, family))
        if do_eval:
            logger.info(_format_eval(metrics, family))
        tracker.log(metrics)
    if do_checkpoint:
        checkpointing.save_and_report(strategy, state, metrics, rank=ctx.rank, **payload)
    elif do_eval:
        checkpointing.report_metrics(metrics)
    if do_eval or do_checkpoint:
        progress.pause_ended()
    return stop
