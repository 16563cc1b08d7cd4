"""The one JSON error body, for errors raised by routes and for requests that match no route.

The outer app here stands in for BentoML's: a plain Starlette router with a route of its own
(``/livez``) and the medattn FastAPI app mounted under it the way BentoML mounts it (a
``PassiveMount`` that only claims paths the FastAPI app has), wrapped in the middleware the
service installs. The real ``bentoml serve`` is covered in ``tests/e2e/test_service.py``.
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from medattn.feedback.schema import FeedbackNotFound
from medattn.serving.backend import HttpProblem
from serving.http_errors import JsonRoutingErrors, install_error_handlers, routing_error_detail


def inner_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/feedback/{feedback_id}")
    async def get_feedback(feedback_id: str) -> dict:
        raise FeedbackNotFound(f"no feedback {feedback_id}")

    @app.post("/reload")
    async def reload() -> dict:
        raise HttpProblem(503, "model runner is unreachable")

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
