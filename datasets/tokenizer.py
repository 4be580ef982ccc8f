"""A byte-level BPE tokenizer trained on the corpus itself.

Byte-level means every string can be encoded (no unknown token) and decoding gives the exact original text
back, which the export and serving side rely on.
"""

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
