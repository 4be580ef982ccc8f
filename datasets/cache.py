"""Prepared-data directories that are either complete or absent.

A directory is built under a temporary sibling name and renamed into place, so a crash never leaves a
directory that looks complete, and two processes preparing the same data both end up using one copy. Its
meta.json, written last by the builder, is what marks it complete.
"""

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

logger = logging.getLogger(__name__)

META_FILE = "meta.json"


def prepared_from_dict(cls, data: dict, *, what: str):
    """A prepared-data description (a plain-data dataclass, as it travels to Ray workers) from its dict; a
    missing key is named, and extra keys are ignored."""
    names = [field.name for field in fields(cls)]
    missing = [name for name in names if name not in data]
    if missing:
        raise ValueError(f"prepared {what} description lacks keys {missing}; expected all of {names}")
    return cls(**{name: data[name] for name in names})


def read_meta(root: Path, *, required: set[str]) -> dict | None:
    """The meta.json of a complete prepared directory, or None when it is absent, unreadable or incomplete."""
    try:
        meta = json.loads((root / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not required <= meta.keys():
        return None
    return meta


def write_meta(directory: Path, meta: dict) -> None:
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def build_into_place(target: Path, build: Callable[[Path], None], *, is_complete: Callable[[Path], bool]) -> None:
    """Run `build(staging_dir)` and rename the result to `target`; `build` writes meta.json last."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the prepared data is meant to be read by other processes
    try:
        build(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists() and not is_complete(target):
        # Renames are atomic, so only a hand-edited or damaged copy can lack its meta.json: replace it.
        logger.warning("replacing incomplete prepared data at %s", target)
        shutil.rmtree(target)
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not is_complete(target):
            raise
        logger.info("another process prepared %s first; using its copy", target)
