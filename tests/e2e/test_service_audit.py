"""Audit, refused model moves and the scheduler's state, against a real ``bentoml serve``.

The registry starts with version 1 as champion and *no* challenger and no earlier champion, so
Accept and Roll back must both be refused (409 JSON, champion untouched, nothing audited). Then
feedback, a promote and a rollback are each found in ``GET /audit`` under the token's name, and
``/metrics`` and ``/review/api/scheduler`` report the state of a retrain held by *another*
process (a lock holder started by the test), read at request time.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image
from service_harness import MODEL_NAME, REPO_ROOT, Served, make_tiny_bundle, register_version, start_served

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lone_champion(tmp_path_factory) -> tuple[str, Path]:
    """Version 1 is champion; there is no challenger alias and no champion before it."""
    from mlflow import MlflowClient

    workdir = tmp_path_factory.mktemp("audit")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    version = register_version(uri, make_tiny_bundle(workdir / "bundle-v1", seed=1), metric=0.6)
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(MODEL_NAME, "champion", version)
    return uri, workdir


@pytest.fixture(scope="module")
def served(lone_champion) -> Iterator[Served]:
    running = start_served(lone_champion)
    try:
        yield running
    finally:
        running.server.stop()


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=60) as http:
        yield http


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["detail"], body
    for word in words:
        assert word in body["detail"], body["detail"]


def served_version(client: httpx.Client, served: Served) -> str:
    return client.get("/model", headers=served.headers("predict")).json()["model"]["version"]


def audit(client: httpx.Client, served: Served, **params) -> list[dict]:
    answer = client.get("/audit", params=params, headers=served.headers("admin"))
    assert answer.status_code == 200, answer.text
    return answer.json()["items"]


def png(width: int = 40, height: int = 30) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_accept_without_challenger_and_rollback_without_previous_champion_are_refused(client, served):
    admin = served.headers("admin")
    assert_error(client.post("/promote", headers=admin), 409, "challenger")
    assert_error(client.post("/rollback", headers=admin), 409, "no previous champion")
    assert served_version(client, served) == "1"
    from medattn.registry import get_model_version_info

    assert get_model_version_info(MODEL_NAME, "champion", tracking_uri=served.tracking_uri).version == "1"
    assert audit(client, served) == []


def test_audit_needs_admin_and_refuses_bad_filters_with_422(client, served):
    assert client.get("/audit").status_code == 401
    assert_error(client.get("/audit", headers=served.headers("expert")), 403)
    admin = served.headers("admin")
    assert_error(client.get("/audit", params={"action": "delete"}, headers=admin), 422, "action")
    assert client.get("/audit", params={"since": "last tuesday"}, headers=admin).status_code == 422
    assert client.get("/audit", params={"limit": 0}, headers=admin).status_code == 422
    assert client.get("/audit", params={"offset": -1}, headers=admin).status_code == 422
    assert client.get("/audit", params={"model_name": "x" * 1000}, headers=admin).status_code == 422


def test_feedback_accept_and_rollback_are_audited_under_the_token_name(client, served):
    from mlflow import MlflowClient

    from medattn.registry import assign_challenger_and_gate

    predicted = client.post("/predict", files={"image": ("a.png", png(), "image/png")}, headers=served.headers("predict"))
    request_id = predicted.json()["request_id"]
    body = {"request_id": request_id, "model_name": MODEL_NAME, "model_version": "1", "expert_id": "expert",
            "rois": [{"shape": "rectangle", "kind": "relevant", "x": 2, "y": 3, "width": 10, "height": 8}]}
    expert = {**served.headers("expert"), "Idempotency-Key": "audited-once"}
    created = client.post("/feedback", json=body, headers=expert)
    assert created.status_code == 201, created.text
    assert client.post("/feedback", json=body, headers=expert).status_code == 200  # a replay: no second row

    v2 = register_version(served.tracking_uri, make_tiny_bundle(served.workdir / "bundle-v2", seed=2), metric=0.5)
    assert not assign_challenger_and_gate(MODEL_NAME, v2, tracking_uri=served.tracking_uri).promoted
    assert client.post("/promote", headers=served.headers("admin")).status_code == 200
    assert served_version(client, served) == v2
    assert client.post("/rollback", headers=served.headers("admin")).status_code == 200
    assert served_version(client, served) == "1"

    events = audit(client, served)
    assert [(e["actor"], e["action"], e["from_version"], e["to_version"]) for e in events] == [
        ("expert", "feedback", None, "1"), ("admin", "promote", "1", v2), ("admin", "rollback", v2, "1")]
    assert events[0]["details"]["feedback_id"] == created.json()["id"]
    assert all(e["model_name"] == MODEL_NAME for e in events)
    assert [e["id"] for e in audit(client, served, action="promote")] == [events[1]["id"]]
    assert audit(client, served, model_name="another") == []
    assert [e["id"] for e in audit(client, served, since=events[2]["created_at"])] == [events[2]["id"]]
    page = client.get("/audit", params={"limit": 2}, headers=served.headers("admin")).json()
    assert page["count"] == 2 and page["next_offset"] == 2
    last = client.get("/audit", params={"limit": 2, "offset": 2}, headers=served.headers("admin")).json()
    assert [e["id"] for e in last["items"]] == [events[2]["id"]] and last["next_offset"] is None
    tags = MlflowClient(tracking_uri=served.tracking_uri).get_model_version(MODEL_NAME, v2).tags
    assert tags["audit.promote.by"] == "admin" and tags["audit.promote.event_id"] == str(events[1]["id"])


def _metric(text: str, name: str) -> float:
    [value] = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return value


def test_metrics_and_the_review_page_read_the_scheduler_state_of_another_process(client, served):
    from medattn.feedback.scheduler import SchedulerState, write_state

    folder = served.state_dir / "recalibration"
    write_state(served.state_dir, SchedulerState(
        running=False, last_run_at="2026-01-01T00:00:00+00:00", last_success=False,
        last_outcome="failed: disk full", min_feedback=10, interval_hours=1.0))
    pending = client.get("/feedback", params={"limit": 1000}, headers=served.headers("expert")).json()["count"]
    assert pending >= 1
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from medattn.feedback.scheduler import ProcessLock\n"
        f"ProcessLock({str(folder / 'retrain.lock')!r}, 'x').acquire(); print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        text = client.get("/metrics").text
        assert _metric(text, "medattn_recalibration_running") == 1.0
        assert _metric(text, "medattn_recalibration_last_success") == 0.0
        assert _metric(text, "medattn_recalibration_last_run_timestamp_seconds") == 1767225600.0
        assert _metric(text, "medattn_recalibration_pending_feedback") == float(pending)
        assert _metric(text, "medattn_recalibration_next_run_timestamp_seconds") == 1767225600.0 + 3600
        assert _metric(text, "medattn_recalibration_scheduler_up") == 0.0
        state = client.get("/review/api/scheduler", headers=served.headers("expert")).json()
        assert state["running"] is True and state["pending"] == pending and state["last_success"] is False
        assert state["last_outcome"] == "failed: disk full"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
    # the holder died without a word: the next scrape sees the lock free
    assert _metric(client.get("/metrics").text, "medattn_recalibration_running") == 0.0
    assert client.get("/review/api/scheduler", headers=served.headers("expert")).json()["running"] is False
    assert client.get("/review/api/scheduler").status_code == 401
    assert json.loads((folder / "state.json").read_text())["last_outcome"] == "failed: disk full"  # read, not written
