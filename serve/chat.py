"""POST /v1/chat/completions: the request checks and response shapes, free of Ray and FastAPI (as serve/api.py).

A chat request becomes the same request a completion does (serve/completion.py), with `messages` in place of
`prompts`: the replica renders them with the model's chat template (datasets/chat_template.py, exactly as
transformers renders it) and generates one choice. The answers follow OpenAI's shapes: a `chat.completion`
with the assistant's `message`, or a stream of `chat.completion.chunk`s whose first delta is the role, then
the content, the last one with the finish_reason (and with stream_options.include_usage, one more chunk with
the usage and no choices).
"""

import json
import time
import uuid

from serve.api import (
    STREAM_DONE,
    RequestError,
    StreamUsage,
    check_fields,
    check_model_field,
    check_text,
    integer_field,
    parse_stream,
    sampling_fields,
    sse,
)

CHAT_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                         "seed", "stream", "stream_options", "user"})
# Accepted only at the value that changes nothing: one choice, no penalties or biases, no logprobs, no storing.
CHAT_NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "logprobs": False,
                "store": False}
ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES = 1024


def parse_chat(payload: dict, *, served: str, max_tokens_limit: int) -> dict:
    """The fields of a POST /v1/chat/completions body, checked: the request a replica answers."""
    check_model_field(payload, served=served)
    check_fields(payload, route="/v1/chat/completions", supported=CHAT_FIELDS, neutral=CHAT_NEUTRAL)
    stream, include_usage = parse_stream(payload)
    max_tokens, param = _max_tokens(payload, limit=max_tokens_limit)
    return {
        "kind": "chat",
        "messages": parse_messages(payload.get("messages")),
        "max_tokens": max_tokens,  # None: as many as the context leaves, up to serve.max_tokens_limit
        "max_tokens_param": param,
        "max_tokens_limit": max_tokens_limit,
        **sampling_fields(payload),
        "logprobs": None,
        "echo": False,
        "stream": stream,
        "include_usage": include_usage,
    }


def _max_tokens(payload: dict, *, limit: int) -> tuple[int | None, str]:
    """max_completion_tokens, or max_tokens (its older name); both given, they must agree."""
    new = integer_field(payload, "max_completion_tokens", None, low=1, high=limit)
    old = integer_field(payload, "max_tokens", None, low=1, high=limit)
    if new is not None and old is not None and new != old:
        raise RequestError(400, f"max_completion_tokens={new} and max_tokens={old} disagree; send one of them "
                                "(max_tokens is its older name)", "max_completion_tokens")
    return (new, "max_completion_tokens") if new is not None else (old, "max_tokens")


def parse_messages(messages) -> list[dict]:
    """Each message as {"role", "content"} (and "name" where given), its content a string: a list of text parts
    is joined with newlines, as vLLM joins them for templates that expect strings."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages is required: a non-empty list of {\"role\", \"content\"} objects",
                           "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(400, f"messages has {len(messages)} entries; at most {MAX_MESSAGES} are allowed",
                           "messages")
    return [_message(message, f"messages[{index}]") for index, message in enumerate(messages)]


def _message(message, where: str) -> dict:
    if not isinstance(message, dict):
        raise RequestError(400, f"{where} must be an object with role and content, got {type(message).__name__}",
                           where)
    role = message.get("role")
    if role not in ROLES:
        what = "tool messages (tool calling) are not supported" if role in ("tool", "function") else \
            f"role must be one of {', '.join(ROLES)}"
        raise RequestError(400, f"{where}.role={json.dumps(role)}: {what}", f"{where}.role")
    for key, value in message.items():  # e.g. an assistant message sent back with "tool_calls": null is fine
        if key not in ("role", "content", "name") and value is not None:
            raise RequestError(400, f"{where}.{key} is not supported; a message has role, content and name",
                               f"{where}.{key}")
    parsed = {"role": role, "content": _content(message.get("content"), f"{where}.content")}
    if message.get("name") is not None:
        if not isinstance(message["name"], str):
            raise RequestError(400, f"{where}.name must be a string", f"{where}.name")
        parsed["name"] = check_text(message["name"], f"{where}.name")
    return parsed


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return check_text(content, where)
    if not isinstance(content, list):
        raise RequestError(400, f"{where} is required: a string or a list of text parts, got "
                                f"{json.dumps(content)}", where)
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RequestError(400, f"{where}[{index}] must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                                    f"{json.dumps(kind)} parts are not supported", f"{where}[{index}]")
        texts.append(check_text(part["text"], f"{where}[{index}].text"))
    return "\n".join(texts)


# ------------------------------------------------------------------------------------------- responses

def chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_body(result: dict, *, request_id: str, served: str, version: int) -> dict:
    """A non-streamed chat answer from a replica's result (serve/completion.py: join_choices)."""
    choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"], "refusal": None},
                "logprobs": None, "finish_reason": c["finish_reason"]} for c in result["choices"]]
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": served,
            "model_version": version, "choices": choices, "usage": result["usage"]}


class ChatStream:
    """The server-sent events of a streamed chat answer: per choice a first delta with the role, then content
    deltas, the finish_reason on the last; then, with include_usage, a chunk with the usage and no choices."""

    def __init__(self, *, request_id: str, served: str, version: int, include_usage: bool):
        self.head = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": served, "model_version": version}
        self.include_usage, self.usage = include_usage, StreamUsage()
        self.started: set[int] = set()

    def events(self, chunk: dict) -> list[str]:
        index, events = chunk["index"], []
        self.usage.add(chunk)
        if index not in self.started:
            self.started.add(index)
            events.append(self._event(index, {"role": "assistant", "content": ""}, None))
        if chunk["text"] or chunk["finish_reason"] is not None:
            delta = {"content": chunk["text"]} if chunk["text"] else {}
            events.append(self._event(index, delta, chunk["finish_reason"]))
        return events

    def end(self) -> list[str]:
        usage = [sse({**self.head, "choices": [], "usage": self.usage.body()})] if self.include_usage else []
        return [*usage, STREAM_DONE]

    def _event(self, index: int, delta: dict, finish_reason: str | None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse({**self.head, "choices": [choice], **({"usage": None} if self.include_usage else {})})
