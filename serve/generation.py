"""Text generation for one request: a KV-cached decode loop, sampling, and stop handling that is safe to stream.

`Decoding` is the single implementation of what happens to each new row of logits (sampling, stops, scores,
releasing text); `generate_stream` drives it one request at a time on a KV cache of its own, and the batching
engine (serve/engine.py) drives many at once. `generate` only concatenates `generate_stream`'s chunks, so a
streamed and a non-streamed request with the same parameters and seed produce the same text by construction.

Log-probabilities (`logprobs`, and the prompt's with `echo`) come from the very logits that generation samples
from: the prefill's logits at every prompt position score the prompt, each step's logits score the token drawn
from them. They are the model's own distribution (log-softmax of the raw logits, before temperature and top_p),
as vLLM reports them, so a score does not depend on how the text was sampled.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from datasets.tokenizer import EOS_TOKEN
from trainers.llm import KVCache, Transformer, build_kv_cache

MAX_STOP_STRINGS = 4  # the OpenAI API's limit, which clients already respect
MAX_LOGPROBS = 5  # alternatives per token, the OpenAI completions API's limit
# Prompt positions scored per log-softmax: bounds the extra memory of echo to this many rows of the vocabulary.
PROMPT_LOGPROB_ROWS = 256
# Below this temperature sampling is greedy: logits / 1e-40 overflow float32 to inf and softmax gives NaN, and
# long before that the distribution is a point mass on the argmax anyway (vLLM draws the line at the same place).
GREEDY_BELOW_TEMPERATURE = 1e-5
# What a byte-level decoder shows for bytes that are not (yet) a whole UTF-8 character.
REPLACEMENT_CHAR = "\ufffd"


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW_TEMPERATURE) means greedy (argmax)
    top_p: float = 1.0  # nucleus: sample among the most likely tokens holding this much probability
    stop: list[str] = field(default_factory=list)  # generation ends before the first occurrence of any
    seed: int | None = None  # None draws a fresh seed per request
    logprobs: int | None = None  # score each token and list this many most likely alternatives; None: no scores
    echo: bool = False  # with logprobs, the prompt's tokens are scored too; max_tokens may then be 0

    def __post_init__(self) -> None:
        if self.max_tokens < (0 if self.echo else 1):
            raise ValueError(f"max_tokens={self.max_tokens} must be at least 1 (0 only with echo)")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} must be at most {MAX_STOP_STRINGS} non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs} must be in 0..{MAX_LOGPROBS}")


@dataclass(frozen=True)
class TokenLogprob:
    """One token's score: its log-probability given the tokens before it (None for a prompt's first token,
    which nothing predicts) and the `logprobs` most likely tokens at its position, most likely first."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StreamChunk:
    """Newly final text. Only the last chunk has a `finish_reason` ("stop" or "length"); counts are running.

    With `logprobs`, the scores of the tokens generated since the previous chunk (the prompt's first, with
    echo): a token whose text is held back is scored in the chunk that releases it, so the chunks' scores
    joined are every completion token counted, EOS and the token completing a stop string included."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


class StreamingText:
    """Turns completion tokens into text that can be released at once and never needs taking back.

    Each step decodes the whole completion (a byte-level BPE token may end inside a UTF-8 character, which
    only decoding all bytes together gets right) and releases the new suffix, holding back:
    - trailing U+FFFD, which the next token may turn into the character it is the start of;
    - a trailing piece that could be the start of a stop string, since it must vanish if the stop completes.
    Once a stop string appears, the text ends before it and `stopped` is set.
    """

    def __init__(self, tokenizer: Tokenizer, *, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.token_ids: list[int] = []
        self.released = 0  # characters of the decoded text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final with it (often empty)."""
        assert not self.stopped, "no tokens may follow a stop string"
        self.token_ids.append(token_id)
        return self._release(self.tokenizer.decode(self.token_ids).rstrip(REPLACEMENT_CHAR), final=False)

    def finish(self) -> str:
        """Release everything still held back: no more tokens are coming."""
        assert not self.stopped, "a stopped text has nothing held back"
        return self._release(self.tokenizer.decode(self.token_ids), final=True)

    def _release(self, text: str, *, final: bool) -> str:
        stop_at = first_stop_index(text, self.stop)
        if stop_at is not None:
            self.stopped = True
            end = stop_at
        else:
            end = len(text) if final else len(text) - held_back_length(text, self.stop)
        # Held-back text is always a stop-string prefix, so a later stop never starts inside released text.
        assert end >= self.released, "released text was revised"
        delta, self.released = text[self.released : end], end
        return delta


def first_stop_index(text: str, stop: list[str]) -> int | None:
    """Where the earliest occurrence of any stop string begins, or None."""
    found = [index for index in (text.find(s) for s in stop) if index >= 0]
    return min(found, default=None)


def held_back_length(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some stop string."""
    longest = 0
    for s in stop:
        for length in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:length]):
                longest = length
                break
    return longest


def generate_stream(model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, *,
                    stop_token_ids: Sequence[int] | None = None) -> Iterator[StreamChunk]:
    """Generate a completion of `prompt_ids`, yielding text as soon as it is final; the last chunk says why it ended.

    One forward over the whole prompt fills the KV cache, then each step feeds only the newest token. A stop
    token (`stop_token_ids`: the model's end-of-sequence ids; None means the tokenizer's <|endoftext|>) ends
    generation with "stop" and is not part of the text; so does a stop string, which is cut off.
    Completion token counts include the token that ended generation (EOS or the one completing a stop).
    The request is checked here, before the first chunk is asked for, so a server can still answer 400.
    """
    check_request(model, prompt_ids, params)
    decoding = Decoding(tokenizer, prompt_ids, params, stop_ids=stop_ids_of(tokenizer, stop_token_ids),
                        device=model.tok_embeddings.weight.device)
    return _decode(model, decoding)


class Decoding:
    """One sequence's generation once its prompt is in a KV cache: what to do with each row of logits it gets.

    The per-request loop (`generate_stream`) and the batching engine (serve/engine.py) both drive it, so
    sampling, stop tokens and strings, scores and the release of text have one implementation, and a seeded
    request draws the same numbers from its own generator whatever else shares its batch.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, *,
                 stop_ids: frozenset[int], device: torch.device):
        self.prompt_ids, self.params, self.stop_ids = prompt_ids, params, stop_ids
        self.scored, self.top = params.logprobs is not None, params.logprobs or 0
        self.generator = _seeded_generator(params.seed, device=device)
        self.text = StreamingText(tokenizer, stop=params.stop)
        self.completion_tokens = 0
        self.pending: list[TokenLogprob] = []  # scores not yet handed out with a chunk

    @property
    def needs_model(self) -> bool:
        """False for the prompt alone, unscored (max_tokens 0 with echo): no forward pass is needed."""
        return self.params.max_tokens > 0 or self.scored

    @property
    def scores_prompt(self) -> bool:
        """Whether every prompt position's logits are wanted (echo with logprobs), not only the last one's."""
        return self.scored and self.params.echo

    def without_model(self) -> StreamChunk:
        return StreamChunk("", "length", len(self.prompt_ids), 0)

    def score_prompt(self, logits: torch.Tensor, *, start: int) -> None:
        """Score the prompt tokens that `logits` (rows for prompt positions start, start + 1, ...) predict."""
        self.pending.extend(prompt_logprobs(logits, self.prompt_ids, top=self.top, start=start))

    def advance(self, logits: torch.Tensor) -> tuple[list[StreamChunk], int | None]:
        """Sample the next token from `logits` (vocab,) of the newest position. Returns the chunks to hand out
        (often none, the last one with its finish_reason) and the token to feed next, None once finished."""
        if self.completion_tokens == self.params.max_tokens:  # echo of a scored prompt with max_tokens 0
            return [self._chunk(self.text.finish(), "length")], None
        token = sample_token(logits, self.params, generator=self.generator)
        self.completion_tokens += 1
        if self.scored:
            self.pending.append(token_logprob(logits, token, top=self.top))
        if token in self.stop_ids:
            return [self._chunk(self.text.finish(), "stop")], None
        delta = self.text.push(token)
        if self.text.stopped:  # `delta` runs up to the stop string; nothing after it is ever released
            return [self._chunk(delta, "stop")], None
        chunks = [self._chunk(delta, None)] if delta else []
        if self.completion_tokens == self.params.max_tokens:  # the last token's logits would go unused
            return [*chunks, self._chunk(self.text.finish(), "length")], None
        return chunks, token

    def _chunk(self, text: str, finish_reason: str | None) -> StreamChunk:
        chunk = StreamChunk(text, finish_reason, len(self.prompt_ids), self.completion_tokens, tuple(self.pending))
        self.pending = []
        return chunk


def stop_ids_of(tokenizer: Tokenizer, stop_token_ids: Sequence[int] | None) -> frozenset[int]:
    """The ids that end a generation: those given, or (None) the tokenizer's <|endoftext|> if it has one."""
    if stop_token_ids is None:
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        stop_token_ids = () if eos_id is None else (eos_id,)
    return frozenset(stop_token_ids)


def _decode(model: Transformer, decoding: Decoding) -> Iterator[StreamChunk]:
    if not decoding.needs_model:
        yield decoding.without_model()
        return
    prompt_ids = decoding.prompt_ids
    cache = _new_cache(model, max_len=len(prompt_ids) + decoding.params.max_tokens)
    if decoding.scores_prompt:
        prompt_logits = _prefill_logits(model, prompt_ids, cache=cache)
        decoding.score_prompt(prompt_logits, start=0)
        logits = prompt_logits[-1]
    else:
        logits = _next_token_logits(model, prompt_ids, cache=cache)
    while True:
        chunks, token = decoding.advance(logits)
        yield from chunks
        if token is None:
            return
        logits = _next_token_logits(model, [token], cache=cache)


def generate(model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, *,
             stop_token_ids: Sequence[int] | None = None) -> Completion:
    """The whole completion at once: `generate_stream`'s chunks joined."""
    pieces, scores = [], []
    for chunk in generate_stream(model, tokenizer, prompt_ids, params, stop_token_ids=stop_token_ids):
        pieces.append(chunk.text)
        scores.extend(chunk.logprobs)
    return Completion("".join(pieces), chunk.finish_reason, chunk.prompt_tokens, chunk.completion_tokens,
                      tuple(scores))


def check_request(model: Transformer, prompt_ids: list[int], params: SamplingParams) -> None:
    """The API layer refuses these first (with a 400); checked again so a direct caller gets a clear error."""
    if not prompt_ids:
        raise ValueError("prompt is empty; expected at least one token")
    if not all(0 <= token < model.vocab_size for token in prompt_ids):
        raise ValueError(f"prompt holds token ids outside the model's vocabulary 0..{model.vocab_size - 1}")
    limit = model.cfg.max_seq_len
    if len(prompt_ids) + params.max_tokens > limit:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
            f"model.max_seq_len={limit}; expected at most {limit} tokens in all"
        )


def sample_token(logits: torch.Tensor, params: SamplingParams, *, generator: torch.Generator) -> int:
    """One token id from `logits` (vocab,): argmax at temperature 0, else a draw from the nucleus."""
    if params.temperature < GREEDY_BELOW_TEMPERATURE:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        probs = nucleus(probs, top_p=params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def nucleus(probs: torch.Tensor, *, top_p: float) -> torch.Tensor:
    """`probs` with all but the smallest set of most likely tokens holding `top_p` of the mass zeroed.

    A token stays when the mass of the tokens ranked above it is still below top_p, so the most likely token
    always stays; a stable sort keeps ties in index order, agreeing with argmax when only one token is left.
    """
    ranked, order = probs.sort(descending=True, stable=True)
    mass_above = ranked.cumsum(dim=-1) - ranked
    ranked = ranked.masked_fill(mass_above >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, ranked)


@torch.inference_mode()
def token_logprob(logits: torch.Tensor, token: int, *, top: int) -> TokenLogprob:
    """The score of `token` drawn from `logits` (vocab,), with the `top` most likely alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = logprobs.topk(top) if top else None
    alternatives = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else ()
    return TokenLogprob(token, float(logprobs[token]), alternatives)


@torch.inference_mode()
def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], *, top: int, start: int = 0) -> list[TokenLogprob]:
    """The scores of the prompt tokens that `logits` predict: row i holds the logits at prompt position start + i
    and scores token start + i + 1 (a row past the prompt's end predicts no prompt token and is skipped). The
    prompt's first token has no score (OpenAI's null). Rows go through log-softmax a slice at a time."""
    scores = [TokenLogprob(prompt_ids[0], None)] if start == 0 else []
    targets = prompt_ids[start + 1 : start + 1 + len(logits)]
    target_ids = torch.tensor(targets, dtype=torch.long, device=logits.device)
    for offset in range(0, len(targets), PROMPT_LOGPROB_ROWS):
        rows = torch.log_softmax(logits[offset : min(offset + PROMPT_LOGPROB_ROWS, len(targets))].float(), dim=-1)
        chosen = rows.gather(-1, target_ids[offset : offset + len(rows), None])[:, 0].tolist()
        if top:
            best = rows.topk(top, dim=-1)
            alternatives = [tuple(zip(i, v, strict=True)) for i, v in zip(best.indices.tolist(),
                                                                       best.values.tolist(), strict=True)]
        else:
            alternatives = [()] * len(chosen)
        scores.extend(TokenLogprob(token, logprob, alts) for token, logprob, alts in
                      zip(targets[offset : offset + len(rows)], chosen, alternatives, strict=True))
    return scores


def _seeded_generator(seed: int | None, *, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# Torch work runs in these small inference-mode functions rather than under one `with` around the loop: a
# generator suspended at `yield` inside the block would leave inference mode switched on in its caller's code.
@torch.inference_mode()
def _new_cache(model: Transformer, *, max_len: int) -> KVCache:
    return build_kv_cache(model, batch_size=1, max_len=max_len)


@torch.inference_mode()
def _prefill_logits(model: Transformer, token_ids: list[int], *, cache: KVCache) -> torch.Tensor:
    """The logits at every prompt position (len, vocab): the prefill computes them all anyway."""
    tokens = torch.tensor([token_ids], dtype=torch.long, device=model.tok_embeddings.weight.device)
    return model(tokens, cache=cache)[0]


@torch.inference_mode()
def _next_token_logits(model: Transformer, token_ids: list[int], *, cache: KVCache) -> torch.Tensor:
    tokens = torch.tensor([token_ids], dtype=torch.long, device=model.tok_embeddings.weight.device)
    return model(tokens, cache=cache)[0, -1]
