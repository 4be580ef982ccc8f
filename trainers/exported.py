"""Reading an export directory back into a plain model, below the serving layer: serve/export.py's load_export
(every replica, the gate, the harness) and a distillation run's teacher both load through here.

An export is the family's weights layout plus model_config.json. A derived version (an optimized child:
trainers/optimizations/) records its methods under "derived" in model_config.json, oldest first; they say which
layout its weights lie in and how to turn the plain model into the child's shape before its weights are loaded
(and finish it after), so one loader serves parents and children alike.
"""

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from trainers.checkpointing import MODEL_CONFIG_FILE
from trainers.families import Family, get_family
from trainers.optimizations import child_layout, derived_steps
from trainers.safe_loading import check_plain_name


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
    derived_steps(config, source=path)  # an unknown method is named before any weights are read
    return config


def family_of(model_config: dict) -> Family:
    return get_family(model_config["family"])


def build_model_from_config(model_config: dict, *, device: str | torch.device = "cpu") -> nn.Module:
    """The plain model a model_config.json describes; on "meta", only names and shapes."""
    family = family_of(model_config)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(family.model_schema), model_config["model"]))
    return family.build_model(cfg, data=model_config, device=device)


def check_matches(state: dict, template: dict, *, source: Path) -> None:
    missing, unexpected = sorted(template.keys() - state.keys()), sorted(state.keys() - template.keys())
    if missing or unexpected:
        raise ValueError(f"{source} does not match its model_config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, tensor in template.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, the model config says "
                             f"{tuple(tensor.shape)}")
        if state[name].dtype != tensor.dtype and not (state[name].is_floating_point() and tensor.is_floating_point()):
            raise ValueError(f"{source}: {name} is {state[name].dtype}, the model expects {tensor.dtype}")


def load_exported_model(directory: Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(the model in eval mode, its model config): fp32 whatever the export's dtype, weights checked name by name
    and shape by shape. A derived version is built in its methods' shape first and finished by them after loading
    (e.g. compiled)."""
    directory = Path(directory)
    model_config = read_model_config(directory)
    model = build_model_from_config(model_config, device=device)
    family = family_of(model_config)
    steps = derived_steps(model_config, source=directory / MODEL_CONFIG_FILE)
    for method, settings in steps:
        method.check_device(torch.device(device))
        model = method.prepare(model, family=family, settings=settings)
    template = model.state_dict()
    state = (child_layout(steps) or family.export_layout).read(directory, names=list(template), device=device)
    check_matches(state, template, source=directory)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    for method, settings in steps:
        model = method.finish(model, family=family, settings=settings)
    return model, model_config
