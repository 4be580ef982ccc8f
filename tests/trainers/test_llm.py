import json
from pathlib import Path

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


# ------------------------------------------------------------------ packed documents and fine-tuning loss

def packed_row(examples: list[torch.Tensor], *, width: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`examples` end to end in one row of `width` tokens, then padding that is a document of its own."""
    used = sum(len(example) for example in examples)
    tokens = torch.cat([*examples, torch.full((width - used,), pad)])
    ids = torch.cat([torch.full((len(example),), index) for index, example in enumerate(examples)]
                    + [torch.full((width - used,), len(examples))])
    return tokens[None], ids[None]


def test_packed_row_logits_equal_each_example_alone():
    """Block-diagonal mask and per-document positions together: a packed example's logits are its logits alone,
    and its padding neither changes them nor turns into NaN."""
    torch.manual_seed(0)
    model = build_llm(CFG, vocab_size=100)
    examples = [torch.randint(0, 100, (length,)) for length in (7, 12, 5)]
    tokens, ids = packed_row(examples, width=CFG.max_seq_len)
    with torch.no_grad():
        packed = model(tokens, document_ids=ids)
        start = 0
        for example in examples:
            alone = model(example[None])
            assert (packed[0, start : start + len(example)] - alone[0]).abs().max() < 1e-5
            start += len(example)
        assert torch.isfinite(packed).all()  # the padding attends to itself, so no row of the mask is empty


def test_document_layout_is_block_diagonal_causal_with_positions_restarting_per_document():
    from trainers.llm import document_layout

    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    mask, positions = document_layout(ids)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert mask.shape == (2, 1, 6, 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for start, end in ((0, 3), (3, 5), (5, 6)):
        expected[start:end, start:end] = torch.ones(end - start, end - start).tril().bool()
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask[1, 0], torch.ones(6, 6).tril().bool())


def test_one_document_per_row_matches_the_plain_causal_path():
    torch.manual_seed(0)
    model = build_llm(CFG, vocab_size=100)
    tokens = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert (model(tokens, document_ids=torch.zeros_like(tokens)) - model(tokens)).abs().max() < 1e-5


def test_document_ids_need_the_tokens_shape_and_no_cache():
    from trainers.llm import build_kv_cache

    model = build_llm(CFG, vocab_size=100)
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"document_ids of shape \(1, 7\) must match tokens \(1, 8\)"):
        model(tokens, document_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="without a KV cache"):
        model(tokens, cache=build_kv_cache(model, batch_size=1), document_ids=torch.zeros_like(tokens))


def test_document_ids_pass_through_activation_checkpointing():
    from trainers.strategies.common import apply_activation_checkpointing

    torch.manual_seed(0)
    model = build_llm(CFG, vocab_size=100)
    tokens, ids = packed_row([torch.randint(0, 100, (9,)), torch.randint(0, 100, (6,))], width=20)
    expected = model(tokens, document_ids=ids)
    apply_activation_checkpointing(model.layers)
    got = model(tokens, document_ids=ids)
    got.sum().backward()
    assert torch.allclose(got, expected, atol=1e-6)
    assert model.layers[0].parameters().__next__().grad is not None


SFT_SEQ_LEN = 256  # the tiny Hugging Face model's max_positions
SFT_CFG = LLMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=SFT_SEQ_LEN)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from tests.hf_models import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("model") / "tiny")


def prepare_chats(path, model_dir, cache_root, **overrides):
    from conf.schema import ChatDataConfig
    from datasets.chat import prepare_chat

    cfg = ChatDataConfig(path=str(path), **{"seq_len": SFT_SEQ_LEN, **overrides})
    return prepare_chat(cfg, cache_root=cache_root, tokenizer_dir=model_dir, max_seq_len=SFT_SEQ_LEN)


def prepared_rows(prepared) -> dict[str, torch.Tensor]:
    """Every row of both splits, as the batch a worker gets."""
    import pyarrow.parquet as pq

    shards = [shard for directory in (prepared.train_dir, prepared.val_dir)
              for shard in sorted(Path(directory).glob("part-*.parquet"))]
    tables = [pq.read_table(shard) for shard in shards]
    return {name: torch.tensor([row for table in tables for row in table[name].to_pylist()])
            for name in prepared.columns("train")}


def sft_model(vocab_size: int):
    torch.manual_seed(0)
    return build_llm(SFT_CFG, vocab_size=vocab_size).eval()


def test_loss_masking_a_user_turn_change_leaves_the_loss_an_assistant_turn_change_moves_it(tiny_hf, tmp_path):
    """The issue's check, through preparation and the family's loss: tokens the user wrote are never targets.

    The user turn changed is the last one: a user turn before an assistant turn is the assistant's context,
    so it rightly changes the assistant's predictions (the loss covers what the assistant says *given* it).
    """
    from trainers.families.llm import LLM

    def conversation(answer: str, follow_up: str) -> str:
        return json.dumps({"messages": [{"role": "user", "content": "What is a fox?"},
                                        {"role": "assistant", "content": answer},
                                        {"role": "user", "content": follow_up}]})

    filler = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
    variants = {"original": conversation("A quick brown animal.", "Thanks! And a dog?"),
                "user_changed": conversation("A quick brown animal.", "Thanks! And what about a cat?"),
                "assistant_changed": conversation("A quick red animal.", "Thanks! And a dog?")}
    losses = {}
    for name, line in variants.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(f"{filler}\n{line}\n{filler}\n")
        prepared = prepare_chats(path, tiny_hf, tmp_path / "cache", packing=False)
        rows = prepared_rows(prepared)
        # One example per row (no packing): the conversation's row is the one whose example is longest.
        row = int((rows["document_ids"] == 0).sum(dim=1).argmax())
        batch = {key: values[row : row + 1] for key, values in rows.items()}
        with torch.no_grad():
            losses[name] = LLM.loss(sft_model(prepared.vocab_size), batch).item()
    assert abs(losses["user_changed"] - losses["original"]) < 1e-6
    assert abs(losses["assistant_changed"] - losses["original"]) > 1e-3


def test_packed_and_padded_rows_give_the_same_masked_losses(tiny_hf, tmp_path):
    """Packing changes no example's loss: the sum of trained-token losses over every row is the same."""
    from tests.hf_models import write_chat_jsonl
    from trainers.families.llm import LLM

    path = write_chat_jsonl(tmp_path / "chats.jsonl", 30, seed=2)
    totals = {}
    for packing in (True, False):
        prepared = prepare_chats(path, tiny_hf, tmp_path / "cache", packing=packing)
        rows = prepared_rows(prepared)
        with torch.no_grad():
            per_row = LLM.predict(sft_model(prepared.vocab_size), rows)["loss"]
        totals[packing] = (per_row * rows["loss_mask"].sum(dim=1)).sum().item()
    assert totals[True] == pytest.approx(totals[False], rel=1e-5)


def test_masked_loss_is_the_mean_over_trained_targets_and_rows_without_any_read_zero():
    import torch.nn.functional as F

    from trainers.families.llm import LLM

    model = sft_model(100)
    tokens, ids = packed_row([torch.randint(0, 100, (9,)), torch.randint(0, 100, (6,))], width=21)
    mask = torch.zeros(1, 20, dtype=torch.int8)
    mask[0, 3:8] = 1
    mask[0, 10:14] = 1
    batch = {"tokens": torch.cat([tokens, tokens]), "document_ids": torch.cat([ids[:, :20], ids[:, :20]]),
             "loss_mask": torch.cat([mask, torch.zeros_like(mask)])}
    with torch.no_grad():
        logits = model(tokens[:, :-1], document_ids=ids[:, :20])
        per_token = F.cross_entropy(logits[0], tokens[0, 1:], reduction="none")
        expected = per_token[mask[0].bool()].mean()
        # The micro-batch mean counts trained targets only: the second row, with none, adds nothing.
        assert LLM.loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)
        predicted = LLM.predict(model, batch)["loss"]
    assert predicted[0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert predicted[1].item() == 0.0
    untrained = {k: v[1:] for k, v in batch.items()}
    assert LLM.loss(model, untrained).item() == 0.0
