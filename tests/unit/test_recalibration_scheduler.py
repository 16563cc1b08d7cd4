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


def _hold(lock: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from medattn.feedback.scheduler import ProcessLock\n"
        f"ProcessLock({str(lock)!r}, 'x').acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_current_state_trusts_the_locks_and_the_store_not_a_stale_file(tmp_path: Path) -> None:
    from medattn.feedback.scheduler import RETRAIN_LOCK, SCHEDULER_LOCK, SchedulerState, current_state, write_state

    folder = tmp_path / "recalibration"
    assert not is_locked(folder / RETRAIN_LOCK) and not folder.exists()  # a probe creates nothing
    # what a SIGKILLed retrain leaves behind: "running" in the file, a free lock
    write_state(tmp_path, SchedulerState(running=True, pending=7, last_run_at="2026-01-01T00:00:00+00:00",
                                         last_success=True, min_feedback=10, interval_hours=24.0))
    with FeedbackStore(tmp_path / "feedback.db") as store:
        state = current_state(tmp_path, store, now=NOW)
        assert (state.running, state.scheduler_up, state.pending, state.next_run_at) == (False, False, 0, None)
        holders = [_hold(folder / RETRAIN_LOCK), _hold(folder / SCHEDULER_LOCK)]
        try:
            state = current_state(tmp_path, store)
            assert state.running and state.scheduler_up
            # the holder's own acquire goes ahead while probes come and go
            assert is_locked(folder / RETRAIN_LOCK)
        finally:
            for holder in holders:
                os.kill(holder.pid, signal.SIGKILL)
                holder.wait(10)
        assert not current_state(tmp_path, store).running
        assert current_state(tmp_path, store).to_json()["last_run_at_unix"] == datetime(
            2026, 1, 1, tzinfo=timezone.utc).timestamp()


def test_metrics_middleware_sets_the_gauges_at_scrape_time(tmp_path: Path) -> None:
    import asyncio

    from prometheus_client import REGISTRY

    from medattn.feedback.scheduler import SchedulerState, write_state
    from medattn.serving.metrics import RecalibrationStateOnScrape, get_metrics

    get_metrics()
    seen: list[str] = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["path"])

    with FeedbackStore(tmp_path / "feedback.db") as store:
        middleware = RecalibrationStateOnScrape(app, source=lambda: (tmp_path, store, None))
        write_state(tmp_path, SchedulerState(last_run_at="2026-01-01T00:00:00+00:00", last_success=False))
        get_metrics().set_recalibration_state({"running": True, "last_success": True})  # stale values
        asyncio.run(middleware({"type": "http", "method": "GET", "path": "/metrics"}, None, None))
        assert REGISTRY.get_sample_value("medattn_recalibration_running") == 0.0  # no lock is held
        assert REGISTRY.get_sample_value("medattn_recalibration_last_success") == 0.0
        assert REGISTRY.get_sample_value("medattn_recalibration_last_run_timestamp_seconds") == datetime(
            2026, 1, 1, tzinfo=timezone.utc).timestamp()
        get_metrics().set_recalibration_state({"running": True})
        asyncio.run(middleware({"type": "http", "method": "GET", "path": "/predict"}, None, None))
        assert REGISTRY.get_sample_value("medattn_recalibration_running") == 1.0  # other paths read nothing
    assert seen == ["/metrics", "/predict"]


def test_the_schedulers_own_gauges_say_it_is_up(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    from medattn.feedback.scheduler import run_scheduler
    from medattn.serving.metrics import get_metrics

    get_metrics()
    params = Params(recalibrate=RecalibrateParams(min_feedback=1))
    with FeedbackStore(tmp_path / "feedback.db") as store:
        assert run_scheduler(params, store, tmp_path, job=lambda: None, poll_seconds=0, max_checks=1,
                             log=lambda _: None) == 1
        assert REGISTRY.get_sample_value("medattn_recalibration_scheduler_up") == 1.0  # set while it held the lock
        run_if_needed(params, store, tmp_path, job=lambda: None)  # a one-shot check, no scheduler
        assert REGISTRY.get_sample_value("medattn_recalibration_scheduler_up") == 0.0


def test_the_dvc_stage_takes_the_same_retrain_lock_as_the_scheduler(tmp_path: Path) -> None:
    # A `dvc repro recalibrate` beside a scheduled retrain would fine-tune the same champion twice.
    from medattn.feedback.scheduler import RETRAIN_LOCK, state_dir_of

    repo = Path(__file__).resolve().parents[2]
    with ProcessLock(state_dir_of(tmp_path) / RETRAIN_LOCK, "a recalibration"):
        stage = subprocess.run(
            [sys.executable, str(repo / "pipelines" / "recalibrate.py"), "--params", str(repo / "params.yaml"),
             "--state-dir", str(tmp_path), "--feedback-db", f"sqlite:///{tmp_path / 'feedback.db'}",
             "--snapshot", str(tmp_path / "no-snapshot"), "--out", str(tmp_path / "result.json")],
            capture_output=True, text=True, cwd=repo, timeout=300)
    assert stage.returncode == 1, stage.stderr
    assert stage.stderr.startswith("error: a recalibration is already running (pid ")
    assert len(stage.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "result.json").exists()


def test_the_next_run_is_known_from_params_before_any_scheduler_check(tmp_path: Path) -> None:
    from test_feedback_store import SHA_B, H, W, submission

    from medattn.feedback.scheduler import current_state, rules_from_params

    (tmp_path / "params.yaml").write_text("recalibrate:\n  min_feedback: 5\n  interval_hours: 6\n")
    assert rules_from_params(tmp_path) == (5, 6.0)
    with FeedbackStore(tmp_path / "feedback.db") as store:
        record, _ = store.add_feedback(submission(), SHA_B, W, H)
        assert current_state(tmp_path, store).next_run_at is None  # no check has recorded its rules
        state = current_state(tmp_path, store, rules=rules_from_params(tmp_path))
        assert (state.pending, state.min_feedback, state.interval_hours) == (1, 5, 6.0)
        assert datetime.fromisoformat(state.next_run_at) == record.created_at + timedelta(hours=6)
        # the rules a check recorded win over the file's
        run_if_needed(Params(recalibrate=RecalibrateParams(min_feedback=9, interval_hours=48)), store, tmp_path,
                      job=lambda: None)
        state = current_state(tmp_path, store, rules=rules_from_params(tmp_path))
        assert (state.min_feedback, state.interval_hours) == (9, 48.0)
        assert datetime.fromisoformat(state.next_run_at) == record.created_at + timedelta(hours=48)
    (tmp_path / "params.yaml").write_text("recalibrate:\n  min_feedback: 0\n")
    assert rules_from_params(tmp_path) is None  # an invalid file: no rules, and no crash of the reader
    assert rules_from_params(tmp_path / "nowhere") is None
