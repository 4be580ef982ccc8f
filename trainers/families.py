"""Model families: how to build a model, which blocks a strategy shards, how a batch becomes a loss, and how
validation outputs become metrics.

A family is selected by `model.family` through the FAMILIES dict; strategies and the training loop only
talk to this interface. A batch is a dict of column name -> tensor, as Ray Data yields it: `tokens` for the
LLM; `label`, `dense`, `sparse` (and `ctr` on synthetic validation data) for rankers.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from trainers import llm, ranker
from trainers.metrics import binary_metrics, logloss, roc_auc

# Above this many parameters a model is built on the meta device and materialized shard by shard.
META_INIT_THRESHOLD = 500_000_000

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    data_kind: str  # the `data.kind` this family trains on
    build_model: Callable[..., nn.Module]  # (model config, *, data: dict, device) -> module
    count_parameters: Callable[..., int]  # (model config, *, data: dict) -> parameters, without building
    blocks: Callable[[nn.Module], nn.ModuleList]  # the units FSDP2 shards one by one (and LLMs checkpoint)
    loss: Callable[[nn.Module, Batch], torch.Tensor]  # mean loss of one micro-batch
    predict: Callable[[nn.Module, Batch], Batch]  # per-row validation outputs, gathered from every worker
    eval_metrics: Callable[[dict[str, np.ndarray]], dict[str, float]]  # all validation rows -> metrics
    items_per_row: Callable[[dict], int]  # tokens (or examples) one data row contributes to throughput
    throughput_key: str  # metrics key of that throughput
    flops_per_item: Callable[..., float]  # (model config, *, data: dict) -> training FLOPs per item
    metric: str  # the validation metric that ranks checkpoints
    metric_mode: str  # "min" or "max"
    checkpoint_payload: Callable[..., dict]  # (model config, data) -> {"model_config": ..., "files": ...}
    sweep_metrics: dict[str, str]  # validation metrics a sweep can rank trials by -> their natural mode
    summary_keys: tuple[str, ...] = ()  # final metrics repeated at the top level of summary.json
    supports_activation_checkpointing: bool = True


def init_device_for(family: Family, cfg, *, data: dict, device: torch.device, meta_supported: bool) -> torch.device:
    """Where to build the model: `model.init_device`, where "auto" picks meta for models too large to build
    whole when the strategy can materialize shards (FSDP2), and the worker's device otherwise."""
    if cfg.init_device not in ("auto", "device", "meta"):
        raise ValueError(f"model.init_device={cfg.init_device!r} is not one of auto, device, meta")
    if cfg.init_device == "meta" and not meta_supported:
        raise ValueError("model.init_device=meta needs strategy=fsdp (the only strategy that materializes shards)")
    large = family.count_parameters(cfg, data=data) > META_INIT_THRESHOLD
    if cfg.init_device == "meta" or (cfg.init_device == "auto" and large and meta_supported):
        return torch.device("meta")
    return device


def _model_config(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


# ------------------------------------------------------------------------------------------------------- llm

def _llm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy: a row of seq_len + 1 tokens gives seq_len inputs and shifted targets."""
    rows = batch["tokens"].long()
    logits = model(rows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())


def _llm_predict(model: nn.Module, batch: Batch) -> Batch:
    rows = batch["tokens"].long()
    logits = model(rows[:, :-1]).float()
    per_token = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
    return {"loss": per_token.view(len(rows), -1).mean(dim=1)}  # rows hold equal token counts


def _llm_payload(cfg, data: dict) -> dict:
    model_config = {"family": "llm", "model": _model_config(cfg), "vocab_size": data["vocab_size"],
                    "seq_len": data["seq_len"], "tokenizer": "tokenizer.json"}
    return {"model_config": model_config, "files": {"tokenizer.json": data["tokenizer_path"]}}


LLM = Family(
    data_kind="text",
    build_model=lambda cfg, *, data, device: llm.build_llm(cfg, vocab_size=data["vocab_size"], device=device),
    count_parameters=lambda cfg, *, data: llm.count_parameters(cfg, vocab_size=data["vocab_size"])["total"],
    blocks=lambda model: model.layers,
    loss=_llm_loss,
    predict=_llm_predict,
    eval_metrics=lambda outputs: {"val_loss": float(np.mean(outputs["loss"]))},
    items_per_row=lambda data: data["seq_len"],
    throughput_key="tokens_per_s",
    flops_per_item=lambda cfg, *, data: llm.training_flops_per_token(
        cfg, vocab_size=data["vocab_size"], seq_len=data["seq_len"]
    ),
    metric="val_loss",
    metric_mode="min",
    checkpoint_payload=_llm_payload,
    sweep_metrics={"val_loss": "min"},
)


# ---------------------------------------------------------------------------------------------------- ranker

def _ranker_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(batch["dense"].float(), batch["sparse"]).float()


def _ranker_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(_ranker_logits(model, batch), batch["label"].float())


def _ranker_predict(model: nn.Module, batch: Batch) -> Batch:
    outputs = {"prob": torch.sigmoid(_ranker_logits(model, batch)), "label": batch["label"].float()}
    if "ctr" in batch:  # synthetic data: the true probability, for the Bayes-optimal figures on the same rows
        outputs["ctr"] = batch["ctr"].float()
    return outputs


def _ranker_metrics(outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC, logloss and calibration over every validation row; with the true probabilities, the Bayes-optimal
    AUC and logloss on the very same rows and the gap to them."""
    metrics = binary_metrics(outputs["prob"], outputs["label"])
    metrics["val_loss"] = metrics["logloss"]  # so the loss plot and checkpoint tooling read one key for all
    if "ctr" in outputs:
        metrics["bayes_auc"] = roc_auc(outputs["ctr"], outputs["label"])
        metrics["bayes_logloss"] = logloss(outputs["ctr"], outputs["label"])
        metrics["auc_gap"] = metrics["bayes_auc"] - metrics["auc"]
    return metrics


def _ranker_payload(cfg, data: dict) -> dict:
    model_config = {"family": "ranker", "model": _model_config(cfg), "num_dense": data["num_dense"],
                    "table_sizes": data["table_sizes"], "feature_spec": "feature_spec.json"}
    return {"model_config": model_config, "files": {"feature_spec.json": data["feature_spec_path"]}}


RANKER = Family(
    data_kind="clicklog",
    build_model=lambda cfg, *, data, device: ranker.build_ranker(
        cfg, num_dense=data["num_dense"], table_sizes=data["table_sizes"], device=device
    ),
    count_parameters=lambda cfg, *, data: ranker.count_parameters(
        cfg, num_dense=data["num_dense"], table_sizes=data["table_sizes"]
    )["total"],
    blocks=lambda model: model.tables,  # one FSDP2 unit per table: sharded at rest, gathered one at a time
    loss=_ranker_loss,
    predict=_ranker_predict,
    eval_metrics=_ranker_metrics,
    items_per_row=lambda data: 1,
    throughput_key="samples_per_s",
    flops_per_item=lambda cfg, *, data: ranker.training_flops_per_sample(
        cfg, num_dense=data["num_dense"], table_sizes=data["table_sizes"]
    ),
    metric="auc",
    metric_mode="max",
    checkpoint_payload=_ranker_payload,
    sweep_metrics={"auc": "max", "logloss": "min"},
    summary_keys=("auc", "logloss", "calibration", "bayes_auc", "bayes_logloss", "auc_gap"),
    supports_activation_checkpointing=False,  # nothing worth recomputing: the tables hold the memory
)

FAMILIES: dict[str, Family] = {"llm": LLM, "ranker": RANKER}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
