"""A byte-level BPE tokenizer trained on the corpus itself.

Byte-level means every string can be encoded (no unknown token) and decoding gives the exact original text
back, which the export and serving side rely on.
"""

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

# Separates documents in the packed token stream; the model learns to emit it where a text ends.
EOS_TOKEN = "<|endoftext|>"
# The 256 byte symbols plus the end-of-document token are the smallest vocabulary that can encode any text.
MIN_VOCAB_SIZE = 256 + 1


def train_tokenizer(texts: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with `vocab_size` entries (fewer if the corpus has too few merges)."""
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text; GPT-2's leading space would break that.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer file {str(path)!r} does not exist; expected a tokenizer.json from prepare_text")
    tokenizer = Tokenizer.from_file(str(path))
    if tokenizer.token_to_id(EOS_TOKEN) is None:
        raise ValueError(f"tokenizer file {str(path)!r} has no {EOS_TOKEN!r} token; expected one from prepare_text")
    return tokenizer


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"data.vocab_size={vocab_size} is too small; a byte-level tokenizer needs at least {MIN_VOCAB_SIZE} "
            f"(256 bytes + {EOS_TOKEN})"
        )


# A pretrained tokenizer directory (a Hugging Face checkpoint's): tokenizer.json is the tokenizer itself,
# tokenizer_config.json names its special tokens and holds the chat template. Both are copied with prepared
# data and exports, and both count in the data fingerprint.
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
PRETRAINED_TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)


def load_pretrained_tokenizer(directory: str | Path) -> tuple[Tokenizer, str]:
    """The tokenizer of a pretrained tokenizer directory and its end-of-text token (tokenizer_config.json's
    eos_token): what separates documents when text is packed."""
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing; data.tokenizer (or model.init_from) must be a directory with a "
                         "Hugging Face tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises its own Exception type for a malformed file
        raise ValueError(f"{path}: not a tokenizer file the tokenizers library reads ({err})") from None
    eos = special_token(directory, "eos_token")
    if eos is None or tokenizer.token_to_id(eos) is None:
        raise ValueError(f"{directory / TOKENIZER_CONFIG_FILE}: eos_token {eos!r} is missing or not in the "
                         "tokenizer; it separates documents and ends generations")
    return tokenizer, eos


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def special_token(directory: str | Path, key: str) -> str | None:
    """A special token's text from tokenizer_config.json (a string, or an AddedToken dict with `content`)."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    return token_text(config.get(key)) if isinstance(config, dict) else None


def tokenizer_digest(directory: str | Path) -> str:
    """sha256 over the pretrained tokenizer's files: a different tokenizer (or chat template) is different data."""
    digest = hashlib.sha256()
    for name in PRETRAINED_TOKENIZER_FILES:
        path = Path(directory) / name
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"<absent>")
    return digest.hexdigest()
