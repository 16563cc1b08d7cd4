"""The one JSON error body, for errors raised by routes and for requests that match no route.

The outer app here stands in for BentoML's: a plain Starlette router with a route of its own
(``/livez``) and the medattn FastAPI app mounted under it the way BentoML mounts it (a
``PassiveMount`` that only claims paths the FastAPI app has), wrapped in the middleware the
service installs. The real ``bentoml serve`` is covered in ``tests/e2e/test_service.py``.
"""

from __future__ import annotations

import anyio
import pytest
from fastapi import FastAPI, Request
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from medattn.feedback.schema import FeedbackNotFound
from medattn.serving.backend import HttpProblem
from serving.client_timeouts import BodyIdleTimeout, timeout_from_env
from serving.http_errors import (
    JsonRoutingErrors,
    install_error_handlers,
    public_detail,
    relative_locations,
    routing_error_detail,
)


def inner_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/feedback/{feedback_id}")
    async def get_feedback(feedback_id: str) -> dict:
        raise FeedbackNotFound(f"no feedback {feedback_id}")

    @app.post("/reload")
    async def reload() -> dict:
        raise HttpProblem(503, "model runner is unreachable")

    @app.get("/leaky")
    async def leaky() -> dict:
        raise HttpProblem(503, "feedback database sqlite:////srv/medattn/.medattn/feedback.db: disk I/O error")

    @app.post("/upload")
    async def upload(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug\nwith a second line")

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    from _bentoml_impl.server.mount import PassiveMount

    async def livez(_request) -> PlainTextResponse:
        return PlainTextResponse("\n")

    outer = Starlette(routes=[Route("/livez", livez), PassiveMount("/", inner_app())],
                      middleware=[Middleware(JsonRoutingErrors)])
    with TestClient(outer, raise_server_exceptions=False) as http:
        yield http


def assert_error_body(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"}
    for word in words:
        assert word in body["detail"], body
    return body


def test_unknown_path_is_a_json_404(client: TestClient) -> None:
    body = assert_error_body(client.get("/no/such/route"), 404, "/no/such/route")
    assert body["error"] == "not found"


def test_wrong_method_on_the_outer_routers_route_is_a_json_405_with_allow(client: TestClient) -> None:
    response = client.post("/livez")
    assert_error_body(response, 405, "POST", "/livez", "GET")
    assert "GET" in response.headers["allow"]
    assert int(response.headers["content-length"]) == len(response.content)


def test_wrong_method_on_a_mounted_route_is_a_json_405_with_allow(client: TestClient) -> None:
    response = client.get("/reload")
    assert_error_body(response, 405, "GET", "/reload", "POST")
    assert response.headers["allow"] == "POST"


def test_route_errors_pass_through_with_their_own_detail(client: TestClient) -> None:
    assert_error_body(client.get("/feedback/abc"), 404, "no feedback abc")
    response = client.post("/reload")
    assert_error_body(response, 503, "unreachable")
    assert response.headers["retry-after"] == "5"


def test_a_bug_is_a_500_without_its_message(client: TestClient) -> None:
    body = assert_error_body(client.get("/boom"), 500, "server log")
    assert "a bug" not in body["detail"]


def test_successful_plain_text_answers_are_untouched(client: TestClient) -> None:
    response = client.get("/livez")
    assert response.status_code == 200 and response.text == "\n"


def test_a_long_unknown_path_is_shortened_in_the_detail() -> None:
    detail = routing_error_detail(404, "GET", "/" + "x" * 5000, None)
    assert len(detail) < 300 and detail.count("\n") == 0


# ---- what details never show; redirects; client aborts; stalled bodies ----------------------------


@pytest.mark.parametrize("leak", [
    "MLflow at sqlite:////tmp/w/mlflow.db: database is locked",
    "feedback database postgresql+psycopg://medattn:***@db.internal:5432/feedback: timeout",
    "cannot open /srv/medattn/.medattn/blobs/ab/cdef: permission denied",
])
def test_details_hide_database_urls_and_server_paths(leak: str):
    shown = public_detail(leak)
    assert "<hidden>" in shown
    for secret in ("/tmp/w", "sqlite:", "db.internal", "medattn:***", "/srv/medattn"):
        assert secret not in shown, shown


def test_details_keep_what_the_client_needs():
    for kept in ("rois[0] (rectangle).x: Input should be a valid number", "no route /docs; see /docs.json",
                 "model_version '\uff11' is not a version number (ASCII digits, e.g. \"3\")"):
        assert public_detail(kept) == kept


def test_a_route_error_with_a_path_is_answered_without_it(client):
    body = assert_error_body(client.get("/leaky"), 503, "disk I/O error")
    assert "/srv" not in body["detail"] and "sqlite" not in body["detail"]


def test_redirect_locations_never_name_the_request_host():
    headers = [(b"location", b"http://evil.example/feedback?x=1"), (b"content-type", b"text/plain")]
    assert relative_locations(headers) == [(b"location", b"/feedback?x=1"), (b"content-type", b"text/plain")]
    assert relative_locations([(b"Location", b"//evil.example/x")]) == [(b"Location", b"/x")]


def test_slash_redirects_through_the_middleware_are_relative(client):
    response = client.get("/upload/", headers={"host": "evil.example"}, follow_redirects=False)
    if 300 <= response.status_code < 400:  # Starlette redirects only when the other form exists
        assert response.headers["location"].startswith("/") and "evil" not in response.headers["location"]


async def _call(app, messages: list[dict], delay_after: int | None = None) -> list[dict]:
    """Run an ASGI app on a POST /upload whose body messages are ``messages`` (a stall after index)."""
    sent: list[dict] = []
    queue = list(messages)

    async def receive() -> dict:
        if delay_after is not None and len(messages) - len(queue) > delay_after:
            await anyio.sleep(3600)
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/upload", "raw_path": b"/upload", "query_string": b"",
             "headers": [(b"content-length", b"10")], "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5), "root_path": ""}
    await app(scope, receive, send)
    return sent


def test_an_aborted_body_is_answered_499_not_500(caplog):
    messages = [{"type": "http.request", "body": b"12345", "more_body": True}, {"type": "http.disconnect"}]
    with caplog.at_level("INFO", logger="medattn.serving"):
        sent = anyio.run(_call, inner_app(), messages)
    assert sent[0]["status"] == 499
    lines = [r for r in caplog.records if r.name == "medattn.serving"]
    assert len(lines) == 1 and "client closed the connection" in lines[0].getMessage() and not lines[0].exc_info


def test_a_stalled_body_gets_408_and_closes_the_connection():
    app = BodyIdleTimeout(inner_app(), seconds=0.2)
    sent = anyio.run(_call, app, [{"type": "http.request", "body": b"12345", "more_body": True}], 0)
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    # A body that keeps coming is read whole.
    whole = anyio.run(_call, app, [{"type": "http.request", "body": b"12345", "more_body": True},
                                   {"type": "http.request", "body": b"67890", "more_body": False}])
    assert whole[0]["status"] == 200 and whole[1]["body"] == b'{"bytes":10}'


def test_timeouts_from_the_environment_are_checked(monkeypatch):
    monkeypatch.setenv("MEDATTN_HEADER_TIMEOUT_S", "2.5")
    assert timeout_from_env("MEDATTN_HEADER_TIMEOUT_S", 10) == 2.5
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv("MEDATTN_HEADER_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="MEDATTN_HEADER_TIMEOUT_S"):
            timeout_from_env("MEDATTN_HEADER_TIMEOUT_S", 10)
