"""What the registry trusts on disk: plain file names in version.json (issue 14 item 3), and files a crash left
zero-length or half-written (item 8), plus the fsyncs that keep a completed write across a power loss."""

import json
import logging
import os
import stat
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from conf.schema import ServeConfig
from serve import promote, registry_store
from serve.registry import Registry, RegistryError

MODEL = "ranker"


def _write_export(directory: Path, *, seed: int) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 4 + seed.to_bytes(4, "little"))
    (directory / "model_config.json").write_text(json.dumps({"hidden": 8, "seed": seed}))
    return directory


def _version_json(root: Path, number: int) -> Path:
    return root / MODEL / "versions" / f"{number:06d}" / "version.json"


def _add_listed_file(root: Path, name: str, entry: dict) -> None:
    path = _version_json(root, 1)
    record = json.loads(path.read_text())
    record["files"][name] = entry
    path.write_text(json.dumps(record))


# --- item 3: file names read from version.json ------------------------------------------------------------

BAD_NAMES = ["../escape.bin", "../../../escape.bin", "sub/escape.bin", "sub\\escape.bin", ".", "..", ""]


@pytest.mark.parametrize("local", [True, False], ids=["local", "object_store"])
@pytest.mark.parametrize("bad", BAD_NAMES + ["absolute"])
def test_version_json_file_names_must_be_plain(tmp_path, bad, local):
    """A tampered version.json cannot make fetch read or write outside the version (or cache) directory."""
    store = tmp_path / "store"
    store.mkdir()
    filesystem = pafs.LocalFileSystem() if local else pafs.SubTreeFileSystem(str(store), pafs.LocalFileSystem())
    registry = Registry(str(store / "registry") if local else "registry", filesystem=filesystem)
    export = _write_export(tmp_path / "export", seed=1)
    registry.register(MODEL, export, metadata={})
    bad = str(tmp_path / "outside" / "escape.bin") if bad == "absolute" else bad
    # A real file where the name leads from the version directory, so nothing but the name check refuses it.
    payload = (export / "model_config.json").read_bytes()
    target = store / "registry" / MODEL / "versions" / "000001" / bad
    if bad not in ("", ".", "..") and not os.path.isabs(bad):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)
    entry = Registry(store / "registry").version(MODEL, 1)["files"]["model_config.json"]
    _add_listed_file(store / "registry", bad, entry)

    cache = tmp_path / "cache"
    with pytest.raises(RegistryError, match=rf"model 'ranker' version 1: .*{_escaped(repr(bad))}.* plain"):
        registry.fetch(MODEL, 1, cache_dir=cache)
    with pytest.raises(RegistryError, match="plain"):
        registry.version(MODEL, 1)
    assert not (tmp_path / "outside").exists() and not (tmp_path / "escape.bin").exists()
    assert not (cache / MODEL / "escape.bin").exists() and not (cache / "escape.bin").exists()


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


# --- item 8: what a crash leaves behind -------------------------------------------------------------------

@pytest.fixture
def registry_root(tmp_path) -> Path:
    root = tmp_path / "registry"
    registry = Registry(root)
    for seed in (1, 2, 3):
        record = registry.register(MODEL, _write_export(tmp_path / f"export{seed}", seed=seed), metadata={})
        registry.move_alias(MODEL, "production", record["version"], reason=f"release {seed}")
    return root


@pytest.mark.parametrize("content", [b"", b'{"version": 2, "fi'])
def test_a_torn_version_json_is_skipped_by_listings_and_named_by_lookups(registry_root, tmp_path, caplog, content):
    torn = _version_json(registry_root, 2)
    torn.write_bytes(content)
    registry = Registry(registry_root)

    with caplog.at_level(logging.WARNING, logger="serve.registry"):
        assert [record["version"] for record in registry.versions(MODEL)] == [1, 3]
    assert str(torn) in caplog.text
    for lookup in (lambda: registry.version(MODEL, 2), lambda: registry.fetch(MODEL, 2, cache_dir=tmp_path / "c")):
        with pytest.raises(RegistryError, match=str(torn)):
            lookup()
    with pytest.raises(RegistryError, match=str(torn)):
        registry.move_alias(MODEL, "production", 2, reason="to a torn version")
    assert registry.resolve(MODEL, "production") == 3
    # Its number stays taken: a torn commit is not a free slot.
    assert registry.register(MODEL, _write_export(tmp_path / "export4", seed=4), metadata={})["version"] == 4


@pytest.mark.parametrize("content", [b"", b'{"seq": 5, "ev'])
def test_a_torn_history_file_is_skipped_with_a_warning_and_rollback_still_works(registry_root, caplog, content):
    history_dir = registry_root / MODEL / "history"
    registered_v1 = history_dir / "00000001.json"  # the register event of v1, not an alias move
    registered_v1.write_bytes(content)
    registry = Registry(registry_root)

    with caplog.at_level(logging.WARNING, logger="serve.registry"):
        events = registry.history(MODEL)
    assert str(registered_v1) in caplog.text
    assert [event["seq"] for event in events] == list(range(2, 7))
    event = promote.rollback(ServeConfig(registry=str(registry_root)), model=MODEL)
    assert (event["from"], event["to"]) == (3, 2)
    assert event["seq"] == 7 and registered_v1.read_bytes() == content  # never overwritten nor renumbered


@pytest.mark.parametrize("content", [b"", b'{"production": {"vers'])
def test_a_torn_aliases_json_is_an_error_naming_it_never_no_production(registry_root, content):
    aliases = registry_root / MODEL / "aliases.json"
    aliases.write_bytes(content)
    registry = Registry(registry_root)
    for read in (lambda: registry.aliases(MODEL), lambda: registry.resolve(MODEL, "production"),
                 lambda: promote.rollback(ServeConfig(registry=str(registry_root)), model=MODEL),
                 lambda: registry.move_alias(MODEL, "canary", 1, reason="would drop production")):
        with pytest.raises(RegistryError, match=rf"{aliases}.*history"):
            read()
    assert aliases.read_bytes() == content  # left for a person to repair, not replaced by a guess


def test_whole_file_writes_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    """The file's bytes reach the disk before the rename publishes them, and the rename itself reaches the disk
    before the write returns (the directory is synced), so a power loss leaves the old file or the new one."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd):
        calls.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return real_fsync(fd)

    def spy_replace(source, target, **kwargs):
        calls.append(("replace", Path(target).name))
        return real_replace(source, target, **kwargs)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    registry_store.write_atomically(pafs.LocalFileSystem(), str(tmp_path / "aliases.json"), b"{}\n")
    assert calls == [("fsync", "file"), ("replace", "aliases.json"), ("fsync", "dir")]
    assert (tmp_path / "aliases.json").read_bytes() == b"{}\n"
