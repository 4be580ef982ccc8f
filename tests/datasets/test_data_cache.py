"""datasets/cache.py on real directories: a prepared directory is complete (with its meta.json) or absent, and
builders that crash or race never leave anything else behind."""

import json
import threading
from pathlib import Path

import pytest

from datasets.cache import META_FILE, build_into_place, read_meta, write_meta

REQUIRED = {"fingerprint", "rows"}


def _is_complete(root: Path) -> bool:
    return read_meta(root, required=REQUIRED) is not None


def _builder(name: str, *, rows: int = 3):
    """A build that writes a data file, then meta.json last, as the real builders do."""
    def build(directory: Path) -> None:
        (directory / "part-0.txt").write_text(f"{name}\n" * rows)
        write_meta(directory, {"fingerprint": name, "rows": rows})
    return build


def _leftovers(parent: Path, target: Path) -> list[str]:
    """Everything in `parent` besides the target: staging directories would show up here."""
    return sorted(path.name for path in parent.iterdir() if path != target)


# ------------------------------------------------------------------------------------------------ read_meta

def test_read_meta_of_a_complete_directory(tmp_path):
    write_meta(tmp_path, {"fingerprint": "abc", "rows": 5, "extra": [1, 2]})
    assert read_meta(tmp_path, required=REQUIRED) == {"fingerprint": "abc", "rows": 5, "extra": [1, 2]}
    assert read_meta(tmp_path, required=set()) is not None


@pytest.mark.parametrize("content", [
    None,  # no meta.json
    "",  # an empty file: a builder that died while writing it
    '{"fingerprint": "abc", "rows":',  # torn JSON
    '["fingerprint", "rows"]',  # JSON, but not an object
    '"fingerprint"',
    '{"fingerprint": "abc"}',  # a required key is missing
    "\udcff",  # bytes that are not UTF-8
])
def test_read_meta_is_none_unless_complete(tmp_path, content):
    if content is not None:
        (tmp_path / META_FILE).write_bytes(content.encode("utf-8", "surrogateescape"))
    assert read_meta(tmp_path, required=REQUIRED) is None


def test_read_meta_of_a_missing_directory_or_unreadable_meta(tmp_path):
    assert read_meta(tmp_path / "never-prepared", required=REQUIRED) is None
    (tmp_path / META_FILE).mkdir()  # a directory where the file should be
    assert read_meta(tmp_path, required=REQUIRED) is None


# --------------------------------------------------------------------------------------- build_into_place

def test_build_lands_complete_and_readable_by_others(tmp_path):
    target = tmp_path / "cache" / "text-abc"  # the parent is created too
    build_into_place(target, _builder("one"), is_complete=_is_complete)
    assert read_meta(target, required=REQUIRED) == {"fingerprint": "one", "rows": 3}
    assert (target / "part-0.txt").read_text() == "one\n" * 3
    assert target.stat().st_mode & 0o777 == 0o755  # mkdtemp's private 0o700 would hide it from other users
    assert _leftovers(target.parent, target) == []


@pytest.mark.parametrize("error", [RuntimeError("tokenizer failed"), KeyboardInterrupt()])
def test_a_failing_build_leaves_neither_target_nor_staging(tmp_path, error):
    target = tmp_path / "text-abc"

    def build(directory: Path) -> None:
        (directory / "part-0.txt").write_text("half of the data")
        raise error

    with pytest.raises(type(error)):
        build_into_place(target, build, is_complete=_is_complete)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the staging directory went too


def test_an_incomplete_target_is_replaced(tmp_path):
    target = tmp_path / "text-abc"
    target.mkdir()
    (target / "part-0.txt").write_text("stale, from a copy without meta.json")
    (target / "stray.bin").write_bytes(b"\0")
    build_into_place(target, _builder("fresh"), is_complete=_is_complete)
    assert read_meta(target, required=REQUIRED)["fingerprint"] == "fresh"
    assert sorted(path.name for path in target.iterdir()) == [META_FILE, "part-0.txt"]
    assert (target / "part-0.txt").read_text() == "fresh\n" * 3


def test_a_target_with_torn_meta_is_replaced(tmp_path):
    target = tmp_path / "text-abc"
    target.mkdir()
    (target / META_FILE).write_text('{"fingerprint": ')
    build_into_place(target, _builder("fresh"), is_complete=_is_complete)
    assert read_meta(target, required=REQUIRED)["fingerprint"] == "fresh"


def test_a_builder_that_loses_the_race_uses_the_winners_copy(tmp_path):
    """The second builder finishes while the first is still building: the first's rename then fails, and it
    must drop its own copy and return without error."""
    target = tmp_path / "text-abc"

    def slow_build(directory: Path) -> None:
        _builder("slow")(directory)
        build_into_place(target, _builder("fast"), is_complete=_is_complete)  # the other process wins meanwhile

    build_into_place(target, slow_build, is_complete=_is_complete)
    assert read_meta(target, required=REQUIRED)["fingerprint"] == "fast"
    assert (target / "part-0.txt").read_text() == "fast\n" * 3
    assert _leftovers(tmp_path, target) == []


def test_builders_racing_end_with_one_complete_copy(tmp_path):
    """Several builders inside build at the same moment (a barrier holds them there), then all rename: each
    returns, and the target is one builder's whole copy, never a mix, with no staging directory left."""
    target = tmp_path / "text-abc"
    names = [f"builder{index}" for index in range(4)]
    barrier = threading.Barrier(len(names), timeout=30)
    errors = []

    def run(name: str) -> None:
        def build(directory: Path) -> None:
            (directory / "part-0.txt").write_text(f"{name}\n" * 3)
            barrier.wait()  # every builder is now staging its own copy
            write_meta(directory, {"fingerprint": name, "rows": 3})
        try:
            build_into_place(target, build, is_complete=_is_complete)
        except BaseException as err:  # collected: an exception in a thread would not fail the test
            errors.append(err)

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    winner = read_meta(target, required=REQUIRED)["fingerprint"]
    assert winner in names
    assert (target / "part-0.txt").read_text() == f"{winner}\n" * 3
    assert _leftovers(tmp_path, target) == []


def test_a_complete_target_is_kept_when_another_build_finishes_later(tmp_path):
    target = tmp_path / "text-abc"
    build_into_place(target, _builder("first"), is_complete=_is_complete)
    build_into_place(target, _builder("second"), is_complete=_is_complete)  # a caller that did not check first
    assert read_meta(target, required=REQUIRED)["fingerprint"] == "first"
    assert _leftovers(tmp_path, target) == []


def test_meta_is_written_as_sorted_json(tmp_path):
    write_meta(tmp_path, {"rows": 1, "fingerprint": "z"})
    text = (tmp_path / META_FILE).read_text()
    assert json.loads(text) == {"rows": 1, "fingerprint": "z"} and text.endswith("\n")
    assert text.index('"fingerprint"') < text.index('"rows"')  # stable bytes for the same meta
