"""The audit log: append-only rows in the feedback store's database, mirrored as MLflow tags."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from medattn.feedback.audit import PROMOTE, RECALIBRATION, list_events, record_event
from medattn.feedback.schema import InvalidFeedback
from medattn.feedback.store import FeedbackStore


@pytest.fixture
def store(tmp_path: Path):
    with FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}") as opened:
        yield opened


def test_events_are_recorded_in_order_and_survive_reopening(store: FeedbackStore, tmp_path: Path) -> None:
    first = record_event(store, "alice", PROMOTE, "1", "2", {"reason": "accepted"}, model_name="m")
    second = record_event(store, "scheduler", RECALIBRATION, "2", "3", {"feedback_ids": ["a", "b"]}, model_name="m")
    assert second.id > first.id
    with FeedbackStore(store.url.render_as_string(hide_password=False)) as reopened:
        events = list_events(reopened)
    assert [(e.actor, e.action, e.from_version, e.to_version) for e in events] == [
        ("alice", "promote", "1", "2"), ("scheduler", "recalibration", "2", "3")]
    assert events[1].details == {"feedback_ids": ["a", "b"]}
    assert [e.id for e in list_events(store, action=RECALIBRATION)] == [second.id]
    assert [e.id for e in list_events(store, limit=1, offset=1)] == [second.id]


def test_the_table_refuses_updates_and_deletes(store: FeedbackStore) -> None:
    record_event(store, "alice", PROMOTE, "1", "2", model_name="m")
    for statement in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events"):
        with pytest.raises(DatabaseError, match="append-only"):
            with store.engine.begin() as conn:
                conn.execute(text(statement))
    assert [e.actor for e in list_events(store)] == ["alice"]


@pytest.mark.parametrize("actor, action", [("", PROMOTE), ("alice", "delete"), ("x" * 500, PROMOTE)])
def test_bad_events_are_refused_with_one_line(store: FeedbackStore, actor: str, action: str) -> None:
    with pytest.raises(InvalidFeedback):
        record_event(store, actor, action, None, None)
    assert list_events(store) == []
