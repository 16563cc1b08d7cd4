"""Content-addressed store for the images experts give feedback on.

An image is kept once, under the SHA-256 of its bytes: ``root/ab/cdef...`` (the first two hex
digits name a sub-folder so no folder grows past 256 entries per level). Writes are crash-safe:
``medattn.atomic_files`` with ``durable=True`` writes a temporary sibling, fsyncs it, renames it
into place and fsyncs the folder, so the rename itself survives a power cut. A reader therefore
sees a complete blob or none, and putting the same bytes twice (even from two processes at once)
is harmless. :meth:`BlobStore.delete` is for retention (:mod:`medattn.feedback.retention`) only.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Union

from medattn.atomic_files import fsync_dir, write_bytes_atomic
from medattn.feedback.schema import FeedbackNotFound, InvalidFeedback

DEFAULT_BLOB_ROOT = Path(".medattn/blobs")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class BlobStore:
    """``put(bytes) -> sha256``, ``get(sha256) -> bytes`` over a folder."""

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    def path(self, sha256: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists)."""
        if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
            raise InvalidFeedback(f"{sha256!r} is not a SHA-256 digest (64 lowercase hex digits)")
        return self.root / sha256[:2] / sha256[2:]

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes) -> str:
        """Store ``data`` durably and return its SHA-256 hex digest (idempotent)."""
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if target.is_file():
            return sha256
        folder = target.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)  # the new sub-folder's entry must survive a crash too
        write_bytes_atomic(target, data, durable=True)
        return sha256

    def delete(self, sha256: str) -> bool:
        """Remove the blob (retention); True when there was one. Callers decide nothing cites it."""
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def get(self, sha256: str) -> bytes:
        """The blob's bytes; :class:`FeedbackNotFound` when there is none."""
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise FeedbackNotFound(f"no image {sha256} in blob store {self.root}") from None
