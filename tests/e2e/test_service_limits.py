"""The service under hostile and careless clients (issue 8, items 1, 2, 7, 8), on a real ``bentoml serve``.

- Memory: bombs of several shapes (1-bit and 16-bit PNGs, a huge-but-small JPEG, a DICOM header
  declaring a large image, batches of them, brush masks declaring huge sizes) are sent while a
  sampler thread reads the RSS of every process of the server (API worker and model runner) with
  psutil; each process's peak stays within the configured per-request decode budget of its
  baseline, also while eight clients send at once (they share a budget of decoded bytes in
  flight). Refusals are 413s naming the limit.
- The frame: an EXIF-rotated JPEG is predicted upright and ROIs drawn on the displayed image fit.
- Stored uploads: what the blob store keeps has no trailing bytes and no text chunks; an image of
  a refused aspect ratio is not stored; blobs of uncited predictions expire, cited ones stay.
"""

from __future__ import annotations

import base64
import io
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image, PngImagePlugin
from service_harness import MODEL_NAME, Served, start_served

from tests.unit.test_imaging import dicom_bytes

pytestmark = pytest.mark.e2e

MAX_DECODED_BYTES = 48 * 2**20
MAX_BATCH_DECODED_BYTES = 96 * 2**20
MAX_FRAME_PIXELS = 1_000_000
RETENTION_HOURS = 0.005  # 18 s: long enough for a test to give feedback, short enough to watch expire
SECRET = b"Patient: Jane Doe, born 1970-01-01"
JUNK = b"JUNK-AFTER-IEND" * 64


@pytest.fixture(scope="module")
def service(registry) -> Iterator[Served]:
    running = start_served(
        registry,
        MEDATTN_MAX_UPLOAD_BYTES=str(8 * 2**20),
        MEDATTN_MAX_IMAGE_PIXELS="60000000",  # 7000 x 7000 passes the pixel cap: the byte budget must hold
        MEDATTN_MAX_DECODED_BYTES=str(MAX_DECODED_BYTES),
        MEDATTN_MAX_BATCH_DECODED_BYTES=str(MAX_BATCH_DECODED_BYTES),
        MEDATTN_MAX_FRAME_PIXELS=str(MAX_FRAME_PIXELS),
        # Concurrent requests share one request's budget: they queue rather than add up.
        MEDATTN_MAX_INFLIGHT_DECODED_BYTES=str(MAX_BATCH_DECODED_BYTES),
        MEDATTN_DECODE_WAIT_SECONDS="300",
        MEDATTN_MAX_BATCH_IMAGES="16",
        MEDATTN_MAX_FEEDBACK_MASK_PIXELS=str(4 * 2**20),
        MEDATTN_UPLOAD_RETENTION_HOURS=str(RETENTION_HOURS),
        MEDATTN_RETENTION_SWEEP_SECONDS="0",
    )
    try:
        yield running
    finally:
        running.server.stop()


@pytest.fixture(scope="module")
def client(service: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=120) as http:
        yield http


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def predict(client: httpx.Client, service: Served, data: bytes, content_type: str = "image/png") -> httpx.Response:
    return client.post("/predict", files={"image": ("upload", data, content_type)}, headers=service.headers("predict"))


def predict_batch(client: httpx.Client, service: Served, images: list[bytes], content_type: str) -> httpx.Response:
    files = [("images", (f"u{i}", data, content_type)) for i, data in enumerate(images)]
    return client.post("/predict_batch", files=files, headers=service.headers("predict"))


def feedback(client: httpx.Client, service: Served, request_id: str, rois: list[dict]) -> httpx.Response:
    body = {"request_id": request_id, "model_name": MODEL_NAME, "model_version": "1", "expert_id": "expert",
            "rois": rois}
    return client.post("/feedback", json=body, headers=service.headers("expert"))


def assert_refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, detail


def blob_files(service: Served) -> set[Path]:
    return {p for p in (service.state_dir / "blobs").rglob("*") if p.is_file()}


def blob_of(service: Served, request_id: str) -> Path:
    with sqlite3.connect(service.state_dir / "feedback.db") as db:
        (sha,) = db.execute("SELECT image_sha256 FROM predictions WHERE request_id = ?", (request_id,)).fetchone()
    return service.state_dir / "blobs" / sha[:2] / sha[2:]


class RssSampler:
    """Peak RSS per process of the server tree, sampled in a thread until stopped."""

    def __init__(self, processes: list[psutil.Process]) -> None:
        self.processes = processes
        self.baseline = {p.pid: p.memory_info().rss for p in processes}
        self.peak = dict(self.baseline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in self.processes:
                try:
                    self.peak[proc.pid] = max(self.peak[proc.pid], proc.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            self._stop.wait(0.005)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def growth(self) -> dict[str, int]:
        names = {p.pid: f"{p.pid} {' '.join(p.cmdline())[-160:]}" for p in self.processes}
        return {names[pid]: self.peak[pid] - self.baseline[pid] for pid in self.peak}


def rle_brush(side: int) -> dict:
    return {"shape": "brush", "kind": "relevant", "rle": {"width": side, "height": side, "counts": [side * side]}}


def concurrent_batch(service: Served, images: list[bytes]) -> int:
    with httpx.Client(base_url=service.url, timeout=300) as own_client:
        content_type = "image/jpeg" if images[0].startswith(b"\xff\xd8") else "image/png"
        return predict_batch(own_client, service, images, content_type).status_code


def test_bombs_of_every_shape_are_refused_or_reduced_within_the_memory_budget(client, service):
    warm = predict(client, service, encode(noise(64, 48), "PNG"))  # first prediction: lazy imports, caches
    assert warm.status_code == 200, warm.text
    one_bit = encode(Image.new("1", (7000, 7000)), "PNG")  # ~6 KB, 49 M pixels
    sixteen_bit = encode(Image.new("I;16", (4000, 4000)), "PNG")
    big_jpeg = encode(Image.new("RGB", (6000, 6000), (90, 60, 30)), "JPEG", quality=50)
    big_dicom = dicom_bytes(np.zeros((4, 4), dtype=np.uint16), rows=6000, columns=6000)
    small_one_bit = encode(Image.new("1", (2000, 2000)), "PNG")
    assert max(map(len, (one_bit, sixteen_bit, big_jpeg, big_dicom))) < 2 * 2**20

    with RssSampler(service.server.processes()) as rss:
        for _ in range(3):
            assert_refused(predict(client, service, one_bit), 413, f"over the limit of {MAX_DECODED_BYTES} decoded")
            assert_refused(predict(client, service, sixteen_bit), 413, "mode I;16", "decoded bytes per image")
            assert_refused(predict(client, service, big_dicom, "application/dicom"), 413, "decoded bytes per image")
            assert_refused(predict_batch(client, service, [small_one_bit] * 16, "image/png"), 413,
                           f"over the limit of {MAX_BATCH_DECODED_BYTES} decoded bytes per request")
            assert_refused(predict_batch(client, service, [one_bit] * 16, "image/png"), 413, "images[0]")
            drafted = predict(client, service, big_jpeg, "image/jpeg")
            assert drafted.status_code == 200, drafted.text
            frame = drafted.json()["image"]
            assert frame["width"] * frame["height"] <= MAX_FRAME_PIXELS and frame["width"] == frame["height"]
            batch = predict_batch(client, service, [big_jpeg] * 3, "image/jpeg")
            assert batch.status_code == 200, batch.text
            masks = feedback(client, service, drafted.json()["request_id"], [rle_brush(16384)] * 20)
            assert_refused(masks, 413, "mask pixels per feedback")
            one_mask = feedback(client, service, drafted.json()["request_id"], [rle_brush(16384)])
            assert_refused(one_mask, 413, "mask pixels per feedback")
            wrong_size = feedback(client, service, drafted.json()["request_id"], [rle_brush(1024)])
            assert_refused(wrong_size, 422, f"but the image is {frame['width']}x{frame['height']}")
        # Eight clients at once, each within its request budget: together they must not add up.
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda i: concurrent_batch(service, [big_jpeg] * 3 if i % 2 else [one_bit] * 2),
                                    range(16)))
        assert sorted(set(answers)) == [200, 413], answers
    growth = rss.growth()
    print("peak RSS growth per server process (bytes):", growth)
    assert len(growth) >= 3  # arbiter, API worker, model runner
    for process, grown in growth.items():
        assert grown < MAX_BATCH_DECODED_BYTES, f"{process} grew by {grown} bytes: {growth}"


def test_exif_rotated_jpeg_is_predicted_mapped_and_bounds_checked_upright(client, service):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 96 x 48 (landscape), displayed 48 x 96 (portrait)
    response = predict(client, service, encode(noise(96, 48), "JPEG", exif=exif.tobytes(), quality=95), "image/jpeg")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] == {"width": 48, "height": 96}
    attention = Image.open(io.BytesIO(base64.b64decode(body["attention_png"])))
    assert attention.size == (48, 96)
    # Drawn on the displayed image: inside 48 x 96, outside the stored 96 x 48.
    roi = {"shape": "rectangle", "kind": "relevant", "x": 4, "y": 60, "width": 30, "height": 30}
    receipt = feedback(client, service, body["request_id"], [roi])
    assert receipt.status_code == 201, receipt.text
    stored = service.state_dir / "blobs" / receipt.json()["image_sha256"][:2] / receipt.json()["image_sha256"][2:]
    assert Image.open(stored).size == (48, 96)


def test_the_stored_upload_keeps_neither_trailing_bytes_nor_text_chunks(client, service):
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", SECRET.decode())
    upload = encode(noise(40, 30, seed=5), "PNG", pnginfo=info) + JUNK
    response = predict(client, service, upload)
    assert response.status_code == 200, response.text
    kept = blob_of(service, response.json()["request_id"]).read_bytes()
    assert SECRET not in kept and JUNK[:15] not in kept
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(kept)).convert("RGB")), np.asarray(noise(40, 30, seed=5)))


def test_an_aspect_ratio_the_model_cannot_use_is_refused_and_not_stored(client, service):
    before = blob_files(service)
    assert_refused(predict(client, service, encode(noise(400, 20), "PNG")), 422, "aspect ratio")
    assert_refused(predict_batch(client, service, [encode(noise(40, 30), "PNG"), encode(noise(20, 400), "PNG")],
                                 "image/png"), 422, "images[1]", "aspect ratio")
    assert blob_files(service) == before


def test_blobs_of_predictions_without_feedback_expire_and_cited_ones_never_do(client, service):
    lonely = predict(client, service, encode(noise(30, 30, seed=11), "PNG")).json()["request_id"]
    cited = predict(client, service, encode(noise(30, 30, seed=12), "PNG")).json()["request_id"]
    roi = {"shape": "rectangle", "kind": "irrelevant", "x": 1, "y": 1, "width": 5, "height": 5}
    assert feedback(client, service, cited, [roi]).status_code == 201
    lonely_blob, cited_blob = blob_of(service, lonely), blob_of(service, cited)
    assert lonely_blob.is_file() and cited_blob.is_file()
    time.sleep(RETENTION_HOURS * 3600 + 1)  # both are now past the retention period
    deadline = time.monotonic() + 60
    while lonely_blob.exists() and time.monotonic() < deadline:
        # Any prediction starts a sweep in the background (MEDATTN_RETENTION_SWEEP_SECONDS=0).
        assert predict(client, service, encode(noise(30, 30, seed=13), "PNG")).status_code == 200
        time.sleep(0.5)
    assert not lonely_blob.exists(), "the uncited prediction's blob was not expired"
    assert cited_blob.is_file(), "a blob that feedback cites was deleted"
    assert feedback(client, service, lonely, [roi]).status_code == 404
    listed = client.get("/feedback", headers=service.headers("expert")).json()["items"]
    assert all((service.state_dir / "blobs" / r["image_sha256"][:2] / r["image_sha256"][2:]).is_file() for r in listed)
