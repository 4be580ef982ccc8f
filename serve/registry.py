"""Model registry on any pyarrow filesystem: numbered immutable versions, movable aliases, append-only history.

Layout under the registry root, per model::

    <model>/versions/000001/      claim.json (created first), the export's files, then version.json (written last,
                                  under the lock: its presence = committed)
    <model>/aliases.json          {"production": {"version": 3, "moved_at": ..., "reason": ..., "lock_token": 7}}
    <model>/history/00000001.json one immutable event per file, numbered in order
    <model>/rollout.json          the progressive rollout's state (serve/rollout.py), rewritten at every look
    <model>/fence.json            the last fencing token handed out with the lock
    <model>/lock/                 the per-model lock: held.json on a local or NFS path, <uuid>.json on S3 or GCS

Commits, alias moves and history events are written under the per-model lock, fenced by its token; the lock's
protocol per store and the synced writes beneath it are in serve/registry_store.py. On a local path, claims of
version numbers and history numbers are exclusive creates too, so nothing that must exclude trusts a listing.

- A torn file (zero-length, half a JSON) is named: a version or history file is skipped by listings with a
  warning and is an error where it was asked for by name; a torn aliases.json is always an error (read as "no
  aliases" it would silently mean "no production").
- Registering with `dedupe_file` makes the same weights one version: checked again under the lock at commit, so
  two registrations racing each other cannot both commit.
- File names read from version.json are plain names (no separator, not '.', '..' or empty), checked before any
  file they name is opened.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from serve.registry_store import (
    HeldLock,
    RegistryError,
    create_exclusively,
    delete_quietly,
    digest_stream,
    held_lock,
    is_local,
    iso,
    json_bytes,
    list_dir,
    local_path,
    open_output,
    read_json,
    resolve_filesystem,
    utc_now,
    write_atomically,
)
from trainers.safe_loading import is_plain_file_name

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
VERSION_RECORD = "version.json"
CLAIM_RECORD = "claim.json"
ROLLOUT_RECORD = "rollout.json"
RESERVED_EXPORT_NAMES = frozenset({VERSION_RECORD, CLAIM_RECORD})
RESERVED_VERSION_KEYS = frozenset({"version", "model", "created_at", "files", "lock_token"})
RESERVED_EVENT_KEYS = frozenset({"seq", "event", "alias", "from", "to", "at", "reason", "version", "moved_at",
                                 "lock_token", "preceded_by"})
# Read when a Registry is made without its own values, so a caller (or a test) can change the defaults.
LOCK_TIMEOUT_S = 30.0
LOCK_LEASE_S = 60.0


class AliasMoved(RegistryError):
    """A compare-and-set alias move found the alias somewhere other than where its caller expected it."""

    def __init__(self, model: str, alias: str, *, expected: int | None, current: int | None) -> None:
        self.model, self.alias, self.expected, self.current = model, alias, expected, current
        super().__init__(f"serve registry: model {model!r} alias {alias!r} is at {_describe(current)}, not at "
                         f"{_describe(expected)} as this move expected; another writer moved it first")


class _AnyVersion:
    def __repr__(self) -> str:
        return "ANY_VERSION"


ANY_VERSION = _AnyVersion()  # move_alias(expected=ANY_VERSION): move wherever the alias is now


def _describe(version: int | None) -> str:
    return "no version" if version is None else f"v{version}"


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


# --- export files, records and checksums -----------------------------------------------------------------------

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


def _check_version_record(record: Any, path: str, *, model: str, number: int) -> dict:
    """A version.json as read: its own number, and files that are plain names with a checksum each."""
    where = f"serve registry: model {model!r} version {number}"
    if not isinstance(record, dict) or record.get("version") != number or not isinstance(record.get("files"), dict):
        raise RegistryError(f"{where}: {path} is not a version record of this version")
    for name, entry in record["files"].items():
        if not is_plain_file_name(name):
            raise RegistryError(f"{where}: {path} lists file {name!r}, which is not a plain file name (no path "
                                "separator, not '.', '..' or empty); refusing to open it")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int)):
            raise RegistryError(f"{where}: {path} gives file {name!r} no sha256 and size ({entry!r})")
    return record


def _verify_files(filesystem: pafs.FileSystem, directory: str, record: dict) -> None:
    """Raise RegistryError unless every file listed in a version record is present with its recorded checksum."""
    for name, expected in record["files"].items():
        try:
            with filesystem.open_input_stream(f"{directory}/{name}") as source:
                actual = digest_stream(source)
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


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as source:
        return digest_stream(source)["sha256"]


class Registry:
    """Model versions, aliases and history kept under one root on a local disk, NFS, S3 or GCS.

    `uri` is a local path (relative paths are resolved now) or a pyarrow filesystem URI (file://, s3://, gs://).
    `filesystem`, when given, is used instead of deriving one from `uri`, which is then a path inside it.
    Lock timeout and lease default to the module's LOCK_TIMEOUT_S and LOCK_LEASE_S.
    """

    def __init__(self, uri: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None,
                 lock_timeout_s: float | None = None, lock_lease_s: float | None = None) -> None:
        text = os.fspath(uri)
        if filesystem is None:
            filesystem, root = resolve_filesystem(text)
        else:
            root = text.rstrip("/")
        # A plain local path becomes absolute, so the URI means the same in Serve replicas with another cwd.
        self.uri = text if "://" in text or not is_local(filesystem) else root
        self.filesystem = filesystem
        self.root = root
        self.lock_timeout_s = LOCK_TIMEOUT_S if lock_timeout_s is None else lock_timeout_s
        self.lock_lease_s = LOCK_LEASE_S if lock_lease_s is None else lock_lease_s

    # --- reading ---------------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Names of the models with at least one committed version, sorted."""
        names = [info.base_name for info in list_dir(self.filesystem, self.root)
                 if info.type == pafs.FileType.Directory and NAME_PATTERN.fullmatch(info.base_name)]
        return [name for name in sorted(names) if self._committed_numbers(self._model_dir(name))]

    def versions(self, model: str) -> list[dict]:
        """Committed version records of `model`, oldest first. Claimed but never committed numbers are skipped, and
        so, with a warning naming the file, is a version.json that is torn or fails its checks."""
        model_dir, records = self._model_dir(model), []
        for number in self._committed_numbers(model_dir):
            try:
                records.append(self._read_version(model, number))
            except FileNotFoundError:
                continue  # removed since the listing
            except RegistryError as error:
                logger.warning("Skipping a version that cannot be trusted: %s", error)
        return records

    def version(self, model: str, number: int) -> dict:
        """The record of one committed version; ValueError naming the committed versions when it is not one,
        RegistryError naming the file when its version.json is torn or fails its checks."""
        _check_version_number(number, key="version")
        try:
            return self._read_version(model, number)
        except FileNotFoundError:
            raise ValueError(f"serve registry: model {model!r} has no committed version {number}; committed "
                             f"versions: {self._committed_numbers(self._model_dir(model))}") from None

    def aliases(self, model: str) -> dict:
        """Every alias of `model` with its record ({"version", "moved_at", "reason", ...}).

        A torn aliases.json raises RegistryError naming it: read as "no aliases" it would mean "no production",
        and the next move would write that guess over the file.
        """
        path = f"{self._model_dir(model)}/aliases.json"
        try:
            aliases = read_json(self.filesystem, path)
        except FileNotFoundError:
            return {}
        except RegistryError as error:
            raise RegistryError(f"{error}. It cannot be read as 'no aliases'; the history ({self.root}/{model}/"
                                "history, or stage=registry) holds every alias move: rewrite the file from the "
                                "latest ones, or delete it to start with no aliases") from None
        if not isinstance(aliases, dict) or not all(isinstance(record, dict) and isinstance(record.get("version"), int)
                                                    for record in aliases.values()):
            raise RegistryError(f"serve registry: {path} is not a map of alias records; rewrite it from the history "
                                "(stage=registry) or delete it to start with no aliases")
        return aliases

    def rollout(self, model: str) -> dict | None:
        """The model's progressive rollout state (serve/rollout.py), or None when none was ever started."""
        path = f"{self._model_dir(model)}/{ROLLOUT_RECORD}"
        try:
            state = read_json(self.filesystem, path)
        except FileNotFoundError:
            return None
        if not isinstance(state, dict) or not isinstance(state.get("canary"), int):
            raise RegistryError(f"serve registry: {path} is not a rollout record; its history (stage=registry) "
                                "holds every step: delete the file to end the rollout it described")
        return state

    def update_rollout(self, model: str, change: Callable[[dict | None], dict]) -> dict:
        """Write `change(current rollout state)` as the new state, under the model's lock, so that two commands
        cannot both start or continue a rollout; `change` raises to refuse."""
        with self._lock(model) as lock:
            state = change(self.rollout(model))
            write_atomically(self.filesystem, f"{self._model_dir(model)}/{ROLLOUT_RECORD}", json_bytes(state),
                             fence=lock.check)
        return state

    def resolve(self, model: str, alias: str) -> int | None:
        """The version an alias points at, or None when the alias is not set."""
        return self.aliases(model).get(_check_name(alias, key="serve.alias"), {}).get("version")

    def history(self, model: str) -> list[dict]:
        """Every recorded event of `model` in the order they happened; a torn event file is skipped with a warning
        naming it (the events around it stand on their own)."""
        history_dir = f"{self._model_dir(model)}/history"
        events = []
        for name in sorted(self._history_names(history_dir), key=lambda name: int(name.split(".")[0])):
            try:
                event = read_json(self.filesystem, f"{history_dir}/{name}")
            except RegistryError as error:
                logger.warning("Skipping a history event that cannot be read: %s", error)
                continue
            if isinstance(event, dict):
                events.append(event)
            else:
                logger.warning("Skipping %s/%s: not an event record", history_dir, name)
        return events

    def fetch(self, model: str, number: int, *, cache_dir: Path) -> Path:
        """A local directory holding version `number`'s files, each verified against its recorded sha256.

        A local registry returns its own version directory (read it, never write to it); a remote one downloads
        into `cache_dir/<model>/<000N>/` once and reuses that copy after checking it again. Raises RegistryError
        naming the file when anything is missing or altered, so a corrupted version is refused at load time.
        """
        record = self.version(model, number)
        version_dir = f"{self._model_dir(model)}/versions/{_version_name(number)}"
        if is_local(self.filesystem):
            _verify_files(self.filesystem, version_dir, record)
            return Path(version_dir)
        return self._download(record, version_dir, Path(cache_dir) / model / _version_name(number))

    def version_location(self, model: str, number: int) -> str:
        """Where version `number`'s files are, for a reader that fetches them itself (vLLM): a local path, or the
        registry's URI scheme with the path inside it (s3://bucket/registry/<model>/versions/000003)."""
        self.version(model, number)  # a committed version, or ValueError naming those there are
        path = f"{self._model_dir(model)}/versions/{_version_name(number)}"
        if is_local(self.filesystem):
            return path
        return f"{self.uri.split('://', 1)[0]}://{path.lstrip('/')}"

    # --- writing ---------------------------------------------------------------------------------------------

    def register(self, model: str, export_dir: Path, *, metadata: dict, dedupe_file: str | None = None) -> dict:
        """Store the files of a local, flat export directory as the next version of `model`; returns its record.

        The number is claimed first and the upload runs without the lock (large models take a while); version.json
        is written last, under the lock, so a crashed upload leaves a number that is never listed nor reused.
        With `dedupe_file` (e.g. "model.safetensors"), a committed version whose file of that name has the same
        sha256 is returned instead of a new version; checked before the upload and again under the lock at commit,
        so two registrations of the same weights racing each other still make one version.
        """
        model_dir = self._model_dir(model)
        files = _export_files(Path(export_dir))
        _check_metadata(metadata)
        same = self._dedupe_target(files, dedupe_file)
        if same and (existing := self._find_same_file(model, *same, other_than=None)):
            return existing
        number = self._claim_number(model)
        version_dir = f"{model_dir}/versions/{_version_name(number)}"
        checksums = {path.name: self._upload(path, f"{version_dir}/{path.name}") for path in files}
        record = {**metadata, "version": number, "model": model, "created_at": iso(utc_now()), "files": checksums}
        if same:
            same = (same[0], checksums[same[0]]["sha256"])  # what was uploaded, should the file have changed since
        return self._commit(model, record, same=same)

    def move_alias(self, model: str, alias: str, version: int | None, *, reason: str,
                   details: dict | None = None, alias_fields: dict | None = None,
                   expected: int | None | _AnyVersion = ANY_VERSION, preceded_by: dict | None = None,
                   rollout: dict | None = None) -> dict:
        """Point `alias` at a committed version (None removes it) and record the move; returns the history event.

        `details` go into the event only; `alias_fields` (e.g. a canary's {"percent": 10}) are kept on the alias
        record and in the event. `expected` makes the move a compare-and-set: unless the alias is at that version
        (None: unset) when the lock is held, AliasMoved is raised and nothing changes. `preceded_by` is an event
        (e.g. the gate's decision) recorded just before the move under the same lock, so a decision and the move
        it allowed are in the history together or not at all; the move's event names its seq as "preceded_by".
        `rollout` is a rollout state (serve/rollout.py) written under the same lock: a judge's rollback or promotion
        and the rollout's end are one step.
        """
        model_dir = self._model_dir(model)
        _check_name(alias, key="serve.alias")
        if version is not None:
            _check_version_number(version, key="version")
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"reason: expected a non-empty string explaining the move, got {reason!r}")
        details = _check_extra_fields(details, key="details")
        alias_fields = _check_extra_fields(alias_fields, key="alias_fields")
        with self._lock(model) as lock:
            if version is not None:
                self._check_committed(model, alias, version)
            aliases, now = self.aliases(model), iso(utc_now())
            previous = aliases.pop(alias, {}).get("version")
            if expected is not ANY_VERSION and previous != expected:
                raise AliasMoved(model, alias, expected=expected, current=previous)
            if version is not None:
                aliases[alias] = {**alias_fields, "version": version, "moved_at": now, "reason": reason,
                                  "lock_token": lock.token}
            write_atomically(self.filesystem, f"{model_dir}/aliases.json", json_bytes(aliases), fence=lock.check)
            if rollout is not None:
                write_atomically(self.filesystem, f"{model_dir}/{ROLLOUT_RECORD}", json_bytes(rollout),
                                 fence=lock.check)
            links = {}
            if preceded_by is not None:
                links["preceded_by"] = self._append_event(lock, model_dir, {"at": now, **preceded_by})["seq"]
            event = self._append_event(lock, model_dir, {**alias_fields, **details, **links, "event": "alias",
                                                         "alias": alias, "from": previous, "to": version, "at": now,
                                                         "reason": reason})
        logger.info("Moved %s alias %r from version %s to %s: %s", model, alias, previous, version, reason)
        return event

    def record(self, model: str, event: dict) -> dict:
        """Append an event that moves nothing (e.g. a refused promotion with the gate's numbers); returns it."""
        model_dir = self._model_dir(model)
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            raise ValueError(f"event: expected a dict with a string 'event' field naming its kind, got {event!r}")
        if "seq" in event:
            raise ValueError("event.seq: the registry numbers events itself; remove the field")
        with self._lock(model) as lock:
            return self._append_event(lock, model_dir, event)

    # --- internals -------------------------------------------------------------------------------------------

    def _model_dir(self, model: str) -> str:
        return f"{self.root}/{_check_name(model, key='serve.model')}"

    def _lock(self, model: str) -> contextlib.AbstractContextManager[HeldLock]:
        return held_lock(self.filesystem, self._model_dir(model), model=model, lease_s=self.lock_lease_s,
                          timeout_s=self.lock_timeout_s)

    def _exclusive(self) -> bool:
        return local_path(self.filesystem, self.root) is not None

    def _check_committed(self, model: str, alias: str, version: int) -> None:
        try:
            self._read_version(model, version)  # read by name: a listing may not show it yet on NFS
        except FileNotFoundError:
            raise ValueError(f"version: model {model!r} has no committed version {version} to point alias {alias!r} "
                             f"at; committed versions: {self._committed_numbers(self._model_dir(model))}") from None

    def _read_version(self, model: str, number: int) -> dict:
        path = f"{self._model_dir(model)}/versions/{_version_name(number)}/{VERSION_RECORD}"
        return _check_version_record(read_json(self.filesystem, path), path, model=model, number=number)

    def _committed_numbers(self, model_dir: str) -> list[int]:
        versions_dir = f"{model_dir}/versions/"
        numbers = []
        for info in list_dir(self.filesystem, versions_dir.rstrip("/"), recursive=True):
            parts = info.path.removeprefix(versions_dir).split("/")
            if len(parts) == 2 and parts[0].isdigit() and parts[1] == VERSION_RECORD:
                numbers.append(int(parts[0]))
        return sorted(numbers)

    def _claimed_numbers(self, model_dir: str) -> list[int]:
        return [int(info.base_name) for info in list_dir(self.filesystem, f"{model_dir}/versions")
                if info.type == pafs.FileType.Directory and info.base_name.isdigit()]

    def _claim_number(self, model: str) -> int:
        # Every directory counts, committed or not, so a number whose upload crashed is never handed out again.
        model_dir = self._model_dir(model)
        claim = {"claimed_at": iso(utc_now()), "pid": os.getpid(), "host": socket.gethostname()}
        if self._exclusive():
            # The listing is only a first guess (NFS may not show recent claims); the exclusive create decides.
            number = max(self._claimed_numbers(model_dir), default=0) + 1
            while not create_exclusively(self._claim_path(model_dir, number),
                                          json_bytes({**claim, "version": number})):
                number += 1
            return number
        with self._lock(model) as lock:
            number = max(self._claimed_numbers(model_dir), default=0) + 1
            write_atomically(self.filesystem, self._claim_path(model_dir, number),
                              json_bytes({**claim, "version": number, "lock_token": lock.token}), fence=lock.check)
        return number

    def _claim_path(self, model_dir: str, number: int) -> str:
        path = f"{model_dir}/versions/{_version_name(number)}/{CLAIM_RECORD}"
        return local_path(self.filesystem, path) if self._exclusive() else path

    def _dedupe_target(self, files: list[Path], dedupe_file: str | None) -> tuple[str, str] | None:
        if dedupe_file is None:
            return None
        matches = [path for path in files if path.name == dedupe_file]
        if not matches:
            raise ValueError(f"dedupe_file: the export has no file {dedupe_file!r} (it has "
                             f"{sorted(path.name for path in files)})")
        return dedupe_file, _file_sha256(matches[0])

    def _find_same_file(self, model: str, name: str, sha256: str, *, other_than: int | None) -> dict | None:
        """A committed version (not `other_than`) whose file `name` has this sha256, if any."""
        for number in self._numbers_to_compare(model, exact=other_than is not None):
            if number == other_than:
                continue
            with contextlib.suppress(FileNotFoundError, RegistryError):  # not committed, or not to be trusted
                record = self._read_version(model, number)
                if record["files"].get(name, {}).get("sha256") == sha256:
                    logger.info("These weights are already registered as %s version %d", model, number)
                    return record
        return None

    def _numbers_to_compare(self, model: str, *, exact: bool) -> Iterator[int]:
        """Version numbers that may be committed. `exact` (under the lock, at commit) must not miss one: on a local
        path a listing may not show a version committed a moment ago (NFS), so every number up to the highest
        claim is read by name, and claims beyond what the listing shows are followed; S3 and GCS list exactly."""
        model_dir = self._model_dir(model)
        if not (exact and self._exclusive()):
            yield from self._committed_numbers(model_dir)
            return
        number, listed = 1, max(self._claimed_numbers(model_dir), default=0)
        while number <= listed or self.filesystem.get_file_info(
                f"{model_dir}/versions/{_version_name(number)}/{CLAIM_RECORD}").type == pafs.FileType.File:
            yield number
            number += 1

    def _commit(self, model: str, record: dict, *, same: tuple[str, str] | None) -> dict:
        model_dir, number = self._model_dir(model), record["version"]
        version_dir = f"{model_dir}/versions/{_version_name(number)}"
        with self._lock(model) as lock:
            if same and (existing := self._find_same_file(model, *same, other_than=number)):
                for name in record["files"]:  # the claim stays, so the number is never reused
                    delete_quietly(self.filesystem, f"{version_dir}/{name}")
                return existing
            record = {**record, "lock_token": lock.token}
            write_atomically(self.filesystem, f"{version_dir}/{VERSION_RECORD}", json_bytes(record),
                              fence=lock.check)
            self._append_event(lock, model_dir, {"event": "register", "version": number})
        logger.info("Registered %s version %d (%d files) in %s", model, number, len(record["files"]), self.uri)
        return record

    def _history_names(self, history_dir: str) -> list[str]:
        return [info.base_name for info in list_dir(self.filesystem, history_dir)
                if re.fullmatch(r"\d+\.json", info.base_name)]

    def _append_event(self, lock: HeldLock, model_dir: str, event: dict) -> dict:
        """Write the next numbered history file, fenced by `lock` (which the caller holds)."""
        history_dir = f"{model_dir}/history"
        seq = max((int(name.split(".")[0]) for name in self._history_names(history_dir)), default=0) + 1
        while True:
            stored = {"at": iso(utc_now()), **event, "lock_token": lock.token, "seq": seq}
            path = f"{history_dir}/{seq:08d}.json"
            if not self._exclusive():  # the listing is exact there
                write_atomically(self.filesystem, path, json_bytes(stored), fence=lock.check)
                return stored
            # A listing may lag on NFS: the exclusive create finds the numbers it did not show.
            if create_exclusively(local_path(self.filesystem, path), json_bytes(stored), fence=lock.check):
                return stored
            seq += 1

    def _upload(self, local_path: Path, remote_path: str) -> dict:
        with open(local_path, "rb") as source, open_output(self.filesystem, remote_path) as sink:
            return digest_stream(source, sink)

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
                        actual = digest_stream(source, sink)
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
