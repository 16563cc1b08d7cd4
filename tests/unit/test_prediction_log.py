"""Group commit of served predictions: one transaction for what waits, answers only after the commit."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import text

from medattn.feedback.schema import FeedbackConflict, InvalidFeedback, UnknownRequest
from medattn.feedback.store import FeedbackStore
from medattn.serving.prediction_log import PredictionWriter

SHA = "ab" * 32


def row(request_id: str, label: str = "a") -> dict[str, Any]:
    return dict(request_id=request_id, image_sha256=SHA, width=4, height=3, model_name="m",
                model_version="1", label=label, probabilities={"a": 0.75, "b": 0.25})


class GatedStore(FeedbackStore):
    """A real SQLite store whose group commits wait for ``gate`` (so rows pile up meanwhile)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.group_sizes: list[int] = []

    def record_predictions(self, rows):  # type: ignore[override]
        self.entered.set()
        assert self.gate.wait(30)
        self.group_sizes.append(len(rows))
        return super().record_predictions(rows)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GatedStore]:
    with GatedStore(f"sqlite:///{tmp_path / 'feedback.db'}") as opened:
        yield opened


def count_rows(store: FeedbackStore) -> int:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT COUNT(*) FROM predictions")).scalar_one()


def test_waiting_rows_share_one_commit_and_no_future_resolves_before_it(store: GatedStore) -> None:
    writer = PredictionWriter(store)
    try:
        first = writer.submit(row("r0"))
        assert store.entered.wait(30)  # the writer is inside the first commit, held at the gate
        later = [writer.submit(row(f"r{i}")) for i in range(1, 6)]
        assert not first.done() and not any(f.done() for f in later)
        assert count_rows(store) == 0  # nothing is answered, nothing is stored yet
        store.gate.set()
        records = [f.result(30) for f in [first, *later]]
    finally:
        writer.close()
    assert [r.request_id for r in records] == [f"r{i}" for i in range(6)]
    assert store.group_sizes == [1, 5] and writer.groups_committed == 2
    assert count_rows(store) == 6
    assert store.get_prediction("r3").probabilities == {"a": 0.75, "b": 0.25}


def test_a_bad_row_fails_only_its_own_request(store: GatedStore) -> None:
    store.gate.set()
    store.record_prediction(**row("taken", label="a"))
    writer = PredictionWriter(store)
    try:
        store.gate.clear()
        store.entered.clear()
        blocker = writer.submit(row("first"))
        assert store.entered.wait(30)
        clash, fine = writer.submit(row("taken", label="b")), writer.submit(row("fine"))
        store.gate.set()
        blocker.result(30)
        with pytest.raises(FeedbackConflict):
            clash.result(30)
        assert fine.result(30).request_id == "fine"
    finally:
        writer.close()
    assert store.get_prediction("taken").label == "a"  # not overwritten
    assert store.get_prediction("fine").label == "a"


def test_invalid_row_is_refused_with_the_stores_error(store: GatedStore) -> None:
    store.gate.set()
    writer = PredictionWriter(store)
    try:
        with pytest.raises(InvalidFeedback):
            writer.submit({**row("x"), "image_sha256": "not-a-digest"}).result(30)
    finally:
        writer.close()
    with pytest.raises(UnknownRequest):
        store.get_prediction("x")


def test_async_record_and_close_commit_what_is_queued(store: GatedStore) -> None:
    store.gate.set()
    writer = PredictionWriter(store)

    async def many() -> list[str]:
        records = await asyncio.gather(*(writer.record(row(f"a{i}")) for i in range(20)))
        return [r.request_id for r in records]

    assert asyncio.run(many()) == [f"a{i}" for i in range(20)]
    store.gate.clear()
    queued = writer.submit(row("last"))
    threading.Timer(0.2, store.gate.set).start()
    writer.close()
    assert queued.result(0).request_id == "last"
    assert count_rows(store) == 21
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(row("after"))
