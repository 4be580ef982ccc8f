"""Export: a training checkpoint (sharded, resumable, written by one strategy) -> a serving artifact
(consolidated, loadable on one CPU process with no strategy code).

An export directory holds:
  model.safetensors    every parameter, full (not sharded) and in fp32, under the plain model's names
  model_config.json    the checkpoint's own model config: family, model settings, data facts
  tokenizer.json       (LLM) the tokenizer the run trained with
  feature_spec.json    (ranker) how raw features become model inputs
  export.json          where it came from: checkpoint, step, strategy, metrics

Gathering the shards happens offline, from the files, in the process that exports: FSDP2's DCP shards are
read back into a full state dict, and DeepSpeed's ZeRO partitions are merged from their fp32 master copies.
Nothing is unpickled beyond tensors and an allow-list of the strategies' own metadata classes.
"""

import contextlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from conf.schema import MODEL_SCHEMAS

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
EXPORT_INFO_FILE = "export.json"
# model_config.json names its side file under these keys (see trainers/families.py's checkpoint payloads).
ASSET_KEYS = ("tokenizer", "feature_spec")


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
    if config.get("family") not in MODEL_SCHEMAS:
        raise ValueError(f"{path}: family={config.get('family')!r} is not one of {', '.join(MODEL_SCHEMAS)}")
    return config


def build_model_from_config(model_config: dict, *, device: str | torch.device = "cpu") -> nn.Module:
    """The plain model a model_config.json describes; on "meta", only names and shapes."""
    from trainers.families import get_family

    schema = MODEL_SCHEMAS[model_config["family"]]
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), model_config["model"]))
    return get_family(model_config["family"]).build_model(cfg, data=model_config, device=device)


# ------------------------------------------------------------------------------ consolidating the shards

def _ddp_state(checkpoint_dir: Path, template: dict) -> dict:
    return torch.load(checkpoint_dir / "model.pt", map_location="cpu", weights_only=True)


def _fsdp_state(checkpoint_dir: Path, template: dict) -> dict:
    """Read DCP's shards into full CPU tensors shaped like the plain model's (no process group needed)."""
    import torch.distributed.checkpoint as dcp

    from trainers.checkpointing import _make_safe_dcp_reader

    state = {"model": {name: torch.empty(t.shape, dtype=torch.float32) for name, t in template.items()}}
    with warnings.catch_warnings():  # DCP warns that it runs without a process group, which is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=_make_safe_dcp_reader(str(checkpoint_dir / "dcp")), no_dist=True)
    return state["model"]


@contextlib.contextmanager
def _weights_only_loads():
    """DeepSpeed's merge tool calls torch.load(weights_only=False); force tensor-only loading while it runs,
    allowing the few DeepSpeed classes its state files contain."""
    from trainers.checkpointing import _safe_deepspeed_globals

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_safe_deepspeed_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _deepspeed_state(checkpoint_dir: Path, template: dict) -> dict:
    """Merge ZeRO-1/2/3 partitions from the fp32 master weights in the optimizer files (bf16 runs included)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _weights_only_loads(), contextlib.redirect_stdout(None):  # the tool prints its progress
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir / "deepspeed"), tag="state")


# What each strategy leaves in a checkpoint (trainers/checkpointing.py) -> its name and how to read it whole.
_CONSOLIDATORS = {"model.pt": ("ddp", _ddp_state), "dcp": ("fsdp", _fsdp_state),
                  "deepspeed": ("deepspeed", _deepspeed_state)}


def _consolidator(checkpoint_dir: Path) -> tuple[str, object]:
    for marker, (strategy, read_whole) in _CONSOLIDATORS.items():
        if (checkpoint_dir / marker).exists():
            return strategy, read_whole
    raise ValueError(
        f"{checkpoint_dir} holds no model weights: expected model.pt (ddp), dcp/ (fsdp) or deepspeed/ (zero)"
    )


def strategy_of(checkpoint_dir: Path) -> str:
    return _consolidator(checkpoint_dir)[0]


def consolidated_state_dict(checkpoint_dir: Path, *, model_config: dict) -> dict[str, torch.Tensor]:
    """Every parameter of the checkpoint, full and in fp32, under the plain model's names."""
    _, read_whole = _consolidator(checkpoint_dir)  # first, so a checkpoint without weights is named as such
    template = build_model_from_config(model_config, device="meta").state_dict()
    state = read_whole(checkpoint_dir, template)
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

def export_checkpoint(checkpoint_dir: Path, out_dir: Path, *, info: dict) -> Path:
    """Write the export of `checkpoint_dir` into `out_dir` (created; must not hold an export already)."""
    from safetensors.torch import save_file

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    model_config = read_model_config(checkpoint_dir)
    state = consolidated_state_dict(checkpoint_dir, model_config=model_config)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"family": model_config["family"]})
    shutil.copyfile(checkpoint_dir / MODEL_CONFIG_FILE, out_dir / MODEL_CONFIG_FILE)
    for key in ASSET_KEYS:
        if key in model_config:
            shutil.copyfile(checkpoint_dir / model_config[key], out_dir / model_config[key])
    info = {**info, "checkpoint": str(checkpoint_dir), "strategy": strategy_of(checkpoint_dir),
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
