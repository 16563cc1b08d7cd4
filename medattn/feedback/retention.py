"""Retention of uploaded images: the blobs of predictions that never received feedback expire.

Every prediction stores its image so that an expert can give feedback on it later; most never
get any. After ``upload_retention_hours`` (setting ``MEDATTN_UPLOAD_RETENTION_HOURS``, 0 = keep
forever) such a prediction is forgotten and its image deleted - unless anything still cites the
image: feedback (through its prediction or its own ``image_sha256``) or a younger prediction of
the same bytes. Feedback's images are never expired. The API runs a sweep at most every
``retention_sweep_seconds``, in the background after a prediction.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Optional

from medattn.feedback.blobs import BlobStore
from medattn.feedback.store import FeedbackStore

log = logging.getLogger("medattn.feedback")


class UploadRetention:
    """``sweep()`` removes what has expired; ``maybe_sweep()`` does so at most once per interval."""

    def __init__(self, store: FeedbackStore, blobs: BlobStore, retention_hours: float,
                 sweep_seconds: float) -> None:
        self.store = store
        self.blobs = blobs
        self.retention = timedelta(hours=retention_hours)
        self.sweep_seconds = sweep_seconds
        self._last_sweep: Optional[float] = None
        self._running = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.retention > timedelta(0)

    def sweep(self, now: Optional[datetime] = None) -> tuple[int, int]:
        """Expire now; returns (predictions forgotten, images deleted)."""
        cutoff = (now or datetime.now(timezone.utc)) - self.retention
        removed = self.store.expire_uncited_predictions(cutoff, self.blobs.delete)
        if removed[0]:
            log.info("retention: forgot %d predictions older than %s without feedback, deleted %d images",
                     removed[0], cutoff.isoformat(timespec="seconds"), removed[1])
        return removed

    def due(self) -> bool:
        """Cheap: whether a sweep would run now."""
        return self.enabled and (self._last_sweep is None
                                 or time.monotonic() - self._last_sweep >= self.sweep_seconds)

    def sweep_in_background(self) -> None:
        """Start a sweep in a daemon thread when one is due (the request that noticed does not wait)."""
        if self.due() and not self._running.locked():
            threading.Thread(target=self._logged_sweep, name="upload-retention", daemon=True).start()

    def _logged_sweep(self) -> None:
        try:
            self.maybe_sweep()
        except Exception:  # noqa: BLE001 - a failed sweep is retried at the next interval
            log.exception("retention sweep failed")

    def maybe_sweep(self) -> Optional[tuple[int, int]]:
        """Sweep when enabled and the interval has passed; one sweep at a time (never blocks)."""
        if not self.enabled or not self._running.acquire(blocking=False):
            return None
        try:
            now = time.monotonic()
            if self._last_sweep is not None and now - self._last_sweep < self.sweep_seconds:
                return None
            self._last_sweep = now
            return self.sweep()
        finally:
            self._running.release()
