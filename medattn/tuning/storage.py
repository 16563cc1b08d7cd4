"""Where a study lives, and how a trial whose worker died is noticed and retried.

* a **journal file** (default, ``tune.storage: null`` or a file path): an append-only log that
  several worker processes on one machine (or on hosts sharing a file system with working
  ``flock``) write through Optuna's file lock;
* an **RDB URL** (``postgresql+psycopg://user:pw@host/db``, ``sqlite:///study.db``, ``mysql://``):
  workers on many hosts share one database.

A worker killed mid-trial leaves its trial RUNNING forever. Both storages here keep a
**heartbeat**: a thread of the worker stamps the running trial every ``heartbeat_seconds``;
a trial whose stamp is older than ``grace_seconds`` is failed by the next worker that starts a
trial, and Optuna's ``RetryHeartbeatStaleTrialCallback`` (the class once named
``RetryFailedTrialCallback``) queues a copy with the same params, up to ``max_retry`` times.
RDBStorage has the heartbeat built in; the journal storage does not, so
:class:`HeartbeatJournalStorage` adds it as a trial system attribute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from medattn.errors import ParamError, first_line

#: system attribute holding a running trial's last heartbeat (seconds since the epoch)
HEARTBEAT_ATTR = "medattn:heartbeat"
RDB_SCHEMES = ("postgresql", "postgres", "mysql", "sqlite", "oracle", "mssql")

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


@dataclass(frozen=True)
class StorageSettings:
    location: str  # a journal file path or an RDB URL
    heartbeat_seconds: int = 30
    grace_seconds: int = 120
    max_retry: int = 2

    @property
    def is_rdb(self) -> bool:
        return is_rdb_url(self.location)


def is_rdb_url(location: str) -> bool:
    scheme = location.split("://", 1)[0].split("+", 1)[0].lower() if "://" in location else ""
    return scheme in RDB_SCHEMES


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal storage whose running trials carry a heartbeat, so a dead worker's trial is retried."""

    def __init__(self, backend: JournalFileBackend, heartbeat_seconds: int, grace_seconds: int,
                 stale_callback: Optional[StaleCallback]) -> None:
        super().__init__(backend)
        self._heartbeat_seconds = heartbeat_seconds
        self._grace_seconds = grace_seconds
        self._stale_callback = stale_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # finished between two beats: nothing left to keep alive

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        deadline = time.time() - self._grace_seconds
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            started = trial.datetime_start.timestamp() if trial.datetime_start else None
            last = beat if beat is not None else started
            if last is not None and last < deadline:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int:
        return self._heartbeat_seconds

    def get_heartbeat_stale_trial_callback(self) -> Optional[StaleCallback]:
        return self._stale_callback


def open_storage(settings: StorageSettings) -> BaseStorage:
    """The Optuna storage for ``settings``; an unreachable database is a one-line ParamError."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry)
    if settings.is_rdb:
        try:
            with warnings.catch_warnings():  # the heartbeat arguments are "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    settings.location,
                    heartbeat_interval=settings.heartbeat_seconds,
                    grace_period=settings.grace_seconds,
                    heartbeat_stale_trial_callback=retry,
                    engine_kwargs={"pool_pre_ping": True},
                )
        except Exception as exc:  # sqlalchemy / driver errors carry pages of context
            raise ParamError(f"tune storage {redact(settings.location)}: cannot open the study database: "
                             f"{first_line(exc)}") from exc
    if "://" in settings.location:
        raise ParamError(f"tune storage {redact(settings.location)}: not a database URL Optuna knows "
                         f"({', '.join(RDB_SCHEMES)}) nor a journal file path")
    path = Path(settings.location)
    path.parent.mkdir(parents=True, exist_ok=True)
    return HeartbeatJournalStorage(JournalFileBackend(str(path)), settings.heartbeat_seconds,
                                   settings.grace_seconds, retry)


def redact(location: str) -> str:
    """A storage URL without its password, for messages and MLflow tags."""
    if "://" not in location or "@" not in location:
        return location
    scheme, rest = location.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else f"{scheme}://{user}@{host}"


def fail_stale_trials_now(study: optuna.Study) -> None:
    """Fail (and queue retries of) trials whose worker stopped beating: at worker start, not only per trial."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
