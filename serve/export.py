"""Export: a training checkpoint (sharded, resumable, written by one strategy) -> a serving artifact
(consolidated, loadable on one CPU process with no strategy code).

An export directory holds:
  weights              in the family's layout (Family.export_layout): for an LLM, a Hugging Face Llama directory
                       (config.json, model-0000i-of-0000n.safetensors with model.safetensors.index.json,
                       generation_config.json) that transformers and vLLM load as is; for a ranker, one
                       model.safetensors under the plain model's names. In serve.export_dtype (fp32 by default).
  model_config.json    the checkpoint's own model config: family, model settings, data facts
  tokenizer.json       (LLM) the tokenizer the run trained with, and its tokenizer_config.json
  feature_spec.json    (ranker) how raw features become model inputs
  export.json          where it came from: checkpoint, step, strategy, metrics

Gathering the shards happens offline, from the files, in the process that exports, and streams: the layout
plans the files it writes from the model's shapes (ExportLayout.plan: Hugging Face shards of at most
serve.export_shard_gb), the checkpoint's format reads one such group of full tensors at a time
(CheckpointFormat.consolidate_groups: FSDP2's DCP shards for the group's keys, DeepSpeed's ZeRO partitions
gathered from their fp32 master copies, DDP's model.pt mapped), and the layout casts, writes and drops each
group before the next is read. Host memory holds one group in fp32 (shard_bytes * 4 / the export dtype's
size, e.g. 10 GB for 5 GB bf16 shards) plus one cast tensor, not the whole fp32 model (32 GB for an 8B one);
scripts/bench_export.py measures it. Nothing is unpickled beyond tensors and an allow-list of the strategies'
own metadata classes.
"""

import itertools
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainers.checkpointing import MODEL_CONFIG_FILE, checkpoint_format, recorded_strategy
from trainers.exported import build_model_from_config, check_matches, family_of, load_exported_model, read_model_config
from trainers.strategies import CheckpointFormat

logger = logging.getLogger(__name__)

EXPORT_INFO_FILE = "export.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # serve.export_shard_gb's default, as the Hub's own checkpoints are cut


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


# ------------------------------------------------------------------------------ consolidating the shards

def model_template(model_config: dict) -> dict[str, torch.Tensor]:
    """The plain model's state dict on the meta device: every name and shape, no memory."""
    return build_model_from_config(model_config, device="meta").state_dict()


def consolidated_groups(checkpoint_dir: Path, *, template: dict[str, torch.Tensor], groups: list[list[str]],
                        stored: CheckpointFormat) -> Iterator[dict[str, torch.Tensor]]:
    """The checkpoint's parameters, one group of full fp32 tensors under the plain model's names at a time,
    read offline (no process group) in the format it is `stored` in (trainers/checkpointing.py:
    checkpoint_format). Each group is the format's own dict, checked and converted in place, so a consumer that
    pops its tensors frees them: nothing here keeps a group once the next one is asked for."""
    source = Path(checkpoint_dir)
    for group, names in zip(stored.consolidate_groups(source, template, groups=groups), groups, strict=True):
        check_matches(group, {name: template[name] for name in names}, source=source)
        for name in names:
            tensor = group[name]
            if tensor.dtype != torch.float32 or not tensor.is_contiguous():
                group[name] = tensor.to(torch.float32).contiguous()
            del tensor
        yield group
        del group


def consolidated_from_checkpoint(checkpoint_dir: Path, *, model_config: dict,
                                 stored: CheckpointFormat) -> dict[str, torch.Tensor]:
    """Every parameter of the checkpoint, full and in fp32, at once (one group of everything): for small models
    and tests; export streams (consolidated_groups)."""
    template = model_template(model_config)
    state: dict[str, torch.Tensor] = {}
    for group in consolidated_groups(checkpoint_dir, template=template, groups=[list(template)], stored=stored):
        state.update(group)
    return state


# ---------------------------------------------------------------------------------------- export and load

def asset_files(model_config: dict) -> list[str]:
    """The side files (tokenizer.json, feature_spec.json) a model config names under its family's asset keys."""
    return [model_config[key] for key in family_of(model_config).asset_keys if key in model_config]


def weights_identity_file(model_config: dict) -> str:
    """The export file whose checksum identifies its weights (the registry keeps one version per weights)."""
    return family_of(model_config).export_layout.identity_file


def export_checkpoint(checkpoint_dir: Path, out_dir: Path, *, info: dict, dtype: torch.dtype = torch.float32,
                      shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the export of `checkpoint_dir` into `out_dir` (created; must not hold an export already), weights in
    `dtype`, in files of at most `shard_bytes` where the family's layout shards."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    model_config = read_model_config(checkpoint_dir)
    stored = checkpoint_format(checkpoint_dir)  # first, so a checkpoint without weights is named as such
    template = model_template(model_config)
    layout = family_of(model_config).export_layout
    groups = layout.plan({name: tuple(t.shape) for name, t in template.items()}, model_config=model_config,
                         dtype=dtype, shard_bytes=shard_bytes)
    streamed = consolidated_groups(checkpoint_dir, template=template, groups=groups, stored=stored)
    # The first group before anything is written: the format refuses a checkpoint that does not match the model
    # config before it yields. (The layout empties each group it writes, so holding the dict holds no tensor.)
    first = next(streamed)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint_dir / MODEL_CONFIG_FILE, out_dir / MODEL_CONFIG_FILE)
    for name in asset_files(model_config):
        shutil.copyfile(checkpoint_dir / name, out_dir / name)
    layout.write_groups(itertools.chain([first], streamed), out_dir, model_config=model_config, dtype=dtype)
    # "strategy" names the checkpoint format the weights came from (ddp, fsdp, deepspeed); "trained_with" the
    # strategy that wrote it, where the checkpoint records it
    info = {**info, "checkpoint": str(checkpoint_dir), "strategy": stored.name,
            "trained_with": recorded_strategy(checkpoint_dir), "dtype": str(dtype).removeprefix("torch."),
            "parameters": sum({id(t): t.numel() for t in template.values()}.values())}  # a tied tensor once
    (out_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    logger.info("exported %s (%s, %d parameters) to %s", checkpoint_dir.name, info["strategy"],
                info["parameters"], out_dir)
    return out_dir


def load_export(directory: Path, *, device: str | torch.device = "cpu") -> LoadedModel:
    """The exported model in eval mode (fp32 whatever the export's dtype), its weights checked name by name and
    shape by shape; a derived version (an optimized child) in its method's form (trainers/exported.py)."""
    model, model_config = load_exported_model(directory, device=device)
    return LoadedModel(model=model, model_config=model_config, directory=Path(directory))
