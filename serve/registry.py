"""Model registry on any pyarrow filesystem: numbered immutable versions, movable aliases, append-only history.

Layout under the registry root, per model::

    <model>/versions/000001/      the export's files, then version.json (written last: its presence = committed)
    <model>/aliases.json          {"production": {"version": 3, "moved_at": ..., "reason": ...}, ...}
    <model>/history/00000001.json one immutable event per file, numbered in order
    <model>/lock/<uuid>.json      entries of the per-model lock (see `_acquire_lock`)

The same code serves a local directory and an object store, so nothing relies on an atomic create or a
rename; a local filesystem only gets the extra of rename-over-target for whole-file writes.
"""

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
VERSION_RECORD = "version.json"
CLAIM_RECORD = "claim.json"
RESERVED_EXPORT_NAMES = frozenset({VERSION_RECORD, CLAIM_RECORD})
RESERVED_VERSION_KEYS = frozenset({"version", "model", "created_at", "files"})
RESERVED_EVENT_KEYS = frozenset({"seq", "event", "alias", "from", "to", "at", "reason", "version", "moved_at"})
COPY_CHUNK_BYTES = 8 << 20


class RegistryError(ValueError):
    """A registry's content is not what it claims to be (a missing or altered file of a committed version)."""


class RegistryLockTimeout(TimeoutError):
    """The per-model lock stayed held by someone else for longer than the registry's lock timeout."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _json_bytes(document: Any) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def _version_name(number: int) -> str:
    return f"{number:06d}"


def _check_name(value: object, *, key: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ValueError(f"{key}: {value!r} is not a valid name; expected letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    return value


def _check_version_number(value: object, *, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: expected a version number (an int >= 1), got {value!r}")
    return value


def resolve_filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root path for a URI; a plain path is made absolute against the current directory."""
    text = os.fspath(uri)
    if "://" in text:
        filesystem, root = pafs.FileSystem.from_uri(text)
        return filesystem, root.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(text).resolve())


# --- filesystem primitives -------------------------------------------------------------------------------------

def _is_local(filesystem: pafs.FileSystem) -> bool:
    return isinstance(filesystem, pafs.LocalFileSystem)


def _stream_bytes(stream, data: bytes) -> None:
    # Chunked so that a failure half-way behaves like a real interrupted upload (and tests can make one).
    for start in range(0, len(data), COPY_CHUNK_BYTES):
        stream.write(data[start:start + COPY_CHUNK_BYTES])


def _open_output(filesystem: pafs.FileSystem, path: str):
    # Object stores need no parent directory, local disks do; creating it only on demand saves a request per
    # write on object stores.
    try:
        return filesystem.open_output_stream(path)
    except FileNotFoundError:
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return filesystem.open_output_stream(path)


def _write_atomically(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file so that readers see either the old content or the new one, never a part.

    An object store publishes an upload only when its stream closes, so a direct write is already atomic. A
    local file is visible while being written, so it goes to a hidden temporary name in the same directory and
    is renamed over the target (a rename within one directory is atomic). Listings skip names starting with '.'.
    """
    if not _is_local(filesystem):
        with _open_output(filesystem, path) as stream:
            _stream_bytes(stream, data)
        return
    parent, name = path.rsplit("/", 1)
    staging = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with _open_output(filesystem, staging) as stream:
            _stream_bytes(stream, data)
        filesystem.move(staging, path)
    except BaseException:
        _delete_quietly(filesystem, staging)
        raise


def _read_json(filesystem: pafs.FileSystem, path: str) -> Any:
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def _delete_quietly(filesystem: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        filesystem.delete_file(path)


def _list_dir(filesystem: pafs.FileSystem, path: str, *, recursive: bool = False) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    return [info for info in filesystem.get_file_info(selector) if not info.base_name.startswith(".")]


def _digest_stream(source, sink=None) -> dict:
    sha256, size = hashlib.sha256(), 0
    while chunk := source.read(COPY_CHUNK_BYTES):
        sha256.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
    return {"sha256": sha256.hexdigest(), "bytes": size}


# --- the lock --------------------------------------------------------------------------------------------------

def _lock_entry_expiry(filesystem: pafs.FileSystem, info: pafs.FileInfo, *, lease_s: float) -> datetime | None:
    """When a lock entry stops counting; None when it is already gone (released between listing and reading)."""
    try:
        expiry = datetime.fromisoformat(_read_json(filesystem, info.path)["expires_at"])
        return expiry if expiry.tzinfo else expiry.replace(tzinfo=UTC)  # a zone-less stamp is taken as UTC
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        # An unreadable entry cannot say when it expires: give it one lease from its modification time.
        written = info.mtime if isinstance(info.mtime, datetime) else _utc_now()
        return written + timedelta(seconds=lease_s)


def _other_live_entries(filesystem: pafs.FileSystem, lock_dir: str, *, own: str, lease_s: float) -> list[str]:
    live = []
    for info in _list_dir(filesystem, lock_dir):
        if info.base_name == own or not info.base_name.endswith(".json"):
            continue
        expiry = _lock_entry_expiry(filesystem, info, lease_s=lease_s)
        if expiry is None:
            continue
        if expiry < _utc_now():
            logger.warning("Removing stale registry lock entry %s (expired %s; its holder likely crashed)",
                           info.path, _iso(expiry))
            _delete_quietly(filesystem, info.path)
            continue
        live.append(info.base_name)
    return live


def _acquire_lock(filesystem: pafs.FileSystem, lock_dir: str, *, lease_s: float, timeout_s: float) -> str:
    """Take the lock in `lock_dir`; returns the path of our entry, whose deletion releases it.

    Why this excludes without an atomic create: each contender first writes its own entry, then lists the
    directory, and holds the lock only if no other live entry is listed. If A listed and saw only itself, B's
    entry was not yet written when A listed, so B lists after that, while A's entry still exists: B sees A and
    backs off. Two contenders may both back off, so the retry waits a random, growing time. This needs listings
    that show every completed write (true of local disks, S3 and GCS), and clocks that agree to well within a
    lease, because an entry past its expires_at is taken for a crashed holder's and removed.
    """
    holder = uuid.uuid4().hex
    own_name = f"{holder}.json"
    deadline, backoff_s = time.monotonic() + timeout_s, 0.01
    while True:
        now = _utc_now()
        entry = {"holder": holder, "pid": os.getpid(), "host": socket.gethostname(), "acquired_at": _iso(now),
                 "expires_at": _iso(now + timedelta(seconds=lease_s))}
        _write_atomically(filesystem, f"{lock_dir}/{own_name}", _json_bytes(entry))
        others = _other_live_entries(filesystem, lock_dir, own=own_name, lease_s=lease_s)
        if not others:
            return f"{lock_dir}/{own_name}"
        _delete_quietly(filesystem, f"{lock_dir}/{own_name}")
        if time.monotonic() >= deadline:
            raise RegistryLockTimeout(f"serve registry: could not take the lock in {lock_dir} within {timeout_s}s; "
                                      f"held by entries {sorted(others)} (they expire after their lease)")
        time.sleep(random.uniform(0.01, backoff_s))
        backoff_s = min(0.1, backoff_s * 1.5)


@contextlib.contextmanager
def _held_lock(filesystem: pafs.FileSystem, lock_dir: str, *, lease_s: float, timeout_s: float) -> Iterator[None]:
    entry = _acquire_lock(filesystem, lock_dir, lease_s=lease_s, timeout_s=timeout_s)
    try:
        yield
    finally:
        _delete_quietly(filesystem, entry)


# --- export files and checksums --------------------------------------------------------------------------------

def _export_files(export_dir: Path) -> list[Path]:
    if not export_dir.is_dir():
        raise ValueError(f"export_dir: {export_dir} is not a directory")
    files = sorted(export_dir.iterdir())
    for path in files:
        if not path.is_file():
            raise ValueError(f"export_dir: {path} is not a regular file; an export must be a flat directory of files")
        if path.name in RESERVED_EXPORT_NAMES:
            raise ValueError(f"export_dir: {path} uses a name the registry reserves ({sorted(RESERVED_EXPORT_NAMES)})")
    if not files:
        raise ValueError(f"export_dir: {export_dir} holds no files")
    return files


def _check_metadata(metadata: dict) -> None:
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata: expected a dict, got {type(metadata).__name__}")
    if clashes := sorted(RESERVED_VERSION_KEYS & metadata.keys()):
        raise ValueError(f"metadata.{clashes[0]}: the registry sets this field itself; use another key")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata: must be JSON-serialisable ({error})") from error


def _check_extra_fields(fields: dict | None, *, key: str) -> dict:
    if fields is None:
        return {}
    if not isinstance(fields, dict):
        raise ValueError(f"{key}: expected a dict or None, got {type(fields).__name__}")
    if clashes := sorted(RESERVED_EVENT_KEYS & fields.keys()):
        raise ValueError(f"{key}.{clashes[0]}: the registry sets this field itself; use another key")
    return fields


def _verify_files(filesystem: pafs.FileSystem, directory: str, record: dict) -> None:
    """Raise RegistryError unless every file listed in a version record is present with its recorded checksum."""
    for name, expected in record["files"].items():
        try:
            with filesystem.open_input_stream(f"{directory}/{name}") as source:
                actual = _digest_stream(source)
        except FileNotFoundError as error:
            raise _missing_file(record, name, directory=directory) from error
        _check_digest(record, name, expected=expected, actual=actual)


def _missing_file(record: dict, name: str, *, directory: str) -> RegistryError:
    return RegistryError(f"serve registry: model {record['model']!r} version {record['version']}: file {name!r} "
                         f"listed in version.json is missing from {directory}")


def _check_digest(record: dict, name: str, *, expected: dict, actual: dict) -> None:
    if actual != {"sha256": expected["sha256"], "bytes": expected["bytes"]}:
        raise RegistryError(f"serve registry: model {record['model']!r} version {record['version']}: file {name!r} "
                            f"does not match version.json (expected sha256 {expected['sha256']}, "
                            f"{expected['bytes']} bytes; got sha256 {actual['sha256']}, {actual['bytes']} bytes)")


class Registry:
    """Model versions, aliases and history kept under one root on a local disk or an object store.

    `uri` is a local path (relative paths are resolved now) or a pyarrow filesystem URI (file://, s3://, gs://).
    `filesystem`, when given, is used instead of deriving one from `uri`, which is then a path inside it.
    """

    def __init__(self, uri: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None,
                 lock_timeout_s: float = 30.0, lock_lease_s: float = 60.0) -> None:
        text = os.fspath(uri)
        if filesystem is None:
            filesystem, root = resolve_filesystem(text)
        else:
            root = text.rstrip("/")
        # A plain local path becomes absolute, so the URI means the same in Serve replicas with another cwd.
        self.uri = text if "://" in text or not _is_local(filesystem) else root
        self.filesystem = filesystem
        self.root = root
        self.lock_timeout_s = lock_timeout_s
        self.lock_lease_s = lock_lease_s

    # --- reading ---------------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Names of the models with at least one committed version, sorted."""
        names = [info.base_name for info in _list_dir(self.filesystem, self.root)
                 if info.type == pafs.FileType.Directory and NAME_PATTERN.fullmatch(info.base_name)]
        return [name for name in sorted(names) if self._committed_numbers(self._model_dir(name))]

    def versions(self, model: str) -> list[dict]:
        """Committed version records of `model`, oldest first (claimed but never committed numbers are skipped)."""
        model_dir = self._model_dir(model)
        return [self._read_version(model_dir, number) for number in self._committed_numbers(model_dir)]

    def version(self, model: str, number: int) -> dict:
        """The record of one committed version; ValueError naming the committed versions when it is not one."""
        model_dir = self._model_dir(model)
        _check_version_number(number, key="version")
        try:
            return self._read_version(model_dir, number)
        except FileNotFoundError:
            raise ValueError(f"serve registry: model {model!r} has no committed version {number}; committed "
                             f"versions: {self._committed_numbers(model_dir)}") from None

    def aliases(self, model: str) -> dict:
        """Every alias of `model` with its record ({"version", "moved_at", "reason", ...})."""
        try:
            return _read_json(self.filesystem, f"{self._model_dir(model)}/aliases.json")
        except FileNotFoundError:
            return {}

    def resolve(self, model: str, alias: str) -> int | None:
        """The version an alias points at, or None when the alias is not set."""
        return self.aliases(model).get(_check_name(alias, key="serve.alias"), {}).get("version")

    def history(self, model: str) -> list[dict]:
        """Every recorded event of `model` in the order they happened."""
        history_dir = f"{self._model_dir(model)}/history"
        names = sorted((info.base_name for info in _list_dir(self.filesystem, history_dir)
                        if re.fullmatch(r"\d+\.json", info.base_name)), key=lambda name: int(name.split(".")[0]))
        return [_read_json(self.filesystem, f"{history_dir}/{name}") for name in names]

    def fetch(self, model: str, number: int, *, cache_dir: Path) -> Path:
        """A local directory holding version `number`'s files, each verified against its recorded sha256.

        A local registry returns its own version directory (read it, never write to it); a remote one downloads
        into `cache_dir/<model>/<000N>/` once and reuses that copy after checking it again. Raises RegistryError
        naming the file when anything is missing or altered, so a corrupted version is refused at load time.
        """
        record = self.version(model, number)
        version_dir = f"{self._model_dir(model)}/versions/{_version_name(number)}"
        if _is_local(self.filesystem):
            _verify_files(self.filesystem, version_dir, record)
            return Path(version_dir)
        return self._download(record, version_dir, Path(cache_dir) / model / _version_name(number))

    # --- writing ---------------------------------------------------------------------------------------------

    def register(self, model: str, export_dir: Path, *, metadata: dict) -> dict:
        """Store the files of a local, flat export directory as the next version of `model`; returns its record.

        The number is claimed under the lock, but the upload runs without it (large models take a while);
        version.json is written last, so a crashed upload leaves a number that is never listed nor reused.
        """
        model_dir = self._model_dir(model)
        files = _export_files(Path(export_dir))
        _check_metadata(metadata)
        number = self._claim_number(model_dir)
        version_dir = f"{model_dir}/versions/{_version_name(number)}"
        checksums = {path.name: self._upload(path, f"{version_dir}/{path.name}") for path in files}
        record = {**metadata, "version": number, "model": model, "created_at": _iso(_utc_now()), "files": checksums}
        _write_atomically(self.filesystem, f"{version_dir}/{VERSION_RECORD}", _json_bytes(record))
        logger.info("Registered %s version %d (%d files) in %s", model, number, len(files), self.uri)
        with self._lock(model_dir):
            self._append_event(model_dir, {"event": "register", "version": number})
        return record

    def move_alias(self, model: str, alias: str, version: int | None, *, reason: str,
                   details: dict | None = None, alias_fields: dict | None = None) -> dict:
        """Point `alias` at a committed version (None removes it) and record the move; returns the history event.

        `details` go into the event only; `alias_fields` (e.g. a canary's {"percent": 10}) are kept on the alias
        record and in the event.
        """
        model_dir = self._model_dir(model)
        _check_name(alias, key="serve.alias")
        if version is not None:
            _check_version_number(version, key="version")
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"reason: expected a non-empty string explaining the move, got {reason!r}")
        details = _check_extra_fields(details, key="details")
        alias_fields = _check_extra_fields(alias_fields, key="alias_fields")
        with self._lock(model_dir):
            committed = self._committed_numbers(model_dir)
            if version is not None and version not in committed:
                raise ValueError(f"version: model {model!r} has no committed version {version} to point alias "
                                 f"{alias!r} at; committed versions: {committed}")
            aliases, now = self.aliases(model), _iso(_utc_now())
            previous = aliases.pop(alias, {}).get("version")
            if version is not None:
                aliases[alias] = {**alias_fields, "version": version, "moved_at": now, "reason": reason}
            _write_atomically(self.filesystem, f"{model_dir}/aliases.json", _json_bytes(aliases))
            event = self._append_event(model_dir, {**alias_fields, **details, "event": "alias", "alias": alias,
                                                   "from": previous, "to": version, "at": now, "reason": reason})
        logger.info("Moved %s alias %r from version %s to %s: %s", model, alias, previous, version, reason)
        return event

    def record(self, model: str, event: dict) -> dict:
        """Append an event that moves nothing (e.g. a refused promotion with the gate's numbers); returns it."""
        model_dir = self._model_dir(model)
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            raise ValueError(f"event: expected a dict with a string 'event' field naming its kind, got {event!r}")
        if "seq" in event:
            raise ValueError("event.seq: the registry numbers events itself; remove the field")
        with self._lock(model_dir):
            return self._append_event(model_dir, event)

    # --- internals -------------------------------------------------------------------------------------------

    def _model_dir(self, model: str) -> str:
        return f"{self.root}/{_check_name(model, key='serve.model')}"

    def _lock(self, model_dir: str) -> contextlib.AbstractContextManager[None]:
        return _held_lock(self.filesystem, f"{model_dir}/lock", lease_s=self.lock_lease_s,
                          timeout_s=self.lock_timeout_s)

    def _read_version(self, model_dir: str, number: int) -> dict:
        return _read_json(self.filesystem, f"{model_dir}/versions/{_version_name(number)}/{VERSION_RECORD}")

    def _committed_numbers(self, model_dir: str) -> list[int]:
        versions_dir = f"{model_dir}/versions/"
        numbers = []
        for info in _list_dir(self.filesystem, versions_dir.rstrip("/"), recursive=True):
            parts = info.path.removeprefix(versions_dir).split("/")
            if len(parts) == 2 and parts[0].isdigit() and parts[1] == VERSION_RECORD:
                numbers.append(int(parts[0]))
        return sorted(numbers)

    def _claim_number(self, model_dir: str) -> int:
        # Every directory counts, committed or not, so a number whose upload crashed is never handed out again.
        with self._lock(model_dir):
            claimed = [int(info.base_name) for info in _list_dir(self.filesystem, f"{model_dir}/versions")
                       if info.type == pafs.FileType.Directory and info.base_name.isdigit()]
            number = max(claimed, default=0) + 1
            claim = {"version": number, "claimed_at": _iso(_utc_now()), "pid": os.getpid(),
                     "host": socket.gethostname()}
            _write_atomically(self.filesystem, f"{model_dir}/versions/{_version_name(number)}/{CLAIM_RECORD}",
                              _json_bytes(claim))
        return number

    def _append_event(self, model_dir: str, event: dict) -> dict:
        """Write the next numbered history file; the caller must hold the model's lock."""
        history_dir = f"{model_dir}/history"
        numbers = [int(info.base_name.split(".")[0]) for info in _list_dir(self.filesystem, history_dir)
                   if re.fullmatch(r"\d+\.json", info.base_name)]
        stored = {"at": _iso(_utc_now()), **event, "seq": max(numbers, default=0) + 1}
        _write_atomically(self.filesystem, f"{history_dir}/{stored['seq']:08d}.json", _json_bytes(stored))
        return stored

    def _upload(self, local_path: Path, remote_path: str) -> dict:
        with open(local_path, "rb") as source, _open_output(self.filesystem, remote_path) as sink:
            return _digest_stream(source, sink)

    def _download(self, record: dict, version_dir: str, target: Path) -> Path:
        local = pafs.LocalFileSystem()
        if target.is_dir():
            try:
                _verify_files(local, str(target), record)
                return target
            except RegistryError as error:
                logger.warning("Cached copy %s failed verification, downloading again: %s", target, error)
                shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Download beside the target and rename at the end, so a crash never leaves a half copy under its name.
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            for name, expected in record["files"].items():
                try:
                    with self.filesystem.open_input_stream(f"{version_dir}/{name}") as source, \
                            open(staging / name, "wb") as sink:
                        actual = _digest_stream(source, sink)
                except FileNotFoundError as error:
                    raise _missing_file(record, name, directory=version_dir) from error
                _check_digest(record, name, expected=expected, actual=actual)
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():
                    raise  # otherwise a concurrent fetch renamed its verified copy first; ours is dropped
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target
