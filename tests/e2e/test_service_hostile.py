"""The service under hostile and careless clients, against a real ``bentoml serve`` on loopback.

Bounded ``/metrics`` after thousands of invented paths; an aborted upload counted as a client
abort (499), not a 5xx; stalled headers and bodies cut by deadlines; redirects that never name
the request's Host; canonical identifiers; idempotency keys scoped to the caller; concurrent
promote/rollback from HTTP and CLI callers leaving the registry consistent; and no response
showing a server path or database URL. The champion switch comes last (it changes the model).
"""

from __future__ import annotations

import getpass
import io
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_harness import CLASS_NAMES, MODEL_NAME, Served, make_tiny_bundle, register_version, start_served

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
STALL_TIMEOUT_S = 2
SEEN_BODIES: list[str] = []  # every response body of this module, checked for server paths at the end


@pytest.fixture(scope="module")
def hostile(registry) -> Served:
    running = start_served(registry, MEDATTN_HEADER_TIMEOUT_S=str(STALL_TIMEOUT_S),
                           MEDATTN_BODY_IDLE_TIMEOUT_S=str(STALL_TIMEOUT_S))
    try:
        yield running
    finally:
        running.server.stop()


@pytest.fixture(scope="module")
def client(hostile: Served):
    def keep(response: httpx.Response) -> None:
        response.read()
        SEEN_BODIES.append(response.text)

    with httpx.Client(base_url=hostile.url, timeout=60, event_hooks={"response": [keep]}) as http:
        yield http


def png(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def metric_samples(text: str, name: str) -> dict[str, float]:
    """``{label text: value}`` of every sample of ``name`` in a Prometheus exposition."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name):].rsplit(" ", 1)
            found[labels] = float(value)
    return found


def requests_total(client: httpx.Client, endpoint: str, status_prefix: str) -> float:
    samples = metric_samples(client.get("/metrics").text, "bentoml_service_request_total")
    return sum(v for labels, v in samples.items()
               if f'endpoint="{endpoint}"' in labels and f'http_response_code="{status_prefix}' in labels)


def raw_exchange(hostile: Served, data: bytes, wait_s: float = 30.0) -> bytes:
    """Send ``data`` on a fresh connection, then read until the server closes it (or ``wait_s``)."""
    with socket.create_connection(("127.0.0.1", hostile.server.port), timeout=wait_s) as sock:
        if data:
            sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except socket.timeout:
            return received + b"<still open>"
        return received


# ---- /metrics cardinality ----------------------------------------------------------------------


def test_metrics_stay_flat_after_thousands_of_distinct_unknown_paths(client, hostile):
    token = secrets.token_hex(4)
    paths = [f"/probe-{token}-{i}/x%00y/{'é' * (i % 3)}" for i in range(2400)]
    for path in paths[:200]:  # the unmatched series exist after the first few
        assert client.get(path).status_code == 404
    before = client.get("/metrics").text
    for path in paths[200:]:
        assert client.post(path, content=b"{}").status_code in (404, 405)
    after = client.get("/metrics").text

    print(f"/metrics: {len(before)} bytes after 200 unknown paths, {len(after)} after {len(paths)}")
    series = lambda text: {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}  # noqa: E731
    grown = series(after) - series(before)
    assert len(grown) <= 10, sorted(grown)[:20]  # e.g. a new method/status pair, never one per path
    assert len(after) < len(before) * 1.1
    assert token not in after and "probe-" not in after and "\\x00" not in after
    endpoints = set(re.findall(r'endpoint="([^"]*)"', after))
    assert "unmatched" in endpoints and all(e == "unmatched" or e.startswith("/") for e in endpoints)
    assert len(endpoints) < 30, endpoints


# ---- client aborts and stalled clients ---------------------------------------------------------


def _request_head(hostile: Served, path: str, length: int, content_type: str = "image/png") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {hostile.tokens['predict']}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n").encode()


def test_an_aborted_upload_is_a_client_abort_not_a_server_error(client, hostile):
    aborts_before = requests_total(client, "/predict", "499")
    errors_before = requests_total(client, "/predict", "5")
    log_before = len(hostile.server.log_tail(10**9))
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", hostile.server.port), timeout=30) as sock:
            sock.sendall(_request_head(hostile, "/predict", 400_000) + png()[:1000])
            time.sleep(0.3)  # the server is reading the body when the client goes
    deadline = time.monotonic() + 60
    while requests_total(client, "/predict", "499") < aborts_before + 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert requests_total(client, "/predict", "499") == aborts_before + 3
    assert requests_total(client, "/predict", "5") == errors_before
    log = hostile.server.log_tail(10**9)[log_before:]
    # One access-log line per abort (medattn's own line is INFO, below BentoML's default level), no traceback.
    assert log.count("path=/predict,type=image/png,length=400000) (status=499") == 3, log[-3000:]
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


def test_stalled_request_headers_are_cut_with_408(hostile):
    for partial in (b"", b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"):
        answer = raw_exchange(hostile, partial)
        assert not answer.endswith(b"<still open>"), answer  # the server closed it, not our 30 s wait
        assert answer.startswith(b"HTTP/1.1 408"), answer


def test_a_stalled_body_is_cut_with_408_json(client, hostile):
    answer = raw_exchange(hostile, _request_head(hostile, "/predict", 5000) + png()[:100])
    assert not answer.endswith(b"<still open>"), answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), head
    assert "no request body data" in json.loads(body)["detail"]
    assert client.get("/livez").status_code == 200


def test_redirects_never_use_the_request_host_header(client):
    redirected = 0
    for path in ("/feedback/", "/model/", "/livez/", "/predict/"):
        response = client.get(path, headers={"Host": "evil.example"})
        if 300 <= response.status_code < 400:
            redirected += 1
            location = response.headers["location"]
            assert location.startswith("/") and not location.startswith("//"), location
            assert "evil.example" not in location
    assert redirected > 0  # the slash redirects exist, so the rule is exercised


# ---- identifiers and scoped idempotency --------------------------------------------------------


def _feedback(expert_id: str = "expert", version: str = "1", **changes) -> dict:
    body = {"model_name": MODEL_NAME, "model_version": version, "expert_id": expert_id,
            "rois": [{"shape": "rectangle", "kind": "relevant", "x": 2, "y": 3, "width": 10, "height": 8}]}
    return {**body, **changes}


def _post_with_image(client, hostile, body: dict, role: str = "expert", key: str | None = None,
                     seed: int = 1) -> httpx.Response:
    headers = {**hostile.headers(role), **({"Idempotency-Key": key} if key else {})}
    return client.post("/feedback", headers=headers,
                       files={"feedback": (None, json.dumps(body), "application/json"),
                              "image": ("scan.png", png(seed=seed), "image/png")})


def test_model_versions_are_canonical_and_coordinates_strict(client, hostile):
    expert = hostile.headers("expert")
    client.post("/predict", files={"image": ("a.png", png(seed=5), "image/png")}, headers=hostile.headers("predict"))
    created = _post_with_image(client, hostile, _feedback(version="0001", corrected_label=CLASS_NAMES[2]))
    assert created.status_code == 201, created.text
    stored = client.get(f"/feedback/{created.json()['id']}", headers=expert).json()
    assert stored["model_version"] == "1"
    for asked in ("1", "0001"):
        listed = client.get("/feedback", params={"model_version": asked, "limit": 1000}, headers=expert).json()
        assert created.json()["id"] in [item["id"] for item in listed["items"]]

    refusals = {
        "full-width digit": _feedback(version="\uff11"),
        "zero": _feedback(version="0"),
        "version with a dot": _feedback(version="1.0"),
        "x as a string": _feedback(rois=[{"shape": "rectangle", "kind": "relevant", "x": "2", "y": 3,
                                          "width": 10, "height": 8}]),
        "width as a boolean": _feedback(rois=[{"shape": "rectangle", "kind": "relevant", "x": 2, "y": 3,
                                               "width": True, "height": 8}]),
        "polygon point as strings": _feedback(rois=[{"shape": "polygon", "kind": "irrelevant",
                                                     "points": [["1", "1"], [9, 1], [5, 8]]}]),
        "rle size as a float": _feedback(rois=[{"shape": "brush", "kind": "relevant",
                                                "rle": {"width": 40.0, "height": 30, "counts": [1200]}}]),
        "unknown class": _feedback(corrected_label="not-a-class"),
    }
    for what, body in refusals.items():
        response = _post_with_image(client, hostile, body)
        assert response.status_code == 422, (what, response.text)
    assert "not a class" in _post_with_image(client, hostile, refusals["unknown class"]).json()["detail"]
    assert client.get("/feedback", params={"model_version": "\uff11"}, headers=expert).status_code == 422


def test_idempotency_keys_are_scoped_to_the_caller(client, hostile):
    key = f"shared-{secrets.token_hex(4)}"
    mine = _post_with_image(client, hostile, _feedback(), role="expert", key=key, seed=7)
    assert mine.status_code == 201, mine.text
    # Another caller (the admin token) with the same key and the same body: a record of its own.
    theirs = _post_with_image(client, hostile, _feedback(), role="admin", key=key, seed=7)
    assert theirs.status_code == 201 and theirs.json()["id"] != mine.json()["id"], theirs.text
    # ... and with another body: no 409 that would name the first caller's record.
    other_body = _post_with_image(client, hostile, _feedback(comment="x"), role="admin", key=key + "-b", seed=7)
    assert other_body.status_code == 201
    again = _post_with_image(client, hostile, _feedback(comment="y"), role="admin", key=key, seed=7)
    assert again.status_code == 409 and mine.json()["id"] not in again.text and theirs.json()["id"] in again.text
    replay = _post_with_image(client, hostile, _feedback(), role="expert", key=key, seed=7)
    assert replay.status_code == 200 and replay.json()["id"] == mine.json()["id"]


# ---- promote / rollback under concurrent HTTP and CLI callers ----------------------------------


def test_concurrent_promote_and_rollback_from_http_and_cli_leave_the_registry_consistent(client, hostile):
    from mlflow import MlflowClient

    from medattn.registry import assign_challenger_and_gate

    uri = hostile.tracking_uri
    v2 = register_version(uri, make_tiny_bundle(hostile.workdir / "bundle-v2", seed=2), metric=0.1)
    assert not assign_challenger_and_gate(MODEL_NAME, v2, tracking_uri=uri).promoted
    params = hostile.workdir / "params.yaml"
    params.write_text(f"mlflow:\n  tracking_uri: {uri}\n  model_name: {MODEL_NAME}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith(("MEDATTN_TRACKING", "MLFLOW_TRACKING"))}
    env["MEDATTN_FEEDBACK_DB"] = f"sqlite:///{hostile.state_dir / 'feedback.db'}"  # the service's audit trail
    cli = [subprocess.Popen([sys.executable, "-m", "medattn.cli", "model", action, "--params", str(params)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for action in ("promote", "rollback", "promote")]
    admin = hostile.headers("admin")

    def call(i: int) -> httpx.Response:
        with httpx.Client(base_url=hostile.url, timeout=300) as http:
            return http.post("/promote" if i % 2 == 0 else "/rollback", headers=admin)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(call, range(20)))
    for process in cli:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0 or "no previous champion" in err, err
    for answer in answers:
        SEEN_BODIES.append(answer.text)
        assert answer.status_code in (200, 409), answer.text
        if answer.status_code == 200:
            assert "champion" in answer.json()["champion"]["aliases"], answer.text
        else:
            assert "no previous champion" in answer.json()["detail"], answer.text
    assert sum(a.status_code == 200 for a in answers) >= 10

    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = str(registry.get_model_version_by_alias(MODEL_NAME, "champion").version)
    history = json.loads(registry.get_registered_model(MODEL_NAME).tags["champion_history"])
    assert history[-1] == champion, (champion, history)
    assert registry.get_model_version(MODEL_NAME, champion).tags.get("rolled_back") != "true"
    assert client.post("/reload", headers=admin).status_code == 200
    assert client.get("/model", headers=admin).json()["model"]["version"] == champion
    # the audit rows, written inside the alias lock by HTTP and CLI alike, tell one unbroken story
    trail = client.get("/audit", params={"model_name": MODEL_NAME, "limit": 1000}, headers=admin).json()["items"]
    moves = [e for e in trail if e["action"] in ("promote", "rollback")]
    assert moves and moves[-1]["to_version"] == champion
    assert all(a["to_version"] == b["from_version"] for a, b in zip(moves, moves[1:], strict=False)), moves
    assert {e["actor"] for e in moves} <= {"admin", getpass.getuser()}


def test_no_response_showed_a_server_path_or_database_url(hostile):
    assert SEEN_BODIES
    secrets_of_the_server = (str(hostile.workdir), hostile.tracking_uri, "sqlite:", str(REPO_ROOT))
    for body in SEEN_BODIES:
        for secret in secrets_of_the_server:
            assert secret not in body, body[:300]
