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

from serve.generation import MAX_STOP_STRINGS

# Our bodies nest three levels at most; a limit far below Python's recursion limit means no later step (an error
# message quoting a value, pickling it to a replica) can hit RecursionError on what the parser accepted.
MAX_JSON_DEPTH = 16


@dataclass
class RequestError(Exception):
    status: int
    message: str
    param: str | None = None
    type: str = "invalid_request_error"
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def error_from_dict(error: dict, *, status: int = 400) -> RequestError:
    """A replica's `{"error": {"message", "param"}}` answer as the RequestError the router raises."""
    return RequestError(status, error["message"], error.get("param"))


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
    """Whether arrays and objects in `value` nest more than `limit` levels; a loop, not recursion."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def _check_text(text: str, key: str) -> str:
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


def _integer(payload: dict, key: str, default: int | None, *, low: int, high: int) -> int | None:
    value = payload.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{key} must be an integer, got {json.dumps(value)}", key)
    if not low <= value <= high:
        raise RequestError(400, f"{key}={value} is over the limit: it must be between {low} and {high}", key)
    return value


def _prompt(payload: dict) -> str:
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:  # OpenAI clients may send a batch of one
        prompt = prompt[0]
    if prompt is None:
        raise RequestError(400, "prompt is required", "prompt")
    if not isinstance(prompt, str):
        raise RequestError(400, f"prompt must be a string, got {type(prompt).__name__}", "prompt")
    if not prompt:
        raise RequestError(400, "prompt must not be empty", "prompt")
    return _check_text(prompt, "prompt")


def _stop(payload: dict) -> list[str]:
    stop = payload.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, f"stop must be a non-empty string or a list of them, got {json.dumps(stop)}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(400, f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
    return [_check_text(s, "stop") for s in stops]


def check_model_field(payload: dict, *, served: str) -> None:
    requested = payload.get("model")
    if requested is not None and requested != served:
        raise RequestError(404, f"model {json.dumps(requested)} is not served here; this endpoint serves "
                                f"{json.dumps(served)}", "model", type="not_found_error")


def parse_completion(payload: dict, *, served: str, max_tokens_limit: int) -> dict:
    """The fields of a POST /v1/completions body that generation uses, checked and with defaults."""
    check_model_field(payload, served=served)
    if payload.get("n", 1) != 1 or payload.get("best_of", 1) != 1:
        raise RequestError(400, "only n=1 and best_of=1 are supported", "n")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"stream must be true or false, got {json.dumps(stream)}", "stream")
    return {
        "prompt": _prompt(payload),
        "max_tokens": _integer(payload, "max_tokens", 16, low=1, high=max_tokens_limit),
        "temperature": _number(payload, "temperature", 1.0, low=0.0, high=2.0),
        "top_p": _number(payload, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
        "stop": _stop(payload),
        "seed": _integer(payload, "seed", None, low=0, high=2**63 - 1),
        "stream": stream,
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
    usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
             "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": served,
            "model_version": version,
            "choices": [{"index": 0, "text": result["text"], "finish_reason": result["finish_reason"],
                         "logprobs": None}],
            "usage": usage}


def stream_event(chunk: dict, *, request_id: str, served: str, version: int) -> str:
    """One server-sent event of a streamed completion (OpenAI's chunk shape)."""
    body = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": served,
            "model_version": version,
            "choices": [{"index": 0, "text": chunk["text"], "finish_reason": chunk["finish_reason"],
                         "logprobs": None}]}
    return f"data: {json.dumps(body)}\n\n"


def stream_error_event(error: RequestError) -> str:
    """The last event of a stream that failed after it started: OpenAI's clients raise it as an APIError."""
    return f"data: {json.dumps(error.body())}\n\n"


STREAM_DONE = "data: [DONE]\n\n"
