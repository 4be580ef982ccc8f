"""AdamW and the warmup + cosine learning-rate schedule, built from the trainer config."""

import functools
import math

import torch

from conf.schema import TrainerConfig


def build_optimizer(param_groups: list[dict], cfg: TrainerConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW; `fused` selects its single-kernel implementation (trainers/loop.py: fuses_optimizer), which
    computes the same update."""
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps (held there afterwards)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = functools.partial(
        lr_multiplier, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
