"""Durable store of expert feedback and of the predictions it refers to (SQLAlchemy 2 Core).

One URL picks the database: ``sqlite:///path/feedback.db`` (the default, a plain path works
too) or ``postgresql+psycopg://user:pass@host/db`` (``postgresql://`` is read as psycopg 3).
SQLite runs in WAL mode with ``synchronous=FULL`` so a commit is on disk when
:meth:`FeedbackStore.add_feedback` returns, ``busy_timeout`` so concurrent writers wait instead
of failing, and foreign keys on; writes open with ``BEGIN IMMEDIATE`` so two writers queue up
front rather than fail mid-transaction when upgrading a read lock.

Migration story: tables are made with ``metadata.create_all`` at start, which creates missing
tables and never alters existing ones. The ``feedback_schema`` table records
``SCHEMA_VERSION``; a release that changes a table bumps it and ships an Alembic migration,
and a store opened on a database of another version refuses to start (``StoreUnavailable``)
rather than write rows the code cannot read back.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import TypeAdapter
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError

from medattn.errors import first_line
from medattn.feedback.schema import (
    MAX_NAME_LENGTH,
    FeedbackConflict,
    FeedbackNotFound,
    FeedbackSubmission,
    InvalidFeedback,
    Roi,
    StoreUnavailable,
    UnknownRequest,
)

SCHEMA_VERSION = 1
DEFAULT_FEEDBACK_DB_URL = "sqlite:///.medattn/feedback.db"
SQLITE_BUSY_TIMEOUT_MS = 30_000
MAX_PAGE = 1000
_WRITE = "medattn_write"  # connection option read by the SQLite BEGIN hook
_DDL_LOCK_KEY = 0x6D656461  # PostgreSQL advisory lock serialising create_all across processes
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ROIS = TypeAdapter(list[Roi])


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on every backend (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        value = _as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        return None if value is None else _as_utc(value)


def _as_utc(value: datetime) -> datetime:
    """Naive datetimes are taken to be UTC already."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


metadata = MetaData()


def _name() -> String:
    """One column type for every user-given name (model, version, expert, label, retrain)."""
    return String(MAX_NAME_LENGTH)


predictions = Table(
    "predictions", metadata,
    Column("request_id", String(128), primary_key=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("image_sha256", String(64), nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("model_name", _name(), nullable=False),
    Column("model_version", _name(), nullable=False),
    Column("label", _name(), nullable=False),
    Column("probabilities", JSON, nullable=False),
)

feedback = Table(
    "feedback", metadata,
    Column("id", Uuid, primary_key=True),
    Column("created_at", UtcDateTime, nullable=False, index=True),
    Column("request_id", String(128), ForeignKey("predictions.request_id"), nullable=True, index=True),
    Column("image_sha256", String(64), nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("model_name", _name(), nullable=False),
    Column("model_version", _name(), nullable=False, index=True),
    Column("expert_id", _name(), nullable=False),
    Column("rois", JSON, nullable=False),
    Column("corrected_label", _name(), nullable=True),
    Column("comment", Text, nullable=True),
    # NULLs never collide in a UNIQUE column (SQLite and PostgreSQL), so keys stay optional.
    Column("idempotency_key", String(200), nullable=True, unique=True),
    Column("body_sha256", String(64), nullable=False),
    Column("consumed_by_retrain", _name(), nullable=True, index=True),
)

feedback_schema = Table(
    "feedback_schema", metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)


@dataclass(frozen=True)
class PredictionRecord:
    request_id: str
    created_at: datetime
    image_sha256: str
    width: int
    height: int
    model_name: str
    model_version: str
    label: str
    probabilities: Any


@dataclass(frozen=True)
class FeedbackRecord:
    id: uuid.UUID
    created_at: datetime
    request_id: Optional[str]
    image_sha256: str
    width: int
    height: int
    model_name: str
    model_version: str
    expert_id: str
    rois: list[dict[str, Any]]
    corrected_label: Optional[str]
    comment: Optional[str]
    idempotency_key: Optional[str]
    consumed_by_retrain: Optional[str]

    def roi_models(self) -> list[Roi]:
        """The ROIs as schema objects (for rasterising)."""
        return _ROIS.validate_python(self.rois)

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict of the expert's content (no bookkeeping: idempotency key, retrain)."""
        return {
            "id": str(self.id), "created_at": self.created_at.isoformat(), "request_id": self.request_id,
            "image_sha256": self.image_sha256, "width": self.width, "height": self.height,
            "model_name": self.model_name, "model_version": self.model_version,
            "expert_id": self.expert_id, "rois": self.rois, "corrected_label": self.corrected_label,
            "comment": self.comment,
        }


def _record(row: Any) -> FeedbackRecord:
    return FeedbackRecord(
        id=row.id, created_at=row.created_at, request_id=row.request_id, image_sha256=row.image_sha256,
        width=row.width, height=row.height, model_name=row.model_name, model_version=row.model_version,
        expert_id=row.expert_id, rois=row.rois, corrected_label=row.corrected_label, comment=row.comment,
        idempotency_key=row.idempotency_key, consumed_by_retrain=row.consumed_by_retrain)


def _fingerprint(payload: Any) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _feedback_id(value: Union[str, uuid.UUID]) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise FeedbackNotFound(f"no feedback with id {value!r} (not a UUID)") from None


def _database_url(url: Union[str, Path]) -> URL:
    """Parse the URL; a bare path means SQLite, ``postgresql://`` means psycopg 3."""
    if isinstance(url, Path) or "://" not in url:
        return URL.create("sqlite", database=str(Path(url).resolve()))
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreUnavailable(f"feedback database URL {url!r} is not a valid database URL") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StoreUnavailable(f"feedback database URL {parsed.render_as_string()!r}: "
                               "only sqlite:/// and postgresql+psycopg:// are supported")
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise StoreUnavailable("feedback database: an in-memory SQLite database is not durable; give a file path")
    return parsed


def _sqlite_engine(url: URL) -> Engine:
    Path(url.database or "").parent.mkdir(parents=True, exist_ok=True)
    # check_same_thread off: the pool hands a connection to one thread at a time.
    engine = create_engine(url, connect_args={"check_same_thread": False,
                                              "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite must not BEGIN on its own: _on_begin does
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(_WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class FeedbackStore:
    """Feedback records and the predictions they refer to, in one SQL database."""

    def __init__(self, url: Union[str, Path] = DEFAULT_FEEDBACK_DB_URL) -> None:
        self.url = _database_url(url)
        self.safe_url = self.url.render_as_string(hide_password=True)
        try:
            self.engine = (_sqlite_engine(self.url) if self.url.get_backend_name() == "sqlite"
                           else create_engine(self.url, pool_pre_ping=True))
        except (NoSuchModuleError, ImportError) as exc:
            raise StoreUnavailable(f"feedback database {self.safe_url}: driver missing ({exc})") from None
        self._create_schema()

    def __repr__(self) -> str:
        return f"FeedbackStore({self.safe_url!r})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "FeedbackStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[Connection]:
        """One transaction, committed on normal exit; an unreachable database is StoreUnavailable."""
        try:
            with self.engine.connect() as conn:
                conn.execution_options(**{_WRITE: write})
                with conn.begin():
                    yield conn
        except OperationalError as exc:
            reason = first_line(exc.orig if exc.orig is not None else exc)
            raise StoreUnavailable(f"feedback database {self.safe_url}: {reason}") from exc

    def _create_schema(self) -> None:
        with self._transaction(write=True) as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _DDL_LOCK_KEY})
            metadata.create_all(conn)
            version = conn.execute(select(feedback_schema.c.version)).scalar_one_or_none()
            if version is None:
                conn.execute(insert(feedback_schema).values(id=1, version=SCHEMA_VERSION))
            elif version != SCHEMA_VERSION:
                raise StoreUnavailable(f"feedback database {self.safe_url} has schema version {version}, "
                                       f"this medattn expects {SCHEMA_VERSION}: migrate it first")

    # -- predictions ---------------------------------------------------------------------------

    def record_prediction(self, request_id: str, image_sha256: str, width: int, height: int,
                          model_name: str, model_version: str, label: str,
                          probabilities: Union[Mapping[str, float], Sequence[float]]) -> PredictionRecord:
        """Remember a served prediction so feedback can cite its ``request_id`` (idempotent)."""
        if not 0 < len(request_id) <= 128:
            raise InvalidFeedback(f"request_id must be 1 to 128 characters, got {len(request_id)}")
        _check_image(image_sha256, width, height)
        row = dict(request_id=request_id, image_sha256=image_sha256, width=width, height=height,
                   model_name=model_name, model_version=model_version, label=label,
                   probabilities=json.loads(json.dumps(probabilities, default=float)))
        try:
            with self._transaction(write=True) as conn:
                created_at = datetime.now(timezone.utc)
                conn.execute(insert(predictions).values(created_at=created_at, **row))
            return PredictionRecord(created_at=created_at, **row)
        except IntegrityError:
            existing = self.get_prediction(request_id)
            if {k: getattr(existing, k) for k in row} != row:
                raise FeedbackConflict(f"request_id {request_id!r} is already recorded "
                                       "for another prediction") from None
            return existing

    def record_predictions(self, rows: Sequence[Mapping[str, Any]]) -> list[PredictionRecord]:
        """Several predictions in ONE transaction (one commit, one fsync): the serving group commit.

        Each row has the keyword arguments of :meth:`record_prediction`. All or none are stored;
        a duplicate ``request_id`` fails the whole group with ``IntegrityError``, after which the
        caller records the rows one by one (:meth:`record_prediction` sorts out which one clashed).
        """
        checked = []
        for row in rows:
            if not 0 < len(row["request_id"]) <= 128:
                raise InvalidFeedback(f"request_id must be 1 to 128 characters, got {len(row['request_id'])}")
            _check_image(row["image_sha256"], row["width"], row["height"])
            checked.append({**row, "probabilities": json.loads(json.dumps(row["probabilities"], default=float))})
        if not checked:
            return []
        with self._transaction(write=True) as conn:
            created_at = datetime.now(timezone.utc)
            conn.execute(insert(predictions), [{"created_at": created_at, **row} for row in checked])
        return [PredictionRecord(created_at=created_at, **row) for row in checked]

    def expire_uncited_predictions(self, older_than: datetime, delete_blob: Callable[[str], None],
                                   batch_size: int = 500) -> tuple[int, int]:
        """Forget predictions made before ``older_than`` that no feedback cites, with their images.

        Returns ``(predictions, blobs)`` removed. An image is deleted (``delete_blob(sha256)``) only
        when no remaining prediction and no feedback record refers to it, and inside the write
        transaction that deletes its last prediction: a feedback insert citing one of them waits
        for that transaction and then fails its foreign key (answered 404), and a prediction
        recorded after it re-stores its image (``BlobStore.put`` after ``record_prediction``).
        """
        cited = select(feedback.c.request_id).where(feedback.c.request_id.is_not(None))
        removed_predictions = removed_blobs = 0
        while True:
            with self._transaction(write=True) as conn:
                rows = conn.execute(select(predictions.c.request_id, predictions.c.image_sha256)
                                    .where(predictions.c.created_at < _as_utc(older_than),
                                           predictions.c.request_id.not_in(cited))
                                    .limit(batch_size)).all()
                if not rows:
                    return removed_predictions, removed_blobs
                conn.execute(delete(predictions).where(predictions.c.request_id.in_([r.request_id for r in rows])))
                shas = {r.image_sha256 for r in rows}
                still_used = set(conn.execute(select(predictions.c.image_sha256)
                                              .where(predictions.c.image_sha256.in_(shas))).scalars())
                still_used |= set(conn.execute(select(feedback.c.image_sha256)
                                               .where(feedback.c.image_sha256.in_(shas))).scalars())
                for sha256 in sorted(shas - still_used):
                    delete_blob(sha256)
                    removed_blobs += 1
                removed_predictions += len(rows)

    def get_prediction(self, request_id: str) -> PredictionRecord:
        with self._transaction() as conn:
            row = conn.execute(select(predictions).where(predictions.c.request_id == request_id)).first()
        if row is None:
            raise UnknownRequest(f"no prediction with request_id {request_id!r}")
        return PredictionRecord(**row._asdict())

    # -- feedback ------------------------------------------------------------------------------

    def add_feedback(self, submission: FeedbackSubmission, image_sha256: Optional[str] = None,
                     width: Optional[int] = None, height: Optional[int] = None,
                     idempotency_key: Optional[str] = None, *, caller: Optional[str] = None,
                     class_names: Optional[Sequence[str]] = None) -> tuple[FeedbackRecord, bool]:
        """Validate and durably store one submission; returns ``(record, created)``.

        ``caller`` scopes the idempotency key (the token's owner: one caller's key never replays
        or reveals another's record); ``class_names`` are the model's classes when the
        submission cites no prediction (otherwise the prediction's, else those of any stored
        prediction of that version): ``corrected_label`` must be one of them.

        With a ``request_id`` the image and its size come from that prediction (given values must
        agree); without one they are required. The transaction is committed before this returns.
        A repeated ``idempotency_key`` with the same body returns the first record with
        ``created=False``; with a different body it raises :class:`FeedbackConflict`.
        """
        if idempotency_key is not None and not (0 < len(idempotency_key) <= 200 and idempotency_key.isprintable()):
            raise InvalidFeedback("Idempotency-Key must be 1 to 200 printable characters")
        image_sha256, width, height = self._image_of(submission, image_sha256, width, height)
        submission.validate_against(width, height)
        self._check_corrected_label(submission, class_names)
        payload = submission.fingerprint_payload()
        body_sha256 = _fingerprint({"submission": payload, "image_sha256": image_sha256})
        given_key, idempotency_key = idempotency_key, scoped_idempotency_key(caller, idempotency_key)
        if idempotency_key is not None and (replay := self._replay(idempotency_key, body_sha256, given_key)):
            return replay, False
        record = FeedbackRecord(
            id=uuid.uuid4(), created_at=datetime.now(timezone.utc), request_id=submission.request_id,
            image_sha256=image_sha256, width=width, height=height, model_name=submission.model_name,
            model_version=submission.model_version, expert_id=submission.expert_id,
            rois=payload.get("rois", []), corrected_label=submission.corrected_label,
            comment=submission.comment, idempotency_key=idempotency_key, consumed_by_retrain=None)
        try:
            with self._transaction(write=True) as conn:
                conn.execute(insert(feedback).values(body_sha256=body_sha256, **asdict(record)))
        except IntegrityError:
            # A concurrent request with the same key won the race: answer as its replay.
            if idempotency_key is not None and (replay := self._replay(idempotency_key, body_sha256, given_key)):
                return replay, False
            if submission.request_id is not None:
                self.get_prediction(submission.request_id)  # expired meanwhile: UnknownRequest (404)
            raise
        return record, True

    def _check_corrected_label(self, submission: FeedbackSubmission, class_names: Optional[Sequence[str]]) -> None:
        """A corrected label must be one of the model's classes (those of the cited prediction)."""
        label = submission.corrected_label
        if label is None:
            return
        if submission.request_id is not None:
            names = _class_names(self.get_prediction(submission.request_id).probabilities)
        elif class_names is not None:
            names = [str(name) for name in class_names]
        else:
            names = self.class_names_of(submission.model_name, submission.model_version)
        if names is None:
            raise InvalidFeedback(f"corrected_label {label!r}: the classes of {submission.model_name!r} version "
                                  f"{submission.model_version} are not known here; cite a prediction's request_id")
        if label not in names:
            raise InvalidFeedback(f"corrected_label {label!r} is not a class of {submission.model_name!r} "
                                  f"version {submission.model_version} (classes: {', '.join(names)})")

    def class_names_of(self, model_name: str, model_version: str) -> Optional[list[str]]:
        """The class names of a model version, from one of its stored predictions; None if it has none."""
        with self._transaction() as conn:
            row = conn.execute(select(predictions.c.probabilities)
                               .where(predictions.c.model_name == model_name,
                                      predictions.c.model_version == model_version).limit(1)).first()
        return None if row is None else _class_names(row.probabilities)

    def _image_of(self, submission: FeedbackSubmission, image_sha256: Optional[str],
                  width: Optional[int], height: Optional[int]) -> tuple[str, int, int]:
        if submission.request_id is None:
            if image_sha256 is None or width is None or height is None:
                raise InvalidFeedback("feedback needs either a request_id or the image itself")
            _check_image(image_sha256, width, height)
            return image_sha256, width, height
        prediction = self.get_prediction(submission.request_id)
        given = {"image_sha256": image_sha256, "width": width, "height": height,
                 "model_name": submission.model_name, "model_version": submission.model_version}
        for field, value in given.items():
            if value is not None and value != getattr(prediction, field):
                raise InvalidFeedback(f"{field} {value!r} differs from {getattr(prediction, field)!r} "
                                      f"of prediction {submission.request_id!r}")
        return prediction.image_sha256, prediction.width, prediction.height

    def _replay(self, idempotency_key: str, body_sha256: str, given_key: Optional[str]) -> Optional[FeedbackRecord]:
        with self._transaction() as conn:
            row = conn.execute(select(feedback).where(feedback.c.idempotency_key == idempotency_key)).first()
        if row is None:
            return None
        if row.body_sha256 != body_sha256:
            raise FeedbackConflict(f"Idempotency-Key {given_key!r} was already used by you for feedback "
                                   f"{row.id} with a different body")
        return _record(row)

    def get(self, feedback_id: Union[str, uuid.UUID]) -> FeedbackRecord:
        with self._transaction() as conn:
            row = conn.execute(select(feedback).where(feedback.c.id == _feedback_id(feedback_id))).first()
        if row is None:
            raise FeedbackNotFound(f"no feedback with id {str(feedback_id)!r}")
        return _record(row)

    def list_feedback(self, since: Optional[datetime] = None, model_version: Optional[str] = None,
                      limit: int = 100, offset: int = 0, pending_only: bool = False) -> list[FeedbackRecord]:
        """Records created at or after ``since``, oldest first (ties by id)."""
        if not 1 <= limit <= MAX_PAGE or offset < 0:
            raise InvalidFeedback(f"limit must be in [1, {MAX_PAGE}] and offset >= 0, got {limit} and {offset}")
        query = (select(feedback).where(*_filters(since, model_version, pending_only))
                 .order_by(feedback.c.created_at, feedback.c.id).limit(limit).offset(offset))
        with self._transaction() as conn:
            return [_record(row) for row in conn.execute(query)]

    def iter_feedback(self, since: Optional[datetime] = None, batch_size: int = 500) -> Iterator[FeedbackRecord]:
        """Every record from ``since`` on, oldest first, paged by key (safe while others insert)."""
        after: Optional[tuple[datetime, uuid.UUID]] = None
        while True:
            query = select(feedback).where(*_filters(since, None, False))
            if after is not None:
                query = query.where(or_(feedback.c.created_at > after[0],
                                        and_(feedback.c.created_at == after[0], feedback.c.id > after[1])))
            with self._transaction() as conn:
                rows = conn.execute(query.order_by(feedback.c.created_at, feedback.c.id).limit(batch_size)).all()
            yield from (_record(row) for row in rows)
            if len(rows) < batch_size:
                return
            after = (rows[-1].created_at, rows[-1].id)

    def count_pending(self, since: Optional[datetime] = None) -> int:
        """How many records no retrain has consumed yet (created at or after ``since``)."""
        with self._transaction() as conn:
            return conn.execute(select(func.count()).select_from(feedback)
                                .where(*_filters(since, None, True))).scalar_one()

    def mark_consumed(self, ids: Sequence[Union[str, uuid.UUID]], retrain_id: str) -> int:
        """Attribute records to a retrain; returns how many were newly marked.

        Marking again for the same retrain is a no-op; a record already consumed by another
        retrain is a :class:`FeedbackConflict`, an unknown id :class:`FeedbackNotFound`.
        """
        wanted = {_feedback_id(i) for i in ids}
        with self._transaction(write=True) as conn:
            rows = conn.execute(select(feedback.c.id, feedback.c.consumed_by_retrain)
                                .where(feedback.c.id.in_(wanted))).all()
            missing = wanted - {row.id for row in rows}
            if missing:
                raise FeedbackNotFound(f"no feedback with id {str(sorted(missing)[0])!r}")
            taken = [row for row in rows if row.consumed_by_retrain not in (None, retrain_id)]
            if taken:
                raise FeedbackConflict(f"feedback {taken[0].id} was already consumed by retrain "
                                       f"{taken[0].consumed_by_retrain!r}")
            result = conn.execute(update(feedback).where(feedback.c.id.in_(wanted),
                                                         feedback.c.consumed_by_retrain.is_(None))
                                  .values(consumed_by_retrain=retrain_id))
            return result.rowcount

    def release_consumed(self, retrain_id: str) -> int:
        """Return a rolled-back retrain's records to pending; returns how many."""
        with self._transaction(write=True) as conn:
            return conn.execute(update(feedback).where(feedback.c.consumed_by_retrain == retrain_id)
                                .values(consumed_by_retrain=None)).rowcount


def scoped_idempotency_key(caller: Optional[str], key: Optional[str]) -> Optional[str]:
    """The stored form of a caller's Idempotency-Key: a digest of (caller, key), 67 characters.

    Keys are unique per caller, not globally: the same key from two callers names two records.
    The digest keeps the column's 200 characters whatever the lengths of name and key.
    """
    if key is None:
        return None
    scope = caller or ""
    return "k1:" + hashlib.sha256(f"{len(scope)}:{scope}\x00{key}".encode("utf-8")).hexdigest()


def _class_names(probabilities: Any) -> list[str]:
    """Class names of a stored prediction: its probability keys, or indices for a plain list."""
    if isinstance(probabilities, Mapping):
        return [str(name) for name in probabilities]
    return [str(i) for i in range(len(probabilities))]


def _filters(since: Optional[datetime], model_version: Optional[str], pending_only: bool) -> list[Any]:
    conditions: list[Any] = []
    if since is not None:
        conditions.append(feedback.c.created_at >= _as_utc(since))
    if model_version is not None:
        conditions.append(feedback.c.model_version == model_version)
    if pending_only:
        conditions.append(feedback.c.consumed_by_retrain.is_(None))
    return conditions


def _check_image(image_sha256: str, width: int, height: int) -> None:
    if not _SHA256_HEX.fullmatch(image_sha256 or ""):
        raise InvalidFeedback(f"image_sha256 {image_sha256!r} is not 64 lowercase hex digits")
    if isinstance(width, bool) or isinstance(height, bool) or width < 1 or height < 1:
        raise InvalidFeedback(f"image size {width}x{height} must be positive")
