import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from conf.schema import ChatDataConfig
from datasets.chat import PreparedChat, load_prepared_chat, prepare_chat
from tests.hf_models import BOS, END_OF_TURN, write_chat_jsonl, write_prompt_completion_jsonl, write_tiny_llama

SEQ_LEN = 256  # the tiny model's max_positions: every generated conversation fits
ASSISTANT_TURN = re.compile(re.escape("<|start_header_id|>assistant<|end_header_id|>\n\n") + r"(.*?"
                            + re.escape(END_OF_TURN) + ")", re.DOTALL)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl", 60, seed=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def prepare(path, model_dir, cache_root, **overrides) -> PreparedChat:
    cfg = ChatDataConfig(path=str(path), **{"seq_len": SEQ_LEN, **overrides})
    return prepare_chat(cfg, cache_root=cache_root, tokenizer_dir=model_dir, max_seq_len=SEQ_LEN)


def read_split(directory) -> dict[str, np.ndarray]:
    tables = [pq.read_table(shard) for shard in sorted(Path(directory).glob("part-*.parquet"))]
    return {name: np.concatenate([np.array(table[name].to_pylist()) for table in tables])
            for name in ("tokens", "loss_mask", "document_ids")}


def examples_in(rows, *, bos: int) -> list[tuple[int, ...]]:
    """Each example of each row, cut out by its document id (every example starts with BOS; the padding does
    not). An example's last token may sit in the row's extra slot (position seq_len, which has no document id):
    it belongs to the example when the mask trains it, since every example ends with a trained token."""
    found = []
    for tokens, mask, ids in zip(rows["tokens"], rows["loss_mask"], rows["document_ids"], strict=True):
        for document in np.unique(ids):
            where = np.flatnonzero(ids == document)
            if tokens[where[0]] != bos:
                continue
            end = where[-1] + 1 + int(where[-1] == len(ids) - 1 and bool(mask[-1]))
            found.append(tuple(tokens[where[0] : end].tolist()))
    return found


def bos_id(prepared) -> int:
    return Tokenizer.from_file(prepared.tokenizer_path).token_to_id(BOS)


def trained_runs(tokens, mask) -> list[list[int]]:
    """The trained target tokens of a row, as runs of consecutive targets."""
    runs, current = [], []
    for target, trained in zip(tokens[1:], mask, strict=True):
        if trained:
            current.append(int(target))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.fixture(scope="module")
def padded(chat_file, model_dir, cache):
    return prepare(chat_file, model_dir, cache, packing=False)


@pytest.fixture(scope="module")
def packed(chat_file, model_dir, cache):
    return prepare(chat_file, model_dir, cache, packing=True)


def test_rows_have_tokens_loss_mask_and_document_ids_of_fixed_width(packed):
    for directory, expected in ((packed.train_dir, packed.train_rows), (packed.val_dir, packed.val_rows)):
        table = pq.read_table(next(Path(directory).glob("part-*.parquet")))
        assert table.column_names == packed.columns("train")
        assert table.schema.field("tokens").type == pa.list_(pa.int32(), SEQ_LEN + 1)
        assert table.schema.field("loss_mask").type == pa.list_(pa.int8(), SEQ_LEN)
        assert table.schema.field("document_ids").type == pa.list_(pa.int32(), SEQ_LEN)
        assert len(table) == expected > 0
    rows = read_split(packed.train_dir)
    assert rows["tokens"].max() < packed.vocab_size == 320
    assert set(np.unique(rows["loss_mask"])) == {0, 1}


def test_prepared_chat_round_trips_through_json_and_copies_the_tokenizer(packed, model_dir):
    assert PreparedChat.from_dict(json.loads(json.dumps(packed.to_dict()))) == packed
    assert load_prepared_chat(packed.root) == packed
    assert Path(packed.tokenizer_path).read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert Path(packed.tokenizer_config_path).read_bytes() == (model_dir / "tokenizer_config.json").read_bytes()
    assert packed.eos_id == Tokenizer.from_file(packed.tokenizer_path).token_to_id(END_OF_TURN)


def test_rows_are_the_conversations_as_transformers_tokenizes_them(padded, chat_file, model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    conversations = [json.loads(line)["messages"] for line in chat_file.read_text().splitlines()]
    expected = sorted(tuple(hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
                      for messages in conversations)
    found = [example for directory in (padded.train_dir, padded.val_dir)
             for example in examples_in(read_split(directory), bos=bos_id(padded))]
    assert sorted(found) == expected


def test_loss_mask_covers_exactly_the_assistant_text_and_end_of_turn(padded):
    tokenizer = Tokenizer.from_file(padded.tokenizer_path)
    rows = read_split(padded.train_dir)
    checked = 0
    for tokens, mask in zip(rows["tokens"], rows["loss_mask"], strict=True):
        text = tokenizer.decode(tokens.tolist(), skip_special_tokens=False)
        turns = ASSISTANT_TURN.findall(text)
        assert turns and all(turn.endswith(END_OF_TURN) for turn in turns)
        decoded = [tokenizer.decode(run, skip_special_tokens=False) for run in trained_runs(tokens, mask)]
        assert decoded == turns
        checked += 1
    assert checked == padded.train_rows


def test_packed_rows_hold_the_same_examples_in_fewer_rows(packed, padded):
    bos = bos_id(packed)
    for split in ("train_dir", "val_dir"):
        packed_rows, padded_rows = read_split(getattr(packed, split)), read_split(getattr(padded, split))
        assert sorted(examples_in(packed_rows, bos=bos)) == sorted(examples_in(padded_rows, bos=bos))
        assert packed_rows["loss_mask"].sum() == padded_rows["loss_mask"].sum()
    assert packed.train_rows < padded.train_rows
    rows = read_split(packed.train_dir)
    bos = bos_id(packed)
    assert ((rows["tokens"] == bos).sum(axis=1) >= 2).any()  # some row really holds several examples
    for tokens, ids in zip(rows["tokens"], rows["document_ids"], strict=True):
        starts = np.flatnonzero(np.diff(ids, prepend=-1))
        assert (np.diff(ids) >= 0).all()  # documents are contiguous runs
        last_is_padding = tokens[starts[-1]] != bos
        assert (tokens[starts[: len(starts) - last_is_padding]] == bos).all()


def test_padding_is_its_own_document_and_never_trained(padded):
    rows = read_split(padded.train_dir)
    for tokens, mask, ids in zip(rows["tokens"], rows["loss_mask"], rows["document_ids"], strict=True):
        example_length = int(np.flatnonzero(mask)[-1]) + 2  # the last trained target ends the example
        assert (ids[:example_length] == 0).all()
        assert (ids[example_length:] == 1).all() and not mask[example_length - 1 :].any()
        assert (tokens[example_length:] == padded.eos_id).all()


def test_prompt_completion_trains_on_completion_and_eos_only(tmp_path, model_dir, cache):
    path = write_prompt_completion_jsonl(tmp_path / "pairs.jsonl", 30, seed=1)
    prepared = prepare(path, model_dir, cache, format="prompt_completion_jsonl", seq_len=64, packing=False)
    tokenizer = Tokenizer.from_file(prepared.tokenizer_path)
    pairs = {(record["prompt"], record["completion"]) for record in map(json.loads, path.read_text().splitlines())}
    rows = read_split(prepared.train_dir)
    for tokens, mask in zip(rows["tokens"], rows["loss_mask"], strict=True):
        (run,) = trained_runs(tokens, mask)
        prompt_length = int(np.flatnonzero(mask)[0]) + 1
        assert tokens[0] == tokenizer.token_to_id(BOS)
        prompt = tokenizer.decode(tokens[1:prompt_length].tolist())
        assert run[-1] == prepared.eos_id
        assert (prompt, tokenizer.decode(run[:-1])) in pairs


def test_examples_longer_than_a_row_are_dropped_and_counted(chat_file, model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="datasets.chat"):
        prepared = prepare(chat_file, model_dir, tmp_path, seq_len=100)
    assert re.search(r"dropped \d+ of 60 examples .* longer than data.seq_len \+ 1 = 101 tokens", caplog.text)
    rows = read_split(prepared.train_dir)
    assert all(len(example) <= 101 for example in examples_in(rows, bos=bos_id(prepared)))
    with pytest.raises(ValueError, match=r"every example of .*chats.jsonl is longer than data.seq_len \+ 1 = 11"):
        prepare(chat_file, model_dir, tmp_path, seq_len=10)


def test_split_keeps_both_sides_and_follows_the_line(tmp_path, model_dir):
    two = write_chat_jsonl(tmp_path / "two.jsonl", 2, seed=3)
    prepared = prepare(two, model_dir, tmp_path / "cache", packing=False)
    assert prepared.train_rows == prepared.val_rows == 1
    # Appending lines does not move the examples already there to the other split.
    lines = write_chat_jsonl(tmp_path / "many.jsonl", 40, seed=4).read_text().splitlines()
    (tmp_path / "few.jsonl").write_text("\n".join(lines[:20]) + "\n")
    few = prepare(tmp_path / "few.jsonl", model_dir, tmp_path / "cache", packing=False)
    many = prepare(tmp_path / "many.jsonl", model_dir, tmp_path / "cache", packing=False)
    bos = bos_id(few)
    assert set(examples_in(read_split(few.val_dir), bos=bos)) <= set(examples_in(read_split(many.val_dir), bos=bos))


def test_fingerprint_covers_data_tokenizer_files_and_settings(chat_file, model_dir, tmp_path):
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(model_dir / name, copy / name)
    first = prepare(chat_file, copy, tmp_path / "cache")
    assert prepare(chat_file, copy, tmp_path / "cache").root == first.root  # reused
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("\n\n", "\n")
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    changed_template = prepare(chat_file, copy, tmp_path / "cache")
    assert changed_template.fingerprint != first.fingerprint
    assert prepare(chat_file, copy, tmp_path / "cache", packing=False).fingerprint != changed_template.fingerprint
    edited = tmp_path / "chats.jsonl"
    edited.write_text(chat_file.read_text() + chat_file.read_text().splitlines()[0] + "\n")
    assert prepare(edited, copy, tmp_path / "cache").fingerprint != changed_template.fingerprint


GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})


@pytest.mark.parametrize("line, message", [
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "bot", "content": "c"}]}),
     "line 3: messages[2].role must be one of system, user, assistant (got 'bot')"),
    ('{"messages": [{"role": "user", "content": "a"}', "line 3: column 47: not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
     "line 3: messages has no assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "b"}]}),
     "line 3: messages[0].content must be a string (got null)"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, "b"]}),
     'line 3: messages[1] must be an object with "role" and "content" (got \'b\')'),
    (json.dumps({"conversation": []}),
     "line 3: messages (data.messages_field) must be a non-empty list of {\"role\", \"content\"} objects "
     "(got nothing: the field is missing)"),
    ("[1, 2]", "line 3: expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}',
     "line 3: messages[0].content holds a lone surrogate"),
])
def test_bad_chat_rows_are_refused_naming_file_line_and_field(tmp_path, model_dir, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")  # line 2 is blank: line numbers count it
    with pytest.raises(ValueError) as error:
        prepare(path, model_dir, tmp_path / "cache")
    assert str(error.value).startswith(f"{path} {message}")


def test_bad_prompt_completion_rows_and_empty_files_are_refused(tmp_path, model_dir):
    path = tmp_path / "pairs.jsonl"
    cases = [('{"prompt": "Q", "completion": 3}', f"{path} line 2: completion (data.completion_field) must be a "
                                                  "string (got 3)"),
             ('{"prompt": "Q", "completion": ""}', f"{path} line 2: completion (data.completion_field) is empty"),
             ('{"completion": "A"}', f"{path} line 2: prompt (data.prompt_field) must be a string (got nothing")]
    for line, message in cases:
        path.write_text('{"prompt": "Q", "completion": "A"}\n' + line + "\n")
        with pytest.raises(ValueError) as error:
            prepare(path, model_dir, tmp_path / "cache", format="prompt_completion_jsonl")
        assert str(error.value).startswith(message)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} has no examples"):
        prepare(path, model_dir, tmp_path / "cache", format="prompt_completion_jsonl")
    path.write_bytes(b'{"prompt": "Q", "completion": "A"}\n{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match="line 2: is not valid UTF-8"):
        prepare(path, model_dir, tmp_path / "cache", format="prompt_completion_jsonl")


def test_a_conversation_the_template_refuses_is_named_by_line(tmp_path, model_dir):
    strict = tmp_path / "model"
    strict.mkdir()
    shutil.copyfile(model_dir / "tokenizer.json", strict / "tokenizer.json")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system prompts') }}"
                               "{% endif %}" + config["chat_template"])
    (strict / "tokenizer_config.json").write_text(json.dumps(config))
    path = tmp_path / "chats.jsonl"
    system = json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]})
    path.write_text(f"{GOOD}\n{system}\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} line 2: .*refused the conversation: no system"):
        prepare(path, strict, tmp_path / "cache")


def test_settings_and_missing_files_are_refused_before_reading(tmp_path, model_dir, chat_file):
    with pytest.raises(ValueError, match="data.seq_len=512 exceeds model.max_seq_len=256"):
        prepare_chat(ChatDataConfig(path=str(chat_file)), cache_root=tmp_path, tokenizer_dir=model_dir,
                     max_seq_len=256)
    with pytest.raises(ValueError, match="data.path is required"):
        prepare_chat(ChatDataConfig(seq_len=8), cache_root=tmp_path, tokenizer_dir=model_dir, max_seq_len=256)
    with pytest.raises(ValueError, match="tokenizer.json does not exist; fine-tuning data is tokenized with the "):
        prepare(chat_file, tmp_path, tmp_path)
