"""Model families: one record (Family) per family holds everything Slipway needs to know about it, from its
config schemas to the replica that serves it, the way torchtitan's TrainSpec does for a model.

A family is selected by `model.family` and looked up here; nothing else switches on its name. A batch is a
dict of column name -> tensor, as Ray Data yields it: `tokens` for the LLM; `label`, `dense`, `sparse` (and
`ctr` on synthetic validation data) for rankers. `data` is the plain dict of facts the prepared data gives
the model (vocabulary size, table sizes, ...): `Prepared.to_dict()` in a run, `plan_data` in a plan.

Adding a family: its schemas in conf/schema.py and YAML in conf/model/ and conf/data/, its data preparation
in datasets/ (if its kind of data is new), its model in trainers/, one module here that declares SPECS, and
a replica class in serve/ that its spec names.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cluster.memory import META_INIT_THRESHOLD
from trainers.discovery import Registry

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ExportLayout:
    """How a family's exported weights lie on disk, so that the tools of its ecosystem load the export as is.

    Export streams (serve/export.py): `plan` cuts the model's names into the groups the layout writes one file
    each from, export reads the checkpoint one group at a time (CheckpointFormat.consolidate_groups), and
    `write_groups` takes the groups as they come, dropping each tensor once written."""

    # (shapes: {our name: shape}, *, model_config, dtype, shard_bytes) -> [[our name, ...], ...]: the names of
    # each weights file, in order; names the layout does not store (a tied output projection) are left out
    plan: Callable[..., list[list[str]]]
    # (groups: iterable of {our name: full tensor}, one per planned file, out_dir, *, model_config, dtype) -> None;
    # writes the weights and any metadata files the layout needs (the side files, e.g. tokenizer.json, are
    # already there)
    write_groups: Callable[..., None]
    # (directory, *, names: our parameter names, device) -> {our name: tensor}
    read: Callable[..., dict]
    identity_file: str  # the file whose checksum identifies the weights (the registry keeps one version per weights)

    def write(self, state: dict[str, torch.Tensor], out_dir, *, model_config: dict, dtype: torch.dtype,
              shard_bytes: int) -> None:
        """A whole state dict (random or small models): planned and written as an export streams it."""
        plan = self.plan({name: tuple(t.shape) for name, t in state.items()}, model_config=model_config,
                         dtype=dtype, shard_bytes=shard_bytes)
        self.write_groups(({name: state[name] for name in names} for names in plan), out_dir,
                          model_config=model_config, dtype=dtype)


WEIGHTS_FILE = "model.safetensors"


def _plan_plain(shapes: dict, *, model_config: dict, dtype: torch.dtype, shard_bytes: int) -> list[list[str]]:
    return [list(shapes)]


def _write_plain(groups, out_dir, *, model_config: dict, dtype: torch.dtype) -> None:
    """One file, so the groups are collected first: this layout is for rankers, whose dense weights are small
    (an LLM-sized model goes through the sharded Hugging Face layout, trainers/pretrained.py)."""
    from safetensors.torch import save_file

    state = {}
    for group in groups:
        for name in list(group):
            tensor = group.pop(name)
            # Integer tensors (an int8 child's weights, trainers/optimizations/) are stored as they are.
            state[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"family": model_config["family"]})


def _read_plain(directory, *, names: list[str], device) -> dict:
    from safetensors.torch import load_file

    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: expected an export directory")
    return load_file(str(weights), device=str(device))


# One model.safetensors under the plain model's names: nothing outside Slipway reads a ranker's weights.
PLAIN_LAYOUT = ExportLayout(plan=_plan_plain, write_groups=_write_plain, read=_read_plain, identity_file=WEIGHTS_FILE)


@dataclass(frozen=True)
class Family:
    name: str
    # Config: the schemas of conf/model/*.yaml and conf/data/*.yaml files of this family (registered with
    # Hydra by trainers/config.py), the data.kind it trains on and the data= choices that give it.
    model_schema: type
    data_schemas: dict[str, type]  # data.kind -> its schema: the kinds of data this family trains on
    data_choices: str  # e.g. "data=stdlib, text_dir or parquet", for the error when the data does not match
    check_config: Callable[..., None]  # (model cfg, data cfg): checks across the two, before anything starts
    # Data: (model cfg, data cfg, *, cache_root) -> the prepared data (datasets/), built once and cached;
    # (model cfg, data cfg) -> the `data` dict as preparing would give it, from the config alone (plan=true).
    prepare_data: Callable[..., object]
    plan_data: Callable[..., dict]
    # Model
    build_model: Callable[..., nn.Module]  # (model cfg, *, data: dict, device) -> module
    count_parameters: Callable[..., int]  # (model cfg, *, data: dict) -> parameters, without building
    blocks: Callable[[nn.Module], nn.ModuleList]  # the units FSDP2 shards one by one (and LLMs checkpoint)
    # The modules torch.compile may compile whole for serving (trainers/optimizations/compile.py): their inputs are
    # tensors only, so one graph with dynamic shapes serves every batch (an LLM engine's slot layout is Python data
    # that would recompile a graph holding attention at every step).
    compile_units: Callable[[nn.Module], list[nn.Module]]
    # Pretrained weights: (model cfg) -> the checkpoint directory a run starts from, or None; and
    # (model, directory) -> fills the model's parameters (or this rank's shards of them) from it.
    pretrained_from: Callable[..., str | None]
    load_pretrained: Callable[[nn.Module, str], None] | None
    supports_activation_checkpointing: bool
    # Training and evaluation
    loss: Callable[[nn.Module, Batch], torch.Tensor]  # mean loss of one micro-batch
    predict: Callable[[nn.Module, Batch], Batch]  # per-row validation outputs, gathered from every worker
    eval_metrics: Callable[[dict[str, np.ndarray]], dict[str, float]]  # all validation rows -> metrics
    metric: str  # the validation metric that ranks checkpoints
    metric_mode: str  # "min" or "max"
    # Distillation (trainers/distill.py): (student, teacher, batch, *, cfg: DistillConfig) -> (the family's loss,
    # the distillation term) of one micro-batch, from one student forward pass; and the model_config keys a
    # teacher's export must share with the student's for their logits to mean the same classes (a key that names a
    # side file, one of asset_keys, compares the files' contents).
    distill_losses: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    teacher_matches: tuple[str, ...]
    sweep_metrics: dict[str, str]  # validation metrics a sweep can rank trials by -> their natural mode
    summary_keys: tuple[str, ...]  # final metrics repeated at the top level of summary.json
    headline_keys: tuple[str, ...]  # final metrics in the run's last log line
    eval_summary: Callable[[dict], str]  # the family's part of an evaluation's log line, after val_loss
    # Throughput and the plan
    item: str  # what throughput counts: "tokens" or "samples"
    row: str  # what one data row is: "sequences" or "samples"
    items_per_row: Callable[[dict], int]  # items one data row contributes: (data) -> int
    throughput_key: str  # metrics key of items per second
    throughput_unit: str  # as the progress line prints it
    flops_per_item: Callable[..., float]  # (model cfg, *, data) -> training FLOPs per item
    # (model cfg, *, data, micro_batch, compute_bytes, residual_bytes, checkpointing, selective) -> cluster
    # Activations; selective: the checkpointing policy is trainer.activation_checkpointing_policy=selective
    activations: Callable[..., object]
    # Checkpoints and exports: (model cfg, data) -> {"model_config": ..., "files": {name: source path}}; the
    # model_config keys that name a side file copied into exports (tokenizer.json, feature_spec.json).
    checkpoint_payload: Callable[..., dict]
    asset_keys: tuple[str, ...]
    export_layout: ExportLayout
    # Serving: the replica class, as "module:Class" under serve/. The class lives in the serving layer, which
    # imports this one, so the spec names it and serve/deploy.py resolves it (trainers never imports serve).
    # The class declares its routes and its sample request (serve/replicas.py).
    serving_replica: str


_REGISTRY = Registry(__name__, key="model.family")


def all_families() -> dict[str, Family]:
    return dict(_REGISTRY.records)


def get_family(name: str) -> Family:
    return _REGISTRY.get(name)


def init_device_for(family: Family, cfg, *, data: dict, device: torch.device, meta_supported: bool) -> torch.device:
    """Where to build the model: `model.init_device`, where "auto" picks meta for models too large to build
    whole when the strategy can materialize shards (FSDP2), and the worker's device otherwise."""
    if cfg.init_device == "meta" and not meta_supported:
        raise ValueError("model.init_device=meta needs a strategy that materializes shards (strategy=fsdp)")
    large = family.count_parameters(cfg, data=data) > META_INIT_THRESHOLD
    if cfg.init_device == "meta" or (cfg.init_device == "auto" and large and meta_supported):
        return torch.device("meta")
    return device


def model_config_dict(cfg) -> dict:
    """A model config as plain data, for model_config.json."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
