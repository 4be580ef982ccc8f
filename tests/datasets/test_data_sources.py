import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conf.schema import TextDataConfig
from datasets.sources import Document, iter_documents


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_text_dir_reads_txt_md_jsonl_recursively_in_sorted_order(tmp_path):
    write(tmp_path / "b.md", "# bee\n")
    write(tmp_path / "a.txt", "ay")
    write(tmp_path / "sub" / "c.jsonl", '{"body": "first"}\n\n{"body": "second", "other": 1}\n')
    write(tmp_path / "notes.csv", "ignored")

    documents = list(iter_documents(TextDataConfig(source="text_dir", path=str(tmp_path), column="body")))

    assert documents == [
        Document(doc_id="a.txt", text="ay"),
        Document(doc_id="b.md", text="# bee\n"),
        Document(doc_id="sub/c.jsonl:1", text="first"),
        Document(doc_id="sub/c.jsonl:3", text="second"),
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [("not json at all", "not valid JSON"), ('{"content": "x"}', "no string field 'text'"), ("[1, 2]", "no string")],
)
def test_jsonl_bad_line_names_file_line_and_field(tmp_path, line, expected):
    write(tmp_path / "docs.jsonl", '{"text": "fine"}\n' + line + "\n")

    with pytest.raises(ValueError, match=expected) as error:
        list(iter_documents(TextDataConfig(source="text_dir", path=str(tmp_path))))

    assert "docs.jsonl" in str(error.value)
    assert "line 2" in str(error.value)
    assert "'text'" in str(error.value)


def test_parquet_file_streams_rows_across_row_groups_and_skips_nulls(tmp_path):
    table = pa.table({"id": [1, 2, 3, 4], "text": ["one", None, "three", "four"]})
    pq.write_table(table, tmp_path / "corpus.parquet", row_group_size=2)

    documents = list(iter_documents(TextDataConfig(source="parquet", path=str(tmp_path / "corpus.parquet"))))

    assert documents == [
        Document(doc_id="corpus.parquet:0", text="one"),
        Document(doc_id="corpus.parquet:2", text="three"),
        Document(doc_id="corpus.parquet:3", text="four"),
    ]


def test_parquet_directory_reads_files_in_sorted_order(tmp_path):
    pq.write_table(pa.table({"text": ["second"]}), tmp_path / "part-1.parquet")
    pq.write_table(pa.table({"text": ["first"]}), tmp_path / "part-0.parquet")

    documents = list(iter_documents(TextDataConfig(source="parquet", path=str(tmp_path))))

    assert [document.text for document in documents] == ["first", "second"]


def test_parquet_missing_column_names_file_column_and_columns_present(tmp_path):
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "corpus.parquet")

    with pytest.raises(ValueError, match="no column 'text'") as error:
        list(iter_documents(TextDataConfig(source="parquet", path=str(tmp_path))))

    assert "corpus.parquet" in str(error.value)
    assert "['body', 'id']" in str(error.value)


def test_max_chars_stops_after_the_document_that_crosses_the_cap(tmp_path):
    for index in range(5):
        write(tmp_path / f"{index}.txt", "x" * 10)

    documents = list(iter_documents(TextDataConfig(source="text_dir", path=str(tmp_path), max_chars=25)))

    assert [document.doc_id for document in documents] == ["0.txt", "1.txt", "2.txt"]
    assert all(len(document.text) == 10 for document in documents)


def test_stdlib_yields_sorted_python_files_outside_site_packages():
    doc_ids = [document.doc_id for document in iter_documents(TextDataConfig(source="stdlib"))]

    assert len(doc_ids) > 500
    assert doc_ids == sorted(doc_ids)
    assert "os.py" in doc_ids
    assert all(doc_id.endswith(".py") for doc_id in doc_ids)
    assert not any("site-packages" in doc_id or "__pycache__" in doc_id for doc_id in doc_ids)


def test_missing_path_names_data_path_and_the_path(tmp_path):
    missing = tmp_path / "nowhere"

    with pytest.raises(ValueError, match="data.path") as error:
        iter_documents(TextDataConfig(source="text_dir", path=str(missing)))

    assert str(missing) in str(error.value)


@pytest.mark.parametrize("source", ["text_dir", "parquet"])
def test_path_required_for_sources_that_read_files(source):
    with pytest.raises(ValueError, match="data.path is required"):
        iter_documents(TextDataConfig(source=source, path=None))


def test_text_dir_path_must_be_a_directory(tmp_path):
    file = write(tmp_path / "a.txt", "text")

    with pytest.raises(ValueError, match="not a directory"):
        iter_documents(TextDataConfig(source="text_dir", path=str(file)))


def test_non_positive_max_chars_is_rejected():
    with pytest.raises(ValueError, match="data.max_chars"):
        iter_documents(TextDataConfig(source="stdlib", max_chars=0))


def test_text_dir_rejects_non_utf8_file_by_name(tmp_path):
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))

    with pytest.raises(ValueError, match="latin.txt.*UTF-8"):
        list(iter_documents(TextDataConfig(source="text_dir", path=str(tmp_path))))


def test_jsonl_text_may_hold_any_json_string(tmp_path):
    write(tmp_path / "d.jsonl", json.dumps({"text": "line\nbreak ✓"}) + "\n")

    (document,) = iter_documents(TextDataConfig(source="text_dir", path=str(tmp_path)))

    assert document.text == "line\nbreak ✓"


@pytest.mark.parametrize("escaped", ["\\ud800", "ok \\udfff then", "\\ude00\\ud83d"])  # lone, lone, reversed pair
def test_jsonl_lone_surrogate_names_file_and_line(tmp_path, escaped):
    """JSON's \\uXXXX escapes can spell half of a UTF-16 pair, which is no Unicode text: named at once, not by the
    tokenizer or the parquet writer later."""
    pair = '{"text": "also fine \\ud83d\\ude00"}'  # a whole pair is one character (an emoji)
    write(tmp_path / "docs.jsonl", '{"text": "fine"}\n' + pair + '\n{"text": "' + escaped + '"}\n')

    with pytest.raises(ValueError, match="lone surrogate") as error:
        list(iter_documents(TextDataConfig(source="text_dir", path=str(tmp_path))))

    assert f"{tmp_path / 'docs.jsonl'}: line 3 field 'text' (data.column)" in str(error.value)
