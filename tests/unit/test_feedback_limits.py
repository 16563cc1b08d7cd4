"""Brush masks are sized from their headers before decoding; mask pixels per feedback are bounded;
uploads of predictions nobody gave feedback on expire, and nothing feedback cites ever does."""

from __future__ import annotations

import struct
import zlib
from base64 import b64encode
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medattn.feedback import rasterize
from medattn.feedback.blobs import BlobStore
from medattn.feedback.retention import UploadRetention
from medattn.feedback.schema import FeedbackTooLarge, InvalidFeedback, UnknownRequest, parse_submission
from medattn.feedback.store import FeedbackStore


def body(*rois: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model_name": "m", "model_version": "1", "expert_id": "dr", "rois": list(rois), **fields}


def png_header_b64(width: int, height: int) -> str:
    """A grey PNG whose IHDR claims width x height, with a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 8)) + chunk(b"IEND", b"")
    return b64encode(png).decode()


def huge_rle(side: int = 16384) -> dict[str, Any]:
    # Two runs summing to side*side: a 2 KB body declaring a 256 MB mask.
    return {"shape": "brush", "kind": "relevant", "rle": {"width": side, "height": side,
                                                          "counts": [side * side - 5, 5]}}


@pytest.fixture
def no_mask_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a mask was decoded before its size was compared with the image")

    monkeypatch.setattr(rasterize, "decode_rle", refuse)
    monkeypatch.setattr(rasterize, "png_mask_to_array", refuse)


@pytest.mark.parametrize("roi", [huge_rle(), {"shape": "brush", "kind": "irrelevant",
                                              "mask_png_base64": png_header_b64(8000, 8000)}])
def test_a_declared_mask_size_is_checked_against_the_image_before_decoding(no_mask_decoding, roi):
    submission = parse_submission(body(roi), max_mask_pixels=2**31)
    with pytest.raises(InvalidFeedback) as info:
        submission.validate_against(64, 48)
    assert "but the image is 64x48" in str(info.value)


def test_total_declared_mask_pixels_per_feedback_are_bounded(no_mask_decoding):
    rois = [huge_rle(1024)] * 5  # 5 x 1 M pixels declared
    with pytest.raises(FeedbackTooLarge) as info:
        parse_submission(body(*rois), max_mask_pixels=4 * 1024 * 1024)
    assert info.value.status_code == 413
    assert "5242880 pixels in all, over the limit of 4194304 mask pixels per feedback" in str(info.value)
    assert len(parse_submission(body(*rois[:4]), max_mask_pixels=4 * 1024 * 1024).rois) == 4


def test_a_mask_of_the_right_size_is_decoded_and_a_damaged_one_refused():
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:3, 2:5] = True
    roi = {"shape": "brush", "kind": "relevant", "rle": {"width": 8, "height": 6, "counts": rasterize.encode_rle(mask)}}
    assert parse_submission(body(roi)).validate_against(8, 6).rois[0].rasterize(6, 8).sum() == 6
    damaged = {"shape": "brush", "kind": "relevant", "mask_png_base64": png_header_b64(8, 6)}
    with pytest.raises(InvalidFeedback) as info:
        parse_submission(body(damaged)).validate_against(8, 6)
    assert "rois[0] (brush)" in str(info.value) and "damaged PNG" in str(info.value)


# ---- retention -----------------------------------------------------------------------------------

@pytest.fixture
def stores(tmp_path: Path):
    with FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}") as store:
        yield store, BlobStore(tmp_path / "blobs")


def predict(store: FeedbackStore, blobs: BlobStore, request_id: str, data: bytes) -> str:
    sha = blobs.put(data)
    store.record_prediction(request_id, sha, 8, 6, "m", "1", "a", {"a": 1.0})
    return sha


def feedback_on(store: FeedbackStore, request_id: str | None = None, **image: Any):
    rect = {"shape": "rectangle", "kind": "relevant", "x": 1, "y": 1, "width": 2, "height": 2}
    return store.add_feedback(parse_submission(body(rect, request_id=request_id)), **image)


def age(store: FeedbackStore, request_id: str, hours: float) -> None:
    from sqlalchemy import update

    from medattn.feedback.store import predictions

    with store.engine.begin() as conn:
        conn.execute(update(predictions).where(predictions.c.request_id == request_id)
                     .values(created_at=datetime.now(timezone.utc) - timedelta(hours=hours)))


def test_retention_expires_only_uncited_old_predictions_and_keeps_every_blob_feedback_cites(stores):
    store, blobs = stores
    lonely = predict(store, blobs, "lonely", b"image never reviewed")
    reviewed = predict(store, blobs, "reviewed", b"image with feedback")
    feedback_on(store, "reviewed")
    shared = predict(store, blobs, "shared", b"same bytes as a direct feedback upload")
    feedback_on(store, None, image_sha256=shared, width=8, height=6)  # cites the blob, not the prediction
    twin = predict(store, blobs, "twin", b"bytes predicted twice")
    assert predict(store, blobs, "young", b"bytes predicted twice") == twin
    for request_id in ("lonely", "reviewed", "shared", "twin"):
        age(store, request_id, hours=3)

    assert UploadRetention(store, blobs, retention_hours=1, sweep_seconds=0).sweep() == (3, 1)
    assert not blobs.exists(lonely)
    assert all(blobs.exists(sha) for sha in (reviewed, shared, twin))
    assert store.get_prediction("reviewed").image_sha256 == reviewed and store.get_prediction("young")
    for gone in ("lonely", "shared", "twin"):
        with pytest.raises(UnknownRequest):
            store.get_prediction(gone)
    with pytest.raises(UnknownRequest):  # feedback on an expired prediction: 404, not a dangling record
        feedback_on(store, "lonely")
    assert UploadRetention(store, blobs, retention_hours=1, sweep_seconds=0).sweep() == (0, 0)


def test_retention_zero_keeps_everything_and_sweeps_are_rate_limited(stores):
    store, blobs = stores
    sha = predict(store, blobs, "old", b"old image")
    age(store, "old", hours=10_000)
    assert UploadRetention(store, blobs, retention_hours=0, sweep_seconds=0).maybe_sweep() is None
    assert blobs.exists(sha)
    hourly = UploadRetention(store, blobs, retention_hours=1, sweep_seconds=3600)
    assert hourly.maybe_sweep() == (1, 1) and not blobs.exists(sha)
    predict(store, blobs, "old-2", b"another")
    age(store, "old-2", hours=5)
    assert hourly.maybe_sweep() is None and not hourly.due()  # the interval has not passed
