"""Token scores (serve/generation.py's TokenLogprob) in the OpenAI completions API's legacy `logprobs` shape.

    {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob, ...}, ...], "text_offset": [...]}

A token is shown as its text. A byte-level BPE token may hold only part of a UTF-8 character; such a token is
shown as "bytes:\\xe2\\x82" (the way OpenAI shows them), so two different tokens never show as the same "\ufffd"
and collide as keys of a top_logprobs object. `text_offset` is where each token's text starts in the choice's
`text` (the prompt's first token at 0 with echo), counted in characters: special tokens, which decoding skips,
add none.
"""

from collections.abc import Sequence
from functools import lru_cache

from tokenizers import Tokenizer, decoders

from serve.generation import TokenLogprob


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (the characters byte-level BPE writes bytes as) back to the bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict.fromkeys(printable), 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = 256 + extra
            extra += 1
    return {chr(code if code is not None else byte): byte for byte, code in chars.items()}


class TokenTexts:
    """How one tokenizer's tokens show in logprobs, and how many characters of decoded text each adds."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self.special = {index for index, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        self._cache: dict[int, tuple[str, int]] = {}

    def show(self, token_id: int) -> str:
        return self._entry(token_id)[0]

    def length(self, token_id: int) -> int:
        return self._entry(token_id)[1]

    def _entry(self, token_id: int) -> tuple[str, int]:
        if token_id not in self._cache:
            self._cache[token_id] = self._describe(token_id)
        return self._cache[token_id]

    def _describe(self, token_id: int) -> tuple[str, int]:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:  # a padded embedding row past the tokenizer's vocabulary: no text at all
            return f"<|token_{token_id}|>", 0
        if token_id in self.special:
            return piece, 0
        raw = self._bytes(piece)
        if raw is None:  # not byte-level (e.g. SentencePiece): trust the decoder
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            return text, len(text)
        # Characters begin at every byte but UTF-8 continuation bytes (0b10xxxxxx): a token holding the start of
        # a split character counts it, the tokens holding its rest add nothing, so offsets match the decoded text.
        starts = sum((byte & 0xC0) != 0x80 for byte in raw)
        try:
            return raw.decode("utf-8"), starts
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw), starts

    def _bytes(self, piece: str) -> bytes | None:
        if not self.byte_level:
            return None
        decoder = _byte_decoder()
        if not all(char in decoder for char in piece):
            return None
        return bytes(decoder[char] for char in piece)


class CompletionLogprobs:
    """The legacy logprobs object of one choice, built chunk by chunk: `text_offset` runs on across chunks."""

    def __init__(self, texts: TokenTexts, *, offset: int = 0):
        self.texts, self.offset = texts, offset

    def add(self, scores: Sequence[TokenLogprob]) -> dict:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for score in scores:
            tokens.append(self.texts.show(score.token_id))
            token_logprobs.append(score.logprob)
            top_logprobs.append(None if score.logprob is None else self._top(score))
            offsets.append(self.offset)
            self.offset += self.texts.length(score.token_id)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def _top(self, score: TokenLogprob) -> dict[str, float]:
        top: dict[str, float] = {}
        for token_id, logprob in score.top:
            top.setdefault(self.texts.show(token_id), logprob)  # most likely first: a shared text keeps the best
        return top


def join_logprobs(parts: Sequence[dict]) -> dict:
    """Chunks' logprobs objects as one, as a non-streamed answer carries it."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [item for part in parts for item in part[key]] for key in keys}
