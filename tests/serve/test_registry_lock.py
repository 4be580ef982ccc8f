"""The registry lock (issue 14 item 6): exclusion that does not trust listings (NFS caches them), a fencing token
that stops a holder paused past its lease, expiry measured by the store's clock, and a lock left by a killed
holder reported by launch.py as exit 2 naming the lock and how to clear it."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from serve import registry_store
from serve.registry import Registry, RegistryError
from serve.registry_store import RegistryLockLost, RegistryLockTimeout

MODEL = "ranker"
REPO_ROOT = Path(__file__).resolve().parents[2]


class LaggingListings(pafs.LocalFileSystem):
    """A local filesystem whose directory listings hide entries younger than `lag_s`, as an NFS client's
    attribute cache does (60 s by default); reads and writes by name stay exact."""

    def __init__(self, lag_s: float):
        super().__init__()
        self.lag_s = lag_s

    def get_file_info(self, paths_or_selector):
        infos = super().get_file_info(paths_or_selector)
        if not isinstance(paths_or_selector, pafs.FileSelector):
            return infos
        cutoff = time.time() - self.lag_s
        return [info for info in infos if info.mtime is None or info.mtime.timestamp() < cutoff]


def _write_export(directory: Path, *, seed: int) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 4 + seed.to_bytes(4, "little"))
    (directory / "model_config.json").write_text(json.dumps({"hidden": 8, "seed": seed}))
    return directory


def _lock_file(root: Path) -> Path:
    return root / MODEL / "lock" / "held.json"


def _write_foreign_lock(root: Path, *, claims_expiry_in_s: float, age_s: float = 0.0) -> Path:
    """A lock held by another host; its content states an expiry by that host's clock, its mtime is the store's."""
    now = datetime.now(UTC)
    lock = _lock_file(root)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"holder": "someone-else", "pid": 4242, "host": "elsewhere", "token": 1,
                                "acquired_at": now.isoformat(),
                                "expires_at": (now + timedelta(seconds=claims_expiry_in_s)).isoformat()}))
    if age_s:
        os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_writers_on_a_filesystem_with_lagging_listings_lose_nothing(tmp_path):
    root = tmp_path / "registry"
    exports = [_write_export(tmp_path / f"export{worker}", seed=worker) for worker in range(4)]
    errors = []

    def promote_one(worker: int) -> None:
        try:
            registry = Registry(str(root), filesystem=LaggingListings(lag_s=30))
            record = registry.register(MODEL, exports[worker], metadata={"worker": worker})
            registry.move_alias(MODEL, "production", record["version"], reason=f"worker {worker}")
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=promote_one, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors

    registry = Registry(root)  # exact listings, to check what the lagging writers left
    assert sorted(record["worker"] for record in registry.versions(MODEL)) == [0, 1, 2, 3]
    assert [record["version"] for record in registry.versions(MODEL)] == [1, 2, 3, 4]
    history = registry.history(MODEL)
    assert [event["seq"] for event in history] == list(range(1, 9))
    moves = [event for event in history if event["event"] == "alias"]
    assert [event["from"] for event in moves] == [None] + [event["to"] for event in moves[:-1]]
    assert registry.resolve(MODEL, "production") == moves[-1]["to"]
    assert not _lock_file(root).exists()


def test_a_holder_paused_past_its_lease_cannot_overwrite_the_next_holders_write(tmp_path, monkeypatch):
    root = tmp_path / "registry"
    registry = Registry(root)
    for seed in (1, 2, 3):
        registry.register(MODEL, _write_export(tmp_path / f"export{seed}", seed=seed), metadata={})
    registry.move_alias(MODEL, "production", 1, reason="first release")

    paused, resume = threading.Event(), threading.Event()
    real_stream_bytes = registry_store._stream_bytes

    def pause_the_slow_move(stream, data):
        if b"slow move" in data and not paused.is_set():  # the slow holder stalls mid-write (GC, swap, SIGSTOP)
            paused.set()
            assert resume.wait(30)
        real_stream_bytes(stream, data)

    monkeypatch.setattr(registry_store, "_stream_bytes", pause_the_slow_move)
    outcome = {}

    def slow_move():
        try:
            Registry(root, lock_lease_s=0.5).move_alias(MODEL, "production", 2, reason="slow move")
        except Exception as error:  # noqa: BLE001 - inspected below
            outcome["error"] = error

    slow = threading.Thread(target=slow_move)
    slow.start()
    assert paused.wait(30)
    time.sleep(1.0)  # past the slow holder's lease
    Registry(root, lock_lease_s=0.5, lock_timeout_s=10).move_alias(MODEL, "production", 3, reason="newer move")
    resume.set()
    slow.join(30)

    assert isinstance(outcome.get("error"), RegistryLockLost), outcome
    assert "lease" in str(outcome["error"]) and MODEL in str(outcome["error"])
    assert registry.resolve(MODEL, "production") == 3
    moves = [event for event in registry.history(MODEL) if event["event"] == "alias"]
    assert [(event["from"], event["to"]) for event in moves] == [(None, 1), (1, 3)]
    assert moves[-1]["lock_token"] > moves[0]["lock_token"]
    assert not [path for path in (root / MODEL).rglob("*") if path.name.endswith(".tmp")]


def test_expiry_is_measured_by_the_stores_clock_not_the_writers(tmp_path):
    root = tmp_path / "registry"
    # Fresh by the store's clock, though its writer's clock (behind ours) says it expired: it is live.
    fresh = _write_foreign_lock(root, claims_expiry_in_s=-600)
    with pytest.raises(RegistryLockTimeout):
        Registry(root, lock_timeout_s=0.3, lock_lease_s=60).record(MODEL, {"event": "blocked"})
    assert fresh.exists()
    # Written two leases ago by the store's clock, though its writer's clock (ahead) says it is still valid.
    _write_foreign_lock(root, claims_expiry_in_s=3600, age_s=120)
    Registry(root, lock_timeout_s=5, lock_lease_s=60).record(MODEL, {"event": "after the stale lock"})
    assert [event["event"] for event in Registry(root).history(MODEL)] == ["after the stale lock"]
    assert not _lock_file(root).exists()


def test_a_zero_length_lock_left_by_a_crash_is_named_and_expires_by_its_mtime(tmp_path):
    root = tmp_path / "registry"
    lock = _lock_file(root)
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")
    with pytest.raises(RegistryLockTimeout, match=rf"{lock}.*unreadable"):
        Registry(root, lock_timeout_s=0.3).record(MODEL, {"event": "blocked"})
    os.utime(lock, (time.time() - 120, time.time() - 120))
    Registry(root, lock_timeout_s=5).record(MODEL, {"event": "after"})
    assert not lock.exists()


def _fsspec_filesystem() -> pafs.FileSystem:
    """A local directory through fsspec: a filesystem that is neither local to pyarrow nor S3 or GCS."""
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fsspec.filesystem("file")))


def test_a_store_with_neither_exclusive_create_nor_consistent_listings_is_refused(tmp_path):
    registry = Registry(str(tmp_path / "registry"), filesystem=_fsspec_filesystem())
    with pytest.raises(RegistryError, match="PyFileSystem offers neither an atomic exclusive create"):
        registry.register(MODEL, _write_export(tmp_path / "export", seed=1), metadata={})
    assert registry.versions(MODEL) == []  # reading needs no lock


def test_the_listing_protocol_excludes_on_a_store_that_lists_consistently(tmp_path, monkeypatch):
    """What S3 and GCS get: entries, a listing, and expiry by the store's clock (here a local directory through
    fsspec stands in for the bucket, taken for a consistently listing store)."""
    monkeypatch.setattr(registry_store, "CONSISTENT_LISTING_FILESYSTEMS", (pafs.PyFileSystem,))
    root = tmp_path / "registry"
    exports = [_write_export(tmp_path / f"export{worker}", seed=worker) for worker in range(3)]
    stale = root / MODEL / "lock" / "0123.json"  # an entry its holder left two leases ago
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"holder": "0123", "host": "elsewhere", "pid": 1}))
    os.utime(stale, (time.time() - 120, time.time() - 120))
    errors = []

    def promote_one(worker: int) -> None:
        try:
            registry = Registry(str(root), filesystem=_fsspec_filesystem())
            record = registry.register(MODEL, exports[worker], metadata={"worker": worker})
            registry.move_alias(MODEL, "production", record["version"], reason=f"worker {worker}")
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=promote_one, args=(worker,)) for worker in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    registry = Registry(root)
    assert [record["version"] for record in registry.versions(MODEL)] == [1, 2, 3]
    assert [event["seq"] for event in registry.history(MODEL)] == list(range(1, 7))
    moves = [event for event in registry.history(MODEL) if event["event"] == "alias"]
    assert [event["from"] for event in moves] == [None] + [event["to"] for event in moves[:-1]]
    assert list((root / MODEL / "lock").iterdir()) == []


LAUNCH_WITH_SHORT_LOCK_TIMEOUT = """
import runpy, sys
from serve import registry
registry.LOCK_TIMEOUT_S = 0.5  # a user would wait the default 30 s for the same message
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def test_launch_reports_a_held_lock_as_exit_2_naming_it_and_how_to_clear_it(tmp_path):
    root = tmp_path / "registry"
    registry = Registry(root)
    for seed in (1, 2):
        record = registry.register(MODEL, _write_export(tmp_path / f"export{seed}", seed=seed), metadata={})
        registry.move_alias(MODEL, "production", record["version"], reason=f"release {seed}")
    lock = _write_foreign_lock(root, claims_expiry_in_s=60)  # as a holder killed a moment ago leaves it

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", LAUNCH_WITH_SHORT_LOCK_TIMEOUT, "stage=rollback",
                             f"serve.model={MODEL}", f"serve.registry={root}", f"paths.root={tmp_path}"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert str(lock) in output and "elsewhere" in output and "4242" in output
    assert f"rm {lock}" in output
    assert Registry(root).resolve(MODEL, "production") == 2
    assert socket.gethostname() not in json.loads(lock.read_text())["host"]
