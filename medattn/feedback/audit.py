"""The audit log: who did what to which model version, when (append-only, in the feedback store's database).

Medical users must be able to say who accepted a model. Every expert feedback, promotion,
rollback and recalibration appends one row::

    id  created_at (UTC)  actor (token name)  action  model_name  from_version  to_version  details (JSON)

``action`` is one of :data:`ACTIONS`. Rows are never updated or deleted: the API here only
inserts and reads, and the database itself refuses ``UPDATE`` / ``DELETE`` on the table
(a trigger on SQLite and on PostgreSQL), so a bug elsewhere cannot rewrite history either.

Each event is mirrored as MLflow tags (:func:`mirror_to_mlflow`) on the version it moved to
(``audit.<action>.by``, ``.at``, ``.event_id``, ``.from_version``), so the registry UI shows it too.

    record_event(store, actor, action, from_version, to_version, details) -> AuditEvent
    list_events(store, action=None, model_name=None, since=None, limit=100, offset=0) -> list[AuditEvent]
    alias_change_recorder(store, actor, tracking_uri) -> callback for the registry's ``on_change``
    record_feedback_event(store, actor, record) -> AuditEvent (once per feedback record)

Who writes them: ``POST /feedback`` (the token's name), ``POST /promote`` / ``/rollback`` and the
review page's Accept / Roll back (the admin token's name), ``medattn model promote|rollback``
(``--actor``, default the login name), the register stage's gate when it promotes
(``$MEDATTN_ACTOR`` or ``register-stage``) and ``medattn recalibrate`` / ``medattn scheduler``
(recalibration, and its auto-promote). Promotions and rollbacks are recorded inside the registry's
alias lock, after the alias moved, and undone if the row cannot be written
(:mod:`medattn.registry.aliases`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, insert, select, text

from medattn.errors import MedattnError, first_line
from medattn.feedback.schema import MAX_NAME_LENGTH, InvalidFeedback
from medattn.feedback.store import MAX_PAGE, FeedbackStore, UtcDateTime

if TYPE_CHECKING:
    from medattn.feedback.store import FeedbackRecord
    from medattn.registry.aliases import AliasChange

log = logging.getLogger("medattn.audit")

FEEDBACK = "feedback"
PROMOTE = "promote"
ROLLBACK = "rollback"
RECALIBRATION = "recalibration"
ACTIONS = (FEEDBACK, PROMOTE, ROLLBACK, RECALIBRATION)
MAX_DETAILS_CHARS = 20_000

# A MetaData of its own: the feedback store's schema version covers its own tables only, and
# create_all never alters an existing table, so adding this one needs no migration.
audit_metadata = MetaData()

audit_events = Table(
    "audit_events", audit_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", UtcDateTime, nullable=False, index=True),
    Column("actor", String(MAX_NAME_LENGTH), nullable=False),
    Column("action", String(32), nullable=False, index=True),
    Column("model_name", String(MAX_NAME_LENGTH), nullable=True),
    Column("from_version", String(MAX_NAME_LENGTH), nullable=True),
    Column("to_version", String(MAX_NAME_LENGTH), nullable=True),
    Column("details", JSON, nullable=False),
)

_SQLITE_GUARDS = [
    f"CREATE TRIGGER IF NOT EXISTS audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events "
    "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END"
    for verb in ("UPDATE", "DELETE")
]
_POSTGRES_GUARDS = [
    "CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION 'audit_events is append-only'; END; $$ LANGUAGE plpgsql",
    "DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events",
    "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
    "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()",
]


@dataclass(frozen=True)
class AuditEvent:
    id: int
    created_at: datetime
    actor: str
    action: str
    model_name: Optional[str]
    from_version: Optional[str]
    to_version: Optional[str]
    details: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "created_at": self.created_at.isoformat(), "actor": self.actor,
                "action": self.action, "model_name": self.model_name, "from_version": self.from_version,
                "to_version": self.to_version, "details": self.details}


_ready: set[str] = set()  # store URLs whose audit table exists (created once per process)


def ensure_audit_table(store: FeedbackStore) -> None:
    """Create the table and its append-only guards if missing (idempotent, safe concurrently)."""
    if store.safe_url in _ready:
        return
    # the store's own transaction helper: BEGIN IMMEDIATE on SQLite, StoreUnavailable on failure
    with store._transaction(write=True) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": 0x61756469})
        audit_metadata.create_all(conn)
        for statement in (_POSTGRES_GUARDS if conn.dialect.name == "postgresql" else _SQLITE_GUARDS):
            conn.execute(text(statement))
    _ready.add(store.safe_url)


def _name_or_none(value: Optional[object], field: str) -> Optional[str]:
    if value is None:
        return None
    value = str(value).strip()
    if not 0 < len(value) <= MAX_NAME_LENGTH:
        raise InvalidFeedback(f"audit {field} must be 1 to {MAX_NAME_LENGTH} characters")
    return value


def record_event(store: FeedbackStore, actor: str, action: str, from_version: Optional[object],
                 to_version: Optional[object], details: Optional[Mapping[str, Any]] = None, *,
                 model_name: Optional[str] = None) -> AuditEvent:
    """Append one event, committed before this returns; ``actor`` is the token's name."""
    if action not in ACTIONS:
        raise InvalidFeedback(f"audit action must be one of {', '.join(ACTIONS)}, got {action!r}")
    actor_name = _name_or_none(actor, "actor")
    if actor_name is None:
        raise InvalidFeedback("audit actor must not be empty")
    payload = json.loads(json.dumps(dict(details or {}), default=str))
    if len(json.dumps(payload)) > MAX_DETAILS_CHARS:
        raise InvalidFeedback(f"audit details must be at most {MAX_DETAILS_CHARS} characters of JSON")
    ensure_audit_table(store)
    row = dict(created_at=datetime.now(timezone.utc), actor=actor_name, action=action,
               model_name=_name_or_none(model_name, "model_name"),
               from_version=_name_or_none(from_version, "from_version"),
               to_version=_name_or_none(to_version, "to_version"), details=payload)
    with store._transaction(write=True) as conn:
        new_id = conn.execute(insert(audit_events).values(**row).returning(audit_events.c.id)).scalar_one()
    return AuditEvent(id=int(new_id), **row)


def list_events(store: FeedbackStore, *, action: Optional[str] = None, model_name: Optional[str] = None,
                since: Optional[datetime] = None, limit: int = 100, offset: int = 0) -> list[AuditEvent]:
    """Events oldest first (by id, which is also commit order), filtered and paged."""
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise InvalidFeedback(f"limit must be in [1, {MAX_PAGE}] and offset >= 0, got {limit} and {offset}")
    if action is not None and action not in ACTIONS:
        raise InvalidFeedback(f"audit action must be one of {', '.join(ACTIONS)}, got {action!r}")
    ensure_audit_table(store)
    query = select(audit_events)
    if action is not None:
        query = query.where(audit_events.c.action == action)
    if model_name is not None:
        query = query.where(audit_events.c.model_name == model_name)
    if since is not None:
        query = query.where(audit_events.c.created_at >= since)
    with store._transaction() as conn:
        rows = conn.execute(query.order_by(audit_events.c.id).limit(limit).offset(offset)).all()
    return [AuditEvent(**{**row._asdict(), "id": int(row.id)}) for row in rows]


def mirror_to_mlflow(event: AuditEvent, tracking_uri: str, run_id: Optional[str] = None) -> None:
    """Copy the event to MLflow: tags on the version it moved to (and on ``run_id``'s run, if given)."""
    from medattn.registry._mlflow import client_for, mlflow_errors

    tags = {f"audit.{event.action}.by": event.actor, f"audit.{event.action}.at": event.created_at.isoformat(),
            f"audit.{event.action}.event_id": str(event.id),
            f"audit.{event.action}.from_version": event.from_version or ""}
    client = client_for(tracking_uri)
    with mlflow_errors(tracking_uri):
        if event.model_name and event.to_version:
            for key, value in tags.items():
                client.set_model_version_tag(event.model_name, event.to_version, key, value)
        if run_id:
            for key, value in tags.items():
                client.set_tag(run_id, key, value)


def alias_change_recorder(store: FeedbackStore, actor: str, tracking_uri: str) -> Callable[["AliasChange"], None]:
    """The registry's ``on_change`` callback: append the promote / rollback row, then mirror it.

    The table is made ready here, before the caller moves any alias, so the usual failure (the
    database unreachable) stops a promote before it starts rather than undoing it afterwards.
    The MLflow mirror is a copy: the row is the record, so a failing mirror is logged, not undone.
    """
    _name_or_none(actor, "actor")
    ensure_audit_table(store)

    def record(change: "AliasChange") -> None:
        event = record_event(store, actor, change.action, change.from_version, change.to_version, change.details,
                             model_name=change.model_name)
        try:
            mirror_to_mlflow(event, tracking_uri)
        except (MedattnError, OSError) as exc:
            log.warning("audit event %s recorded; its MLflow mirror failed: %s", event.id, first_line(exc))

    return record


def feedback_event(store: FeedbackStore, feedback_id: str) -> Optional[AuditEvent]:
    """The audit row of one feedback record, if written (``details.feedback_id``)."""
    ensure_audit_table(store)
    query = (select(audit_events).where(audit_events.c.action == FEEDBACK)
             .where(audit_events.c.details["feedback_id"].as_string() == str(feedback_id))
             .order_by(audit_events.c.id).limit(1))
    with store._transaction() as conn:
        row = conn.execute(query).first()
    return AuditEvent(**{**row._asdict(), "id": int(row.id)}) if row is not None else None


def record_feedback_event(store: FeedbackStore, actor: str, record: "FeedbackRecord") -> AuditEvent:
    """Append the row of a stored feedback record, unless it has one (a retried submission)."""
    existing = feedback_event(store, str(record.id))
    if existing is not None:
        return existing
    return record_event(store, actor, FEEDBACK, None, record.model_version,
                        {"feedback_id": str(record.id), "request_id": record.request_id,
                         "expert_id": record.expert_id, "rois": len(record.rois)},
                        model_name=record.model_name)


__all__ = ["ACTIONS", "AuditEvent", "FEEDBACK", "PROMOTE", "RECALIBRATION", "ROLLBACK", "alias_change_recorder",
           "ensure_audit_table", "feedback_event", "list_events", "mirror_to_mlflow", "record_event",
           "record_feedback_event"]
