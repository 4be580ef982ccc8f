"""Chat templates: the Jinja in a model's tokenizer_config.json, rendered the way Hugging Face renders it.

A Hub model ships its conversation format as a Jinja template (`chat_template`). transformers renders it in
a sandboxed environment with trim_blocks and lstrip_blocks, a `raise_exception` global, a `strftime_now`
global and a `tojson` filter that keeps non-ASCII text (transformers/utils/chat_template_utils.py), passing
`messages`, `add_generation_prompt` and the special tokens (`bos_token`, `eos_token`, ...) as variables. We
render the same way, so a fine-tuned model sees the exact text it will see behind /v1/chat/completions and
behind transformers, vLLM or any other server that applies the template.

The sandbox matters: a template comes from a downloaded file, and the sandbox refuses attribute access that
could reach Python internals.
"""

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from datasets.tokenizer import token_text

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A template that does not compile or refuses a conversation (its raise_exception), naming the file."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _compile(source: str, *, origin: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        hint = (" ({% generation %} blocks, which mark assistant text for transformers' return_assistant_tokens_mask, "
                "are not supported: Slipway finds assistant text by rendering turn by turn)"
                if "generation" in str(err) else "")
        raise ChatTemplateError(
            f"{origin}: chat_template does not compile at line {err.lineno}: {err.message}{hint}") from None


@dataclass
class ChatTemplate:
    source: str
    origin: str  # the file the template came from, for errors
    special_tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._template = _compile(self.source, origin=self.origin)

    @classmethod
    def from_tokenizer_config(cls, path: str | Path) -> "ChatTemplate":
        path = Path(path)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ChatTemplateError(f"{path}: no such file; a chat template comes from the model's "
                                    "tokenizer_config.json") from None
        except json.JSONDecodeError as err:
            raise ChatTemplateError(
                f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
        source = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(source, list):  # several named templates: the one named "default" is the chat template
            source = next((item.get("template") for item in source if isinstance(item, dict)
                           and item.get("name") == "default"), None)
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"{path}: has no chat_template; this model cannot render conversations "
                                    "(use a chat model's tokenizer, or prompt/completion data)")
        tokens = {key: token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        return cls(source=source, origin=str(path), special_tokens={k: v for k, v in tokens.items() if v})

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.exceptions.TemplateError as err:
            raise ChatTemplateError(f"{self.origin}: chat_template refused the conversation: {err}") from None

    def assistant_spans(self, messages: list[dict]) -> list[tuple[int, int]]:
        """Character spans of the rendered conversation that the assistant wrote: for each assistant turn, the
        text after the prompt that asks for it (so the role header is excluded) up to the end of its turn (so the
        end-of-turn token is included: the model must learn to stop).

        Found by rendering prefixes of the conversation, which works for any template whose rendering of a
        conversation starts with its rendering of every shorter prefix; a template that does not is refused.
        """
        full = self.render(messages)
        spans = []
        for index, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.render(messages[:index], add_generation_prompt=True)
            turn = self.render(messages[: index + 1])
            if not (full.startswith(turn) and turn.startswith(prompt)):
                raise ChatTemplateError(
                    f"{self.origin}: chat_template renders conversation prefixes inconsistently (message {index} "
                    "changes the text before it), so the assistant's tokens cannot be told apart")
            spans.append((len(prompt), len(turn)))
        return spans
