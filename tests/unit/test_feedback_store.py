"""Feedback persistence: blob store, SQL store (SQLite here; tests/e2e re-runs the backend-agnostic
ones on a real PostgreSQL), and the DVC snapshot export."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from medattn.errors import DataError, ParamError
from medattn.feedback.blobs import BlobStore
from medattn.feedback.export import export_command, export_snapshot, image_extension
from medattn.feedback.schema import (
    FeedbackConflict,
    FeedbackNotFound,
    FeedbackSubmission,
    InvalidFeedback,
    StoreUnavailable,
    UnknownRequest,
    parse_submission,
)
from medattn.feedback.store import FeedbackStore, scoped_idempotency_key

W, H = 16, 12
SHA_A, SHA_B = "a" * 64, "b" * 64


def submission(request_id: str | None = None, version: str = "3", x: float = 2, **fields: Any) -> FeedbackSubmission:
    return parse_submission({
        "request_id": request_id, "model_name": "medattn-fundus", "model_version": version,
        "expert_id": "dr-lee", **fields,
        "rois": [{"shape": "rectangle", "kind": "relevant", "x": x, "y": 1, "width": 4, "height": 3},
                 {"shape": "polygon", "kind": "irrelevant", "points": [[8, 2], [14, 2], [10, 9]]}]})


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state' / 'feedback.db'}"


@pytest.fixture
def store(store_url: str) -> Iterator[FeedbackStore]:
    with FeedbackStore(store_url) as opened:
        yield opened


# -- backend-agnostic store behaviour (also run on PostgreSQL by tests/e2e) ---------------------------

def test_round_trip_of_prediction_and_feedback(store: FeedbackStore, store_url: str) -> None:
    prediction = store.record_prediction("req-1", SHA_A, W, H, "medattn-fundus", "3", "2",
                                         {"0": 0.1, "1": 0.0, "2": 0.9})
    record, created = store.add_feedback(submission("req-1", corrected_label="1", comment="decoy, not lesion"))
    assert created
    assert (record.image_sha256, record.width, record.height) == (SHA_A, W, H)  # taken from the prediction
    assert record.created_at.tzinfo == timezone.utc and record.consumed_by_retrain is None
    assert [roi["shape"] for roi in record.rois] == ["rectangle", "polygon"]
    assert store.get(record.id) == record == store.get(str(record.id))
    assert store.get_prediction("req-1") == prediction
    with FeedbackStore(store_url) as reopened:  # committed, not just cached in this process
        assert reopened.get(record.id) == record
    assert json.loads(json.dumps(record.to_json()))["id"] == str(record.id)


def test_feedback_on_an_uploaded_image_needs_the_image(store: FeedbackStore) -> None:
    record, created = store.add_feedback(submission(), SHA_B, W, H)
    assert created and record.request_id is None and record.image_sha256 == SHA_B
    with pytest.raises(InvalidFeedback, match="either a request_id or the image"):
        store.add_feedback(submission())
    with pytest.raises(InvalidFeedback, match="not 64 lowercase hex digits"):
        store.add_feedback(submission(), "not-a-digest", W, H)


def test_feedback_is_checked_against_the_prediction(store: FeedbackStore) -> None:
    store.record_prediction("req-1", SHA_A, W, H, "medattn-fundus", "3", "2", [0.1, 0.9])
    with pytest.raises(UnknownRequest, match="'req-404'"):
        store.add_feedback(submission("req-404"))
    with pytest.raises(InvalidFeedback, match="model_version '4' differs from '3'"):
        store.add_feedback(submission("req-1", version="4"))
    with pytest.raises(InvalidFeedback, match="image_sha256 'bbbb"):
        store.add_feedback(submission("req-1"), SHA_B, W, H)
    with pytest.raises(InvalidFeedback, match=r"rois\[0\] \(rectangle\).*outside the 16x12 image"):
        store.add_feedback(submission("req-1", x=14))
    assert store.list_feedback() == []


def test_record_prediction_is_idempotent_but_not_overwritable(store: FeedbackStore) -> None:
    first = store.record_prediction("req-1", SHA_A, W, H, "medattn-fundus", "3", "2", [0.1, 0.9])
    assert store.record_prediction("req-1", SHA_A, W, H, "medattn-fundus", "3", "2", (0.1, 0.9)) == first
    with pytest.raises(FeedbackConflict, match="'req-1'"):
        store.record_prediction("req-1", SHA_A, W, H, "medattn-fundus", "3", "0", [0.9, 0.1])


def test_idempotency_key_replays_or_conflicts(store: FeedbackStore) -> None:
    first, created = store.add_feedback(submission(), SHA_A, W, H, idempotency_key="key-1")
    again, created_again = store.add_feedback(submission(), SHA_A, W, H, idempotency_key="key-1")
    assert created and not created_again and again == first
    with pytest.raises(FeedbackConflict, match="'key-1' was already used"):
        store.add_feedback(submission(x=3), SHA_A, W, H, idempotency_key="key-1")
    with pytest.raises(FeedbackConflict):  # same ROIs on another image is another body too
        store.add_feedback(submission(), SHA_B, W, H, idempotency_key="key-1")
    other, created_other = store.add_feedback(submission(), SHA_A, W, H)  # no key: a new record
    assert created_other and other.id != first.id
    assert len(store.list_feedback()) == 2


def test_concurrent_writers_store_every_record_exactly_once(store: FeedbackStore) -> None:
    # 200 keys; threads t and t+4 send the same keys in the same order, so every key races with
    # itself (a client retry landing mid-request) as well as with the other keys' writes.
    lanes = [[f"key-{n}" for n in range(200) if n % 4 == lane] for lane in range(4)]
    start = threading.Barrier(8)

    def worker(thread: int) -> list[tuple[str, uuid.UUID, bool]]:
        start.wait()
        results = []
        for key in lanes[thread % 4]:
            record, created = store.add_feedback(submission(x=int(key[4:]) % 10), SHA_A, W, H,
                                                 idempotency_key=key)
            results.append((key, record.id, created))
        return results

    with ThreadPoolExecutor(8) as pool:
        results = [r for chunk in pool.map(worker, range(8)) for r in chunk]
    stored = list(store.iter_feedback(batch_size=37))
    assert len(stored) == 200
    # Stored scoped to the caller (none here): a digest of (caller, key), see scoped_idempotency_key.
    assert sorted(r.idempotency_key for r in stored) == sorted(scoped_idempotency_key(None, f"key-{n}")
                                                               for n in range(200))
    ids_by_key = {r.idempotency_key: r.id for r in stored}
    ids_by_key = {key: ids_by_key[scoped_idempotency_key(None, key)] for key in (f"key-{n}" for n in range(200))}
    assert len(results) == 400
    assert all(ids_by_key[key] == record_id for key, record_id, _ in results)  # both sends got the one id
    assert sum(created for _, _, created in results) == 200


def test_idempotency_keys_are_scoped_to_the_caller(store: FeedbackStore) -> None:
    mine, created = store.add_feedback(submission(), SHA_A, W, H, idempotency_key="k", caller="alice")
    theirs, created_theirs = store.add_feedback(submission(), SHA_A, W, H, idempotency_key="k", caller="bob")
    assert created and created_theirs and theirs.id != mine.id  # bob's key never replays alice's record
    with pytest.raises(FeedbackConflict) as caught:
        store.add_feedback(submission(x=3), SHA_A, W, H, idempotency_key="k", caller="bob")
    assert str(theirs.id) in str(caught.value) and str(mine.id) not in str(caught.value)
    again, created_again = store.add_feedback(submission(), SHA_A, W, H, idempotency_key="k", caller="alice")
    assert (again.id, created_again) == (mine.id, False)
    # Lengths are part of the digest: ("ab", "c") and ("a", "bc") are different scopes.
    assert scoped_idempotency_key("ab", "c") != scoped_idempotency_key("a", "bc")


def test_corrected_label_must_be_a_class_of_the_model(store: FeedbackStore) -> None:
    store.record_prediction("req-c", SHA_A, W, H, "medattn-fundus", "3", "mild", {"healthy": 0.2, "mild": 0.8})
    assert store.add_feedback(submission("req-c", corrected_label="healthy"))[1]
    with pytest.raises(InvalidFeedback, match="not a class .*classes: healthy, mild"):
        store.add_feedback(submission("req-c", corrected_label="severe"))
    # Without a request_id: the classes given, else those of a stored prediction of that version.
    with pytest.raises(InvalidFeedback, match="not a class"):
        store.add_feedback(submission(corrected_label="2"), SHA_B, W, H, class_names=["0", "1"])
    assert store.add_feedback(submission(corrected_label="mild"), SHA_B, W, H)[1]
    with pytest.raises(InvalidFeedback, match="not known here"):
        store.add_feedback(submission(version="9", corrected_label="mild"), SHA_B, W, H)


def test_model_versions_are_canonical() -> None:
    assert submission(version="0002").model_version == "2"
    for bad in ("\uff11", "\u00b2", "0", "-1", "1.0", " ", "1e3"):
        with pytest.raises(InvalidFeedback, match="model_version"):
            submission(version=bad)


def test_list_filters_and_paging(store: FeedbackStore) -> None:
    made = [store.add_feedback(submission(version=v), SHA_A, W, H)[0] for v in ("3", "3", "4", "3", "4")]
    assert [r.id for r in store.list_feedback()] == [r.id for r in made]  # oldest first
    assert [r.id for r in store.list_feedback(model_version="4")] == [made[2].id, made[4].id]
    since = made[2].created_at
    assert [r.id for r in store.list_feedback(since=since)] == [r.id for r in made if r.created_at >= since]
    naive_since = since.replace(tzinfo=None)  # naive means UTC
    assert store.list_feedback(since=naive_since) == store.list_feedback(since=since)
    assert store.list_feedback(since=since + timedelta(days=1)) == []
    assert [r.id for r in store.list_feedback(limit=2, offset=1)] == [made[1].id, made[2].id]
    assert [r.id for r in store.iter_feedback(since=since, batch_size=1)] == [r.id for r in made[2:]]
    with pytest.raises(InvalidFeedback, match="limit must be in"):
        store.list_feedback(limit=0)


def test_pending_consumed_and_released(store: FeedbackStore) -> None:
    made = [store.add_feedback(submission(), SHA_A, W, H)[0] for _ in range(4)]
    assert store.count_pending() == 4
    assert store.count_pending(since=made[2].created_at) == sum(r.created_at >= made[2].created_at for r in made)
    assert store.mark_consumed([made[0].id, str(made[1].id)], "retrain-1") == 2
    assert store.mark_consumed([made[0].id], "retrain-1") == 0  # again for the same retrain: no-op
    assert store.count_pending() == 2
    assert [r.id for r in store.list_feedback(pending_only=True)] == [made[2].id, made[3].id]
    assert store.get(made[0].id).consumed_by_retrain == "retrain-1"
    with pytest.raises(FeedbackConflict, match="already consumed by retrain 'retrain-1'"):
        store.mark_consumed([made[1].id, made[2].id], "retrain-2")
    assert store.count_pending() == 2  # the failed call marked nothing
    with pytest.raises(FeedbackNotFound):
        store.mark_consumed([uuid.uuid4()], "retrain-2")
    assert store.release_consumed("retrain-1") == 2
    assert store.count_pending() == 4


def test_unknown_ids_are_not_found(store: FeedbackStore) -> None:
    with pytest.raises(FeedbackNotFound, match="no feedback with id"):
        store.get(uuid.uuid4())
    with pytest.raises(FeedbackNotFound, match="not a UUID"):
        store.get("1; DROP TABLE feedback")
    with pytest.raises(UnknownRequest):
        store.get_prediction("nope")


def test_store_refuses_a_database_of_another_schema_version(store: FeedbackStore, store_url: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE feedback_schema SET version = 99"))
    with pytest.raises(StoreUnavailable, match="schema version 99, this medattn expects 1"):
        FeedbackStore(store_url)


# -- SQLite specifics ---------------------------------------------------------------------------------

def test_sqlite_runs_in_wal_mode_with_full_sync(store: FeedbackStore, tmp_path: Path) -> None:
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    assert (tmp_path / "state" / "feedback.db").is_file()  # parent folder created
    with FeedbackStore(tmp_path / "plain-path.db") as by_path:
        assert by_path.engine.dialect.name == "sqlite"


@pytest.mark.parametrize("url, message", [
    ("mysql://u@h/db", "only sqlite:/// and postgresql"),
    ("sqlite://", "in-memory SQLite database is not durable"),
    ("sqlite:///:memory:", "in-memory"),
    ("postgresql://u:secret@127.0.0.1:1/db", "u:\\*\\*\\*@127.0.0.1"),  # unreachable, password hidden
])
def test_unusable_database_urls(url: str, message: str) -> None:
    with pytest.raises(StoreUnavailable, match=message) as caught:
        FeedbackStore(url)
    assert "secret" not in str(caught.value)


# -- blobs ----------------------------------------------------------------------------------------------

def test_blob_store_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = b"\x89PNG fake image bytes"
    sha = blobs.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert blobs.path(sha) == tmp_path / "blobs" / sha[:2] / sha[2:]
    assert blobs.exists(sha) and blobs.get(sha) == data
    assert blobs.put(data) == sha
    assert [p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == [sha[2:]]  # no temp files left
    missing = hashlib.sha256(b"other").hexdigest()
    assert not blobs.exists(missing)
    with pytest.raises(FeedbackNotFound, match=missing):
        blobs.get(missing)
    with pytest.raises(InvalidFeedback, match="not a SHA-256"):
        blobs.get("../../etc/passwd")


# -- export ---------------------------------------------------------------------------------------------

def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def filled(store: FeedbackStore, tmp_path: Path) -> tuple[FeedbackStore, BlobStore]:
    blobs = BlobStore(tmp_path / "blobs")
    sha_1, sha_2 = blobs.put(png_bytes(1)), blobs.put(png_bytes(2))
    store.record_prediction("req-1", sha_1, W, H, "medattn-fundus", "3", "2", [0.1, 0.9])
    store.add_feedback(submission("req-1"))
    store.add_feedback(submission(x=5, corrected_label="0"), sha_2, W, H)
    store.add_feedback(submission("req-1", comment="second look"))
    return store, blobs


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_writes_records_images_masks_and_manifest(filled: tuple[FeedbackStore, BlobStore],
                                                         tmp_path: Path) -> None:
    store, blobs = filled
    out = export_snapshot(store, blobs, tmp_path / "export")
    lines = (out / "feedback.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [str(r.id) for r in store.list_feedback()]
    assert lines == [json.dumps(r, sort_keys=True, separators=(",", ":")) for r in records]
    assert all("idempotency_key" not in r and "consumed_by_retrain" not in r for r in records)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records"] == 3 and manifest["images"] == 2 and manifest["masks"] == 3
    assert manifest["rois"] == {"irrelevant": 3, "relevant": 3}
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{r['image_sha256']}.png" for r in records[:2])
    for record in records:
        assert (out / record["image"]).read_bytes() == blobs.get(record["image_sha256"])
        mask = np.asarray(Image.open(out / record["mask"]))
        assert mask.shape == (H, W)
        x = int(record["rois"][0]["x"])
        assert mask[1, x] == 255 and mask[3, 9] == 0 and mask[11, 0] == 128


def test_export_is_deterministic_and_replaces_the_previous_snapshot(filled: tuple[FeedbackStore, BlobStore],
                                                                     tmp_path: Path) -> None:
    store, blobs = filled
    first = folder_bytes(export_snapshot(store, blobs, tmp_path / "a"))
    assert folder_bytes(export_snapshot(store, blobs, tmp_path / "b")) == first
    assert folder_bytes(export_snapshot(store, blobs, tmp_path / "a")) == first  # over its own output
    store.mark_consumed([r.id for r in store.list_feedback()], "retrain-1")  # bookkeeping only
    assert folder_bytes(export_snapshot(store, blobs, tmp_path / "a")) == first
    later = store.list_feedback()[2].created_at
    export_snapshot(store, blobs, tmp_path / "a", since=later)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["records"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left


def test_export_failure_leaves_the_previous_snapshot(filled: tuple[FeedbackStore, BlobStore], tmp_path: Path) -> None:
    store, blobs = filled
    before = folder_bytes(export_snapshot(store, blobs, tmp_path / "export"))
    store.add_feedback(submission(), "c" * 64, W, H)  # its image never reached the blob store
    with pytest.raises(DataError, match="missing from blob store"):
        export_snapshot(store, blobs, tmp_path / "export")
    assert folder_bytes(tmp_path / "export") == before
    (tmp_path / "not-an-export").mkdir()
    (tmp_path / "not-an-export" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a feedback export"):
        export_snapshot(store, blobs, tmp_path / "not-an-export")
    assert (tmp_path / "not-an-export" / "precious.txt").read_text() == "keep me"


def test_export_command(filled: tuple[FeedbackStore, BlobStore], store_url: str, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    _, blobs = filled
    export_command(db_url=store_url, blob_root=blobs.root, out=tmp_path / "cli", since="2000-01-01")
    assert "exported 3 feedback records and 2 images" in capsys.readouterr().out
    with pytest.raises(ParamError, match="--since 'yesterday'"):
        export_command(db_url=store_url, blob_root=blobs.root, out=tmp_path / "cli", since="yesterday")


def test_image_extension_by_content() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG")
    assert image_extension(png_bytes(0)) == ".png"
    assert image_extension(buffer.getvalue()) == ".jpg"
    assert image_extension(b"\0" * 128 + b"DICM" + b"\0" * 16) == ".dcm"
    assert image_extension(b"garbage") == ".bin"
