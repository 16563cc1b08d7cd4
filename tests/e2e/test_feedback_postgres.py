"""The feedback store's backend-agnostic tests, re-run against a real PostgreSQL server.

The test functions are those of ``tests/unit/test_feedback_store.py``; only the ``store_url``
fixture differs (a fresh database per test on a server started by ``tests/postgres_server.py``).
Without the PostgreSQL binaries these fail under ``CI=true`` and skip otherwise.
"""

from __future__ import annotations

import sys
from datetime import timezone
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import text

# tests/ is not a package: put the shared fixture module and the SQLite suite on the path so this
# works the same under `pytest` and `python -m pytest`, whatever the import mode.
_TESTS = Path(__file__).resolve().parents[1]
for _folder in (_TESTS, _TESTS / "unit"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from postgres_server import postgres_server, postgres_url  # noqa: E402,F401  (fixtures)
from test_feedback_store import (  # noqa: E402,F401  (re-run here)
    SHA_A,
    H,
    W,
    submission,
    test_concurrent_writers_store_every_record_exactly_once,
    test_feedback_is_checked_against_the_prediction,
    test_feedback_on_an_uploaded_image_needs_the_image,
    test_idempotency_key_replays_or_conflicts,
    test_list_filters_and_paging,
    test_pending_consumed_and_released,
    test_record_prediction_is_idempotent_but_not_overwritable,
    test_round_trip_of_prediction_and_feedback,
    test_store_refuses_a_database_of_another_schema_version,
    test_unknown_ids_are_not_found,
)

from medattn.feedback.store import FeedbackStore  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture
def store_url(postgres_url: str) -> str:  # noqa: F811
    return postgres_url


@pytest.fixture
def store(store_url: str) -> Iterator[FeedbackStore]:
    with FeedbackStore(store_url) as opened:
        yield opened


def test_postgres_tables_use_native_types(store: FeedbackStore) -> None:
    assert store.engine.dialect.name == "postgresql" and store.engine.dialect.driver == "psycopg"
    with store.engine.connect() as conn:
        types = dict(conn.execute(text(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'feedback'")).all())
    assert types["id"] == "uuid"
    assert types["created_at"] == "timestamp with time zone"
    record, _ = store.add_feedback(submission(), SHA_A, W, H)
    assert store.get(record.id).created_at.tzinfo == timezone.utc


def test_plain_postgresql_url_uses_psycopg3(store_url: str) -> None:
    with FeedbackStore(store_url.replace("postgresql+psycopg://", "postgresql://")) as store:
        assert store.engine.dialect.driver == "psycopg"


def test_two_stores_starting_together_create_the_schema_once(store_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: FeedbackStore(store_url), range(4)))
    try:
        with stores[0].engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM feedback_schema")).scalar_one() == 1
    finally:
        for opened in stores:
            opened.close()


def test_audit_rows_on_postgres(store: FeedbackStore) -> None:
    """The audit table on PostgreSQL: one row per feedback (found by its JSON detail), append-only."""
    from sqlalchemy.exc import DatabaseError

    from medattn.feedback.audit import PROMOTE, feedback_event, list_events, record_event, record_feedback_event

    record, _ = store.add_feedback(submission(), SHA_A, W, H)
    first = record_feedback_event(store, "expert", record)
    assert record_feedback_event(store, "expert", record).id == first.id
    assert feedback_event(store, str(record.id)).id == first.id and feedback_event(store, "unknown") is None
    promote = record_event(store, "admin", PROMOTE, "1", "2", model_name="m")
    assert [e.id for e in list_events(store)] == [first.id, promote.id]
    assert [e.id for e in list_events(store, action=PROMOTE, since=promote.created_at)] == [promote.id]
    with pytest.raises(DatabaseError, match="append-only"):
        with store.engine.begin() as conn:
            conn.execute(text("DELETE FROM audit_events"))
