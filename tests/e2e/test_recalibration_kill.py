"""A recalibration SIGKILLed mid-training changes nothing; the next run succeeds and consumes the feedback once.

The real ``medattn recalibrate`` runs as a subprocess on a tiny workspace (:mod:`recal_workspace`)
with far more epochs than it will live through. Once it prints its first epoch line (training has
started, its MLflow run exists) its whole process group is SIGKILLed: no cleanup code runs. Then
the champion, the aliases, the champion history, the registered versions and the feedback store
(records and their consumed flags) must be exactly as before, and the retrain lock free. A second
run with one epoch must succeed, register one challenger and mark every record consumed by it.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from recal_workspace import MODEL_NAME, make_workspace

from medattn.config import load_params
from medattn.feedback.audit import RECALIBRATION, list_events
from medattn.feedback.scheduler import RETRAIN_LOCK, current_state, is_locked, run_if_needed

pytestmark = pytest.mark.e2e

STARTED_TIMEOUT_S = 300  # imports + data loading on a loaded 2-core machine
FIRST_EPOCH = "recalibrate: epoch 1/"


def _lines(stream, into: "queue.Queue[str]") -> None:
    for line in iter(stream.readline, ""):
        into.put(line)
    into.put("")  # EOF


def test_a_killed_recalibration_leaves_everything_and_the_next_run_consumes_once(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", n_feedback=4, epochs=5000)
    registry_before, feedback_before = ws.registry_state(), ws.feedback_state()
    assert [consumed for _, consumed in feedback_before] == [None] * 4

    args = ("recalibrate", "--data", "data/prepared", "--snapshot", "data/feedback", "--actor", "dr-kill")
    victim = subprocess.Popen(ws.command(*args), cwd=ws.root, env=ws.env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=_lines, args=(victim.stderr, lines), daemon=True).start()
    seen, deadline = [], time.monotonic() + STARTED_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            if FIRST_EPOCH in line or line == "":
                break
        assert any(FIRST_EPOCH in line for line in seen), f"training never started:\n{''.join(seen)[-3000:]}"
        assert victim.poll() is None, "the retrain ended before it could be killed"
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(30)
    assert victim.returncode == -signal.SIGKILL

    # -- nothing changed, and nothing is held ----------------------------------------------------
    assert ws.registry_state() == registry_before
    assert ws.feedback_state() == feedback_before
    lock = ws.state_dir / "recalibration" / RETRAIN_LOCK
    assert lock.exists() and not is_locked(lock)
    with ws.open_store() as store:
        state = current_state(ws.state_dir, store)
        assert not state.running and state.pending == 4
        assert list_events(store, action=RECALIBRATION) == []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=ws.tracking_uri)
    [killed_run] = client.search_runs([client.get_experiment_by_name("recal-e2e").experiment_id],
                                      "tags.stage = 'recalibrate'")
    assert killed_run.info.status == "RUNNING"  # it had started; SIGKILL let it end no other way

    # -- the next run succeeds and consumes each record exactly once ------------------------------
    ws.set_params(epochs=1)
    done = ws.medattn(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    after = ws.registry_state()
    [new_version] = sorted(set(after["versions"]) - set(registry_before["versions"]))
    assert after["aliases"] == {"champion": ws.champion, "challenger": new_version}  # no auto-promote
    assert after["history"] == registry_before["history"]
    tag = f"recalibration:{MODEL_NAME}:v{new_version}"
    assert ws.feedback_state() == [(fid, tag) for fid, _ in feedback_before]
    with ws.open_store() as store:
        [event] = list_events(store, action=RECALIBRATION)
        assert (event.actor, event.from_version, event.to_version) == ("dr-kill", ws.champion, new_version)
        assert event.details["consumed"] == 4 and sorted(event.details["feedback_ids"]) == sorted(ws.feedback_ids)
        # and a scheduled check now finds nothing to do: no record is counted twice
        ran, why = run_if_needed(load_params(ws.root / "params.yaml"), store, ws.state_dir,
                                 job=lambda: pytest.fail("nothing should run"))
        assert not ran and "no new feedback" in why
    assert not is_locked(lock)
