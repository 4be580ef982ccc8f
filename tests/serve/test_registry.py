"""The model registry on real files: local paths, file:// URIs, and a non-local filesystem that forces downloads."""

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from serve import registry_store
from serve.registry import Registry, RegistryError
from serve.registry_store import RegistryLockTimeout

MODEL = "ranker"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _write_export(directory: Path, *, seed: int) -> Path:
    directory.mkdir(parents=True)
    # Every byte value, so a text-mode copy anywhere on the way would change the checksum.
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 16 + seed.to_bytes(4, "little"))
    (directory / "model_config.json").write_text(json.dumps({"hidden": 8, "seed": seed}))
    (directory / "feature_spec.json").write_text(json.dumps({"dense": 13, "sparse": 26}))
    return directory


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lock_entries(root: Path) -> list[Path]:
    lock_dir = root / MODEL / "lock"
    return sorted(lock_dir.iterdir()) if lock_dir.exists() else []


def _write_foreign_lock(root: Path, *, age_s: float) -> Path:
    """The lock file another host holds; its age is its mtime by the store's clock."""
    lock = root / MODEL / "lock" / "held.json"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"holder": "someone-else", "pid": 1, "host": "elsewhere",
                                "acquired_at": datetime.now(UTC).isoformat()}))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


@pytest.fixture
def exports(tmp_path) -> list[Path]:
    return [_write_export(tmp_path / f"export{seed}", seed=seed) for seed in (1, 2)]


@pytest.mark.parametrize("form", ["absolute", "relative", "file_uri"])
def test_register_and_fetch_local(tmp_path, monkeypatch, exports, form):
    monkeypatch.chdir(tmp_path)
    uri = {"absolute": str(tmp_path / "outputs/registry"), "relative": "outputs/registry",
           "file_uri": (tmp_path / "outputs/registry").as_uri()}[form]
    registry = Registry(uri)
    first = registry.register(MODEL, exports[0], metadata={"source_run": "run-a", "metrics": {"auc": 0.71}})
    second = registry.register(MODEL, exports[1], metadata={"source_run": "run-b"})

    assert (first["version"], second["version"]) == (1, 2)
    assert first["model"] == MODEL and first["source_run"] == "run-a" and first["metrics"] == {"auc": 0.71}
    assert datetime.fromisoformat(first["created_at"]).tzinfo is not None
    assert set(first["files"]) == {"model.safetensors", "model_config.json", "feature_spec.json"}
    for name, entry in first["files"].items():
        assert entry == {"sha256": _sha256(exports[0] / name), "bytes": (exports[0] / name).stat().st_size}
    assert registry.versions(MODEL) == [first, second]
    assert registry.version(MODEL, 2) == second
    assert registry.models() == [MODEL]

    version_dir = tmp_path / "outputs/registry" / MODEL / "versions" / "000001"
    fetched = registry.fetch(MODEL, 1, cache_dir=tmp_path / "cache")
    assert fetched == version_dir  # a local registry is read in place, not copied
    for name in first["files"]:
        assert (fetched / name).read_bytes() == (exports[0] / name).read_bytes()
    assert not (tmp_path / "cache").exists()


def test_fetch_from_non_local_filesystem_downloads_and_verifies(tmp_path, exports):
    # A SubTreeFileSystem is not a LocalFileSystem, so the registry treats it like an object store.
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    registry = Registry("registry", filesystem=pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem()))
    registry.register(MODEL, exports[0], metadata={})
    registry.register(MODEL, exports[1], metadata={})
    cache = tmp_path / "cache"

    fetched = registry.fetch(MODEL, 1, cache_dir=cache)
    assert fetched == cache / MODEL / "000001"
    assert sorted(path.name for path in fetched.iterdir()) == sorted(path.name for path in exports[0].iterdir())
    for path in exports[0].iterdir():
        assert (fetched / path.name).read_bytes() == path.read_bytes()
    assert registry.fetch(MODEL, 1, cache_dir=cache) == fetched

    stored = bucket / "registry" / MODEL / "versions" / "000002" / "model.safetensors"
    stored.write_bytes(stored.read_bytes()[:-1] + b"\xff")  # the export's last byte is 0x00
    with pytest.raises(RegistryError, match=r"version 2: file 'model.safetensors'"):
        registry.fetch(MODEL, 2, cache_dir=cache)
    assert sorted(path.name for path in (cache / MODEL).iterdir()) == ["000001"]  # no half copy, no staging dir

    (fetched / "model_config.json").write_text("{}")  # a damaged cached copy is replaced, not served
    assert (registry.fetch(MODEL, 1, cache_dir=cache) / "model_config.json").read_bytes() == \
        (exports[0] / "model_config.json").read_bytes()


def test_fetch_refuses_altered_or_missing_files(tmp_path, exports):
    registry = Registry(tmp_path / "registry")
    record = registry.register(MODEL, exports[0], metadata={})
    version_dir = tmp_path / "registry" / MODEL / "versions" / "000001"

    weights = version_dir / "model.safetensors"
    weights.write_bytes(b"tampered" + weights.read_bytes()[8:])
    with pytest.raises(RegistryError, match=r"version 1: file 'model.safetensors'") as refused:
        registry.fetch(MODEL, 1, cache_dir=tmp_path / "cache")
    assert record["files"]["model.safetensors"]["sha256"] in str(refused.value)
    assert _sha256(weights) in str(refused.value)

    weights.write_bytes((exports[0] / "model.safetensors").read_bytes())
    assert registry.fetch(MODEL, 1, cache_dir=tmp_path / "cache") == version_dir
    (version_dir / "model_config.json").unlink()
    with pytest.raises(RegistryError, match=r"version 1: file 'model_config.json' .*missing"):
        registry.fetch(MODEL, 1, cache_dir=tmp_path / "cache")


def test_aliases_move_resolve_and_history(tmp_path, exports, caplog):
    registry = Registry(tmp_path / "registry")
    registry.register(MODEL, exports[0], metadata={})
    registry.register(MODEL, exports[1], metadata={})
    assert registry.aliases(MODEL) == {} and registry.resolve(MODEL, "production") is None

    with caplog.at_level(logging.INFO, logger="serve.registry"):
        registry.move_alias(MODEL, "production", 1, reason="first release")
        moved = registry.move_alias(MODEL, "production", 2, reason="better auc", details={"auc": [0.71, 0.74]})
    assert "alias 'production' from version 1 to 2" in caplog.text
    assert moved["from"] == 1 and moved["to"] == 2 and moved["auc"] == [0.71, 0.74]
    assert registry.resolve(MODEL, "production") == 2
    assert registry.aliases(MODEL)["production"]["reason"] == "better auc"

    with pytest.raises(ValueError, match=r"no committed version 99 .*\[1, 2\]"):
        registry.move_alias(MODEL, "production", 99, reason="typo")
    assert registry.resolve(MODEL, "production") == 2

    registry.move_alias(MODEL, "canary", 1, reason="try", alias_fields={"percent": 10})
    assert registry.aliases(MODEL)["canary"]["percent"] == 10 and registry.resolve(MODEL, "canary") == 1
    refused = registry.record(MODEL, {"event": "promotion_refused", "candidate": 1, "auc": 0.70, "baseline": 0.74})
    registry.move_alias(MODEL, "canary", None, reason="rolled back")
    assert registry.resolve(MODEL, "canary") is None and set(registry.aliases(MODEL)) == {"production"}

    history = registry.history(MODEL)
    assert [event["seq"] for event in history] == list(range(1, 8))
    assert [(event["event"], event.get("version"), event.get("to")) for event in history] == [
        ("register", 1, None), ("register", 2, None), ("alias", None, 1), ("alias", None, 2),
        ("alias", None, 1), ("promotion_refused", None, None), ("alias", None, None)]
    assert [(e["from"], e["reason"]) for e in history if e["event"] == "alias"] == [
        (None, "first release"), (1, "better auc"), (None, "try"), (1, "rolled back")]
    assert history[4]["percent"] == 10 and history[5] == refused and refused["baseline"] == 0.74


# Each worker is a fresh interpreter importing only the registry, which starts much faster than a
# multiprocessing child that has to import this test module and pytest.
PROMOTE_SCRIPT = """
import sys, time
from pathlib import Path
from serve.registry import Registry
root, export_dir, worker, gate = sys.argv[1:]
Path(gate, f"ready-{worker}").touch()
while not Path(gate, "go").exists():
    time.sleep(0.001)
registry = Registry(root)
record = registry.register("ranker", Path(export_dir), metadata={"worker": int(worker)})
registry.move_alias("ranker", "production", record["version"], reason=f"worker {worker}")
"""


def _start_together(commands: list[list[str]], *, gate: Path) -> list[subprocess.Popen]:
    """Start the commands, then release them at once when all have reached the gate, so their writes overlap."""
    gate.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    processes = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for command in commands]
    deadline = time.monotonic() + 60
    while len(list(gate.glob("ready-*"))) < len(commands):
        assert time.monotonic() < deadline and all(process.poll() is None for process in processes), \
            [process.communicate()[1] for process in processes if process.poll() is not None]
        time.sleep(0.005)
    (gate / "go").touch()
    return processes


def test_concurrent_promotions_get_distinct_versions_and_lose_nothing(tmp_path, exports):
    root = tmp_path / "registry"
    commands = [[sys.executable, "-c", PROMOTE_SCRIPT, str(root), str(exports[0]), str(worker), str(tmp_path / "gate")]
                for worker in range(4)]
    for process in _start_together(commands, gate=tmp_path / "gate"):
        _, errors = process.communicate(timeout=60)
        assert process.returncode == 0, errors

    registry = Registry(root)
    records = registry.versions(MODEL)
    assert [record["version"] for record in records] == [1, 2, 3, 4]
    assert sorted(record["worker"] for record in records) == [0, 1, 2, 3]
    history = registry.history(MODEL)
    assert [event["seq"] for event in history] == list(range(1, 9))
    assert sorted(e["version"] for e in history if e["event"] == "register") == [1, 2, 3, 4]
    moves = [event for event in history if event["event"] == "alias"]
    assert sorted(event["to"] for event in moves) == [1, 2, 3, 4]
    # No lost update: each move starts from where the one before it left the alias.
    assert [event["from"] for event in moves] == [None] + [event["to"] for event in moves[:-1]]
    aliases = json.loads((root / MODEL / "aliases.json").read_text())
    assert aliases["production"]["version"] == moves[-1]["to"]
    assert _lock_entries(root) == []


def test_stale_lock_is_removed_and_live_lock_times_out(tmp_path, caplog):
    root = tmp_path / "registry"
    stale = _write_foreign_lock(root, age_s=65)  # older than the 60 s lease
    with caplog.at_level(logging.WARNING, logger="serve.registry"):
        Registry(root).record(MODEL, {"event": "note"})
    assert not stale.exists() and "stale" in caplog.text
    assert _lock_entries(root) == []

    live = _write_foreign_lock(root, age_s=0)
    began = time.monotonic()
    with pytest.raises(RegistryLockTimeout, match=str(root / MODEL / "lock")):
        Registry(root, lock_timeout_s=0.5).record(MODEL, {"event": "blocked"})
    assert 0.5 <= time.monotonic() - began < 3
    assert _lock_entries(root) == [live]  # the holder's lock is left alone
    assert [event["event"] for event in Registry(root).history(MODEL)] == ["note"]


def test_interrupted_alias_write_keeps_previous_aliases(tmp_path, exports, monkeypatch):
    root = tmp_path / "registry"
    registry = Registry(root)
    registry.register(MODEL, exports[0], metadata={})
    registry.register(MODEL, exports[1], metadata={})
    registry.move_alias(MODEL, "production", 1, reason="first release")
    before = (root / MODEL / "aliases.json").read_bytes()

    real_stream_bytes = registry_store._stream_bytes

    def fail_half_way(stream, data):
        if b"doomed move" in data:
            stream.write(data[: len(data) // 2])
            raise OSError("disk full")
        real_stream_bytes(stream, data)

    monkeypatch.setattr(registry_store, "_stream_bytes", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        registry.move_alias(MODEL, "production", 2, reason="doomed move")
    assert (root / MODEL / "aliases.json").read_bytes() == before
    assert not [path for path in (root / MODEL).rglob("*") if path.name.endswith(".tmp")]
    assert _lock_entries(root) == []
    assert len(registry.history(MODEL)) == 3

    # Leftovers of a writer killed before it could clean up are never read as data.
    (root / MODEL / ".aliases.json.0123.tmp").write_text('{"production": {"vers')
    (root / MODEL / "history" / ".00000009.json.0123.tmp").write_text("{")
    monkeypatch.setattr(registry_store, "_stream_bytes", real_stream_bytes)
    assert registry.resolve(MODEL, "production") == 1
    event = registry.move_alias(MODEL, "production", 2, reason="retry")
    assert event["seq"] == 4 and [e["seq"] for e in registry.history(MODEL)] == [1, 2, 3, 4]


def test_uncommitted_version_is_invisible_and_its_number_not_reused(tmp_path, exports):
    root = tmp_path / "registry"
    registry = Registry(root)
    registry.register(MODEL, exports[0], metadata={})
    crashed = root / MODEL / "versions" / "000002"  # as a register that died during its upload leaves it
    crashed.mkdir()
    (crashed / "claim.json").write_text(json.dumps({"version": 2}))
    (crashed / "model.safetensors").write_bytes(b"half an upl")

    assert [record["version"] for record in registry.versions(MODEL)] == [1]
    with pytest.raises(ValueError, match=r"'ranker' has no committed version 2; committed versions: \[1\]"):
        registry.version(MODEL, 2)
    with pytest.raises(ValueError, match="no committed version 2"):
        registry.move_alias(MODEL, "production", 2, reason="too early")
    assert registry.register(MODEL, exports[1], metadata={})["version"] == 3
    assert [record["version"] for record in registry.versions(MODEL)] == [1, 3]


@pytest.mark.parametrize("name", ["", ".hidden", "../escape", "a/b", "with space", "-dash", None])
def test_bad_model_names_are_refused(tmp_path, exports, name):
    registry = Registry(tmp_path / "registry")
    with pytest.raises(ValueError, match="serve.model"):
        registry.register(name, exports[0], metadata={})
    with pytest.raises(ValueError, match="serve.model"):
        registry.versions(name)
    with pytest.raises(ValueError, match="serve.model"):
        registry.move_alias(name, "production", 1, reason="x")
    assert not (tmp_path / "registry").exists()


def test_bad_inputs_name_what_was_expected(tmp_path, exports):
    registry = Registry(tmp_path / "registry")
    with pytest.raises(ValueError, match="serve.alias"):
        registry.move_alias(MODEL, "prod/uction", None, reason="x")
    with pytest.raises(ValueError, match=r"metadata\.version"):
        registry.register(MODEL, exports[0], metadata={"version": 7})
    (exports[1] / "nested").mkdir()
    with pytest.raises(ValueError, match="export_dir: .*nested.* not a regular file"):
        registry.register(MODEL, exports[1], metadata={})
    with pytest.raises(ValueError, match=r"event\.seq"):
        registry.record(MODEL, {"event": "note", "seq": 5})
    assert registry.versions(MODEL) == []
