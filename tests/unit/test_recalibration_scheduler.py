"""The schedule's rules, its locks (a dead holder releases them) and its state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from medattn.config import Params, RecalibrateParams
from medattn.feedback.scheduler import LockHeld, ProcessLock, decide, is_locked, read_state, run_if_needed
from medattn.feedback.store import FeedbackStore

NOW = datetime(2026, 1, 2, tzinfo=timezone.utc)
DAY = timedelta(hours=24)


def test_rules_enough_feedback_or_interval_with_any() -> None:
    assert decide(10, None, NOW, NOW, 10, DAY)[0]
    assert not decide(0, NOW - 3 * DAY, None, NOW, 10, DAY)[0]  # interval passed but nothing new
    assert not decide(3, NOW - timedelta(hours=1), NOW, NOW, 10, DAY)[0]
    assert decide(3, NOW - 2 * DAY, NOW, NOW, 10, DAY)[0]
    assert decide(3, None, NOW - 2 * DAY, NOW, 10, DAY)[0]  # never ran: counted from the oldest waiting record


def test_a_killed_holder_does_not_keep_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / "retrain.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from medattn.feedback.scheduler import ProcessLock\n"
        f"ProcessLock({str(lock)!r}, 'x').acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_locked(lock)
        with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
            ProcessLock(lock, "a recalibration").acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
    deadline = time.monotonic() + 10
    while is_locked(lock) and time.monotonic() < deadline:
        time.sleep(0.1)
    with ProcessLock(lock, "a recalibration"):
        assert is_locked(lock)


def test_run_if_needed_runs_once_records_state_and_refuses_a_second(tmp_path: Path) -> None:
    params = Params(recalibrate=RecalibrateParams(min_feedback=1))
    with FeedbackStore(tmp_path / "feedback.db") as store:
        ran, why = run_if_needed(params, store, tmp_path, job=lambda: None)
        assert not ran and "no new feedback" in why
        assert read_state(tmp_path).pending == 0 and not read_state(tmp_path).running

        def nested_job():
            # a second check while this retrain holds the lock answers "already running"
            inner, reason = run_if_needed(params, store, tmp_path, job=lambda: None, force=True)
            assert not inner and "already running" in reason
            return None

        ran, _ = run_if_needed(params, store, tmp_path, job=nested_job, force=True)
        assert ran and read_state(tmp_path).last_success is True

        def failing_job():
            raise RuntimeError("disk full")

        with pytest.raises(RuntimeError):
            run_if_needed(params, store, tmp_path, job=failing_job, force=True)
        state = read_state(tmp_path)
        assert state.last_success is False and "disk full" in state.last_outcome and not state.running
