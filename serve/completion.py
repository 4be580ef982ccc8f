"""What an LLM replica does with a checked request, free of Ray so it runs (and tests) in-process.

A request comes from serve/api.py (`kind` "completion": `prompts`, each a string or token ids) or serve/chat.py
(`kind` "chat": `messages`, rendered with the model's chat template). Each prompt becomes one choice, generated
in a replica by the batching engine (serve/engine.py) or here one after another (`stream_choices`); either
way `ChoiceChunks` turns them into plain dicts (they travel from the replica to the router), and `join_choices`
makes the answer of a non-streamed request out of them.

Prompt text and token ids follow transformers and vLLM: a string prompt is encoded with the tokenizer's
post-processor (which adds BOS for Llama tokenizers and nothing for our own BPE), token ids are used as given,
and a rendered chat prompt, which already holds whatever BOS text the template writes, is encoded without
special tokens.

An exported LLM is a Hugging Face model directory: besides tokenizer.json, tokenizer_config.json (its
`chat_template` and `eos_token`, when the model has them) and generation_config.json (`eos_token_id`: an id or
a list) say how conversations look and which tokens end a generation. Either may be missing: a model with no
chat template answers chat requests with a 400, and a model with neither file stops at <|endoftext|>.
"""

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from datasets.chat_template import ChatTemplate, ChatTemplateError
from datasets.tokenizer import EOS_TOKEN, TOKENIZER_CONFIG_FILE, token_text
from serve.export import LoadedModel
from serve.generation import SamplingParams, generate_stream
from serve.logprobs import CompletionLogprobs, TokenTexts, join_logprobs
from trainers.llm import Transformer
from trainers.pretrained import GENERATION_CONFIG_FILE

logger = logging.getLogger(__name__)



@dataclass
class LoadedLLM:
    model: Transformer
    tokenizer: Tokenizer
    version: int
    chat_template: ChatTemplate | None = None
    stop_token_ids: tuple[int, ...] = ()  # the ids that end a generation (EOS, end of turn)
    engine: object = None  # in a replica, the AsyncEngine that batches this version's requests (serve/engine.py)
    live: object = None  # in a replica, the LiveProfile its prompts are counted into (serve/monitoring.py)
    texts: TokenTexts = field(init=False)

    def __post_init__(self) -> None:
        self.texts = TokenTexts(self.tokenizer)


def load_llm(export: LoadedModel, *, version: int) -> LoadedLLM:
    """A loaded export with its tokenizer, chat template and stop tokens, read from the export's own files."""
    tokenizer = Tokenizer.from_file(str(export.asset("tokenizer")))
    tokenizer_config = _read_json(export.directory / TOKENIZER_CONFIG_FILE)
    template = None
    if tokenizer_config.get("chat_template"):
        template = ChatTemplate.from_tokenizer_config(export.directory / TOKENIZER_CONFIG_FILE)
    generation_config = _read_json(export.directory / GENERATION_CONFIG_FILE) or \
        export.model_config.get("generation_config") or {}  # an export may carry it inside model_config.json
    stop_ids = stop_token_ids(tokenizer, tokenizer_config, generation_config)
    if not stop_ids:
        logger.warning("%s names no end-of-sequence token: generations run to max_tokens", export.directory)
    return LoadedLLM(model=export.model, tokenizer=tokenizer, version=version, chat_template=template,
                     stop_token_ids=stop_ids)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def stop_token_ids(tokenizer: Tokenizer, tokenizer_config: dict, generation_config: dict) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (an id or a list: chat models often end turns with a token of their
    own) and tokenizer_config.json's eos_token, as vLLM takes both; neither given: <|endoftext|>, our BPE's EOS."""
    ids = generation_config.get("eos_token_id")
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    eos = token_text(tokenizer_config.get("eos_token"))
    if eos is not None and tokenizer.token_to_id(eos) is not None:
        ids.append(tokenizer.token_to_id(eos))
    if not ids and tokenizer.token_to_id(EOS_TOKEN) is not None:
        ids.append(tokenizer.token_to_id(EOS_TOKEN))
    return tuple(dict.fromkeys(int(i) for i in ids))


# ------------------------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class Job:
    """One choice to generate: the prompt's ids, the text echoed before the completion, and how to sample."""

    index: int
    prompt_ids: list[int]
    echo_text: str
    params: SamplingParams


def _error(message: str, param: str | None) -> dict:
    return {"error": {"message": message, "param": param}}


def prepare(llm: LoadedLLM, request: dict) -> list[Job] | dict:
    """The request's choices, or an error answer for a prompt this model cannot take (the router sends a 400)."""
    prompts = _chat_prompt(llm, request) if request["kind"] == "chat" else _completion_prompts(llm, request)
    if isinstance(prompts, dict):
        return prompts
    jobs = []
    for index, (prompt_ids, text) in enumerate(prompts):
        max_tokens = _max_tokens(llm, request, prompt_ids, index=index, batch=len(prompts) > 1)
        if isinstance(max_tokens, dict):
            return max_tokens
        params = SamplingParams(max_tokens=max_tokens, temperature=request["temperature"], top_p=request["top_p"],
                                stop=request["stop"], seed=request["seed"], logprobs=request["logprobs"],
                                echo=request["echo"])
        jobs.append(Job(index, prompt_ids, text if request["echo"] else "", params))
    return jobs


def _completion_prompts(llm: LoadedLLM, request: dict) -> list[tuple[list[int], str]] | dict:
    prompts = []
    vocab = llm.model.vocab_size
    for index, prompt in enumerate(request["prompts"]):
        if isinstance(prompt, str):
            prompts.append((llm.tokenizer.encode(prompt).ids, prompt))
            continue
        outside = next((token for token in prompt if token >= vocab), None)
        if outside is not None:
            where = f"prompt[{index}]" if len(request["prompts"]) > 1 else "prompt"
            return _error(f"{where} holds token id {outside}, outside this model's vocabulary 0..{vocab - 1}",
                          "prompt")
        prompts.append((list(prompt), llm.tokenizer.decode(prompt) if request["echo"] else ""))
    return prompts


def _chat_prompt(llm: LoadedLLM, request: dict) -> list[tuple[list[int], str]] | dict:
    if llm.chat_template is None:
        return _error(f"model version {llm.version} has no chat template (its tokenizer_config.json has no "
                      "chat_template), so it cannot answer /v1/chat/completions; send a prompt to /v1/completions",
                      "model")
    try:
        text = llm.chat_template.render(request["messages"], add_generation_prompt=True)
    except ChatTemplateError as err:
        return _error(f"messages: {err}", "messages")
    return [(llm.tokenizer.encode(text, add_special_tokens=False).ids, text)]


def _max_tokens(llm: LoadedLLM, request: dict, prompt_ids: list[int], *, index: int, batch: bool) -> int | dict:
    """The request's max_tokens, or (when it gave none) as many as fit the context, up to serve.max_tokens_limit."""
    context, wanted = llm.model.cfg.max_seq_len, request["max_tokens"]
    prompt_param = "messages" if request["kind"] == "chat" else "prompt"
    label = f"{prompt_param}[{index}]" if batch else f"the {prompt_param}"
    if not prompt_ids:
        return _error(f"{label} encodes to no tokens; it must hold at least one", prompt_param)
    if len(prompt_ids) > context or (len(prompt_ids) == context and wanted != 0):
        return _error(f"{label} is {len(prompt_ids)} tokens; this model's context is {context} tokens, so "
                      f"{prompt_param} must be shorter", prompt_param)
    if wanted is None:
        return min(request["max_tokens_limit"], context - len(prompt_ids))
    if len(prompt_ids) + wanted > context:
        param = request["max_tokens_param"]
        return _error(f"{label} ({len(prompt_ids)} tokens) + {param} ({wanted}) exceeds the model's context of "
                      f"{context} tokens; lower {param} to at most {context - len(prompt_ids)}", param)
    return wanted


class ChoiceChunks:
    """One choice's StreamChunks as the dicts that travel from the replica to the router: {"index", "text",
    "finish_reason", "logprobs", "prompt_tokens", "completion_tokens"} (counts running per choice). With echo
    the first chunk starts with the prompt's text."""

    def __init__(self, llm: LoadedLLM, job: Job):
        self.index, self.echo = job.index, job.echo_text
        self.scores = CompletionLogprobs(llm.texts) if job.params.logprobs is not None else None

    def to_dict(self, chunk) -> dict:
        text, self.echo = self.echo + chunk.text, ""
        return {"index": self.index, "text": text, "finish_reason": chunk.finish_reason,
                "logprobs": self.scores.add(chunk.logprobs) if self.scores is not None else None,
                "prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens}


def stream_choices(llm: LoadedLLM, jobs: list[Job]) -> Iterator[dict]:
    """Each choice's chunks in turn, generated one request at a time without the engine, for callers in this
    process (tests of the API's shapes); replicas batch requests through serve/engine.py."""
    for job in jobs:
        choice = ChoiceChunks(llm, job)
        for chunk in generate_stream(llm.model, llm.tokenizer, job.prompt_ids, job.params,
                                     stop_token_ids=llm.stop_token_ids):
            yield choice.to_dict(chunk)


def join_choices(chunks: list[dict]) -> dict:
    """A non-streamed answer from the chunks of stream_choices: one choice per index, and usage over them all."""
    by_index: dict[int, list[dict]] = {}
    for chunk in chunks:
        by_index.setdefault(chunk["index"], []).append(chunk)
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index in sorted(by_index):
        parts, last = by_index[index], by_index[index][-1]
        logprobs = [part["logprobs"] for part in parts if part["logprobs"] is not None]
        choices.append({"index": index, "text": "".join(part["text"] for part in parts),
                        "finish_reason": last["finish_reason"],
                        "logprobs": join_logprobs(logprobs) if logprobs else None})
        prompt_tokens += last["prompt_tokens"]
        completion_tokens += last["completion_tokens"]
    return {"choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
