"""lm-evaluation-harness's model interface over an export, in one process: what lm-eval's `local-completions`
client gets back from a replica serving the export, computed with the replica's own code and no server.

The eval gate scores versions with it (serve.gate_metric), so a promotion needs no endpoint, and its numbers are
the ones `scripts/eval_lm.py` measures over HTTP for the same version. That holds because each step mirrors
the client (lm_eval/models/api_models.py TemplateAPI, openai_completions.py LocalCompletionsAPI, 0.4.13) and
the server (serve/completion.py, serve/generation.py):

- Text becomes token ids as the client's Hugging Face tokenizer makes them (tokenizer.json, no special tokens;
  BOS or else EOS stands in for an empty context, as tokenizer_config.json names them), and is cut from the
  left to the same `max_length`.
- A log-likelihood is the sum of the continuation's echoed prompt log-probabilities (the replica's prefill, one
  forward pass per request) and "greedy" means every continuation token scored its own top-1 alternative:
  lm-eval's parse_logprobs on the endpoint's answer.
- A generation is the replica's `generate` with the request the client would send: the task's max_gen_toks (or
  the default), temperature (0 unless the task says), its `until` strings plus the EOS text as stop strings,
  the client's seed, and the export's stop token ids.
"""

import copy
import logging

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from datasets.tokenizer import special_token
from serve.completion import LoadedLLM
from serve.generation import SamplingParams, generate

logger = logging.getLogger(__name__)

CLIENT_SEED = 1234  # TemplateAPI's default `seed`, sent with every request
CLIENT_DEFAULT_MAX_GEN_TOKS = 256  # TemplateAPI's default `max_gen_toks`
# Generation settings a task may give that the completions API takes; anything else the endpoint refuses (400).
SAMPLING_KEYS = ("temperature", "top_p", "seed")


def default_max_gen_toks(context: int) -> int:
    """Tokens a generation task without max_gen_toks may generate: lm-eval's 256, at most half the context (a
    small model's context could not hold 256 new tokens and a prompt). scripts/eval_lm.py sends the same."""
    return max(1, min(CLIENT_DEFAULT_MAX_GEN_TOKS, context // 2))


class ExportLM(TemplateLM):
    """An LLM export (serve/completion.py's LoadedLLM) as an lm-eval model; `max_length` is the context the
    client is told (its `max_length` model argument): it keeps one position for the token generated."""

    def __init__(self, llm: LoadedLLM, *, directory, max_length: int, max_gen_toks: int | None = None):
        super().__init__()
        self.llm = llm
        self.max_length = max_length - 1  # as TemplateAPI: requests are cut to max_length - 1 tokens
        self._max_gen_toks = max_gen_toks or default_max_gen_toks(max_length)
        self.eos_string = special_token(directory, "eos_token")
        self._bos_id = self._token_id(special_token(directory, "bos_token"))
        self._eos_id = self._token_id(self.eos_string)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.llm.tokenizer.token_to_id(token)

    # ------------------------------------------------------------------------------ tokens, as the client
    @property
    def eot_token_id(self) -> int | None:
        return self._eos_id

    @property
    def prefix_token_id(self) -> int | None:
        return self._bos_id if self._bos_id is not None else self._eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = self.llm.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    @property
    def tokenizer_name(self) -> str:
        return f"slipway-v{self.llm.version}"

    # ------------------------------------------------------------------------------------ log-likelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for cache_key, context, continuation in requests:
            # As TemplateAPI.batch_loglikelihood_requests: the request keeps its last max_length tokens.
            tokens = (context + continuation)[-self.max_length:]
            context_len = len(context) - max(0, len(context) + len(continuation) - self.max_length)
            result = self._score(tokens, context_len)
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
            results.append(result)
        return results

    def _score(self, tokens: list[int], context_len: int) -> tuple[float, bool]:
        """The replica's echoed prompt scores (one prefill), summed over the continuation as parse_logprobs does."""
        params = SamplingParams(max_tokens=0, temperature=0, logprobs=1, echo=True, seed=CLIENT_SEED)
        scores = generate(self.llm.model, self.llm.tokenizer, tokens, params,
                          stop_token_ids=self.llm.stop_token_ids).logprobs[context_len:]
        total = sum(score.logprob for score in scores)
        greedy = all(score.logprob == score.top[0][1] for score in scores)
        return total, greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """As TemplateAPI: disjoint windows of the whole text, each scored as a continuation."""
        totals = []
        for (text,) in (request.args for request in requests):
            windows = [(None, *make_disjoint_window(window)) for window in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1, context_len=1)]
            totals.append(sum(score for score, _ in self._loglikelihood_tokens(windows)))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), totals[-1])
        return totals

    # ------------------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        texts = []
        for context, gen_kwargs in (request.args for request in requests):
            texts.append(self._generate(context, copy.deepcopy(gen_kwargs)))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), texts[-1])
        return texts

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        """The completion the endpoint gives for the request LocalCompletionsAPI makes of `context`."""
        max_gen_toks = gen_kwargs.get("max_gen_toks", self._max_gen_toks)
        prompt = self.tok_encode(context)[-(self.max_length - max_gen_toks):]
        gen_kwargs.pop("do_sample", None)
        max_tokens = gen_kwargs.pop("max_tokens", None) or gen_kwargs.pop("max_gen_toks", self._max_gen_toks)
        gen_kwargs.pop("max_gen_toks", None)
        stop = handle_stop_sequences(gen_kwargs.pop("until", None), self.eos_string)
        unknown = sorted(set(gen_kwargs) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"generation_kwargs {unknown} are not completions API parameters; a task may set "
                             f"until, max_gen_toks, do_sample and {', '.join(SAMPLING_KEYS)}")
        params = SamplingParams(max_tokens=max_tokens, temperature=gen_kwargs.get("temperature", 0),
                                top_p=gen_kwargs.get("top_p", 1.0), stop=stop,
                                seed=gen_kwargs.get("seed", CLIENT_SEED))
        return generate(self.llm.model, self.llm.tokenizer, prompt, params, stop_token_ids=self.llm.stop_token_ids).text
