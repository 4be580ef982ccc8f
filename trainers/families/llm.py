"""The `llm` family: a Llama-style decoder (trainers/llm.py), pretrained on packed token rows (datasets/text.py) or
fine-tuned on conversations with assistant-only loss (datasets/chat.py), from scratch or from a Hugging Face
checkpoint (model.init_from: trainers/pretrained.py), and exported as a Hugging Face model directory."""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cluster.activations import llm_activations
from conf.schema import ChatDataConfig, LLMConfig, TextDataConfig
from trainers import llm, pretrained
from trainers.distill import token_distill_loss
from trainers.families import Batch, ExportLayout, Family, model_config_dict


def _check_config(model_cfg: LLMConfig, data_cfg: TextDataConfig | ChatDataConfig) -> None:
    """The shapes the model is built from, checked before data preparation and Ray: a head count that does
    not divide the width would otherwise fail inside every worker, after retries. (The sizes' own ranges are
    checked first: conf/derived.py BOUNDS.)"""
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
    _check_tokenizer(model_cfg, data_cfg)
    if model_cfg.init_from:
        # Headers only: a missing tensor or a wrong shape is named before data preparation and Ray start.
        pretrained.check_checkpoint_tensors(model_cfg.init_from, model_cfg, vocab_size=model_cfg.vocab_size)


def _check_tokenizer(model_cfg: LLMConfig, data_cfg: TextDataConfig | ChatDataConfig) -> None:
    from datasets.tokenizer import check_vocab_size

    if data_cfg.kind == "chat" and data_cfg.tokenizer is None:
        raise ValueError("fine-tuning data (data.kind=chat) is rendered and tokenized by a pretrained model's own "
                         "tokenizer: set model.init_from=<Hugging Face checkpoint directory> (or data.tokenizer=DIR)")
    if data_cfg.kind == "text" and data_cfg.tokenizer is None:
        check_vocab_size(data_cfg.vocab_size)


def _prepare(model_cfg: LLMConfig, data_cfg: TextDataConfig | ChatDataConfig, *, cache_root):
    if data_cfg.kind == "chat":
        from datasets.chat import prepare_chat

        prepared = prepare_chat(data_cfg, cache_root=cache_root, tokenizer_dir=Path(data_cfg.tokenizer),
                                max_seq_len=model_cfg.max_seq_len)
    else:
        from datasets.text import prepare_text

        prepared = prepare_text(data_cfg, cache_root=cache_root, max_seq_len=model_cfg.max_seq_len)
    if model_cfg.vocab_size is not None and prepared.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer {prepared.tokenizer_path} has {prepared.vocab_size} tokens but "
                         f"model.vocab_size={model_cfg.vocab_size}: ids past the embedding table cannot be trained")
    return prepared


def _plan_data(model_cfg: LLMConfig, data_cfg: TextDataConfig | ChatDataConfig) -> dict:
    """The data facts the plan needs, from the config alone: a checkpoint's vocabulary (model.vocab_size), a
    pretrained tokenizer's size, or the BPE target (a tiny corpus may give fewer; the plan counts the most)."""
    _check_tokenizer(model_cfg, data_cfg)
    vocab = model_cfg.vocab_size
    if vocab is None and data_cfg.tokenizer is not None:
        from datasets.tokenizer import load_pretrained_tokenizer

        vocab = load_pretrained_tokenizer(data_cfg.tokenizer)[0].get_vocab_size()
    return {"vocab_size": vocab if vocab is not None else data_cfg.vocab_size, "seq_len": data_cfg.seq_len}


def vocab_size(cfg: LLMConfig, data: dict) -> int:
    """Rows of the embedding table: the model's own (a checkpoint's, possibly padded past its tokenizer) or the
    prepared tokenizer's."""
    return cfg.vocab_size if cfg.vocab_size is not None else data["vocab_size"]


def _loss(model: nn.Module, batch: Batch):
    """Next-token cross-entropy: a row of seq_len + 1 tokens gives seq_len inputs and shifted targets.

    Fine-tuning rows (datasets/chat.py) add `loss_mask` (which targets are trained: assistant or completion
    tokens) and `document_ids` (the packed examples, kept from attending to each other). Their loss is the mean
    over this micro-batch's trained targets. Accumulation and data parallelism then average micro-batches
    equally (Family.loss is a micro-batch mean), so a trained token weighs a little more in a micro-batch with
    few of them; the exact token mean over a step would need every micro-batch's count before the first
    backward, an extra collective per step. Packing keeps the counts per micro-batch close.
    """
    rows = batch["tokens"].long()
    if "loss_mask" not in batch:
        logits = model(rows[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())
    per_token, mask = _masked_token_losses(model, batch)
    # clamp: a micro-batch without trained targets gives 0 (and no gradient) rather than 0 / 0
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _predict(model: nn.Module, batch: Batch) -> Batch:
    rows = batch["tokens"].long()
    if "loss_mask" in batch:
        per_token, mask = _masked_token_losses(model, batch)
        # Each row's mean over its trained targets; a row without any (none are prepared so) reads 0, not NaN.
        return {"loss": (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)}
    logits = model(rows[:, :-1]).float()
    per_token = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
    return {"loss": per_token.view(len(rows), -1).mean(dim=1)}  # rows hold equal token counts


def _masked_token_losses(model: nn.Module, batch: Batch):
    """Per-target cross-entropy (rows, seq_len) of fine-tuning rows and their float loss mask."""
    rows = batch["tokens"].long()
    logits = model(rows[:, :-1], document_ids=batch["document_ids"].long()).float()
    per_token = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
    return per_token.view(len(rows), -1), batch["loss_mask"].float()


def _distill_losses(student: nn.Module, teacher: nn.Module, batch: Batch, *, cfg) -> tuple:
    """(next-token cross-entropy, the distillation term) from one student forward pass: the term covers the
    targets the cross-entropy trains (a fine-tuning row's loss_mask), each position's teacher seeing the same
    tokens (and, packed, the same document boundaries) as the student."""
    rows = batch["tokens"].long()
    extra = {"document_ids": batch["document_ids"].long()} if "loss_mask" in batch else {}
    logits = student(rows[:, :-1], **extra).float()
    with torch.no_grad():
        teacher_logits = teacher(rows[:, :-1], **extra).float()
    per_token = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="none").view(len(rows), -1)
    mask = batch["loss_mask"].float() if "loss_mask" in batch else None
    data_loss = per_token.mean() if mask is None else (per_token * mask).sum() / mask.sum().clamp(min=1)
    return data_loss, token_distill_loss(logits, teacher_logits, cfg=cfg, mask=mask)


def _payload(cfg: LLMConfig, data: dict) -> dict:
    from datasets.tokenizer import TOKENIZER_CONFIG_FILE

    model_config = {"family": "llm", "model": model_config_dict(cfg), "vocab_size": vocab_size(cfg, data),
                    "seq_len": data["seq_len"], "tokenizer": "tokenizer.json"}
    files = {"tokenizer.json": data["tokenizer_path"]}
    generation = Path(cfg.init_from or "", pretrained.GENERATION_CONFIG_FILE)
    if cfg.init_from and generation.is_file():  # the checkpoint's decoding defaults (stop tokens), kept on export
        model_config["generation_config"] = json.loads(generation.read_text())
    # A pretrained tokenizer's config (special tokens, chat template) travels with it into checkpoints and exports.
    tokenizer_config = Path(data["tokenizer_path"]).with_name(TOKENIZER_CONFIG_FILE)
    if tokenizer_config.is_file():
        model_config["tokenizer_config"] = TOKENIZER_CONFIG_FILE
        files[TOKENIZER_CONFIG_FILE] = str(tokenizer_config)
    return {"model_config": model_config, "files": files}


def _activations(cfg: LLMConfig, *, data: dict, micro_batch: int, compute_bytes: int, residual_bytes: int,
                 checkpointing: bool, selective: bool):
    return llm_activations(cfg, vocab_size=vocab_size(cfg, data), seq_len=data["seq_len"], micro_batch=micro_batch,
                           compute_bytes=compute_bytes, residual_bytes=residual_bytes, checkpointing=checkpointing,
                           selective=selective)


LLM = Family(
    name="llm",
    model_schema=LLMConfig,
    # Pretraining text, and fine-tuning conversations or prompt/completion pairs (datasets/chat.py)
    data_schemas={"text": TextDataConfig, "chat": ChatDataConfig},
    data_choices="data=stdlib, text_dir or parquet; data=chat_jsonl or prompt_completion_jsonl with model.init_from",
    check_config=_check_config,
    prepare_data=_prepare,
    plan_data=_plan_data,
    build_model=lambda cfg, *, data, device: llm.build_llm(cfg, vocab_size=vocab_size(cfg, data), device=device),
    count_parameters=lambda cfg, *, data: llm.count_parameters(cfg, vocab_size=vocab_size(cfg, data))["total"],
    blocks=lambda model: model.layers,
    # Each block's norms and feed-forward, and the head: attention reads the engine's slot layout and stays eager.
    compile_units=lambda model: [unit for layer in model.layers
                                 for unit in (layer.attention_norm, layer.ffn_norm, layer.feed_forward)]
    + [model.norm, model.output],
    pretrained_from=lambda cfg: cfg.init_from,
    load_pretrained=pretrained.load_pretrained,
    supports_activation_checkpointing=True,
    loss=_loss,
    predict=_predict,
    eval_metrics=lambda outputs: {"val_loss": float(np.mean(outputs["loss"]))},
    metric="val_loss",
    metric_mode="min",
    distill_losses=_distill_losses,
    teacher_matches=("vocab_size", "tokenizer"),  # the same token ids, in a table of the same size
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
        cfg, vocab_size=vocab_size(cfg, data), seq_len=data["seq_len"]
    ),
    activations=_activations,
    checkpoint_payload=_payload,
    asset_keys=("tokenizer", "tokenizer_config"),
    # A Hugging Face Llama directory: transformers' from_pretrained and `vllm serve` load the export as is.
    export_layout=ExportLayout(plan=pretrained.plan_hf_export, write_groups=pretrained.write_hf_export,
                               read=pretrained.read_hf_weights, identity_file=pretrained.INDEX_FILE),
    serving_replica="serve.replicas:LLMReplica",
)

SPECS = (LLM,)
