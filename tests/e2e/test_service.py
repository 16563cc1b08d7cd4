"""The medattn service as clients see it: a real ``bentoml serve`` on loopback (see conftest).

One server for the module (start-up takes seconds). The tests run in file order; the champion
switch comes last because it changes which model answers.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_harness import (
    CLASS_NAMES,
    IMAGE_SIZE,
    MAX_UPLOAD_BYTES,
    MODEL_NAME,
    Served,
    make_tiny_bundle,
    register_version,
    start_served,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_imaging import dicom_bytes, png_header_only  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def service(registry) -> Served:
    running = start_served(registry, MEDATTN_POLL_SECONDS="1")
    try:
        yield running
    finally:
        running.server.stop()


@pytest.fixture(scope="module")
def client(service: Served) -> httpx.Client:
    with httpx.Client(base_url=service.url, timeout=60) as http:
        yield http


def image_bytes(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def same_pixels(stored: bytes, uploaded: bytes) -> bool:
    def rgb(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    return np.array_equal(rgb(stored), rgb(uploaded))


def predict(client: httpx.Client, service: Served, data: bytes, content_type: str = "image/png",
            **params) -> httpx.Response:
    return client.post("/predict", files={"image": ("upload", data, content_type)}, params=params,
                       headers=service.headers("predict"))


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"]
    for word in words:
        assert word in body["detail"], body["detail"]


def submission(request_id: str | None, version: str = "1", **changes) -> dict:
    body = {"request_id": request_id, "model_name": MODEL_NAME, "model_version": version,
            "expert_id": "expert", "comment": "lesion missed", "corrected_label": "severe",
            "rois": [{"shape": "rectangle", "kind": "relevant", "x": 2, "y": 3, "width": 10, "height": 8},
                     {"shape": "polygon", "kind": "irrelevant", "points": [[20, 5], [40, 5], [30, 20]]}]}
    if request_id is None:
        del body["request_id"]
    body.update(changes)
    return body


# ---- health -------------------------------------------------------------------------------------


def test_liveness_and_readiness(client: httpx.Client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


# ---- predictions --------------------------------------------------------------------------------


def test_prediction_has_probabilities_model_and_attention_at_input_size(client, service):
    response = predict(client, service, image_bytes(50, 40), raw_attention="true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body["probabilities"]) == set(CLASS_NAMES)
    assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-6
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["model"] == {"name": MODEL_NAME, "version": "1"}
    assert len(body["request_id"]) >= 16 and body["image"] == {"width": 50, "height": 40}
    with Image.open(io.BytesIO(base64.b64decode(body["attention_png"]))) as png:
        assert png.format == "PNG" and png.size == (50, 40)
    raw = body["attention"]
    values = np.asarray(raw["values"])
    assert raw["resolution"] == "model" and values.shape == (IMAGE_SIZE, IMAGE_SIZE)
    assert values.min() >= 0.0 and values.max() <= 1.0 and values.std() > 0


def test_raw_attention_only_when_asked(client, service):
    body = predict(client, service, image_bytes(30, 30)).json()
    assert "attention" not in body and "attention_png" in body
    form = client.post("/predict", files={"image": ("x.png", image_bytes(30, 30), "image/png")},
                       data={"raw_attention": "true"}, headers=service.headers("predict"))
    assert np.asarray(form.json()["attention"]["values"]).shape == (IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("fmt, content_type", [("JPEG", "image/jpeg"), ("TIFF", "image/tiff")])
def test_jpeg_and_tiff_uploads(client, service, fmt, content_type):
    response = predict(client, service, image_bytes(64, 48, fmt), content_type)
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": 64, "height": 48}


def test_dicom_upload(client, service):
    pixels = np.linspace(0, 4000, 40 * 24).reshape(24, 40).astype(np.uint16)
    response = predict(client, service, dicom_bytes(pixels, "MONOCHROME1"), "application/dicom")
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": 40, "height": 24}


def test_raw_image_body_is_accepted(client, service):
    response = client.post("/predict", content=image_bytes(20, 10), headers={
        **service.headers("predict"), "Content-Type": "image/png"})
    assert response.status_code == 200 and response.json()["image"] == {"width": 20, "height": 10}


def test_predict_batch_answers_in_order(client, service):
    sizes = [(20, 10), (33, 44), (64, 16)]
    files = [("images", (f"{i}.png", image_bytes(w, h, seed=i), "image/png")) for i, (w, h) in enumerate(sizes)]
    response = client.post("/predict_batch", files=files, headers=service.headers("predict"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(p["image"]["width"], p["image"]["height"]) for p in body] == sizes
    assert len({p["request_id"] for p in body}) == 3


def test_concurrent_predictions_are_all_answered(service):
    from concurrent.futures import ThreadPoolExecutor

    def one(seed: int) -> int:
        with httpx.Client(base_url=service.url, timeout=60) as http:
            return predict(http, service, image_bytes(24, 24, seed=seed)).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(one, range(16))) == [200] * 16


# ---- auth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("header, words", [
    (None, "missing Authorization"), ("Token abc", "malformed"), ("Bearer", "malformed"),
    ("Bearer not-a-valid-token-at-all", "invalid token"),
])
def test_missing_malformed_or_unknown_token_is_401(client, header, words):
    headers = {"Authorization": header} if header is not None else {}
    response = client.post("/predict", files={"image": ("x.png", image_bytes(8, 8), "image/png")}, headers=headers)
    assert_error(response, 401, words)


@pytest.mark.parametrize("role, method, path", [
    ("predict", "POST", "/feedback"), ("predict", "GET", "/feedback"),
    ("expert", "POST", "/reload"), ("expert", "POST", "/promote"), ("expert", "POST", "/rollback"),
])
def test_too_low_a_role_is_403(client, service, role, method, path):
    response = client.request(method, path, json=submission("x"), headers=service.headers(role))
    assert_error(response, 403, role)


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_uploads_are_4xx_with_a_reason(client, service):
    assert_error(predict(client, service, b"%PDF-1.4 not an image", "application/octet-stream"), 422, "not an image")
    png = image_bytes(80, 60)
    assert_error(predict(client, service, png[: len(png) // 2]), 422, "truncated")
    too_big = np.random.default_rng(0).bytes(MAX_UPLOAD_BYTES + 10)
    assert_error(predict(client, service, too_big, "application/octet-stream"), 413, "limit")
    assert_error(predict(client, service, png_header_only(5000, 5000)), 413, "5000x5000")
    assert_error(predict(client, service, png, "text/plain"), 415, "text/plain")
    assert_error(predict(client, service, image_bytes(16, 16, "GIF"), "application/octet-stream"), 415, "GIF")
    wrong_body = client.post("/predict", content=b'{"x": 1}', headers={
        **service.headers("predict"), "Content-Type": "application/json"})
    assert_error(wrong_body, 415, "multipart/form-data")
    no_field = client.post("/predict", files={"picture": ("x.png", png, "image/png")},
                           headers=service.headers("predict"))
    assert_error(no_field, 422, "'image'")
    too_many = [("images", (f"{i}.png", image_bytes(8, 8, seed=i), "image/png")) for i in range(5)]
    assert_error(client.post("/predict_batch", files=too_many, headers=service.headers("predict")), 413, "5 images")
    one_bad = [("images", ("a.png", png, "image/png")), ("images", ("b.txt", b"hello", "application/octet-stream"))]
    assert_error(client.post("/predict_batch", files=one_bad, headers=service.headers("predict")), 422, "images[1]")


def test_unknown_paths_and_wrong_methods_get_the_json_error_body(client, service):
    # Unknown paths never reach the medattn app: BentoML's router answers them (now in JSON).
    assert_error(client.get("/no/such/route", headers=service.headers("admin")), 404, "/no/such/route")
    assert_error(client.post("/predictions"), 404, "/predictions")
    # A wrong method on a medattn route and on one of BentoML's own routes.
    on_predict = client.get("/predict", headers=service.headers("predict"))
    assert_error(on_predict, 405, "GET", "/predict")
    assert on_predict.headers["allow"] == "POST"
    on_livez = client.post("/livez")
    assert_error(on_livez, 405, "POST", "/livez")
    assert "GET" in on_livez.headers["allow"]
    # BentoML's pages and the routes' own 404 are unchanged.
    assert client.get("/docs.json").status_code == 200
    assert client.get("/").status_code == 200
    assert_error(client.get(f"/feedback/{'0' * 32}", headers=service.headers("expert")), 404, "no feedback")


def test_bad_feedback_is_4xx_and_stores_nothing(client, service):
    request_id = predict(client, service, image_bytes(50, 40)).json()["request_id"]
    expert = service.headers("expert")
    before = client.get("/feedback", params={"limit": 1000}, headers=expert).json()["count"]
    outside = submission(request_id, rois=[{"shape": "rectangle", "kind": "relevant", "x": 45, "y": 0,
                                            "width": 10, "height": 5}])
    assert_error(client.post("/feedback", json=outside, headers=expert), 422, "outside")
    flat = submission(request_id, rois=[{"shape": "polygon", "kind": "relevant", "points": [[1, 1], [5, 5], [9, 9]]}])
    assert_error(client.post("/feedback", json=flat, headers=expert), 422, "zero area")
    tiny = submission(request_id, rois=[{"shape": "rectangle", "kind": "relevant", "x": 1, "y": 1, "width": 0,
                                         "height": 4}])
    assert_error(client.post("/feedback", json=tiny, headers=expert), 422, "zero or negative area")
    crowded = submission(request_id, rois=[{"shape": "polygon", "kind": "relevant",
                                            "points": [[i % 50, i % 40] for i in range(1001)]}])
    assert_error(client.post("/feedback", json=crowded, headers=expert), 422, "points")
    assert_error(client.post("/feedback", json=submission(request_id, version="2"), headers=expert), 422,
                 "model_version")
    assert_error(client.post("/feedback", json=submission("no-such-request"), headers=expert), 404, "no-such-request")
    assert_error(client.post("/feedback", content=b"{not json", headers={**expert, "Content-Type": "application/json"}),
                 422, "JSON")
    no_image = submission(None)
    assert_error(client.post("/feedback", json=no_image, headers=expert), 422, "request_id or the image")
    unknown_version = client.post("/feedback", files={"feedback": (None, json.dumps(submission(None, version="99"))),
                                                      "image": ("x.png", image_bytes(50, 40), "image/png")},
                                  headers=expert)
    assert_error(unknown_version, 422, "unknown model version")
    assert_error(client.get("/feedback", params={"model_version": "99"}, headers=expert), 422, "unknown model version")
    assert_error(client.get("/feedback", params={"since": "last tuesday"}, headers=expert), 422, "since")
    impostor = submission(request_id, expert_id="someone-else")
    assert_error(client.post("/feedback", json=impostor, headers=expert), 403, "someone-else")
    after = client.get("/feedback", params={"limit": 1000}, headers=expert).json()["count"]
    assert after == before


# ---- feedback -----------------------------------------------------------------------------------


def test_feedback_round_trip_with_request_id_and_idempotency(client, service):
    request_id = predict(client, service, image_bytes(50, 40, seed=9)).json()["request_id"]
    expert = {**service.headers("expert"), "Idempotency-Key": f"round-trip-{request_id}"}
    brush = {"shape": "brush", "kind": "relevant", "rle": {"width": 50, "height": 40, "counts": [100, 60, 1840]}}
    body = submission(request_id, rois=[*submission(request_id)["rois"], brush])
    created = client.post("/feedback", json=body, headers=expert)
    assert created.status_code == 201, created.text
    receipt = created.json()
    assert receipt["request_id"] == request_id and receipt["replayed"] is False
    assert created.headers["location"] == f"/feedback/{receipt['id']}"

    replay = client.post("/feedback", json=body, headers=expert)
    assert replay.status_code == 200 and replay.json()["id"] == receipt["id"] and replay.json()["replayed"]
    conflict = client.post("/feedback", json={**body, "comment": "changed my mind"}, headers=expert)
    assert_error(conflict, 409, "Idempotency-Key")

    stored = client.get(f"/feedback/{receipt['id']}", headers=service.headers("expert")).json()
    assert stored["rois"][2]["rle"]["counts"] == [100, 60, 1840]
    assert (stored["width"], stored["height"], stored["model_version"]) == (50, 40, "1")
    assert stored["corrected_label"] == "severe" and stored["expert_id"] == "expert"
    blob = service.state_dir / "blobs" / stored["image_sha256"][:2] / stored["image_sha256"][2:]
    assert same_pixels(blob.read_bytes(), image_bytes(50, 40, seed=9))  # stored re-encoded: the frame's pixels

    listed = client.get("/feedback", params={"model_version": "1", "limit": 1000},
                        headers=service.headers("expert")).json()
    assert [item["id"] for item in listed["items"]].count(receipt["id"]) == 1
    later = client.get("/feedback", params={"since": "2999-01-01T00:00:00Z"}, headers=service.headers("expert")).json()
    assert later["items"] == []


def test_feedback_with_the_image_itself(client, service):
    image = image_bytes(30, 20, seed=11)
    response = client.post("/feedback", files={"feedback": (None, json.dumps(submission(None, rois=[
        {"shape": "rectangle", "kind": "irrelevant", "x": 0, "y": 0, "width": 5, "height": 5}]))),
        "image": ("scan.png", image, "image/png")}, headers=service.headers("expert"))
    assert response.status_code == 201, response.text
    record = client.get(f"/feedback/{response.json()['id']}", headers=service.headers("expert")).json()
    assert record["request_id"] is None and (record["width"], record["height"]) == (30, 20)
    blob = service.state_dir / "blobs" / record["image_sha256"][:2] / record["image_sha256"][2:]
    assert same_pixels(blob.read_bytes(), image)


# ---- monitoring ---------------------------------------------------------------------------------


def test_metrics_keep_bentoml_request_metrics_and_add_ours(client, service):
    text = client.get("/metrics").text
    assert 'bentoml_service_request_total{endpoint="/predict",http_response_code="200"' in text
    assert "bentoml_service_request_duration_seconds_bucket" in text
    # No adaptive-batch series here: in the default auto mode this tiny model is served in the API
    # process; test_service_inference_modes.py checks the runner's batching metrics.
    assert 'inference' in client.get("/model", headers=service.headers("predict")).json()
    assert 'medattn_predictions_total{label=' in text and 'model_version="1"' in text
    assert f'medattn_model_info{{model_name="{MODEL_NAME}",version="1"}} 1.0' in text
    assert "medattn_model_loaded 1.0" in text
    assert 'medattn_errors_total{endpoint="/predict",error_type="AuthError",http_status="401"}' in text
    assert "medattn_feedback_total" in text and "medattn_attention_entropy_bucket" in text


# ---- readiness: no champion, no readiness -------------------------------------------------------


def test_not_ready_until_a_champion_exists_then_reload_serves_it(tmp_path):
    from medattn.registry import assign_challenger_and_gate

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = register_version(tracking_uri, make_tiny_bundle(tmp_path / "bundle", seed=3), metric=0.5)
    empty = start_served((tracking_uri, tmp_path), probe="/livez")  # registered, but no champion yet
    try:
        with httpx.Client(base_url=empty.url, timeout=60) as http:
            assert http.get("/livez").status_code == 200
            assert http.get("/readyz").status_code == 503
            assert_error(predict(http, empty, image_bytes(16, 16)), 503, "champion")
            assert http.get("/model", headers=empty.headers("predict")).json()["loaded"] is False
            assert "medattn_model_loaded 0.0" in http.get("/metrics").text
            assert_error(http.post("/reload", headers=empty.headers("admin")), 409, "champion")

            assign_challenger_and_gate(MODEL_NAME, version, tracking_uri=tracking_uri)
            reloaded = http.post("/reload", headers=empty.headers("admin"))
            assert reloaded.status_code == 200 and reloaded.json()["model"]["version"] == version
            assert http.get("/readyz").status_code == 200
            assert predict(http, empty, image_bytes(16, 16)).json()["model"]["version"] == version
    finally:
        empty.server.stop()


# ---- champion switch (last: it changes the served model) ----------------------------------------


def served_version(client: httpx.Client, service: Served) -> str:
    return predict(client, service, image_bytes(16, 16)).json()["model"]["version"]


def wait_for_version(client: httpx.Client, service: Served, version: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get("/model", headers=service.headers("predict")).json()
        if (status.get("model") or {}).get("version") == version:
            return
        time.sleep(0.5)
    raise AssertionError(f"the service did not switch to version {version}: {status}")


def test_champion_switch_by_admin_and_by_polling(client, service):
    from medattn.registry import assign_challenger_and_gate, promote_challenger

    version = register_version(service.tracking_uri, make_tiny_bundle(service.workdir / "bundle-v2", seed=2),
                               metric=0.1)
    gate = assign_challenger_and_gate(MODEL_NAME, version, tracking_uri=service.tracking_uri)
    assert version == "2" and not gate.promoted  # worse metric: only challenger, v1 still serves
    assert served_version(client, service) == "1"

    promoted = client.post("/promote", headers=service.headers("admin"))
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["champion"]["version"] == "2"
    assert served_version(client, service) == "2"

    rolled_back = client.post("/rollback", headers=service.headers("admin"))
    assert rolled_back.status_code == 200 and rolled_back.json()["champion"]["version"] == "1"
    assert served_version(client, service) == "1"
    assert client.post("/reload", headers=service.headers("admin")).json()["changed"] is False

    # Moved behind the service's back: the poller (every second here) picks it up, no restart.
    promote_challenger(MODEL_NAME, tracking_uri=service.tracking_uri)
    wait_for_version(client, service, "2")
    assert served_version(client, service) == "2"
    metrics = client.get("/metrics").text
    assert f'medattn_model_info{{model_name="{MODEL_NAME}",version="2"}} 1.0' in metrics
