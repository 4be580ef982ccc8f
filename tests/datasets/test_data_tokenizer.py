import pytest

from datasets.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer

CORPUS = [
    "def main():\n    return 42\n",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café, Grüße, 日本語のテキスト",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "  leading spaces and\ttabs\n\n",
        "def f(x):\n    return x ** 2  # squared\n",
        "naïve café — 日本語 🚀🧪 ∑ x²",
        "e\u0301 combining accent and \u200b zero width",
        "",
    ],
)
def test_decode_encode_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_eos_is_a_single_special_token(tokenizer):
    eos_id = tokenizer.token_to_id(EOS_TOKEN)

    assert eos_id is not None
    assert tokenizer.encode(EOS_TOKEN).ids == [eos_id]


def test_vocab_size_is_respected(tokenizer):
    assert 257 <= tokenizer.get_vocab_size() <= 300


def test_save_and_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))

    loaded = load_tokenizer(path)

    assert loaded.encode("quick fox").ids == tokenizer.encode("quick fox").ids


def test_vocab_below_bytes_plus_eos_names_the_key():
    with pytest.raises(ValueError, match="data.vocab_size=256"):
        train_tokenizer(CORPUS, vocab_size=256)


def test_load_missing_file_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="nothing.json"):
        load_tokenizer(tmp_path / "nothing.json")
