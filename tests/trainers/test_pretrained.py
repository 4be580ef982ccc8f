"""Hugging Face Llama checkpoints in (model.init_from): config.json becomes our config, the weights load into
every strategy's model, and the logits equal transformers' own on the same tokens (fp32, under 1e-4) — on one
process, and on gloo workers under DDP, FSDP2, ZeRO-2, ZeRO-3 (2 each) and HSDP (4: a 2x2 mesh), the sharding
strategies' ranks holding and reading only their part.
Every bad checkpoint gets an error naming the file and the key or tensor."""

import json
import math
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conf.pretrained import adopt_checkpoint_config, read_checkpoint_config
from conf.schema import Llama3RopeScaling, LLMConfig, TrainerConfig
from tests.hf_models import write_tiny_llama
from tests.serve.conftest import free_port
from trainers import optim
from trainers.llm import build_llm
from trainers.pretrained import check_checkpoint_tensors, load_pretrained
from trainers.strategies import build_strategy
from trainers.strategies.ddp import DDPConfig
from trainers.strategies.fsdp import FSDPConfig
from trainers.strategies.hsdp import HSDPConfig
from trainers.strategies.zero import ZeroConfig

TOLERANCE = 1e-4
TOKENS = torch.arange(3 * 40).reshape(3, 40) % 300  # ids every tiny checkpoint's vocabulary holds


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The three shapes the issue names: untied with llama3 RoPE scaling (one file), tied and sharded, and
    untied without scaling."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "untied": write_tiny_llama(root / "untied", tied=False, rope_scaling=True),
        "tied_sharded": write_tiny_llama(root / "tied", tied=True, shard=True, seed=1),
        "plain_rope": write_tiny_llama(root / "plain", tied=False, rope_scaling=False, seed=2),
    }


def reference_logits(directory) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def model_config(directory) -> LLMConfig:
    keys = read_checkpoint_config(directory)
    scaling = keys.pop("rope_scaling")
    return LLMConfig(**keys, rope_scaling=Llama3RopeScaling(**scaling) if scaling else None)


@pytest.mark.parametrize("name", ["untied", "tied_sharded", "plain_rope"])
def test_imported_logits_equal_transformers_on_one_process(checkpoints, name):
    cfg = model_config(checkpoints[name])
    check_checkpoint_tensors(checkpoints[name], cfg, vocab_size=cfg.vocab_size)
    model = build_llm(cfg, vocab_size=cfg.vocab_size, device="meta")
    model.to_empty(device="cpu")
    load_pretrained(model, checkpoints[name])
    with torch.no_grad():
        ours = model(TOKENS)
    assert (ours - reference_logits(checkpoints[name])).abs().max().item() < TOLERANCE
    assert (model.output.weight is model.tok_embeddings.weight) == cfg.tie_embeddings


def test_both_config_layouts_read_the_same(checkpoints, tmp_path):
    """transformers 5 writes rope_parameters; transformers 4 (and most Hub checkpoints) rope_theta + rope_scaling."""
    new = json.loads((checkpoints["untied"] / "config.json").read_text())
    assert "rope_parameters" in new
    parameters = new.pop("rope_parameters")
    old = {**new, "rope_theta": parameters.pop("rope_theta"), "rope_scaling": parameters}
    shutil.copytree(checkpoints["untied"], tmp_path / "v4")
    (tmp_path / "v4" / "config.json").write_text(json.dumps(old))
    assert read_checkpoint_config(tmp_path / "v4") == read_checkpoint_config(checkpoints["untied"])
    assert read_checkpoint_config(tmp_path / "v4")["rope_scaling"] == {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 32}


# ------------------------------------------------------------------------------------ the config gives way

def _plain(directory, **model):
    return {"model": {"family": "llm", "init_from": str(directory), "dim": 128, "n_layers": 2, **model},
            "data": {"kind": "text", "vocab_size": 4096, "tokenizer": None}}


def test_the_checkpoint_sets_the_shape_and_the_tokenizer(checkpoints):
    adopted = adopt_checkpoint_config(_plain(checkpoints["untied"]), command_line=["+exp=llm_tiny"])
    assert adopted["model"]["dim"] == 64 and adopted["model"]["n_kv_heads"] == 2
    assert adopted["model"]["vocab_size"] == read_checkpoint_config(checkpoints["untied"])["vocab_size"]
    assert adopted["data"]["tokenizer"] == str(checkpoints["untied"])


def test_a_typed_size_that_contradicts_the_checkpoint_names_both(checkpoints):
    plain = _plain(checkpoints["untied"], dim=128)
    with pytest.raises(ValueError, match=r"model.dim=128 on the command line contradicts .*config.json \(dim=64\)"):
        adopt_checkpoint_config(plain, command_line=["model.dim=128"])
    agreeing = adopt_checkpoint_config(_plain(checkpoints["untied"], dim=64), command_line=["model.dim=64"])
    assert agreeing["model"]["dim"] == 64


# ------------------------------------------------------------------------------------------ bad checkpoints

def _broken_copy(source, target, edit_config=None):
    shutil.copytree(source, target)
    if edit_config:
        config = json.loads((target / "config.json").read_text())
        edit_config(config)
        (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="mistral"), "model_type='mistral'.*imports the Llama family only"),
    (lambda c: c.update(attention_bias=True), r"config.json: attention_bias=True is not supported"),
    (lambda c: c["rope_parameters"].update(rope_type="yarn"), "rope scaling of type 'yarn' is not supported"),
    (lambda c: c.pop("hidden_size"), "key 'hidden_size' is missing"),
    (lambda c: c.update(head_dim=32), "head_dim=32 with num_attention_heads=4 does not give hidden_size=64"),
])
def test_an_unsupported_config_is_named(checkpoints, tmp_path, edit, message):
    directory = _broken_copy(checkpoints["untied"], tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        read_checkpoint_config(directory)


def test_missing_files_and_tensors_are_named(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        read_checkpoint_config(tmp_path / "nowhere")
    no_config = _broken_copy(checkpoints["untied"], tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(ValueError, match=r"no_config/config.json: missing"):
        read_checkpoint_config(no_config)
    cfg = model_config(checkpoints["tied_sharded"])
    no_shard = _broken_copy(checkpoints["tied_sharded"], tmp_path / "no_shard")
    index = json.loads((no_shard / "model.safetensors.index.json").read_text())
    (no_shard / index["weight_map"]["model.norm.weight"]).unlink()
    with pytest.raises(ValueError, match=r"model-000\d\d-of-000\d\d.safetensors: missing \(the index names it\)"):
        check_checkpoint_tensors(no_shard, cfg, vocab_size=cfg.vocab_size)
    index["weight_map"].pop("model.layers.1.mlp.up_proj.weight")
    (no_shard / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        check_checkpoint_tensors(no_shard, cfg, vocab_size=cfg.vocab_size)


def test_a_shape_mismatch_names_the_file_and_tensor(checkpoints, tmp_path):
    directory = _broken_copy(checkpoints["untied"], tmp_path / "shape",
                             lambda c: c.update(intermediate_size=128))
    cfg = model_config(directory)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape "
                                         r"\[160, 64\]; config.json implies \[128, 64\]"):
        check_checkpoint_tensors(directory, cfg, vocab_size=cfg.vocab_size)


def test_pickled_weights_are_refused(checkpoints, tmp_path):
    directory = _broken_copy(checkpoints["untied"], tmp_path / "bin")
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"\.bin pickles are refused"):
        check_checkpoint_tensors(directory, model_config(directory), vocab_size=300)


# ------------------------------------------------------------------------------ 2 gloo workers, each its part

def _load_on_rank(rank: int, world: int, port: int, strategy_name: str, directory: str, out: str) -> None:
    # DeepSpeed reads the rank layout from the environment; the group rendezvous through a file, not a TCP port
    # another process of the session could take between choosing it and binding it.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = model_config(directory)
    options = {"ddp": DDPConfig(), "fsdp": FSDPConfig(),
               "hsdp": HSDPConfig(hsdp_shard_size=2)}.get(strategy_name) or ZeroConfig(name=strategy_name)
    strategy = build_strategy(options, device=torch.device("cpu"), precision="fp32", accum_steps=1, grad_clip=1.0,
                              micro_batch_size=len(TOKENS))
    # As trainers/loop.py builds it: on meta for FSDP2 (and DDP, which materializes it whole), inside ZeRO-3's
    # partitioning context for DeepSpeed.
    with strategy.init_context(pretrained=True):
        model = build_llm(cfg, vocab_size=cfg.vocab_size, device="cpu" if strategy_name.startswith("zero") else "meta")
    trainer = TrainerConfig(lr=0.0, warmup_steps=0)
    strategy.setup(model, blocks=model.layers, weight_decay=0.0,
                   build_optimizer=lambda groups: optim.build_optimizer(groups, trainer),
                   build_scheduler=lambda opt: optim.build_scheduler(opt, trainer),
                   load_weights=lambda m: load_pretrained(m, directory))
    embedding = strategy.unwrapped_model().tok_embeddings.weight
    if hasattr(embedding, "ds_tensor"):  # a ZeRO-3 partition
        held = embedding.ds_tensor.numel()
    else:  # an FSDP2 DTensor's local shard, or a whole tensor
        held = (embedding.to_local() if hasattr(embedding, "to_local") else embedding).numel()
    with torch.no_grad():
        logits = strategy.model(TOKENS)
    if rank == 0:
        torch.save(logits, os.path.join(out, "logits.pt"))
    with open(os.path.join(out, f"held-{rank}.json"), "w") as file:
        json.dump({"held": held, "full": cfg.vocab_size * cfg.dim}, file)
    dist.destroy_process_group()


# FSDP2 and ZeRO-3 shard the parameters (each rank holds half the embedding table, never all of it); DDP and
# ZeRO-2 hold them whole on every rank (ZeRO-2 partitions only gradients and optimizer state). HSDP runs on 4
# workers, 2 replicas of 2-way shard groups: each rank holds half, as in its shard group.
SHARE_HELD = {"fsdp": 0.5, "zero3": 0.5, "ddp": 1.0, "zero2": 1.0, "hsdp": 0.5}
WORKERS = {"hsdp": 4}


@pytest.mark.parametrize("strategy_name", list(SHARE_HELD))
def test_imported_logits_equal_transformers_on_gloo_workers(checkpoints, tmp_path, strategy_name):
    directory, world = checkpoints["tied_sharded"], WORKERS.get(strategy_name, 2)
    mp.spawn(_load_on_rank, args=(world, free_port(), strategy_name, str(directory), str(tmp_path)), nprocs=world,
             join=True)
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert (logits - reference_logits(directory)).abs().max().item() < TOLERANCE
    for rank in range(world):
        held = json.loads((tmp_path / f"held-{rank}.json").read_text())
        assert held["held"] <= math.ceil(held["full"] * SHARE_HELD[strategy_name])
