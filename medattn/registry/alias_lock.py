"""One lock around every change of a registered model's aliases (promote, rollback, gate).

A change of champion is several MLflow calls - read the aliases and ``champion_history``, move
the alias, rewrite the history tag, tag the version rolled back - and MLflow has no transaction
across them. Two callers interleaving them leave the alias, the history and the tags telling
different stories. Every caller (the HTTP routes, the CLI, the register stage, the recalibration
job) therefore takes :func:`alias_lock` first; the lock lives where every such caller can reach
it and is released by the operating system or the database when its holder dies:

- ``sqlite:///<db>`` tracking (the default): an OS file lock (``fcntl.flock``) on
  ``<db>.alias-<model>.lock`` beside the database. Everyone who can write the database can open
  the file; the kernel drops the lock when the holding process exits, however it exits, so a
  crashed promote (SIGKILL included) never blocks the next one. The lock file is never deleted
  (deleting it would let two holders lock two different files).
- ``postgresql://`` tracking: a session-level advisory lock (``pg_advisory_lock``) in that
  database, keyed by the model name; PostgreSQL releases it when the holder's connection drops.
- any other store (an ``mlflow server`` over HTTP): no shared place is reachable from here, so
  the file lock is taken in ``MEDATTN_ALIAS_LOCK_DIR`` (default ``~/.cache/medattn/alias-locks``),
  which serialises the callers of one machine only; a deployment with several admin hosts points
  that variable at a shared filesystem, or uses PostgreSQL tracking directly.

Waiting is bounded (``timeout_s``, default 120 s): a caller that cannot get the lock in time
gets a one-line :class:`~medattn.errors.RegistryError` (HTTP 409), never a hang.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medattn.errors import RegistryError, first_line
from medattn.registry.location import sqlite_db_path

DEFAULT_TIMEOUT_S = 120.0
_POLL_S = 0.05
LOCK_DIR_ENV = "MEDATTN_ALIAS_LOCK_DIR"


def _model_key(model_name: str) -> str:
    return hashlib.sha256(model_name.encode("utf-8")).hexdigest()[:16]


def lock_file_for(tracking_uri: str, model_name: str) -> Path:
    """The file locked for ``model_name`` in a file-locked store (see the module docstring)."""
    db = sqlite_db_path(tracking_uri)
    if db is not None:
        return db.parent / f"{db.name}.alias-{_model_key(model_name)}.lock"
    folder = Path(os.environ.get(LOCK_DIR_ENV) or Path.home() / ".cache" / "medattn" / "alias-locks")
    store = hashlib.sha256(tracking_uri.encode("utf-8")).hexdigest()[:16]
    return folder / f"{store}.alias-{_model_key(model_name)}.lock"


@contextmanager
def alias_lock(tracking_uri: str, model_name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Hold the alias lock of ``model_name`` in ``tracking_uri`` for the block."""
    if tracking_uri.startswith(("postgresql:", "postgresql+", "postgres:")):
        with _advisory_lock(tracking_uri, model_name, timeout_s):
            yield
    else:
        with _file_lock(lock_file_for(tracking_uri, model_name), model_name, timeout_s):
            yield


@contextmanager
def _file_lock(path: Path, model_name: str, timeout_s: float) -> Iterator[None]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    except OSError as exc:
        raise RegistryError(f"registry: cannot open the alias lock of {model_name!r}: "
                            f"{exc.strerror or first_line(exc)}") from None
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RegistryError(f"registry: cannot lock the aliases of {model_name!r}: "
                                        f"{exc.strerror}") from None
            if time.monotonic() >= deadline:
                raise RegistryError(_busy(model_name, timeout_s))
            time.sleep(_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)  # closing drops the lock too: an exception above cannot leave it held


@contextmanager
def _advisory_lock(tracking_uri: str, model_name: str, timeout_s: float) -> Iterator[None]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    url = make_url(tracking_uri)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    key = int(_model_key(model_name), 16) & 0x7FFF_FFFF_FFFF_FFFF  # a signed 64-bit key
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            deadline = time.monotonic() + timeout_s
            while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar_one():
                conn.rollback()
                if time.monotonic() >= deadline:
                    raise RegistryError(_busy(model_name, timeout_s))
                time.sleep(_POLL_S)
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    except SQLAlchemyError as exc:
        raise RegistryError(f"registry: cannot take the alias lock of {model_name!r} in the tracking "
                            f"database: {first_line(getattr(exc, 'orig', None) or exc)}") from None
    finally:
        engine.dispose()


def _busy(model_name: str, timeout_s: float) -> str:
    return (f"registry: another promote/rollback of {model_name!r} held the alias lock for over "
            f"{timeout_s:g} s; retry")
