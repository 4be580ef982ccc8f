import pytest
import torch

from conf.schema import LLMConfig
from trainers.llm import build_llm, count_parameters, training_flops_per_token

CFG = LLMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=32)


def test_logits_have_vocab_width_and_parameter_count_matches_formula():
    model = build_llm(CFG, vocab_size=100)
    assert model(torch.randint(0, 100, (3, 16))).shape == (3, 16, 100)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(CFG, vocab_size=100)["total"]


def test_attention_is_causal():
    torch.manual_seed(0)
    model = build_llm(CFG, vocab_size=100)
    tokens = torch.randint(0, 100, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 100
    with torch.no_grad():
        assert torch.allclose(model(tokens)[0, :10], model(changed)[0, :10], atol=1e-6)
        assert not torch.allclose(model(tokens)[0, 10:], model(changed)[0, 10:])


def test_meta_build_allocates_nothing_until_materialized():
    model = build_llm(CFG, vocab_size=100, device="meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    logits = model(torch.randint(0, 100, (2, 8)))
    assert torch.isfinite(logits).all()
    assert model.tok_embeddings.weight.std().item() == pytest.approx(CFG.init_std, rel=0.2)


def test_sequence_longer_than_the_model_limit_is_refused():
    model = build_llm(CFG, vocab_size=100)
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="model.n_heads"):
        build_llm(LLMConfig(dim=64, n_heads=5, n_kv_heads=5), vocab_size=10)


def test_flops_per_token_for_llama_8b_shape_is_near_six_times_parameters():
    cfg = LLMConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, max_seq_len=8192)
    params = count_parameters(cfg, vocab_size=128256)
    # Llama 3 8B has 8.03e9 parameters (Meta's model card); our shape with its vocabulary must agree.
    assert params["total"] == pytest.approx(8.03e9, rel=0.01)
    flops = training_flops_per_token(cfg, vocab_size=128256, seq_len=4096)
    assert 6 * params["non_embedding"] < flops < 6 * params["total"] * 1.2


def test_flops_per_token_counts_each_matmul_weight_once():
    """6 FLOPs per matmul weight (the Linear layers of a real model, the output projection once) plus attention."""
    cfg = LLMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=32)
    model = build_llm(cfg, vocab_size=500, device="cpu")
    matmul_weights = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))
    attention = 12 * cfg.n_layers * cfg.dim * 32
    flops = training_flops_per_token(cfg, vocab_size=500, seq_len=32)
    assert flops == pytest.approx(6 * matmul_weights + attention, rel=0.01)
