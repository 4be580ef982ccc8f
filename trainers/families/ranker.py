"""The `ranker` family: DLRM and DCN-v2 click-through models (trainers/ranker.py) on click logs
(datasets/clicklog.py)."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cluster.activations import ranker_activations
from conf.schema import ClickLogDataConfig, RankerConfig
from datasets.metrics import binary_metrics, logloss, roc_auc
from trainers import ranker
from trainers.distill import binary_distill_loss
from trainers.families import PLAIN_LAYOUT, Batch, Family, model_config_dict


def _check_config(model_cfg: RankerConfig, data_cfg: ClickLogDataConfig) -> None:
    """What trainers/ranker.py would refuse inside every worker, checked before data preparation and Ray.
    (The sizes' own ranges are checked first: conf/derived.py BOUNDS.)"""
    if model_cfg.arch == "dlrm" and (not model_cfg.bottom_mlp or model_cfg.bottom_mlp[-1] != model_cfg.embedding_dim):
        raise ValueError(
            f"model.bottom_mlp={list(model_cfg.bottom_mlp)} must end with model.embedding_dim="
            f"{model_cfg.embedding_dim}: its output takes part in the dot products with the embeddings"
        )
    if model_cfg.arch == "dcn" and model_cfg.cross_layers < 1:
        raise ValueError(f"model.cross_layers={model_cfg.cross_layers} must be at least 1 for model.arch=dcn")


def _prepare(model_cfg: RankerConfig, data_cfg: ClickLogDataConfig, *, cache_root):
    from datasets.clicklog import prepare_clicklog

    return prepare_clicklog(data_cfg, cache_root=cache_root)


def _plan_data(model_cfg: RankerConfig, data_cfg: ClickLogDataConfig) -> dict:
    """The tables preparation would make (datasets/clicklog.py): hash buckets per table, else one row per
    category plus the missing bucket."""
    from datasets.click_encoding import NUM_CATEGORICAL, NUM_DENSE
    from datasets.clicklog import hash_buckets_per_table

    buckets = hash_buckets_per_table(data_cfg)
    if buckets is None:
        if len(data_cfg.cardinalities) != NUM_CATEGORICAL:
            raise ValueError(f"data.cardinalities must be {NUM_CATEGORICAL} numbers, "
                             f"got {len(data_cfg.cardinalities)}")
        buckets = [int(card) + 1 for card in data_cfg.cardinalities]
    return {"num_dense": NUM_DENSE, "table_sizes": buckets}


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(batch["dense"].float(), batch["sparse"]).float()


def _loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(_logits(model, batch), batch["label"].float())


def _distill_losses(student: nn.Module, teacher: nn.Module, batch: Batch, *, cfg) -> tuple:
    """(the click loss, the logit-matching term) from one student forward pass."""
    logits = _logits(student, batch)
    with torch.no_grad():
        teacher_logits = _logits(teacher, batch)
    data_loss = F.binary_cross_entropy_with_logits(logits, batch["label"].float())
    return data_loss, binary_distill_loss(logits, teacher_logits, cfg=cfg)


def _predict(model: nn.Module, batch: Batch) -> Batch:
    outputs = {"prob": torch.sigmoid(_logits(model, batch)), "label": batch["label"].float()}
    if "ctr" in batch:  # synthetic data: the true probability, for the Bayes-optimal figures on the same rows
        outputs["ctr"] = batch["ctr"].float()
    return outputs


def _metrics(outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC, logloss and calibration over every validation row; with the true probabilities, the Bayes-optimal
    AUC and logloss on the very same rows and the gap to them."""
    metrics = binary_metrics(outputs["prob"], outputs["label"])
    metrics["val_loss"] = metrics["logloss"]  # so the loss plot and checkpoint tooling read one key for all
    if "ctr" in outputs:
        metrics["bayes_auc"] = roc_auc(outputs["ctr"], outputs["label"])
        metrics["bayes_logloss"] = logloss(outputs["ctr"], outputs["label"])
        metrics["auc_gap"] = metrics["bayes_auc"] - metrics["auc"]
    return metrics


def _eval_summary(metrics: dict) -> str:
    line = f" | auc {metrics['auc']:.4f} | calibration {metrics['calibration']:.3f}"
    if "bayes_auc" in metrics:
        line += f" | bayes-optimal auc {metrics['bayes_auc']:.4f} (gap {metrics['auc_gap']:.4f})"
    return line


def _payload(cfg: RankerConfig, data: dict) -> dict:
    model_config = {"family": "ranker", "model": model_config_dict(cfg), "num_dense": data["num_dense"],
                    "table_sizes": data["table_sizes"], "feature_spec": "feature_spec.json"}
    return {"model_config": model_config, "files": {"feature_spec.json": data["feature_spec_path"]}}


def _activations(cfg: RankerConfig, *, data: dict, micro_batch: int, compute_bytes: int, residual_bytes: int,
                 checkpointing: bool, selective: bool):
    # Rankers are never checkpointed (supports_activation_checkpointing=False): both flags are ignored.
    return ranker_activations(cfg, num_dense=data["num_dense"], num_tables=len(data["table_sizes"]),
                              micro_batch=micro_batch, compute_bytes=compute_bytes, residual_bytes=residual_bytes)


RANKER = Family(
    name="ranker",
    model_schema=RankerConfig,
    data_schemas={"clicklog": ClickLogDataConfig},
    data_choices="data=synthetic_clicks or criteo_tsv",
    check_config=_check_config,
    prepare_data=_prepare,
    plan_data=_plan_data,
    build_model=lambda cfg, *, data, device: ranker.build_ranker(
        cfg, num_dense=data["num_dense"], table_sizes=data["table_sizes"], device=device
    ),
    count_parameters=lambda cfg, *, data: ranker.count_parameters(
        cfg, num_dense=data["num_dense"], table_sizes=data["table_sizes"]
    )["total"],
    blocks=lambda model: model.tables,  # one FSDP2 unit per table: sharded at rest, gathered one at a time
    compile_units=lambda model: [model],  # the whole forward: dense and sparse tensors in, logits out
    pretrained_from=lambda cfg: None,
    export_layout=PLAIN_LAYOUT,
    load_pretrained=None,
    supports_activation_checkpointing=False,  # nothing worth recomputing: the tables hold the memory
    loss=_loss,
    predict=_predict,
    eval_metrics=_metrics,
    metric="auc",
    metric_mode="max",
    distill_losses=_distill_losses,
    teacher_matches=("num_dense", "table_sizes"),  # the same features, hashed into tables of the same sizes
    sweep_metrics={"auc": "max", "logloss": "min"},
    summary_keys=("auc", "logloss", "calibration", "bayes_auc", "bayes_logloss", "auc_gap"),
    headline_keys=("auc", "logloss", "calibration", "bayes_auc", "auc_gap"),
    eval_summary=_eval_summary,
    item="samples",
    row="samples",
    items_per_row=lambda data: 1,
    throughput_key="samples_per_s",
    throughput_unit="samples/s",
    flops_per_item=lambda cfg, *, data: ranker.training_flops_per_sample(
        cfg, num_dense=data["num_dense"], table_sizes=data["table_sizes"]
    ),
    activations=_activations,
    checkpoint_payload=_payload,
    asset_keys=("feature_spec",),
    serving_replica="serve.replicas:RankerReplica",
)

SPECS = (RANKER,)
