"""The optimization methods on their own (trainers/optimizations/): the int8 modules against the float layers they
replace, the pruning patterns, Wanda against magnitude, and a child's export read back through the one loader
(trainers/exported.py) giving exactly the derived model's outputs. No Ray: tests/serve/test_optimize.py runs the
stage on trained runs and serves the children."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conf.schema import LLMConfig, RankerConfig
from trainers.checkpointing import MODEL_CONFIG_FILE
from trainers.exported import load_exported_model
from trainers.families import get_family, model_config_dict
from trainers.optimizations import all_methods, get_method
from trainers.optimizations.prune import prune_mask
from trainers.optimizations.quantize import Int8EmbeddingBag, Int8Linear

TABLES = [30, 7, 120]


def _ranker_config() -> dict:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RankerConfig),
                                              {"arch": "dcn", "embedding_dim": 8, "cross_layers": 2,
                                               "deep_mlp": [32, 16]}))
    return {"family": "ranker", "model": model_config_dict(cfg), "num_dense": 5, "table_sizes": TABLES}


def _llm_config() -> dict:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LLMConfig),
                                              {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                               "ffn_hidden": 64, "max_seq_len": 32}))
    return {"family": "llm", "model": model_config_dict(cfg), "vocab_size": 96}


def _ranker_inputs(rows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sparse = torch.stack([torch.randint(0, size, (rows,), generator=generator) for size in TABLES], dim=1)
    return torch.randn(rows, 5, generator=generator), sparse


def test_int8_linear_matches_the_float_layer_within_quantization_error():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(32, 64)
    expected = linear(x)
    for dynamic in (True, False):
        quantized = Int8Linear.from_linear(linear, dynamic=dynamic)
        assert quantized.weight_int8.dtype == torch.int8
        got = quantized(x)
        relative = (got - expected).norm() / expected.norm()
        assert relative < 0.02, (dynamic, relative)
    # Leading dimensions pass through, as an LLM's (batch, seq, dim) activations need.
    assert Int8Linear.from_linear(linear, dynamic=True)(x.reshape(4, 8, 64)).shape == (4, 8, 48)


def test_int8_tables_rows_are_within_half_a_step_and_three_times_smaller():
    torch.manual_seed(0)
    table = nn.EmbeddingBag(500, 16, mode="sum")
    quantized = Int8EmbeddingBag.from_embedding_bag(table)
    ids = torch.randint(0, 500, (200, 1))
    step = quantized.row_scale.float()[ids[:, 0]]
    error = (quantized(ids) - table(ids)).abs().amax(dim=1)
    assert (error <= step * 0.5 + 2e-3).all()  # rounding, plus the fp16 offset's own rounding
    before = table.weight.numel() * 4
    after = sum(buffer.numel() * buffer.element_size() for buffer in quantized.buffers())
    assert before / after >= 3.0


def test_prune_masks_keep_half_of_each_row_or_two_of_each_four():
    scores = torch.rand(6, 16)
    unstructured = prune_mask(scores, sparsity=0.5, pattern="unstructured")
    assert (unstructured.sum(dim=1) == 8).all()
    # the kept scores are each row's largest
    kept, dropped = scores[unstructured].reshape(6, 8), scores[~unstructured].reshape(6, 8)
    assert (kept.min(dim=1).values >= dropped.max(dim=1).values).all()
    two_of_four = prune_mask(scores, sparsity=0.5, pattern="2:4")
    assert (two_of_four.reshape(6, 4, 4).sum(dim=-1) == 2).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        prune_mask(torch.rand(2, 6), sparsity=0.5, pattern="2:4")


def test_wanda_keeps_the_weights_that_meet_large_inputs():
    """With one input channel 1000x larger than the rest, Wanda keeps its weights where magnitude pruning drops
    them for being small."""
    family = get_family("llm")
    config = _llm_config()
    from trainers.exported import build_model_from_config

    torch.manual_seed(0)
    model = build_model_from_config(config)
    first = model.layers[0].attention.wq
    with torch.no_grad():
        first.weight[:, 3] = 1e-3  # tiny weights on channel 3 of the first layer's input
        model.layers[0].attention_norm.weight[3] = 1000.0  # ... which carries large activations
    batches = [{"tokens": torch.randint(0, 96, (4, 17))}]
    wanda = get_method("prune_wanda_50").derive(build_copy(model, config), family=family, settings={},
                                                calibration=batches)
    magnitude = get_method("prune_magnitude_50").derive(build_copy(model, config), family=family, settings={})
    assert (wanda.layers[0].attention.wq.weight[:, 3] != 0).all()
    assert (magnitude.layers[0].attention.wq.weight[:, 3] == 0).all()
    for pruned in (wanda, magnitude):
        for linear in pruned.layers[1].modules():
            if isinstance(linear, nn.Linear):
                assert (linear.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def build_copy(model: nn.Module, config: dict) -> nn.Module:
    from trainers.exported import build_model_from_config

    copy = build_model_from_config(config)
    copy.load_state_dict(model.state_dict())
    return copy


def _write_child(tmp_path, config: dict, method_name: str, *, calibration=None):
    """A random parent derived by `method_name` and written as an export; returns (derived model, directory)."""
    from trainers.exported import build_model_from_config

    family, method = get_family(config["family"]), get_method(method_name)
    torch.manual_seed(1)
    parent = build_model_from_config(config).eval()
    child = method.derive(parent, family=family, settings=dict(method.settings), calibration=calibration)
    child_config = {**config, "derived": [{"method": method_name, "settings": dict(method.settings), "parent": 1}]}
    directory = tmp_path / method_name
    directory.mkdir()
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(child_config))
    (method.layout or family.export_layout).write(child.state_dict(), directory, model_config=child_config,
                                                  dtype=torch.float32, shard_bytes=10**9)
    return child, directory


@pytest.mark.parametrize("method_name", ["int8_dynamic", "int8_weight_only", "int8_tables"])
def test_a_quantized_ranker_child_loads_back_with_the_same_outputs(tmp_path, method_name):
    child, directory = _write_child(tmp_path, _ranker_config(), method_name)
    loaded, model_config = load_exported_model(directory)
    assert model_config["derived"][0]["method"] == method_name
    dense, sparse = _ranker_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(dense, sparse), child(dense, sparse), rtol=0, atol=0)
    kinds = {type(module).__name__ for module in loaded.modules()}
    assert ("Int8EmbeddingBag" if method_name == "int8_tables" else "Int8Linear") in kinds


@pytest.mark.parametrize("method_name", ["int8_dynamic", "int8_weight_only"])
def test_an_llm_child_loads_back_with_the_same_logits(tmp_path, method_name):
    batches = [{"tokens": torch.randint(0, 96, (4, 17))}]
    child, directory = _write_child(tmp_path, _llm_config(), method_name, calibration=batches)
    loaded, _ = load_exported_model(directory)
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), child(tokens), rtol=0, atol=0)


def test_a_compiled_child_gives_the_parents_scores(tmp_path):
    child, directory = _write_child(tmp_path, _ranker_config(), "compile")
    loaded, _ = load_exported_model(directory)
    assert loaded._compiled_call_impl is not None  # the loader compiled the ranker's forward (its compile unit)
    dense, sparse = _ranker_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(dense, sparse), child(dense, sparse), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded(dense[:7], sparse[:7]), child(dense[:7], sparse[:7]), rtol=1e-5, atol=1e-6)


def test_an_unknown_method_or_family_is_named(tmp_path):
    _, directory = _write_child(tmp_path, _ranker_config(), "int8_tables")
    config = json.loads((directory / MODEL_CONFIG_FILE).read_text())
    config["derived"][0]["method"] = "int4_magic"
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"derived.method: serve.optimize='int4_magic' is not one of .*int8_dynamic"):
        load_exported_model(directory)
    with pytest.raises(ValueError, match="applies to llm models, not ranker"):
        get_method("prune_wanda_50").check_family("ranker")
    assert {"int8_dynamic", "int8_weight_only", "int8_tables", "compile", "prune_wanda_50", "prune_2of4"} <= set(
        all_methods())
