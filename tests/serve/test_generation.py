import random

import pytest
import torch
import torch.nn.functional as F

from conf.schema import LLMConfig
from datasets.tokenizer import EOS_TOKEN, train_tokenizer
from serve.generation import SamplingParams, StreamingText, generate, generate_stream
from trainers.llm import Transformer, build_kv_cache, build_llm

# n_kv_heads < n_heads so every cached path also exercises grouped-query attention.
CFG = LLMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64)
WORDS = "the of and to in is was for that with as on by at from his her which an be this are have not but".split()


@pytest.fixture(scope="module")
def tokenizer():
    # Plain ASCII words: the 43 merges go to common letter pairs, so a character like "€" stays three byte tokens.
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(60)) + "." for _ in range(40)]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer) -> Transformer:
    torch.manual_seed(0)
    return build_llm(CFG, vocab_size=tokenizer.get_vocab_size())


def char_tokens(tokenizer, text: str) -> list[int]:
    """One token per byte-level symbol of each character, so a multi-byte character spans several tokens."""
    return [token for char in text for token in tokenizer.encode(char).ids]


def build_scripted_model(script: list[int], *, vocab_size: int) -> Transformer:
    """A real decoder whose every next token is certain: after script[i] it emits script[i + 1].

    Zeroing the residual branches' output projections leaves the current token's embedding as the final
    hidden state, so the output layer acts as a bigram table: each script token gets an orthonormal embedding
    and its successor's output row points the same way (logit 8 * 10 = 80 against 0 for every other token).
    """
    assert len(set(script[:-1])) == len(script) - 1, "a bigram table needs distinct tokens"
    torch.manual_seed(1)
    scripted = build_llm(CFG, vocab_size=vocab_size)
    with torch.no_grad():
        for layer in scripted.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        directions = torch.linalg.qr(torch.randn(CFG.dim, len(script) - 1)).Q.T
        scripted.output.weight.zero_()
        for direction, token, successor in zip(directions, script, script[1:], strict=False):
            scripted.tok_embeddings.weight[token] = direction
            scripted.output.weight[successor] = 10 * direction
    return scripted


@pytest.fixture(scope="module")
def scripted(tokenizer):
    """A model that continues the prompt "Zap" with "5€ jolt!" and then EOS; "€" is three byte tokens."""
    prompt, completion = char_tokens(tokenizer, "Zap"), char_tokens(tokenizer, "5€ jolt!")
    assert len(completion) == len("5€ jolt!") + 2
    script = prompt + completion + [tokenizer.token_to_id(EOS_TOKEN)]
    return build_scripted_model(script, vocab_size=tokenizer.get_vocab_size()), prompt


def stream(model, tokenizer, prompt, params) -> list:
    return list(generate_stream(model, tokenizer, prompt, params))


# ------------------------------------------------------------------------------------------------ KV cache

def test_cached_logits_match_the_full_forward_at_every_position(model):
    tokens = torch.randint(0, model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    cache = build_kv_cache(model, batch_size=2)
    # Prefill, single steps, a multi-token chunk on a non-empty cache (needs the shifted causal mask), steps.
    bounds = [0, 7, 8, 9, 10, 25, 26, 27, 40]
    with torch.no_grad():
        full = model(tokens)
        pieces = [model(tokens[:, a:b], cache=cache) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert cache.length == 40
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def _pre_cache_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """The decoder's computation as written before the KV cache existed, op for op."""

    def rope(x, cos, sin):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)

    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        attention, x = layer.attention, layer.attention_norm(h)
        batch, seq, _ = x.shape
        q = attention.wq(x).view(batch, seq, attention.n_heads, attention.head_dim).transpose(1, 2)
        k = attention.wk(x).view(batch, seq, attention.n_kv_heads, attention.head_dim).transpose(1, 2)
        v = attention.wv(x).view(batch, seq, attention.n_kv_heads, attention.head_dim).transpose(1, 2)
        q, k = rope(q, model.rope_cos, model.rope_sin), rope(k, model.rope_cos, model.rope_sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + attention.wo(out.transpose(1, 2).reshape(batch, seq, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h))


def test_training_forward_is_bitwise_the_pre_cache_computation(model):
    # Training losses are compared to references at 1e-4; the no-cache path must not move by a single bit.
    tokens = torch.randint(0, model.vocab_size, (3, CFG.max_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(tokens), _pre_cache_forward(model, tokens))


def test_cache_overflow_and_oversized_cache_are_refused(model):
    cache = build_kv_cache(model, batch_size=1, max_len=8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="max_seq_len=64"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        build_kv_cache(model, batch_size=1, max_len=CFG.max_seq_len + 1)


# ------------------------------------------------------------------------------------------------ decoding

def test_greedy_generation_matches_recomputing_the_whole_sequence_each_step(model, tokenizer):
    prompt = tokenizer.encode("the quick brown fox").ids
    eos, reference = tokenizer.token_to_id(EOS_TOKEN), []
    with torch.no_grad():
        while len(reference) < 30:
            token = int(model(torch.tensor([prompt + reference]))[0, -1].argmax())
            reference.append(token)
            if token == eos:
                break
    completion = generate(model, tokenizer, prompt, SamplingParams(max_tokens=30, temperature=0))
    assert completion.text == tokenizer.decode([t for t in reference if t != eos])
    assert (completion.prompt_tokens, completion.completion_tokens) == (len(prompt), len(reference))


def test_eos_ends_generation_and_is_not_in_the_text(scripted, tokenizer):
    model, prompt = scripted
    chunks = stream(model, tokenizer, prompt, SamplingParams(max_tokens=20, temperature=0))
    # "€" arrives as three tokens but is released once, whole; EOS counts as a completion token.
    assert [c.text for c in chunks] == ["5", "€", " ", "j", "o", "l", "t", "!", ""]
    assert [c.finish_reason for c in chunks] == [None] * 8 + ["stop"]
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (3, 11)


def test_stop_string_cuts_the_text_before_it(scripted, tokenizer):
    model, prompt = scripted
    completion = generate(model, tokenizer, prompt, SamplingParams(max_tokens=20, temperature=0, stop=["€ jo"]))
    assert (completion.text, completion.finish_reason, completion.completion_tokens) == ("5", "stop", 7)
    earliest_wins = generate(model, tokenizer, prompt, SamplingParams(max_tokens=20, temperature=0, stop=["lt", "jo"]))
    assert earliest_wins.text == "5€ "


def test_a_possible_stop_string_is_held_back_until_it_fails_to_complete(scripted, tokenizer):
    model, prompt = scripted
    chunks = stream(model, tokenizer, prompt, SamplingParams(max_tokens=20, temperature=0, stop=["€ jam"]))
    assert [c.text for c in chunks] == ["5", "€ jo", "l", "t", "!", ""]
    # Cut by the length limit instead, the held-back text is released: it never became a stop string.
    chunks = stream(model, tokenizer, prompt, SamplingParams(max_tokens=6, temperature=0, stop=["€ jam"]))
    assert [c.text for c in chunks] == ["5", "€ j"]
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("length", 6)


def test_split_utf8_character_is_released_only_when_complete(tokenizer):
    text = StreamingText(tokenizer, stop=[])
    euro = tokenizer.encode("€").ids
    assert len(euro) == 3
    assert [text.push(token) for token in euro] == ["", "", "€"]
    assert text.finish() == ""


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=40, temperature=0),
    SamplingParams(max_tokens=40, temperature=1.0, seed=7),
    SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=3),
], ids=["greedy", "sampled", "nucleus"])
def test_streamed_text_equals_the_non_streamed_text(model, tokenizer, params):
    # The untrained model emits arbitrary bytes, so its text is full of split and invalid UTF-8.
    prompt = tokenizer.encode("the cat").ids
    chunks = stream(model, tokenizer, prompt, params)
    completion = generate(model, tokenizer, prompt, params)
    assert "".join(c.text for c in chunks) == completion.text
    assert chunks[-1].finish_reason == completion.finish_reason
    assert all(c.finish_reason is None for c in chunks[:-1])
    if completion.finish_reason == "length":
        assert completion.completion_tokens == params.max_tokens


def test_stop_string_in_sampled_text_cuts_where_the_unstopped_text_has_it(model, tokenizer):
    prompt = tokenizer.encode("the cat").ids
    unstopped = generate(model, tokenizer, prompt, SamplingParams(max_tokens=40, seed=11)).text
    usable = [i for i in range(len(unstopped) // 2, len(unstopped) - 1) if "\ufffd" not in unstopped[i : i + 2]]
    assert usable, f"no stop string candidate in {unstopped!r}"
    stop = unstopped[usable[0] : usable[0] + 2]
    params = SamplingParams(max_tokens=40, seed=11, stop=[stop])
    completion = generate(model, tokenizer, prompt, params)
    assert completion.text == unstopped[: unstopped.find(stop)]
    assert completion.finish_reason == "stop"
    assert "".join(c.text for c in stream(model, tokenizer, prompt, params)) == completion.text


def test_same_seed_same_text_and_another_seed_another(model, tokenizer):
    prompt = tokenizer.encode("the cat").ids
    texts = [generate(model, tokenizer, prompt, SamplingParams(max_tokens=20, seed=seed)).text for seed in (5, 5, 6)]
    assert texts[0] == texts[1] != texts[2]


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-6])
def test_a_vanishing_temperature_is_greedy_rather_than_nan(model, tokenizer, temperature):
    """logits / 1e-40 overflow float32 to inf, and softmax of inf is NaN: multinomial used to raise."""
    prompt = tokenizer.encode("the cat").ids
    greedy = generate(model, tokenizer, prompt, SamplingParams(max_tokens=20, temperature=0))
    assert generate(model, tokenizer, prompt, SamplingParams(max_tokens=20, temperature=temperature, seed=0)) == greedy


def test_tiny_top_p_keeps_only_the_most_likely_token(model, tokenizer):
    prompt = tokenizer.encode("the cat").ids
    greedy = generate(model, tokenizer, prompt, SamplingParams(max_tokens=20, temperature=0))
    nucleus = generate(model, tokenizer, prompt, SamplingParams(max_tokens=20, temperature=1.0, top_p=1e-6, seed=0))
    assert nucleus == greedy


# ------------------------------------------------------------------------------------------------ refusals

def test_requests_beyond_the_context_are_refused_before_streaming(model, tokenizer):
    prompt = [1] * 60
    with pytest.raises(ValueError, match=r"max_tokens.*max_seq_len=64"):
        generate_stream(model, tokenizer, prompt, SamplingParams(max_tokens=5))  # raises without iterating
    assert generate(model, tokenizer, prompt, SamplingParams(max_tokens=4, temperature=0)).completion_tokens <= 4
    with pytest.raises(ValueError, match="prompt"):
        generate(model, tokenizer, [], SamplingParams())


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("stop", ["a", "b", "c", "d", "e"]),
    ("stop", [""]),
])
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


# ------------------------------------------------------------------------------------------------ logprobs

def _reference_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log-softmax of one full forward over `tokens`, no cache: row i scores token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens]))[0].float(), dim=-1)


def test_completion_logprobs_are_the_models_own_at_each_step(model, tokenizer):
    prompt = tokenizer.encode("the cat").ids
    completion = generate(model, tokenizer, prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=4, logprobs=3))
    scores = completion.logprobs
    assert len(scores) == completion.completion_tokens
    reference = _reference_logprobs(model, prompt + [s.token_id for s in scores][:-1])
    for position, score in enumerate(scores, start=len(prompt) - 1):
        # Raw logits, not tempered: the score does not depend on how the token was drawn.
        assert score.logprob == pytest.approx(float(reference[position, score.token_id]), abs=1e-5)
        best = reference[position].topk(3)
        assert [i for i, _ in score.top] == best.indices.tolist()
        assert [v for _, v in score.top] == pytest.approx(best.values.tolist(), abs=1e-5)


def test_greedy_tokens_score_exactly_their_top_alternative(model, tokenizer):
    """lm-eval's is_greedy compares a token's logprob with max(top_logprobs) for equality: same float, same tensor."""
    prompt = tokenizer.encode("the cat").ids
    completion = generate(model, tokenizer, prompt, SamplingParams(max_tokens=10, temperature=0, logprobs=1))
    assert all(score.top == ((score.token_id, score.logprob),) for score in completion.logprobs)


def test_echo_scores_the_prompt_from_the_prefill(model, tokenizer, monkeypatch):
    from serve import generation

    monkeypatch.setattr(generation, "PROMPT_LOGPROB_ROWS", 4)  # several slices, the last one short
    prompt = tokenizer.encode("the cat sat on the mat with his hat").ids
    assert len(prompt) > 9
    completion = generate(model, tokenizer, prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=2,
                                                                   echo=True))
    scores = completion.logprobs
    assert len(scores) == len(prompt) + 1 and [s.token_id for s in scores[:-1]] == prompt
    assert (scores[0].logprob, scores[0].top) == (None, ())  # nothing predicts the first token
    reference = _reference_logprobs(model, prompt + [scores[-1].token_id])
    for position, score in enumerate(scores[1:]):
        assert score.logprob == pytest.approx(float(reference[position, score.token_id]), abs=1e-5)
        assert [i for i, _ in score.top] == reference[position].topk(2).indices.tolist()
    assert completion.text == tokenizer.decode([scores[-1].token_id])  # the text holds the completion only


def test_echo_with_no_tokens_to_generate_only_scores_the_prompt(model, tokenizer):
    prompt = tokenizer.encode("the cat").ids
    chunks = stream(model, tokenizer, prompt, SamplingParams(max_tokens=0, echo=True, logprobs=0))
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in chunks] == [("", "length", 0)]
    assert [s.token_id for s in chunks[0].logprobs] == prompt and all(s.top == () for s in chunks[0].logprobs)
    unscored = stream(model, tokenizer, prompt, SamplingParams(max_tokens=0, echo=True))
    assert [(c.text, c.completion_tokens, c.logprobs) for c in unscored] == [("", 0, ())]


def test_streamed_scores_cover_every_counted_token_once(scripted, tokenizer):
    """A token whose text is held back (part of "€", a possible stop string) is scored in the chunk that
    releases it; EOS and the token completing a stop string are scored too."""
    model, prompt = scripted
    for params in (SamplingParams(max_tokens=20, temperature=0, logprobs=1),
                   SamplingParams(max_tokens=20, temperature=0, logprobs=1, stop=["€ jam"]),
                   SamplingParams(max_tokens=20, temperature=0, logprobs=1, stop=["jo"])):
        chunks = stream(model, tokenizer, prompt, params)
        scored = [s.token_id for c in chunks for s in c.logprobs]
        assert len(scored) == chunks[-1].completion_tokens
        assert scored == char_tokens(tokenizer, "5€ jolt!")[: len(scored)] + [tokenizer.token_to_id(EOS_TOKEN)][
            : max(0, len(scored) - 10)]
        assert scored == [s.token_id for s in generate(model, tokenizer, prompt, params).logprobs]


def test_stop_token_ids_replace_the_tokenizers_eos(scripted, tokenizer):
    model, prompt = scripted
    j_token = char_tokens(tokenizer, "j")[0]
    completion = generate(model, tokenizer, prompt, SamplingParams(max_tokens=20, temperature=0),
                          stop_token_ids=[j_token])
    assert (completion.text, completion.finish_reason) == ("5€ ", "stop")
    # With no stop ids at all EOS is just a token (decoded to nothing): generation runs to max_tokens.
    assert generate(model, tokenizer, prompt, SamplingParams(max_tokens=14, temperature=0),
                    stop_token_ids=[]).finish_reason == "length"


@pytest.mark.parametrize(("fields", "says"), [
    ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 6}, "logprobs"), ({"logprobs": -1}, "logprobs"),
])
def test_sampling_params_refuse_bad_logprobs_settings(fields, says):
    with pytest.raises(ValueError, match=says):
        SamplingParams(**fields)
    SamplingParams(max_tokens=0, echo=True)  # scoring the prompt alone
