"""A Hugging Face Llama checkpoint's config.json, read into our model config and written back from it.

`model.init_from=DIR` makes the checkpoint the source of the model's shape: `adopt_checkpoint_config` replaces
the experiment's sizes (and the tokenizer) with the checkpoint's before the config is frozen, so
`+exp=llm_tiny model.init_from=DIR` trains the checkpoint's model, and the run name hashes what is trained. A
size typed on the command line that disagrees with the checkpoint is an error naming both values: silently
preferring either would train something other than what one of them says.
"""

import json
import math
from pathlib import Path

CONFIG_FILE = "config.json"
ARCHITECTURE = "LlamaForCausalLM"
# config.json keys that change the computation in ways our decoder does not implement, with the value that
# means "off" (Hugging Face's default for Llama).
UNSUPPORTED_UNLESS = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "pretraining_tp": 1}
# Our model keys that the checkpoint decides.
ADOPTED_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len", "rope_theta",
                "rope_scaling", "norm_eps", "tie_embeddings", "vocab_size")


def read_checkpoint_config(directory: str | Path) -> dict:
    """config.json of a local Hugging Face checkpoint as our model keys (ADOPTED_KEYS); a missing file, another
    architecture or a feature our decoder lacks is a ValueError naming the file and key."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise ValueError(f"model.init_from={directory}: no such directory; expected a local Hugging Face "
                         "checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; model.init_from needs a Hugging Face checkpoint directory") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object")
    _check_supported(hf, path=path)
    return _model_keys(hf, path=path)


def _check_supported(hf: dict, *, path: Path) -> None:
    architectures = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (architectures and ARCHITECTURE not in architectures):
        raise ValueError(f"{path}: model_type={hf.get('model_type')!r}, architectures={architectures}; Slipway "
                         f"imports the Llama family only (model_type 'llama', {ARCHITECTURE})")
    for key, off in UNSUPPORTED_UNLESS.items():
        if hf.get(key, off) != off:
            raise ValueError(f"{path}: {key}={hf[key]!r} is not supported (Slipway's decoder implements {key}={off!r})")
    heads = _required(hf, "num_attention_heads", path)
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != _required(hf, "hidden_size", path):
        raise ValueError(f"{path}: head_dim={head_dim} with num_attention_heads={heads} does not give hidden_size="
                         f"{hf['hidden_size']}; Slipway's attention needs head_dim = hidden_size / heads")


def _required(hf: dict, key: str, path: Path):
    if key not in hf:
        raise ValueError(f"{path}: key {key!r} is missing")
    return hf[key]


def _rope(hf: dict, *, path: Path) -> tuple[float, dict | None]:
    """rope_theta and llama3 scaling from either layout: transformers 4 writes rope_theta and rope_scaling,
    transformers 5 writes one rope_parameters dict holding both."""
    parameters = hf.get("rope_parameters") or {}
    theta = parameters.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (parameters if parameters.get("rope_type", "default") != "default" else None)
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ValueError(f"{path}: rope scaling of type {kind!r} is not supported; Slipway implements 'llama3'")
    keys = {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
            "original_max_position_embeddings": "original_max_seq_len"}
    missing = [key for key in keys if key not in scaling]
    if missing:
        raise ValueError(f"{path}: llama3 rope scaling lacks {', '.join(missing)}")
    return float(theta), {ours: scaling[theirs] for theirs, ours in keys.items()}


def _model_keys(hf: dict, *, path: Path) -> dict:
    theta, scaling = _rope(hf, path=path)
    return {
        "dim": _required(hf, "hidden_size", path),
        "n_layers": _required(hf, "num_hidden_layers", path),
        "n_heads": _required(hf, "num_attention_heads", path),
        "n_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "ffn_hidden": _required(hf, "intermediate_size", path),
        "max_seq_len": _required(hf, "max_position_embeddings", path),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "vocab_size": _required(hf, "vocab_size", path),
    }


def adopt_checkpoint_config(config: dict, *, command_line: list[str]) -> dict:
    """`config` (plain, resolved) with model.init_from's shape and tokenizer in place of the experiment's.

    `command_line` holds the overrides as typed; a model size among them that the checkpoint contradicts is a
    ValueError naming both values. Without model.init_from the config is returned unchanged.
    """
    directory = (config.get("model") or {}).get("init_from")
    if not directory:
        return config
    adopted = read_checkpoint_config(directory)
    typed = _typed_keys(command_line)
    model = dict(config["model"])
    for key in ADOPTED_KEYS:
        if f"model.{key}" in typed and not _same(model.get(key), adopted[key]):
            raise ValueError(f"model.{key}={model.get(key)} on the command line contradicts model.init_from's "
                             f"{Path(directory) / CONFIG_FILE} ({key}={adopted[key]}); drop the override or use "
                             "another checkpoint")
        model[key] = adopted[key]
    data = dict(config["data"])
    tokenizer = data.get("tokenizer")
    if tokenizer and Path(tokenizer).resolve() != Path(directory).resolve():
        raise ValueError(f"data.tokenizer={tokenizer} differs from model.init_from={directory}: a pretrained model "
                         "reads its own tokenizer's ids; leave data.tokenizer unset")
    data["tokenizer"] = directory
    return {**config, "model": model, "data": data}


def _typed_keys(command_line: list[str]) -> set[str]:
    """`model.dim` from `model.dim=64`, `+model.dim=64` or `++model.dim=64`."""
    return {override.lstrip("+~").split("=", 1)[0] for override in command_line}


def _same(ours, theirs) -> bool:
    if isinstance(ours, float) or isinstance(theirs, float):
        return ours is not None and theirs is not None and math.isclose(float(ours), float(theirs), rel_tol=1e-9)
    return ours == theirs


def checkpoint_config_json(model: dict, *, vocab_size: int, dtype: str, bos_token_id: int | None,
                           eos_token_id: int | list[int] | None) -> dict:
    """config.json for our model config (a plain LLMConfig dict) in the layout transformers 4 and 5 and vLLM
    all read: rope_theta and rope_scaling at the top level (transformers 5 converts them on load)."""
    scaling = model.get("rope_scaling")
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": model["dim"],
        "num_hidden_layers": model["n_layers"],
        "num_attention_heads": model["n_heads"],
        "num_key_value_heads": model["n_kv_heads"],
        "head_dim": model["dim"] // model["n_heads"],
        "intermediate_size": model["ffn_hidden"],
        "max_position_embeddings": model["max_seq_len"],
        "rope_theta": model["rope_theta"],
        "rope_scaling": None if not scaling else {
            "rope_type": "llama3", "factor": scaling["factor"], "low_freq_factor": scaling["low_freq_factor"],
            "high_freq_factor": scaling["high_freq_factor"],
            "original_max_position_embeddings": scaling["original_max_seq_len"]},
        "rms_norm_eps": model["norm_eps"],
        "tie_word_embeddings": bool(model.get("tie_embeddings")),
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    return config
