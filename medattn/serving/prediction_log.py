"""Group commit of served predictions: one writer thread, one transaction for all that are waiting.

Every answered prediction is first recorded in the feedback store, so that feedback can cite its
``request_id`` (:meth:`medattn.serving.backend.ServingBackend.predict`). Recorded one per request,
concurrent requests of one API process each opened a write transaction: SQLite lets one writer
in at a time and the others poll its lock with growing sleeps (``busy_timeout``), and every
commit paid its own fsync - at 8 concurrent clients the largest cost after the model itself.

:class:`PredictionWriter` queues the rows instead. One thread takes everything that is waiting
(up to ``max_group`` rows), stores it with :meth:`FeedbackStore.record_predictions` in one
transaction and only then resolves each row's future. **The durability rule is unchanged**: a
request's answer waits for the commit that holds its row (``await writer.record(...)``), so no
client ever receives a ``request_id`` the store does not have. A failed group is retried row by
row, so one bad row fails only its own request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from medattn.feedback.store import FeedbackStore, PredictionRecord

log = logging.getLogger("medattn.serving")

DEFAULT_MAX_GROUP = 64
_STOP = object()


class PredictionWriter:
    """``await record(row)``: returns once ``row`` is committed (see the module docstring)."""

    def __init__(self, store: FeedbackStore, max_group: int = DEFAULT_MAX_GROUP) -> None:
        self.store = store
        self.max_group = max_group
        self.groups_committed = 0  # for tests and logs: how many transactions carried the rows
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="prediction-writer", daemon=True)
        self._closed = False
        self._thread.start()

    async def record(self, row: Mapping[str, Any]) -> PredictionRecord:
        """Queue ``row`` (keyword arguments of ``FeedbackStore.record_prediction``); wait for its commit."""
        return await asyncio.wrap_future(self.submit(row))

    def submit(self, row: Mapping[str, Any]) -> "Future[PredictionRecord]":
        """The thread-side form of :meth:`record`: a future resolved after the commit."""
        if self._closed:
            raise RuntimeError("prediction writer is closed")
        future: "Future[PredictionRecord]" = Future()
        self._queue.put((dict(row), future))
        return future

    def close(self, timeout_s: float = 30.0) -> None:
        """Commit what is queued, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            group, stop = [first], False
            while len(group) < self.max_group:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                group.append(item)
            self._commit(group)
            if stop:
                return

    def _commit(self, group: list[tuple[dict[str, Any], "Future[PredictionRecord]"]]) -> None:
        rows = [row for row, _ in group]
        try:
            records = self.store.record_predictions(rows)
            self.groups_committed += 1
        except Exception as exc:  # noqa: BLE001 - retried one by one: only the bad row's request fails
            log.warning("group commit of %d predictions failed (%s); recording them one by one",
                        len(rows), type(exc).__name__)
            for row, future in group:
                self._commit_one(row, future)
            return
        for (_, future), record in zip(group, records, strict=True):
            future.set_result(record)

    def _commit_one(self, row: dict[str, Any], future: "Future[PredictionRecord]") -> None:
        try:
            record = self.store.record_prediction(**row)
            self.groups_committed += 1
        except Exception as exc:  # noqa: BLE001 - handed to the request that owns the row
            future.set_exception(exc)
            return
        future.set_result(record)
