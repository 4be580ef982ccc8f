"""Export: a training checkpoint (sharded, resumable, written by one strategy) -> a serving artifact
(consolidated, loadable on one CPU process with no strategy code).

An export directory holds:
  model.safetensors    every parameter, full (not sharded) and in fp32, under the plain model's names
  model_config.json    the checkpoint's own model config: family, model settings, data facts
  tokenizer.json       (LLM) the tokenizer the run trained with
  feature_spec.json    (ranker) how raw features become model inputs
  export.json          where it came from: checkpoint, step, strategy, metrics

Gathering the shards happens offline, from the files, in the process that exports: the checkpoint manager
(trainers/checkpointing.py) reads the strategy's part back whole in its checkpoint format, e.g. FSDP2's DCP
shards into a full state dict, DeepSpeed's ZeRO partitions merged from their fp32 master copies. Nothing is
unpickled beyond tensors and an allow-list of the strategies' own metadata classes.
"""

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from trainers.checkpointing import MODEL_CONFIG_FILE, checkpoint_format, recorded_strategy
from trainers.families import Family, get_family
from trainers.safe_loading import check_plain_name
from trainers.strategies import CheckpointFormat

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
EXPORT_INFO_FILE = "export.json"


@dataclass
class LoadedModel:
    model: nn.Module
    model_config: dict
    directory: Path

    @property
    def family(self) -> str:
        return self.model_config["family"]

    def asset(self, key: str) -> Path:
        """The side file (tokenizer.json, feature_spec.json) the model config names under `key`."""
        if key not in self.model_config:
            raise ValueError(f"{self.directory / MODEL_CONFIG_FILE} names no {key!r} file")
        return self.directory / self.model_config[key]


# ----------------------------------------------------------------------------------------------- building

def read_model_config(directory: Path) -> dict:
    path = Path(directory) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected a checkpoint or export directory")
    config = json.loads(path.read_text())
    try:
        family = get_family(config.get("family"))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    for key in family.asset_keys:  # names that export copies and serving opens: they stay inside the directory
        if key in config:
            check_plain_name(config[key], source=path, field=key)
    return config


def family_of(model_config: dict) -> Family:
    return get_family(model_config["family"])


def build_model_from_config(model_config: dict, *, device: str | torch.device = "cpu") -> nn.Module:
    """The plain model a model_config.json describes; on "meta", only names and shapes."""
    family = family_of(model_config)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(family.model_schema), model_config["model"]))
    return family.build_model(cfg, data=model_config, device=device)


# ------------------------------------------------------------------------------ consolidating the shards

def consolidated_from_checkpoint(checkpoint_dir: Path, *, model_config: dict,
                                 stored: CheckpointFormat) -> dict[str, torch.Tensor]:
    """Every parameter of the checkpoint, full and in fp32, under the plain model's names, read offline (no
    process group) in the format the checkpoint is `stored` in (trainers/checkpointing.py: checkpoint_format)."""
    template = build_model_from_config(model_config, device="meta").state_dict()
    state = stored.consolidate(checkpoint_dir, template)
    _check_matches(state, template, source=checkpoint_dir)
    return {name: state[name].detach().to(torch.float32).contiguous() for name in template}


def _check_matches(state: dict, template: dict, *, source: Path) -> None:
    missing, unexpected = sorted(template.keys() - state.keys()), sorted(state.keys() - template.keys())
    if missing or unexpected:
        raise ValueError(f"{source} does not match its model_config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, tensor in template.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, the model config says "
                             f"{tuple(tensor.shape)}")


# ---------------------------------------------------------------------------------------- export and load

def asset_files(model_config: dict) -> list[str]:
    """The side files (tokenizer.json, feature_spec.json) a model config names under its family's asset keys."""
    return [model_config[key] for key in family_of(model_config).asset_keys if key in model_config]


def export_checkpoint(checkpoint_dir: Path, out_dir: Path, *, info: dict) -> Path:
    """Write the export of `checkpoint_dir` into `out_dir` (created; must not hold an export already)."""
    from safetensors.torch import save_file

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    model_config = read_model_config(checkpoint_dir)
    stored = checkpoint_format(checkpoint_dir)  # first, so a checkpoint without weights is named as such
    state = consolidated_from_checkpoint(checkpoint_dir, model_config=model_config, stored=stored)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"family": model_config["family"]})
    shutil.copyfile(checkpoint_dir / MODEL_CONFIG_FILE, out_dir / MODEL_CONFIG_FILE)
    for name in asset_files(model_config):
        shutil.copyfile(checkpoint_dir / name, out_dir / name)
    # "strategy" names the checkpoint format the weights came from (ddp, fsdp, deepspeed); "trained_with" the
    # strategy that wrote it, where the checkpoint records it
    info = {**info, "checkpoint": str(checkpoint_dir), "strategy": stored.name,
            "trained_with": recorded_strategy(checkpoint_dir),
            "parameters": sum(t.numel() for t in state.values())}
    (out_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    logger.info("exported %s (%s, %d parameters) to %s", checkpoint_dir.name, info["strategy"],
                info["parameters"], out_dir)
    return out_dir


def load_export(directory: Path, *, device: str | torch.device = "cpu") -> LoadedModel:
    """The exported model in eval mode, its weights checked name by name and shape by shape."""
    from safetensors.torch import load_file

    directory = Path(directory)
    model_config = read_model_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: expected an export directory")
    model = build_model_from_config(model_config, device=device)
    state = load_file(str(weights), device=str(device))
    _check_matches(state, model.state_dict(), source=weights)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, model_config=model_config, directory=directory)
