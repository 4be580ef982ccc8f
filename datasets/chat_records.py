"""The lines of a fine-tuning file (datasets/chat.py), checked one by one.

A bad line is refused before anything is tokenized, with the file, the line number and the field that is
wrong, e.g. `chats.jsonl line 7: messages[2].role must be one of system, user, assistant (got 'bot')`: a
fine-tuning file is usually written by a script, and the line number is what finds the bug in it.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conf.schema import ChatDataConfig, ChatFormat

ROLES = ("system", "user", "assistant")
_ABSENT = object()  # a field the line does not have, told apart from a null


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line number in the file
    text: str  # the line (stripped of surrounding whitespace): its hash decides the split
    messages: list[dict] | None = None  # chat_jsonl
    prompt: str | None = None  # prompt_completion_jsonl
    completion: str | None = None


def record_error(path: Path, line: int, message: str) -> ValueError:
    return ValueError(f"{path} line {line}: {message}")


def iter_records(cfg: ChatDataConfig, *, path: Path) -> Iterator[Record]:
    """Every non-blank line of `path` as a checked Record, in file order."""
    read = _chat_record if cfg.format == ChatFormat.chat_jsonl else _completion_record
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            text = _decode(raw, path=path, line=number).strip()
            if number == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark some editors write is not part of the JSON
            if not text:
                continue  # blank lines (a trailing newline, hand-edited files) carry no example
            yield read(_parse(text, path=path, line=number, cfg=cfg), cfg, path=path, line=number, text=text)


def _decode(raw: bytes, *, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise record_error(path, line, f"is not valid UTF-8 (byte {err.start} of the line); expected UTF-8 "
                                       "text") from None


def _parse(text: str, *, path: Path, line: int, cfg: ChatDataConfig) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise record_error(path, line, f"column {err.colno}: not valid JSON ({err.msg}); expected one JSON object "
                                       f"per line, {_shape(cfg)}") from None
    if not isinstance(value, dict):
        raise record_error(path, line, f"expected a JSON object, {_shape(cfg)} (got {_describe(value)})")
    return value


def _shape(cfg: ChatDataConfig) -> str:
    if cfg.format == ChatFormat.chat_jsonl:
        return f'{{"{cfg.messages_field}": [{{"role": ..., "content": ...}}, ...]}}'
    return f'{{"{cfg.prompt_field}": ..., "{cfg.completion_field}": ...}}'


def _chat_record(value: dict, cfg: ChatDataConfig, *, path: Path, line: int, text: str) -> Record:
    field = cfg.messages_field
    messages = value.get(field, _ABSENT)
    if not isinstance(messages, list) or not messages:
        raise record_error(path, line, f"{field} (data.messages_field) must be a non-empty list of "
                                       f'{{"role", "content"}} objects (got {_describe(messages)})')
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise record_error(path, line, f'{where} must be an object with "role" and "content" '
                                           f"(got {_describe(message)})")
        role, content = message.get("role", _ABSENT), message.get("content", _ABSENT)
        if role not in ROLES:
            raise record_error(path, line, f"{where}.role must be one of {', '.join(ROLES)} (got {_describe(role)})")
        _check_text(content, path=path, line=line, where=f"{where}.content")
    if not any(message["role"] == "assistant" for message in messages):
        raise record_error(path, line, f"{field} has no assistant turn; the loss covers assistant turns only, so "
                                       "this conversation would teach nothing")
    return Record(line=line, text=text, messages=messages)


def _completion_record(value: dict, cfg: ChatDataConfig, *, path: Path, line: int, text: str) -> Record:
    prompt = value.get(cfg.prompt_field, _ABSENT)
    completion = value.get(cfg.completion_field, _ABSENT)
    _check_text(prompt, path=path, line=line, where=f"{cfg.prompt_field} (data.prompt_field)")
    _check_text(completion, path=path, line=line, where=f"{cfg.completion_field} (data.completion_field)")
    if not completion:
        raise record_error(path, line, f"{cfg.completion_field} (data.completion_field) is empty; the loss covers "
                                       "the completion only, so this example would teach nothing")
    return Record(line=line, text=text, prompt=prompt, completion=completion)


def _check_text(value, *, path: Path, line: int, where: str) -> None:
    if not isinstance(value, str):
        raise record_error(path, line, f"{where} must be a string (got {_describe(value)})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        # JSON may escape a lone UTF-16 surrogate ("\ud800"), which the tokenizer and parquet would refuse later.
        raise record_error(path, line, f"{where} holds a lone surrogate {value[err.start]!r} at character "
                                       f"{err.start} (an unpaired \\uD800-\\uDFFF escape); expected valid "
                                       "Unicode") from None


def _describe(value) -> str:
    """A JSON value as the error shows it: strings quoted (shortened), containers by kind."""
    if value is _ABSENT:
        return "nothing: the field is missing"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    if isinstance(value, (bool, int, float)) or value is None:
        return json.dumps(value)
    return "a list" if isinstance(value, list) else "an object"
