"""The one way medattn writes a file or folder that something else may be reading.

Every output goes to a temporary sibling first and is renamed onto its final name only when
complete, so a reader (DVC, MLflow, the service, a concurrent stage) sees the old version or
the new one, never half a file, and a killed writer leaves the previous version intact.
``durable=True`` also fsyncs the data and the folder entry, for records that must survive a
power cut (feedback blobs), at the cost of a disk flush per write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _temp_sibling(target: Path, suffix: str = ".tmp") -> Path:
    # Not mkstemp: its 0600 mode would stick to the final file; a unique name is enough.
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` survive a crash (POSIX)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(target)
    try:
        yield temp
        if durable:
            with open(temp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temp, target)
        if durable:
            fsync_dir(target.parent)
    finally:
        temp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes, durable: bool = False) -> Path:
    with atomic_path(path, durable=durable) as temp:
        temp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_path(path, durable=durable) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, payload: Any, sort_keys: bool = False) -> Path:
    """Pretty JSON (2-space indent, trailing newline) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder next to ``path``; it replaces ``path`` (a folder) on success.

    A folder cannot be renamed onto a non-empty one, so the old folder is first renamed aside
    and deleted after the swap: between the two renames ``path`` is briefly absent, but it is
    never half-written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the result is an ordinary folder
    try:
        yield staging
        if target.exists():
            retired = _temp_sibling(target, ".old")
            os.rename(target, retired)
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
