"""The registry's store: whole-file writes, exclusive creates, listings and JSON reads on a pyarrow filesystem, and
the per-model lock that serve/registry.py holds around every write that must exclude another.

What the lock relies on, per store:

- A local path, NFS included (README recommends `paths.root` on NFS): exclusive create, by link(2) of a complete,
  synced temporary file, which fails when the name exists (atomic on NFS, unlike a listing: NFS clients cache
  listings for up to 60 s). The lock, version-number claims and history numbers are all taken that way, so
  nothing that must exclude depends on a listing; listings only serve reads and first guesses.
- S3 and GCS: pyarrow offers no conditional write there, so the lock is the listing protocol of
  `_try_listed_lock`, which is safe because both stores list strongly consistently (a completed upload is in
  every later listing: S3 since December 2020, GCS always). Any other filesystem is refused when a write needs
  the lock (RegistryError), rather than given an exclusion that silently is not one.
- Every lock carries a fencing token (fence.json); each write made under the lock checks that its token is still
  the latest just before it publishes (before the rename on a local path, before the upload on an object store),
  and records it ("lock_token"), so a holder paused past its lease cannot overwrite a newer holder's write. No
  store here can check and write in one step, so what is left is the instant between the check and the rename.
- A lock's age is measured by the store's clock: its mtime as the store reports it, against the mtime of a fresh
  probe file written to the same store, never by the writer's clock. A lock older than its lease is broken; one
  left by a killed holder within its lease makes the next writer time out with RegistryLockTimeout (a
  ValueError: exit 2) naming the lock file, its holder's host and pid, and the command that clears it.
- Whole-file writes and exclusive creates on a local path are synced before the rename or link and the directory
  after it, so a power loss leaves the old file or the new one. A file torn anyway (zero-length, half a JSON) is
  a RegistryError naming it when read (serve/registry.py decides which files a listing may skip); a torn
  fence.json is always an error, and a torn lock file is a held lock that expires by its mtime.
"""

import contextlib
import hashlib
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

LOCK_FILE = "held.json"
FENCE_FILE = "fence.json"
COPY_CHUNK_BYTES = 8 << 20
# Stores whose listings show every completed write, so the listing lock protocol excludes there.
CONSISTENT_LISTING_FILESYSTEMS: tuple[type, ...] = (pafs.S3FileSystem, pafs.GcsFileSystem)


class RegistryError(ValueError):
    """The registry cannot safely do what was asked: a missing, torn or altered file, a name that is not plain,
    a lock it cannot take or has lost. A ValueError, so launch.py reports it as exit 2 with its message."""


class RegistryLockTimeout(RegistryError):
    """The per-model lock stayed held by someone else for longer than the registry's lock timeout."""


class RegistryLockLost(RegistryError):
    """Our lease ran out and another holder took the lock; the write that found out was not made."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def json_bytes(document: Any) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


# --- filesystem primitives -------------------------------------------------------------------------------------

def is_local(filesystem: pafs.FileSystem) -> bool:
    return isinstance(filesystem, pafs.LocalFileSystem)


def local_path(filesystem: pafs.FileSystem, path: str) -> str | None:
    """The operating-system path behind `path`, when the filesystem is a local one (or a sub-tree of one)."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return path
    if isinstance(filesystem, pafs.SubTreeFileSystem):
        return local_path(filesystem.base_fs, f"{filesystem.base_path.rstrip('/')}/{path.lstrip('/')}")
    return None


def _stream_bytes(stream, data: bytes) -> None:
    # Chunked so that a failure half-way behaves like a real interrupted upload (and tests can make one).
    for start in range(0, len(data), COPY_CHUNK_BYTES):
        stream.write(data[start:start + COPY_CHUNK_BYTES])


def open_output(filesystem: pafs.FileSystem, path: str):
    # Object stores need no parent directory, local disks do; creating it only on demand saves a request per
    # write on object stores.
    try:
        return filesystem.open_output_stream(path)
    except FileNotFoundError:
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return filesystem.open_output_stream(path)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(directory: str) -> None:
    # A rename or link is an entry in the directory: without this a power loss can forget it after we returned.
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _synced_temporary(path: str, data: bytes) -> str:
    """`data` in a hidden temporary file beside `path`, on disk (fsynced); returns the temporary's path."""
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(staging, "wb") as stream:
            _stream_bytes(stream, data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        _unlink_quietly(staging)
        raise
    return staging


def write_atomically(filesystem: pafs.FileSystem, path: str, data: bytes, *,
                      fence: Callable[[], None] | None = None) -> None:
    """Write a whole file so that readers see either the old content or the new one, never a part.

    An object store publishes an upload only when its stream closes, so a direct write is already atomic. A
    local file is visible while being written, so it goes to a synced hidden temporary in the same directory,
    is renamed over the target (atomic within one directory) and the directory is synced. Listings skip names
    starting with '.'. `fence` (a held lock's check) runs as late as the store allows: just before the rename
    on a local path, so a writer that stalled while writing finds out before it publishes anything.
    """
    local = local_path(filesystem, path)
    if local is None:
        if fence:
            fence()
        with open_output(filesystem, path) as stream:
            _stream_bytes(stream, data)
        return
    staging = _synced_temporary(local, data)
    try:
        if fence:
            fence()
        os.replace(staging, local)
    except BaseException:
        _unlink_quietly(staging)
        raise
    _fsync_dir(os.path.dirname(local))


def create_exclusively(local: str, data: bytes, *, fence: Callable[[], None] | None = None) -> bool:
    """Create the local file `local` holding `data` unless the name exists; True when we created it.

    link(2) of a complete temporary fails when the target exists, atomically also on NFS, and the new name never
    shows partial content (O_CREAT|O_EXCL and then writing would). On NFS a retried LINK can report EEXIST for a
    link that succeeded; the temporary's link count tells (the classic check from open(2)). `fence` runs just
    before the link, as in `write_atomically`.
    """
    staging = _synced_temporary(local, data)
    try:
        if fence:
            fence()
        try:
            os.link(staging, local)
        except FileExistsError:
            if os.stat(staging).st_nlink != 2:
                return False
    finally:
        _unlink_quietly(staging)
    _fsync_dir(os.path.dirname(local))
    return True


def read_json(filesystem: pafs.FileSystem, path: str) -> Any:
    """A JSON file's document; FileNotFoundError when it is absent, RegistryError naming it when it is torn."""
    with filesystem.open_input_stream(path) as stream:
        data = stream.read()
    try:
        return json.loads(data)
    except ValueError as error:
        raise RegistryError(f"serve registry: {path} is not valid JSON ({len(data)} bytes: {error}); a writer "
                            "probably crashed while writing it") from None


def delete_quietly(filesystem: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        filesystem.delete_file(path)


def list_dir(filesystem: pafs.FileSystem, path: str, *, recursive: bool = False) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    for attempt in range(5):
        try:
            infos = filesystem.get_file_info(selector)
            break
        except FileNotFoundError:
            # A local listing stats each name it reads; another writer's temporary can vanish in between.
            if attempt == 4:
                raise
            time.sleep(0.01 * (attempt + 1))
    return [info for info in infos if not info.base_name.startswith(".")]


def resolve_filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root path for a URI; a plain path is made absolute against the current directory."""
    text = os.fspath(uri)
    if "://" in text:
        filesystem, root = pafs.FileSystem.from_uri(text)
        return filesystem, root.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def digest_stream(source, sink=None) -> dict:
    sha256, size = hashlib.sha256(), 0
    while chunk := source.read(COPY_CHUNK_BYTES):
        sha256.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
    return {"sha256": sha256.hexdigest(), "bytes": size}


# --- the lock --------------------------------------------------------------------------------------------------

@dataclass
class _Blocker:
    """Who holds a lock we could not take, for the timeout's message."""
    paths: list[str]
    holder: dict | None  # the lock file's content; None when it could not be read
    unreadable: str | None
    expires_in_s: float  # by the store's clock


@dataclass
class HeldLock:
    """A held per-model lock; `check()` before each write made under it is what makes its token a fence."""
    filesystem: pafs.FileSystem
    model: str
    fence_path: str
    holder: str
    token: int
    lease_s: float

    def check(self) -> None:
        current = _read_fence(self.filesystem, self.fence_path)
        if (current.get("token"), current.get("holder")) != (self.token, self.holder):
            raise RegistryLockLost(
                f"serve registry: the lock on model {self.model!r} was taken over (our token {self.token}, now "
                f"{current.get('token')} held by host {current.get('host')} pid {current.get('pid')}): this process "
                f"held it past its {self.lease_s:g} s lease, so it wrote nothing more; rerun the command")


def _read_fence(filesystem: pafs.FileSystem, path: str) -> dict:
    try:
        fence = read_json(filesystem, path)
    except FileNotFoundError:
        return {"token": 0}
    except RegistryError as error:
        raise RegistryError(f"{error}. It holds the registry lock's fencing token: remove it once no registry "
                            "command is running (tokens then restart, which is safe while nothing holds the "
                            "lock)") from None
    if not isinstance(fence, dict) or not isinstance(fence.get("token"), int):
        raise RegistryError(f"serve registry: {path} holds no fencing token ({fence!r}); remove it once no "
                            "registry command is running")
    return fence


def _lock_protocol(filesystem: pafs.FileSystem) -> str:
    if local_path(filesystem, "/") is not None:
        return "exclusive"
    if isinstance(filesystem, CONSISTENT_LISTING_FILESYSTEMS):
        return "listing"
    if isinstance(filesystem, pafs.SubTreeFileSystem):
        return _lock_protocol(filesystem.base_fs)
    raise RegistryError(f"serve.registry: a {type(filesystem).__name__} offers neither an atomic exclusive create "
                        "nor listings documented to show every completed write, so the registry lock could not "
                        "exclude concurrent writers there; use a local or NFS path, s3:// or gs://")


def _entry_bytes(holder: str) -> bytes:
    return json_bytes({"holder": holder, "pid": os.getpid(), "host": socket.gethostname(),
                        "acquired_at": iso(utc_now())})


def _parse_holder(data: bytes) -> tuple[dict | None, str | None]:
    try:
        holder = json.loads(data)
        if isinstance(holder, dict):
            return holder, None
        return None, f"unreadable: {holder!r} is not a lock record"
    except ValueError as error:
        return None, f"unreadable ({len(data)} bytes: {error}), as a holder killed while writing it leaves it"


def _local_store_now(directory: str) -> float:
    """The store's current time: the mtime the store gives a file created now (the server's clock on NFS)."""
    probe = os.path.join(directory, f".probe-{uuid.uuid4().hex}")
    descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    try:
        return os.fstat(descriptor).st_mtime
    finally:
        os.close(descriptor)
        _unlink_quietly(probe)


def _try_exclusive_lock(lock_path: str, holder: str, *, lease_s: float) -> _Blocker | None:
    """One attempt at the local lock file; None when we took it, else who holds it (a stale one is broken)."""
    if create_exclusively(lock_path, _entry_bytes(holder)):
        return None
    try:
        with open(lock_path, "rb") as stream:
            found, data = os.fstat(stream.fileno()), stream.read()
    except FileNotFoundError:
        return _Blocker([lock_path], None, "released while we looked", 0.0)  # retry at once
    expires_in_s = found.st_mtime + lease_s - _local_store_now(os.path.dirname(lock_path))
    content, unreadable = _parse_holder(data)
    if expires_in_s < 0:
        _break_stale_lock(lock_path, found, content, unreadable)
    return _Blocker([lock_path], content, unreadable, max(expires_in_s, 0.0))


def _break_stale_lock(lock_path: str, judged: os.stat_result, content: dict | None, unreadable: str | None) -> None:
    """Remove a lock whose holder's lease ran out, without ever removing a newer holder's lock.

    It is renamed aside (only one breaker can win the rename) and checked to be the file we judged; if a newer
    holder's lock was taken aside instead, it is linked back. If a third contender took the name in between, the
    newer holder finds out at its next fenced write (its token is no longer the latest) and writes nothing.
    """
    aside = f"{os.path.dirname(lock_path)}/.stale-{uuid.uuid4().hex}"
    try:
        os.rename(lock_path, aside)
    except FileNotFoundError:
        return
    moved = os.stat(aside)
    if (moved.st_ino, moved.st_mtime_ns) != (judged.st_ino, judged.st_mtime_ns):
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock_path)
    else:
        who = content or unreadable
        logger.warning("Removed stale registry lock %s (held by %s, older than its lease by the store's clock; "
                       "its holder likely crashed)", lock_path, who)
    _unlink_quietly(aside)


def _release_exclusive_lock(lock_path: str, holder: str) -> None:
    # Only our own: past our lease, another contender may have broken our lock and taken the name.
    try:
        with open(lock_path, "rb") as stream:
            content, _ = _parse_holder(stream.read())
    except FileNotFoundError:
        return
    if content and content.get("holder") == holder:
        _unlink_quietly(lock_path)


def _store_now(filesystem: pafs.FileSystem, directory: str) -> datetime:
    probe = f"{directory}/.probe-{uuid.uuid4().hex}"
    write_atomically(filesystem, probe, b"{}")
    try:
        return filesystem.get_file_info(probe).mtime
    finally:
        delete_quietly(filesystem, probe)


def _try_listed_lock(filesystem: pafs.FileSystem, lock_dir: str, holder: str, *, lease_s: float) -> _Blocker | None:
    """One attempt at the lock by listing, for stores without an exclusive create (S3, GCS).

    Why this excludes: each contender first writes its own entry, then lists the directory, and holds the lock
    only if no other live entry is listed. If A listed and saw only itself, B's entry was not yet written when A
    listed, so B lists after that, while A's entry still exists: B sees A and backs off. This needs listings that
    show every completed write: true of S3 and GCS, false of NFS (which therefore uses the exclusive create).
    """
    own = f"{lock_dir}/{holder}.json"
    write_atomically(filesystem, own, _entry_bytes(holder))
    others = [info for info in list_dir(filesystem, lock_dir)
              if info.base_name.endswith(".json") and info.path != own]
    if not others:
        return None
    delete_quietly(filesystem, own)
    now = _store_now(filesystem, lock_dir)
    live = []
    for info in others:
        expires_in_s = (info.mtime - now).total_seconds() + lease_s
        if expires_in_s >= 0:
            live.append((info, expires_in_s))
            continue
        logger.warning("Removing stale registry lock entry %s (older than its lease by the store's clock; its "
                       "holder likely crashed)", info.path)
        delete_quietly(filesystem, info.path)
    if not live:
        return _Blocker([], None, None, 0.0)  # retry at once
    try:
        with filesystem.open_input_stream(live[0][0].path) as stream:
            content, unreadable = _parse_holder(stream.read())
    except FileNotFoundError:
        content, unreadable = None, "released while we looked"
    return _Blocker([info.path for info, _ in live], content, unreadable, max(s for _, s in live))


def _lock_timeout(model: str, blocker: _Blocker, *, timeout_s: float, lease_s: float,
                  local: bool) -> RegistryLockTimeout:
    holder = blocker.holder or {}
    who = (f"host {holder.get('host')} pid {holder.get('pid')} since {holder.get('acquired_at')}" if blocker.holder
           else f"a lock file that is {blocker.unreadable}")
    clear = f"rm {' '.join(blocker.paths)}" if local else f"delete the object(s) {', '.join(blocker.paths)}"
    return RegistryLockTimeout(
        f"serve registry: could not take the lock on model {model!r} within {timeout_s:g} s: "
        f"{', '.join(blocker.paths)} is held by {who}. It counts as abandoned {blocker.expires_in_s:.0f} s from now "
        f"({lease_s:g} s after it was written, by the store's clock). If that process is gone (killed, or its "
        f"machine lost) and you cannot wait, clear the lock with: {clear}")


@contextlib.contextmanager
def held_lock(filesystem: pafs.FileSystem, model_dir: str, *, model: str, lease_s: float,
               timeout_s: float) -> Iterator[HeldLock]:
    """Hold the model's lock for the block; yields it with a fresh fencing token."""
    protocol, holder, lock_dir = _lock_protocol(filesystem), uuid.uuid4().hex, f"{model_dir}/lock"
    if protocol == "exclusive":
        lock_path = local_path(filesystem, f"{lock_dir}/{LOCK_FILE}")
        attempt = lambda: _try_exclusive_lock(lock_path, holder, lease_s=lease_s)  # noqa: E731
        release = lambda: _release_exclusive_lock(lock_path, holder)  # noqa: E731
    else:
        attempt = lambda: _try_listed_lock(filesystem, lock_dir, holder, lease_s=lease_s)  # noqa: E731
        release = lambda: delete_quietly(filesystem, f"{lock_dir}/{holder}.json")  # noqa: E731
    deadline, backoff_s = time.monotonic() + timeout_s, 0.01
    while (blocker := attempt()) is not None:
        if time.monotonic() >= deadline:
            raise _lock_timeout(model, blocker, timeout_s=timeout_s, lease_s=lease_s, local=protocol == "exclusive")
        time.sleep(random.uniform(0.01, backoff_s))
        backoff_s = min(0.1, backoff_s * 1.5)
    try:
        yield _take_token(filesystem, model_dir, model=model, holder=holder, lease_s=lease_s)
    finally:
        release()


def _take_token(filesystem: pafs.FileSystem, model_dir: str, *, model: str, holder: str, lease_s: float) -> HeldLock:
    fence_path = f"{model_dir}/{FENCE_FILE}"
    token = _read_fence(filesystem, fence_path)["token"] + 1
    fence = {"token": token, "holder": holder, "host": socket.gethostname(), "pid": os.getpid(), "at": iso(utc_now())}
    write_atomically(filesystem, fence_path, json_bytes(fence))
    return HeldLock(filesystem, model, fence_path, holder, token, lease_s)
