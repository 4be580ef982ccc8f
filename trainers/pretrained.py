"""Hugging Face Llama weights in and out of our decoder: the name mapping, the checks, and loading into any
strategy's model without building the whole model on every rank.

Our decoder computes what transformers' LlamaForCausalLM computes (rotate-half RoPE on the projections as
stored, SwiGLU, RMSNorm, grouped-query attention), so the mapping is names only: no tensor is permuted or
reshaped. (Meta's original consolidated.pth files rotate interleaved pairs and need q/k permuted; Hub
checkpoints converted by transformers already use the rotate-half layout, which is the one we read.) The
tests hold it to transformers' logits, not to this comment.

Loading reads safetensors through torch.distributed.checkpoint's HuggingFaceStorageReader: each rank asks for
the slices its parameters hold (an FSDP2 shard, or everything for DDP) and reads only those bytes. ZeRO-3
parameters are partitioned flat by DeepSpeed, so each rank reads the rows that cover its partition instead.
"""

import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Ours -> Hugging Face's, per layer and at the top. A tied output projection has no lm_head tensor.
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
# Tensors some Hub checkpoints carry that are derived, not learned (older transformers saved RoPE tables).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def to_hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face LlamaForCausalLM name."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _LAYER.fullmatch(name)
    if not match or match.group(2) not in _LAYER_NAMES:
        raise KeyError(f"{name} has no Hugging Face Llama counterpart")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def hf_names(model: nn.Module) -> dict[str, str]:
    """Every distinct parameter of `model` (a tied output projection is the embedding) -> its HF name."""
    return {name: to_hf_name(name) for name, _ in model.named_parameters()}


def expected_shapes(model_cfg, *, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a plain LLMConfig, computed without building the model."""
    head_dim = model_cfg.dim // model_cfg.n_heads
    kv = model_cfg.n_kv_heads * head_dim
    per_layer = {"self_attn.q_proj.weight": (model_cfg.dim, model_cfg.dim),
                 "self_attn.k_proj.weight": (kv, model_cfg.dim), "self_attn.v_proj.weight": (kv, model_cfg.dim),
                 "self_attn.o_proj.weight": (model_cfg.dim, model_cfg.dim),
                 "mlp.gate_proj.weight": (model_cfg.ffn_hidden, model_cfg.dim),
                 "mlp.up_proj.weight": (model_cfg.ffn_hidden, model_cfg.dim),
                 "mlp.down_proj.weight": (model_cfg.dim, model_cfg.ffn_hidden),
                 "input_layernorm.weight": (model_cfg.dim,), "post_attention_layernorm.weight": (model_cfg.dim,)}
    shapes = {f"model.layers.{i}.{name}": shape for i in range(model_cfg.n_layers) for name, shape in per_layer.items()}
    shapes["model.embed_tokens.weight"] = (vocab_size, model_cfg.dim)
    shapes["model.norm.weight"] = (model_cfg.dim,)
    if not model_cfg.tie_embeddings:
        shapes["lm_head.weight"] = (vocab_size, model_cfg.dim)
    return shapes


def tensor_files(directory: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it, from the index (sharded) or the single file."""
    from trainers.safe_loading import check_plain_name

    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({err})") from None
        for file_name in set(weight_map.values()):
            check_plain_name(file_name, source=index, field="weight_map")
        return {name: directory / file_name for name, file_name in weight_map.items()}
    if (directory / SINGLE_FILE).is_file():
        from safetensors import safe_open

        with safe_open(str(directory / SINGLE_FILE), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), directory / SINGLE_FILE)
    raise ValueError(f"{directory}: has neither {INDEX_FILE} nor {SINGLE_FILE}; expected Hugging Face safetensors "
                     "weights (.bin pickles are refused: loading them can run code)")


def check_checkpoint_tensors(directory: str | Path, model_cfg, *, vocab_size: int) -> None:
    """Every tensor the model needs is in the checkpoint with the right shape, and nothing unknown is: a
    ValueError names the file and tensor. Reads only the safetensors headers."""
    from safetensors import safe_open

    directory = Path(directory)
    files = tensor_files(directory)
    expected = expected_shapes(model_cfg, vocab_size=vocab_size)
    missing = sorted(set(expected) - set(files))
    if missing:
        raise ValueError(f"{directory}: tensor {missing[0]} is missing from the checkpoint "
                         f"({len(missing)} missing in all)")
    unknown = sorted(name for name in set(files) - set(expected)
                     if not _IGNORED.fullmatch(name) and not (name == "lm_head.weight" and model_cfg.tie_embeddings))
    if unknown:
        raise ValueError(f"{files[unknown[0]]}: tensor {unknown[0]} is not part of a Llama model with this "
                         "config.json (unsupported architecture?)")
    for path in sorted(set(files[name] for name in expected)):
        if not path.is_file():
            raise ValueError(f"{path}: missing (the index names it)")
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(str(path), framework="pt"))
                   for path in set(files[name] for name in expected)}
        for name, shape in expected.items():  # in the model's order: the first mismatch is the one named
            stored = tuple(handles[files[name]].get_slice(name).get_shape())
            if stored != shape:
                raise ValueError(f"{files[name]}: tensor {name} has shape {list(stored)}; config.json implies "
                                 f"{list(shape)}")


def load_pretrained(model: nn.Module, directory: str | Path) -> None:
    """Fill `model`'s parameters (plain, FSDP2 DTensor shards, or ZeRO-3 partitions) from a checked HF
    checkpoint directory, each rank reading only what it holds. Parameters must already live on their device."""
    started = time.perf_counter()
    directory = Path(directory)
    tie = getattr(model, "tie_weights", None)
    if tie is not None:  # materializing from the meta device unties shared parameters
        tie()
    names = hf_names(model)
    parameters = dict(model.named_parameters())
    partitioned = {names[name]: p for name, p in parameters.items() if hasattr(p, "ds_tensor")}
    if partitioned:
        _fill_zero3_partitions(partitioned, directory)
    else:
        _load_with_dcp({names[name]: p.detach() for name, p in parameters.items()}, directory)
    reset = getattr(model, "reset_rope_tables", None)
    if reset is not None:  # derived buffers are not in the checkpoint; a meta-built model has them empty
        reset()
    logger.info("loaded %d tensors from %s in %.1f s", len(names), directory, time.perf_counter() - started)


def _load_with_dcp(state: dict[str, torch.Tensor], directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    # DCP copies into the tensors in place (converting bf16 files to fp32 parameters), shard by shard.
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(directory)))


def _fill_zero3_partitions(parameters: dict[str, nn.Parameter], directory: Path) -> None:
    """DeepSpeed ZeRO-3 holds each parameter flattened, padded to a multiple of the world size and cut in equal
    contiguous partitions (param.ds_tensor); read the rows of the stored tensor that cover this rank's."""
    import torch.distributed as dist
    from safetensors import safe_open

    files = tensor_files(directory)
    rank = dist.get_rank() if dist.is_initialized() else 0
    by_file: dict[Path, list[str]] = {}
    for name in parameters:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for name in names:
                _fill_partition(parameters[name], handle.get_slice(name), rank=rank)


@torch.no_grad()
def _fill_partition(param: nn.Parameter, stored, *, rank: int) -> None:
    partition = param.ds_tensor
    size = partition.numel()
    start = rank * size
    numel = param.ds_numel
    end = min(start + size, numel)
    partition.zero_()  # the padding past the last element stays zero, as DeepSpeed leaves it
    if start >= end:
        return
    shape = stored.get_shape()
    row = 1 if len(shape) == 1 else int(torch.tensor(shape[1:]).prod())
    first, last = start // row, -(-end // row)
    rows = stored[first:last].reshape(-1)
    values = rows[start - first * row : end - first * row]
    partition[: end - start].copy_(values.to(partition.dtype))


# --------------------------------------------------------------------------------- writing the HF layout

SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
WEIGHTS_DIGEST_KEY = "slipway_weights_sha256"  # in the index's metadata: the registry's identity of the weights


def plan_hf_shards(shapes: dict[str, tuple[int, ...]], *, dtype: torch.dtype, shard_bytes: int,
                   tied: bool) -> list[list[str]]:
    """Our names, in order, cut into the shards write_hf_weights writes: at most `shard_bytes` in `dtype` each (a
    larger tensor gets a shard of its own). A tied output projection is the embedding and is left out
    (LlamaForCausalLM ties it back on load)."""
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        if tied and name == "output.weight":
            continue
        nbytes = math.prod(shape) * dtype.itemsize
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    return groups


def write_hf_weights(groups: Iterable[dict[str, torch.Tensor]], out_dir: Path, *, dtype: torch.dtype,
                     tied: bool) -> dict:
    """Write each group ({our name: full tensor}, as plan_hf_shards cuts them, taken as they come) as one Hugging
    Face safetensors shard, then model.safetensors.index.json; returns the index.

    Streaming: each tensor is taken out of its group (popped, so the group no longer holds it), cast and
    hashed, and its source dropped; the shard is written once its group is cast. So beyond what the caller
    holds, the peak is one shard in `dtype`, and a caller that keeps no other reference to a group's tensors
    (serve/export.py) holds one group at a time. The shard count is known at the end: shards are written under
    a provisional name and renamed."""
    import hashlib

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    digest, weight_map, total, written = hashlib.sha256(), {}, 0, []
    for group in groups:
        shard = {}
        for name in list(group):
            if tied and name == "output.weight":
                del group[name]
                continue
            shard[to_hf_name(name)] = tensor = group.pop(name).detach().to(dtype).contiguous()
            digest.update(f"{to_hf_name(name)}:{tensor.dtype}:{list(tensor.shape)}".encode())
            if tensor.numel():  # the bytes in place: no copy of the tensor
                digest.update(tensor.view(-1).view(torch.uint8).numpy())
            total += tensor.numel() * tensor.element_size()
            del tensor
        partial = out_dir / f"model-{len(written) + 1:05d}.safetensors.partial"
        save_file(shard, str(partial), metadata={"format": "pt"})  # transformers checks "format"
        written.append((partial, list(shard)))
        logger.info("wrote shard %d (%d tensors)", len(written), len(shard))
        del shard
    for index, (partial, names) in enumerate(written, start=1):
        file_name = SHARD_NAME.format(index=index, count=len(written))
        partial.rename(out_dir / file_name)
        weight_map.update(dict.fromkeys(names, file_name))
    index = {"metadata": {"total_size": total, WEIGHTS_DIGEST_KEY: digest.hexdigest()}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def read_hf_weights(directory: Path, *, names: list[str], device: str | torch.device = "cpu") -> dict:
    """Our state dict (every name in `names`) from a Hugging Face layout directory; a tied output projection
    reads the embedding."""
    from safetensors import safe_open

    files = tensor_files(Path(directory))
    state = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name in names:
        hf_name = to_hf_name(name)
        if hf_name not in files and name == "output.weight":
            hf_name = to_hf_name("tok_embeddings.weight")
        if hf_name not in files:
            raise ValueError(f"{Path(directory)}: tensor {hf_name} is missing")
        by_file.setdefault(files[hf_name], []).append((name, hf_name))
    for path, pairs in by_file.items():
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            for name, hf_name in pairs:
                state[name] = handle.get_tensor(hf_name)
    return state


def plan_hf_export(shapes: dict[str, tuple[int, ...]], *, model_config: dict, dtype: torch.dtype,
                   shard_bytes: int) -> list[list[str]]:
    return plan_hf_shards(shapes, dtype=dtype, shard_bytes=shard_bytes,
                          tied=bool(model_config["model"].get("tie_embeddings")))


def write_hf_export(groups: Iterable[dict[str, torch.Tensor]], out_dir: Path, *, model_config: dict,
                    dtype: torch.dtype) -> None:
    """An LLM export as a Hugging Face model directory: the weights (write_hf_weights, one shard per group of
    plan_hf_export), config.json, and the tokenizer_config.json and generation_config.json that transformers and
    vLLM read the special tokens from (a tokenizer_config.json that came with a pretrained tokenizer is already
    there and is kept)."""
    from conf.pretrained import checkpoint_config_json
    from datasets.tokenizer import EOS_TOKEN, TOKENIZER_CONFIG_FILE, special_token

    out_dir = Path(out_dir)
    write_hf_weights(groups, out_dir, dtype=dtype, tied=bool(model_config["model"].get("tie_embeddings")))
    if not (out_dir / TOKENIZER_CONFIG_FILE).is_file():  # our own BPE: its one special token ends every text
        (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "bos_token": None,
            "model_max_length": model_config["model"]["max_seq_len"], "clean_up_tokenization_spaces": False,
        }, indent=2) + "\n")
    ids = _special_token_ids(out_dir, special_token)
    generation = model_config.get("generation_config") or {}
    eos = generation.get("eos_token_id", ids["eos_token"])
    config = checkpoint_config_json(model_config["model"], vocab_size=model_config["vocab_size"],
                                    dtype=str(dtype).removeprefix("torch."), bos_token_id=ids["bos_token"],
                                    eos_token_id=eos)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": ids["bos_token"], **generation, "eos_token_id": eos}
    (out_dir / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")


GENERATION_CONFIG_FILE = "generation_config.json"


def _special_token_ids(out_dir: Path, special_token) -> dict[str, int | None]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    ids = {}
    for key in ("bos_token", "eos_token"):
        text = special_token(out_dir, key)
        ids[key] = tokenizer.token_to_id(text) if text else None
    return ids

