"""The HTTP API's request checks and response shapes, free of Ray and FastAPI so they test in isolation.

Errors follow the OpenAI API's shape, `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients show
them as they would show OpenAI's own; `param` names the offending field. A streamed answer that fails after its
first chunk ends with one such error as its last event (the status line was sent long before).
"""

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from serve.generation import MAX_LOGPROBS, MAX_STOP_STRINGS

# Our bodies nest four levels at most; a limit far below Python's recursion limit means no later step (an error
# message quoting a value, pickling it to a replica) can hit RecursionError on what the parser accepted.
MAX_JSON_DEPTH = 16
MAX_PROMPTS = 128  # prompts in one /v1/completions batch: lm-eval's batches are far smaller
MAX_TOKEN_ID = 2**31  # token ids travel as int64 tensors: a bigger number is refused here, not in torch
RETRY_AFTER_S = 1  # what a 503 for a full queue tells clients: queues of short requests drain within seconds

COMPLETION_FIELDS = frozenset({"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
                               "stream_options", "logprobs", "echo", "user"})
# Accepted only at the value that changes nothing: one choice per prompt, no penalties or biases, no suffix.
COMPLETION_NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
                      "suffix": ""}


@dataclass
class RequestError(Exception):
    status: int
    message: str
    param: str | None = None
    type: str = "invalid_request_error"
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def error_from_dict(error: dict) -> RequestError:
    """A replica's `{"error": {"message", "param"}}` answer as the RequestError the router raises: a 400, or a
    503 with Retry-After when the replica says it is full (`"retry_after_s"`, see `overloaded_dict`)."""
    if "retry_after_s" in error:
        return RequestError(503, error["message"], None, type="server_error",
                            headers={"retry-after": str(error["retry_after_s"])})
    return RequestError(error.get("status", 400), error["message"], error.get("param"))


def overloaded(reason: str, *, retry_after_s: int) -> RequestError:
    """The 503 of every full queue (a replica's engine, its admission, Serve's handle), with Retry-After."""
    return RequestError(503, f"{reason}; the server is at capacity, retry after {retry_after_s} s", None,
                        type="server_error", headers={"retry-after": str(retry_after_s)})


def overloaded_dict(reason: str, *, retry_after_s: int) -> dict:
    """`overloaded` as a replica's answer (the router turns it back into the 503 with error_from_dict)."""
    return {"error": {"message": overloaded(reason, retry_after_s=retry_after_s).message, "param": None,
                      "retry_after_s": retry_after_s}}


def check_content_length(value: str | None, *, limit: int) -> None:
    """Refuse a body by its declared size, before a byte of it is read (serve.max_body_bytes)."""
    if value is not None and value.isdigit() and int(value) > limit:
        raise body_too_large(limit, declared=int(value))


def body_too_large(limit: int, *, declared: int | None = None) -> RequestError:
    size = f" of {declared} bytes" if declared is not None else ""
    return RequestError(413, f"the request body{size} is over the limit of {limit} bytes (serve.max_body_bytes)",
                        "body")


def parse_json_object(body: bytes) -> dict:
    too_deep = RequestError(400, f"the request body nests JSON more than {MAX_JSON_DEPTH} levels deep", "body")
    try:
        payload = json.loads(body)
    except RecursionError:  # Python's parser recurses per level: thousands of "[" exhaust its stack
        raise too_deep from None
    except (UnicodeDecodeError, ValueError) as err:
        raise RequestError(400, f"the request body is not valid JSON: {err}", "body") from None
    if _deeper_than(payload, MAX_JSON_DEPTH):
        raise too_deep
    if not isinstance(payload, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(payload).__name__}", "body")
    return payload


def _deeper_than(value, limit: int) -> bool:
    """Whether arrays and objects in `value` nest more than `limit` levels; a loop over levels, not recursion,
    that keeps only containers (a 64-candidate /v1/rank body: 0.12 ms, against 0.22 ms visiting every value)."""
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(limit):
        if not level:
            return False
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, dict | list)]
    return bool(level)


def check_text(text: str, key: str) -> str:
    """JSON's \\ud800 escapes can spell a lone UTF-16 surrogate, which Python keeps in a str but which is not
    text: a tokenizer (or any UTF-8 encoder) refuses it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(400, f"{key} holds a lone UTF-16 surrogate (\\u{ord(text[err.start]):04x} at character "
                                f"{err.start}), which is not valid Unicode: send surrogates in pairs", key) from None
    return text


def _number(payload: dict, key: str, default: float, *, low: float, high: float, low_open: bool = False) -> float:
    value = payload.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(400, f"{key} must be a number, got {json.dumps(value)}", key)
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(400, f"{key}={value:g} must be in {bounds}", key)
    return float(value)


def integer_field(payload: dict, key: str, default: int | None, *, low: int, high: int) -> int | None:
    value = payload.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{key} must be an integer, got {json.dumps(value)}", key)
    if not low <= value <= high:
        side = "over the limit" if value > high else "under the minimum"
        raise RequestError(400, f"{key}={value} is {side}: it must be between {low} and {high}", key)
    return value


def _boolean(payload: dict, key: str, default: bool, *, name: str | None = None) -> bool:
    value, name = payload.get(key, default), name or key
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def check_fields(payload: dict, *, route: str, supported: frozenset[str], neutral: dict) -> None:
    """Refuse, by name, every field this server would otherwise ignore: one it does not implement, or one of
    `neutral`'s at any value but the one that changes nothing (n=1, a penalty of 0). A null is a field left out,
    as OpenAI's clients send it."""
    for key, value in payload.items():
        if value is None:
            continue
        if key in neutral:
            expected = neutral[key]
            if value != expected or isinstance(value, bool) != isinstance(expected, bool):
                raise RequestError(400, f"{key}={json.dumps(value)} is not supported by this server's {route}: "
                                        f"leave {key} out or set it to {json.dumps(expected)}", key)
        elif key not in supported:
            raise RequestError(400, f"{key} is not supported by this server's {route}; leave it out (supported: "
                                    f"{', '.join(sorted(supported | neutral.keys()))})", key)


def _token_ids(value: list, key: str) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < MAX_TOKEN_ID for t in value):
        raise RequestError(400, f"{key} as token ids must hold integers in 0..{MAX_TOKEN_ID - 1}", "prompt")
    return value


def _one_prompt(value, key: str, *, batch: bool) -> str | list[int]:
    if isinstance(value, str):
        if not value:
            raise RequestError(400, f"{key} must not be empty", "prompt")
        return check_text(value, "prompt")
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return _token_ids(value, key)
    if isinstance(value, list) and not value:
        raise RequestError(400, f"{key} must not be empty", "prompt")
    shapes = "a string or a list of token ids" if batch else \
        "a string, a list of token ids, or a list of strings or of token-id lists (a batch)"
    raise RequestError(400, f"{key} must be {shapes}; got {type(value).__name__}", "prompt")


def _prompts(payload: dict) -> list[str | list[int]]:
    """`prompt` as OpenAI takes it: a string, token ids, or a batch of either (one choice per prompt)."""
    prompt = payload.get("prompt")
    if prompt is None:
        raise RequestError(400, "prompt is required", "prompt")
    is_batch = isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt)
    if not is_batch:
        return [_one_prompt(prompt, "prompt", batch=False)]
    if len(prompt) > MAX_PROMPTS:
        raise RequestError(400, f"prompt holds {len(prompt)} prompts; at most {MAX_PROMPTS} are allowed per "
                                "request", "prompt")
    return [_one_prompt(p, f"prompt[{i}]", batch=True) for i, p in enumerate(prompt)]


def parse_stop(payload: dict) -> list[str]:
    stop = payload.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, f"stop must be a non-empty string or a list of them, got {json.dumps(stop)}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(400, f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
    return [check_text(s, "stop") for s in stops]


def parse_stream(payload: dict) -> tuple[bool, bool]:
    """`stream`, and whether `stream_options.include_usage` asks for a last chunk with the usage."""
    stream = _boolean(payload, "stream", False)
    options = payload.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise RequestError(400, "stream_options is only allowed with stream=true", "stream_options")
    if not isinstance(options, dict):
        raise RequestError(400, f"stream_options must be an object, got {json.dumps(options)}", "stream_options")
    for key, value in options.items():
        if key == "include_obfuscation" and value in (None, False):
            continue
        if key != "include_usage":
            raise RequestError(400, f"stream_options.{key} is not supported; only include_usage is",
                               f"stream_options.{key}")
    return stream, _boolean(options, "include_usage", False, name="stream_options.include_usage")


def check_model_field(payload: dict, *, served: str) -> None:
    requested = payload.get("model")
    if requested is not None and requested != served:
        raise RequestError(404, f"model {json.dumps(requested)} is not served here; this endpoint serves "
                                f"{json.dumps(served)}", "model", type="not_found_error")


def sampling_fields(payload: dict) -> dict:
    """What both LLM routes take the same way: temperature, top_p, stop and seed."""
    return {"temperature": _number(payload, "temperature", 1.0, low=0.0, high=2.0),
            "top_p": _number(payload, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
            "stop": parse_stop(payload),
            "seed": integer_field(payload, "seed", None, low=0, high=2**63 - 1)}


def parse_completion(payload: dict, *, served: str, max_tokens_limit: int) -> dict:
    """The fields of a POST /v1/completions body that generation uses, checked and with defaults: the request
    a replica answers (serve/completion.py)."""
    check_model_field(payload, served=served)
    check_fields(payload, route="/v1/completions", supported=COMPLETION_FIELDS, neutral=COMPLETION_NEUTRAL)
    stream, include_usage = parse_stream(payload)
    prompts = _prompts(payload)
    echo = _boolean(payload, "echo", False)
    if payload.get("max_tokens") == 0 and not echo:
        raise RequestError(400, "max_tokens=0 generates nothing: it is only allowed with echo=true (to score the "
                                "prompt)", "max_tokens")
    return {
        "kind": "completion",
        "prompts": prompts,
        "max_tokens": integer_field(payload, "max_tokens", 16, low=0 if echo else 1, high=max_tokens_limit),
        "max_tokens_param": "max_tokens",
        "max_tokens_limit": max_tokens_limit,
        **sampling_fields(payload),
        "logprobs": integer_field(payload, "logprobs", None, low=0, high=MAX_LOGPROBS),
        "echo": echo,
        "stream": stream,
        "include_usage": include_usage,
    }


def parse_rank(payload: dict, *, served: str, max_candidates: int) -> tuple[dict, list[dict]]:
    """A POST /v1/rank body: an optional `context` object of features shared by every candidate, and a
    non-empty list of `candidates`, each an object of features."""
    check_model_field(payload, served=served)
    context = payload.get("context") or {}
    if not isinstance(context, dict):
        raise RequestError(400, f"context must be an object of features, got {type(context).__name__}", "context")
    candidates = payload.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        raise RequestError(400, "candidates must be a non-empty list of objects of features", "candidates")
    if len(candidates) > max_candidates:
        raise RequestError(400, f"candidates has {len(candidates)} entries; at most {max_candidates} are allowed "
                                f"per request", "candidates")
    for index, candidate in enumerate(candidates):
        if not isinstance(candidate, dict):
            raise RequestError(400, f"candidates[{index}] must be an object of features", f"candidates[{index}]")
        shared = sorted(context.keys() & candidate.keys())
        if shared:
            raise RequestError(400, f"feature {shared[0]} is given in both context and candidates[{index}]",
                               f"candidates[{index}].{shared[0]}")
    return context, candidates


# ------------------------------------------------------------------------------------------- responses

def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def completion_body(result: dict, *, request_id: str, served: str, version: int) -> dict:
    """A non-streamed /v1/completions answer from a replica's result (serve/completion.py: join_choices)."""
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": served,
            "model_version": version,
            "choices": [{"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"],
                         "logprobs": c["logprobs"]} for c in result["choices"]],
            "usage": result["usage"]}


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


class StreamUsage:
    """Token counts of a stream: each choice's chunks carry its running counts, the last one its total."""

    def __init__(self):
        self.counts: dict[int, tuple[int, int]] = {}

    def add(self, chunk: dict) -> None:
        self.counts[chunk["index"]] = (chunk["prompt_tokens"], chunk["completion_tokens"])

    def body(self) -> dict:
        prompt = sum(p for p, _ in self.counts.values())
        completion = sum(c for _, c in self.counts.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class CompletionStream:
    """The server-sent events of a streamed /v1/completions answer (OpenAI's `text_completion` chunks). With
    stream_options.include_usage every chunk has `"usage": null` and a last chunk with no choices has the usage."""

    def __init__(self, *, request_id: str, served: str, version: int, include_usage: bool):
        self.head = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": served,
                     "model_version": version}
        self.include_usage, self.usage = include_usage, StreamUsage()

    def events(self, chunk: dict) -> list[str]:
        self.usage.add(chunk)
        choice = {"index": chunk["index"], "text": chunk["text"], "finish_reason": chunk["finish_reason"],
                  "logprobs": chunk["logprobs"]}
        return [sse({**self.head, "choices": [choice], **self._usage_field()})]

    def end(self) -> list[str]:
        usage = [sse({**self.head, "choices": [], "usage": self.usage.body()})] if self.include_usage else []
        return [*usage, STREAM_DONE]

    def _usage_field(self) -> dict:
        return {"usage": None} if self.include_usage else {}


def stream_error_event(error: RequestError) -> str:
    """The last event of a stream that failed after it started: OpenAI's clients raise it as an APIError."""
    return sse(error.body())


STREAM_DONE = "data: [DONE]\n\n"
