"""The recalibration job's bad input, on a real workspace: each stops with one line, before training,
and leaves the champion, the aliases and the feedback store (records, consumed flags) as they were.

Snapshot-level parsing is unit-tested in tests/unit/test_recalibration_snapshot.py; here the whole
``recalibrate()`` (and ``medattn scheduler``) meets: an empty snapshot, a corrupt one, images of
another size than the model's input, a record the store does not have, and two schedulers at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from recal_workspace import RecalWorkspace, make_workspace

from medattn.config import load_params
from medattn.errors import DataError
from medattn.feedback.blobs import BlobStore
from medattn.feedback.export import export_snapshot
from medattn.feedback.recalibration import recalibrate
from medattn.feedback.scheduler import SCHEDULER_LOCK, LockHeld, ProcessLock, run_scheduler, state_dir_of

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> RecalWorkspace:
    return make_workspace(tmp_path_factory.mktemp("recal-bad") / "ws", n_feedback=3)


@pytest.fixture
def snapshot(ws: RecalWorkspace, tmp_path: Path) -> Path:
    with ws.open_store() as store:
        export_snapshot(store, BlobStore(ws.state_dir / "blobs"), tmp_path / "snapshot")
    return tmp_path / "snapshot"


def _refused(ws: RecalWorkspace, snapshot: Path, *words: str) -> None:
    before = (ws.registry_state(), ws.feedback_state())
    with ws.open_store() as store, pytest.raises(DataError) as refused:
        recalibrate(load_params(ws.root / "params.yaml"), snapshot, ws.root / "data" / "prepared", store,
                    progress=False)
    message = str(refused.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert (ws.registry_state(), ws.feedback_state()) == before
    assert all(consumed is None for _, consumed in before[1])


def test_an_empty_snapshot(ws: RecalWorkspace, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    with ws.open_store() as store:  # an export of nothing: since a time after every record
        from datetime import datetime, timedelta, timezone

        export_snapshot(store, BlobStore(ws.state_dir / "blobs"), empty,
                        since=datetime.now(timezone.utc) + timedelta(days=1))
    _refused(ws, empty, "empty")


def test_a_corrupt_snapshot(ws: RecalWorkspace, snapshot: Path) -> None:
    (snapshot / "feedback.jsonl").write_text((snapshot / "feedback.jsonl").read_text()[:40])
    _refused(ws, snapshot, "corrupt")


def test_a_snapshot_missing_an_image(ws: RecalWorkspace, snapshot: Path) -> None:
    first = json.loads((snapshot / "feedback.jsonl").read_text().splitlines()[0])
    (snapshot / first["image"]).unlink()
    _refused(ws, snapshot, "missing from the snapshot")


def test_images_of_another_size_than_the_model_input(ws: RecalWorkspace, snapshot: Path) -> None:
    first = json.loads((snapshot / "feedback.jsonl").read_text().splitlines()[0])
    for key in ("image", "mask"):
        path = snapshot / first[key]
        Image.open(path).resize((48, 48)).save(path)
    _refused(ws, snapshot, "48x48 px, the model takes 32x32")


def test_a_record_the_store_does_not_have(ws: RecalWorkspace, snapshot: Path, tmp_path: Path) -> None:
    lines = (snapshot / "feedback.jsonl").read_text().splitlines()
    forged = json.loads(lines[0])
    forged["id"] = "00000000-0000-0000-0000-000000000000"
    (snapshot / "feedback.jsonl").write_text("\n".join([json.dumps(forged), *lines[1:]]) + "\n")
    _refused(ws, snapshot, "not in the feedback store", forged["id"])


def test_two_schedulers_at_once(ws: RecalWorkspace) -> None:
    with ProcessLock(state_dir_of(ws.state_dir) / SCHEDULER_LOCK, "a medattn scheduler"):
        with ws.open_store() as store, pytest.raises(LockHeld, match="a medattn scheduler is already running"):
            run_scheduler(load_params(ws.root / "params.yaml"), store, ws.state_dir,
                          job=lambda: pytest.fail("must not run"), poll_seconds=0, max_checks=1)
        second = ws.medattn("scheduler", "--max-checks", "1", "--poll-seconds", "0")
    assert second.returncode == 1
    assert second.stderr.strip().startswith("error: a medattn scheduler is already running"), second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
    assert all(consumed is None for _, consumed in ws.feedback_state())
