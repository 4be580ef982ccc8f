"""The `llm` family: a Llama-style decoder (trainers/llm.py) trained on packed token rows (datasets/text.py)."""

import numpy as np
import torch.nn.functional as F
from torch import nn

from cluster.activations import llm_activations
from conf.schema import LLMConfig, TextDataConfig
from trainers import llm
from trainers.families import Batch, Family, model_config_dict


def _check_config(model_cfg: LLMConfig, data_cfg: TextDataConfig) -> None:
    """The shapes the model is built from, checked before data preparation and Ray: a head count that does
    not divide the width would otherwise fail inside every worker, after retries. (The sizes' own ranges are
    checked first: conf/derived.py BOUNDS.)"""
    from datasets.tokenizer import check_vocab_size

    if data_cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(
            f"data.seq_len={data_cfg.seq_len} is beyond the model's limit model.max_seq_len={model_cfg.max_seq_len}"
        )
    dim, heads, kv_heads = model_cfg.dim, model_cfg.n_heads, model_cfg.n_kv_heads
    if dim % heads:
        raise ValueError(f"model.n_heads={heads} must divide model.dim={dim}: each head gets dim / n_heads channels")
    if heads % kv_heads:
        raise ValueError(f"model.n_kv_heads={kv_heads} must divide model.n_heads={heads}: each key/value head "
                         "serves an equal group of query heads")
    if (dim // heads) % 2:
        raise ValueError(f"model.dim={dim} / model.n_heads={heads} = {dim // heads} channels per head must be even: "
                         "rotary embeddings rotate channel pairs")
    check_vocab_size(data_cfg.vocab_size)


def _prepare(model_cfg: LLMConfig, data_cfg: TextDataConfig, *, cache_root):
    from datasets.text import prepare_text

    return prepare_text(data_cfg, cache_root=cache_root, max_seq_len=model_cfg.max_seq_len)


def _loss(model: nn.Module, batch: Batch):
    """Next-token cross-entropy: a row of seq_len + 1 tokens gives seq_len inputs and shifted targets."""
    rows = batch["tokens"].long()
    logits = model(rows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())


def _predict(model: nn.Module, batch: Batch) -> Batch:
    rows = batch["tokens"].long()
    logits = model(rows[:, :-1]).float()
    per_token = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
    return {"loss": per_token.view(len(rows), -1).mean(dim=1)}  # rows hold equal token counts


def _payload(cfg: LLMConfig, data: dict) -> dict:
    model_config = {"family": "llm", "model": model_config_dict(cfg), "vocab_size": data["vocab_size"],
                    "seq_len": data["seq_len"], "tokenizer": "tokenizer.json"}
    return {"model_config": model_config, "files": {"tokenizer.json": data["tokenizer_path"]}}


def _activations(cfg: LLMConfig, *, data: dict, micro_batch: int, compute_bytes: int, residual_bytes: int,
                 checkpointing: bool):
    return llm_activations(cfg, vocab_size=data["vocab_size"], seq_len=data["seq_len"], micro_batch=micro_batch,
                           compute_bytes=compute_bytes, residual_bytes=residual_bytes, checkpointing=checkpointing)


LLM = Family(
    name="llm",
    model_schema=LLMConfig,
    data_schema=TextDataConfig,
    data_kind="text",
    data_choices="data=stdlib, text_dir or parquet",
    check_config=_check_config,
    prepare_data=_prepare,
    # The tokenizer is trained to data.vocab_size (fewer on a tiny corpus; the plan counts the most).
    plan_data=lambda model_cfg, data_cfg: {"vocab_size": data_cfg.vocab_size, "seq_len": data_cfg.seq_len},
    build_model=lambda cfg, *, data, device: llm.build_llm(cfg, vocab_size=data["vocab_size"], device=device),
    count_parameters=lambda cfg, *, data: llm.count_parameters(cfg, vocab_size=data["vocab_size"])["total"],
    blocks=lambda model: model.layers,
    supports_activation_checkpointing=True,
    loss=_loss,
    predict=_predict,
    eval_metrics=lambda outputs: {"val_loss": float(np.mean(outputs["loss"]))},
    metric="val_loss",
    metric_mode="min",
    sweep_metrics={"val_loss": "min"},
    summary_keys=(),
    headline_keys=(),
    eval_summary=lambda metrics: "",
    item="tokens",
    row="sequences",
    items_per_row=lambda data: data["seq_len"],
    throughput_key="tokens_per_s",
    throughput_unit="tok/s",
    flops_per_item=lambda cfg, *, data: llm.training_flops_per_token(
        cfg, vocab_size=data["vocab_size"], seq_len=data["seq_len"]
    ),
    activations=_activations,
    checkpoint_payload=_payload,
    asset_keys=("tokenizer",),
    serving_replica="serve.replicas:LLMReplica",
)

SPECS = (LLM,)
