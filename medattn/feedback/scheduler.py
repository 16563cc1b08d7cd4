"""When to recalibrate: enough new feedback, or an interval passed with any; one retrain at a time.

``medattn recalibrate --if-needed`` (cron, a Kubernetes CronJob) asks once; ``medattn scheduler``
asks every ``--poll-seconds``. Both start a retrain only when

* at least ``recalibrate.min_feedback`` feedback records wait (not consumed by a retrain), or
* ``recalibrate.interval_hours`` passed since the last retrain (or, before any, since the oldest
  waiting record) and at least one record waits —

never one per submission. A retrain holds ``<state>/recalibration/retrain.lock``, a kernel
``flock``: the kernel drops it when its holder exits or dies (SIGKILL included), so a crashed
holder never keeps it; a second retrain meanwhile is refused at once. A second ``medattn
scheduler`` is refused the same way through ``scheduler.lock``. (``flock`` serialises processes
on one host or one shared POSIX file system; replicas on many hosts should run one scheduler,
e.g. a CronJob with ``concurrencyPolicy: Forbid``.)

The scheduler's state — running or not, last run and its outcome, next interval run, pending
feedback — is written to ``<state>/recalibration/state.json`` after every check and published
as the ``medattn_recalibration_*`` gauges (``medattn.serving.metrics``) on ``/metrics``: the
scheduler's own (``--metrics-port``) and the service's. The service, usually another process
(or host, with a shared state folder), does not trust the file alone: at every scrape
:func:`current_state` re-reads it, asks the *locks* whether a retrain or a scheduler is alive
(a SIGKILLed one leaves ``running: true`` in the file but frees its lock) and the feedback store
how many records wait, and recomputes the next interval run from the rules the file records.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Optional

from medattn.atomic_files import write_json_atomic
from medattn.config import Params, load_params
from medattn.errors import MedattnError, first_line
from medattn.feedback.store import FeedbackStore

log = logging.getLogger("medattn.feedback")

RETRAIN_LOCK = "retrain.lock"
SCHEDULER_LOCK = "scheduler.lock"
STATE_FILE = "state.json"


class LockHeld(MedattnError):
    """Another process holds the lock (a retrain or a scheduler is already running)."""


# A holder keeps the lock for minutes; a probe (is_locked: a /metrics scrape) for microseconds.
# Waiting this long before refusing lets a check that meets a probe go ahead, and is still "at once".
PROBE_GRACE_S = 0.5


class ProcessLock:
    """An exclusive, non-blocking ``flock`` on a file; the file also names the holder (for messages)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what
        self._fd: Optional[int] = None

    def acquire(self) -> "ProcessLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + PROBE_GRACE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise LockHeld(f"{self.what} is already running ({holder}; lock {self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ProcessLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(path: Path) -> bool:
    """Whether some live process holds the lock at ``path``.

    Probed with a shared, non-blocking ``flock`` on a read-only descriptor, released at once: it
    creates nothing, writes nothing, and a holder's exclusive lock makes it fail.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the shared lock too
    return False


@dataclass
class SchedulerState:
    running: bool = False
    pending: int = 0
    last_run_at: Optional[str] = None
    last_success: Optional[bool] = None
    last_outcome: Optional[str] = None
    last_version: Optional[str] = None
    next_run_at: Optional[str] = None
    checked_at: Optional[str] = None
    scheduler_up: bool = False  # a `medattn scheduler` holds its lock (set by current_state)
    min_feedback: Optional[int] = None  # the rules of the last check, so a reader can recompute next_run_at
    interval_hours: Optional[float] = None

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("last_run_at", "next_run_at"):
            out[f"{key}_unix"] = datetime.fromisoformat(out[key]).timestamp() if out[key] else None
        return out


def state_dir_of(state_root: Path) -> Path:
    return Path(state_root) / "recalibration"


def read_state(state_root: Path) -> SchedulerState:
    path = state_dir_of(state_root) / STATE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        known = SchedulerState.__dataclass_fields__
        return SchedulerState(**{k: v for k, v in raw.items() if k in known})
    except (OSError, ValueError, TypeError):
        return SchedulerState()  # no state yet (or a hand-mangled file): start afresh


def write_state(state_root: Path, state: SchedulerState) -> None:
    write_json_atomic(state_dir_of(state_root) / STATE_FILE, state.to_json(), sort_keys=True)
    from medattn.serving.metrics import set_recalibration_state

    # this process's own gauges (`medattn scheduler --metrics-port`): whether a scheduler holds its lock
    # is asked of the lock, as current_state does (held by this very process when it is the scheduler)
    set_recalibration_state({**state.to_json(), "scheduler_up": is_locked(state_dir_of(state_root) / SCHEDULER_LOCK)})


def current_state(state_root: Path, store: Optional[FeedbackStore] = None, now: Optional[datetime] = None,
                  rules: Optional[tuple[int, float]] = None) -> SchedulerState:
    """The state as it is now, for a reader in another process (the service's ``/metrics``, the review page).

    ``running`` and ``scheduler_up`` come from the locks (a killed holder frees them, so a stale
    ``running: true`` in the file reads false); ``pending`` and the next interval run from the
    store when given. ``rules`` (min_feedback, interval_hours; :func:`rules_from_params`) stand in
    until a check has recorded the ones it used, so the next run is known before the first check.
    Blocking (a file, two locks, two small queries): call it in a thread.
    """
    state = read_state(state_root)
    folder = state_dir_of(state_root)
    state.running = is_locked(folder / RETRAIN_LOCK)
    state.scheduler_up = is_locked(folder / SCHEDULER_LOCK)
    if rules is not None and (state.min_feedback is None or state.interval_hours is None):
        state.min_feedback, state.interval_hours = int(rules[0]), float(rules[1])
    if store is not None:
        state.pending = store.count_pending()
        if state.interval_hours is not None and state.min_feedback is not None:
            last = datetime.fromisoformat(state.last_run_at) if state.last_run_at else None
            _, _, next_run = decide(state.pending, last, oldest_pending_at(store), now or datetime.now(timezone.utc),
                                    state.min_feedback, timedelta(hours=state.interval_hours))
            state.next_run_at = next_run.isoformat() if next_run and state.pending else None
    return state


def rules_from_params(repo_root: Path) -> Optional[tuple[int, float]]:
    """(recalibrate.min_feedback, recalibrate.interval_hours) of ``<repo_root>/params.yaml``; None without a valid one."""
    path = Path(repo_root) / "params.yaml"
    if not path.is_file():
        return None
    try:
        rp = load_params(path).recalibrate
    except MedattnError as exc:  # a reader's fallback only: the scheduler itself reports a bad file
        log.warning("%s: recalibration rules not read: %s", path, exc)
        return None
    return rp.min_feedback, float(rp.interval_hours)


def oldest_pending_at(store: FeedbackStore) -> Optional[datetime]:
    page = store.list_feedback(limit=1, pending_only=True)
    return page[0].created_at if page else None


def decide(pending: int, last_run_at: Optional[datetime], oldest_pending: Optional[datetime], now: datetime,
           min_feedback: int, interval: timedelta) -> tuple[bool, str, Optional[datetime]]:
    """(start a retrain?, why, when the interval rule fires next)."""
    reference = last_run_at or oldest_pending
    next_run = reference + interval if reference is not None else None
    if pending >= min_feedback:
        return True, f"{pending} new feedback records >= recalibrate.min_feedback={min_feedback}", next_run
    if pending == 0:
        return False, "no new feedback", next_run
    if next_run is not None and now >= next_run:
        return True, f"{pending} new feedback records and the interval passed since {reference.isoformat()}", next_run
    return False, f"{pending} new feedback records < {min_feedback}; interval rule at {next_run}", next_run


RunJob = Callable[[], object]


def run_if_needed(params: Params, store: FeedbackStore, state_root: Path, job: RunJob, *, force: bool = False,
                  now: Optional[datetime] = None) -> tuple[bool, str]:
    """Check the rules and, when due (or ``force``), run ``job`` under the retrain lock.

    Returns (ran?, why). A retrain already running is not an error here: the check answers so.
    ``job`` failing is recorded in the state (last_success false) and re-raised.
    """
    rp = params.recalibrate
    state = read_state(state_root)
    now = now or datetime.now(timezone.utc)
    pending = store.count_pending()
    last = datetime.fromisoformat(state.last_run_at) if state.last_run_at else None
    due, why, next_run = decide(pending, last, oldest_pending_at(store), now, rp.min_feedback,
                                timedelta(hours=rp.interval_hours))
    state.pending, state.checked_at = pending, now.isoformat()
    state.min_feedback, state.interval_hours = rp.min_feedback, float(rp.interval_hours)
    state.next_run_at = next_run.isoformat() if next_run else None
    lock_path = state_dir_of(state_root) / RETRAIN_LOCK
    if not (due or force):
        state.running = is_locked(lock_path)
        write_state(state_root, state)
        return False, why
    try:
        lock = ProcessLock(lock_path, "a recalibration").acquire()
    except LockHeld as exc:
        state.running = True
        write_state(state_root, state)
        return False, str(exc)
    try:
        state.running = True
        write_state(state_root, state)
        try:
            outcome = job()
        except BaseException as exc:
            _finish(state, now, False, f"failed: {first_line(exc)}", None, store)
            write_state(state_root, state)
            raise
        _finish(state, now, True, why if not force else "forced", getattr(outcome, "version", None), store)
        write_state(state_root, state)
        return True, why if not force else "forced"
    finally:
        lock.release()


def _finish(state: SchedulerState, started: datetime, success: bool, outcome: str, version: Optional[str],
            store: FeedbackStore) -> None:
    state.running = False
    state.last_run_at = datetime.now(timezone.utc).isoformat()
    state.last_success, state.last_outcome = success, outcome
    if version is not None:
        state.last_version = str(version)
    state.pending = store.count_pending()


def run_scheduler(params: Params, store: FeedbackStore, state_root: Path, job: RunJob, *, poll_seconds: float,
                  max_checks: Optional[int] = None, log: Callable[[str], None] = print) -> int:
    """The long-running loop: check every ``poll_seconds`` (``max_checks`` bounds it, for tests)."""
    checks = 0
    with ProcessLock(state_dir_of(state_root) / SCHEDULER_LOCK, "a medattn scheduler"):
        while max_checks is None or checks < max_checks:
            try:
                ran, why = run_if_needed(params, store, state_root, job)
                log(f"scheduler: {'recalibrated' if ran else 'waiting'}: {why}")
            except Exception as exc:  # one failed retrain must not stop the schedule
                log(f"scheduler: recalibration failed: {first_line(exc)}")
            checks += 1
            if max_checks is None or checks < max_checks:
                time.sleep(poll_seconds)
    return checks


__all__ = ["LockHeld", "ProcessLock", "SchedulerState", "current_state", "decide", "is_locked", "read_state", "run_if_needed",
           "run_scheduler", "write_state"]
