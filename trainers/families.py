"""Model families: how to build a model, which blocks a strategy shards, and how a batch becomes a loss.

A family is selected by `model.family` through the FAMILIES dict; strategies and the training loop only
talk to this interface, so the ranking family (a later issue) plugs in beside the LLM.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from conf.schema import ModelConfig
from trainers import llm

# Above this many parameters a model is built on the meta device and materialized shard by shard.
META_INIT_THRESHOLD = 500_000_000


@dataclass(frozen=True)
class Family:
    build_model: Callable[..., nn.Module]  # (ModelConfig, *, data: dict, device) -> module
    blocks: Callable[[nn.Module], nn.ModuleList]  # the repeated units strategies shard and checkpoint
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # mean loss of one micro-batch
    items_per_row: Callable[[dict], int]  # tokens (or examples) one data row contributes to throughput
    flops_per_item: Callable[..., float]  # (ModelConfig, *, data: dict) -> training FLOPs per item
    metric: str  # the validation metric that ranks checkpoints
    metric_mode: str  # "min" or "max"


def init_device_for(cfg: ModelConfig, *, vocab_size: int, device: torch.device, meta_supported: bool) -> torch.device:
    """Where to build the model: `model.init_device`, where "auto" picks meta for models too large to build
    whole when the strategy can materialize shards (FSDP2), and the worker's device otherwise."""
    if cfg.init_device not in ("auto", "device", "meta"):
        raise ValueError(f"model.init_device={cfg.init_device!r} is not one of auto, device, meta")
    if cfg.init_device == "meta" and not meta_supported:
        raise ValueError("model.init_device=meta needs strategy=fsdp (the only strategy that materializes shards)")
    large = llm.count_parameters(cfg, vocab_size=vocab_size)["total"] > META_INIT_THRESHOLD
    if cfg.init_device == "meta" or (cfg.init_device == "auto" and large and meta_supported):
        return torch.device("meta")
    return device


def _build_llm(cfg: ModelConfig, *, data: dict, device: torch.device) -> nn.Module:
    return llm.build_llm(cfg, vocab_size=data["vocab_size"], device=device)


def _llm_loss(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: a row of seq_len + 1 tokens gives seq_len inputs and shifted targets."""
    logits = model(rows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())


FAMILIES: dict[str, Family] = {
    "llm": Family(
        build_model=_build_llm,
        blocks=lambda model: model.layers,
        loss=_llm_loss,
        items_per_row=lambda data: data["seq_len"],
        flops_per_item=lambda cfg, *, data: llm.training_flops_per_token(
            cfg, vocab_size=data["vocab_size"], seq_len=data["seq_len"]
        ),
        metric="val_loss",
        metric_mode="min",
    ),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
