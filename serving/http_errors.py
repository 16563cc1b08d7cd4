"""One JSON error body for every error the service answers, from any layer.

Every error is ``{"error": "<HTTP reason>", "detail": "<one line saying what is wrong>"}``: client
mistakes are 4xx, an unavailable model 503, and only a bug is a 500 (logged with its traceback).

Two layers produce errors. The FastAPI app's exception handlers (:func:`install_error_handlers`)
answer everything raised by a route. Requests that never reach a route - an unknown path, or a
wrong method on one of BentoML's own routes (``POST /livez``) - are answered by BentoML's outer
Starlette router, in plain text; :class:`JsonRoutingErrors` (an ASGI middleware on the BentoML
service) rewrites those answers into the same JSON body, keeping their status and ``Allow`` header.
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Mapping, MutableMapping, Optional
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from medattn.errors import MedattnError
from medattn.serving import metrics
from medattn.serving.backend import http_status_of

log = logging.getLogger("medattn.serving")

_STATUS_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": "5"}}

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]


# nginx's status for "the client closed the connection before the answer": not a server fault,
# so it stays out of the 5xx series the error-rate alert watches.
CLIENT_CLOSED_REQUEST = 499
_PHRASES = {CLIENT_CLOSED_REQUEST: "client closed request"}

# What an error detail must never show: a URL with a scheme (a database URL, with or without
# credentials: sqlite:////srv/..., postgresql+psycopg://user:pw@host/db) or an absolute server
# path of two or more segments (/srv/medattn/.medattn/feedback.db).
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"]*")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"]+/)+[^\s/'\"]*")
HIDDEN = "<hidden>"


def public_detail(detail: str) -> str:
    """``detail`` with database URLs and server paths replaced by ``<hidden>`` (the log keeps them)."""
    return _ABSOLUTE_PATH.sub(HIDDEN, _URL.sub(HIDDEN, detail))


def error_body(status: int, detail: str) -> dict[str, str]:
    phrase = _PHRASES.get(status) or HTTPStatus(status).phrase.lower()
    return {"error": phrase, "detail": detail}


def error_response(status: int, detail: str, endpoint: str = "", error_type: str = "",
                   headers: Optional[Mapping[str, str]] = None) -> JSONResponse:
    if endpoint:
        metrics.record_error(endpoint=endpoint, http_status=status, error_type=error_type or "HTTPError")
    return JSONResponse(error_body(status, detail), status_code=status,
                        headers={**_STATUS_HEADERS.get(status, {}), **(headers or {})})


def _endpoint(request: Request) -> str:
    """The route template that matched (``/feedback/{feedback_id}``), else the path (labelled "unmatched")."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or metrics.endpoint_labels(request.url.path)


async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    status = http_status_of(exc)
    if status is None:
        log.exception("bug while serving %s %s", request.method, _endpoint(request))
        return error_response(500, "internal error; the server log has the details",
                              _endpoint(request), exc.__class__.__name__)
    detail = public_detail(str(exc))
    if detail != str(exc):
        log.info("%s %s answered %d: %s", request.method, _endpoint(request), status, exc)
    return error_response(status, detail, _endpoint(request), exc.__class__.__name__)


async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
    """The client closed the connection before its request was read: one log line, status 499.

    Nobody receives this answer; it exists so that BentoML's request metrics and
    ``medattn_errors_total`` count the request as a client abort, outside the 5xx series.
    """
    log.info("client closed the connection during %s %s (counted as %d)", request.method,
             _endpoint(request), CLIENT_CLOSED_REQUEST)
    return error_response(CLIENT_CLOSED_REQUEST, "client closed the connection before the request was read",
                          _endpoint(request), "ClientDisconnect")


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return error_response(422, public_detail("; ".join(problems)) or "invalid request", _endpoint(request),
                          "RequestValidationError")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})  # a 405 carries the Allow header
    detail = str(exc.detail)
    if detail == HTTPStatus(exc.status_code).phrase:  # Starlette's routing errors say no more than this
        detail = routing_error_detail(exc.status_code, request.method, request.url.path, headers.get("Allow"))
    return error_response(exc.status_code, detail, _endpoint(request), "HTTPException", headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Exception, _any_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # Registered for MedattnError too (every expected error is one): Starlette then answers it in
    # its ExceptionMiddleware, whereas the Exception handler runs in ServerErrorMiddleware, which
    # re-raises.
    app.add_exception_handler(MedattnError, _any_error)
    # A handler of its own keeps it in ExceptionMiddleware too: no 500, no traceback.
    app.add_exception_handler(ClientDisconnect, _client_gone)


def routing_error_detail(status: int, method: str, path: str, allow: Optional[str]) -> str:
    """The one-line detail of a request that matched no route (404) or none for its method (405)."""
    shown = path if len(path) <= 200 else path[:200] + "..."
    if status == 405:
        allowed = f" (allowed: {allow})" if allow else ""
        return f"method {method} is not allowed on {shown}{allowed}"
    if status == 404:
        return f"no route {shown}; the routes are listed in /docs.json"
    return HTTPStatus(status).phrase


def relative_locations(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``Location`` headers reduced to path and query: a redirect never names the request's Host.

    Starlette's slash redirects (``/feedback/`` -> ``/feedback``) build an absolute URL from the
    ``Host`` header the client sent, so a forged Host would send the next client elsewhere.
    """
    out = []
    for name, value in headers:
        if name.lower() == b"location":
            parsed = urlsplit(value.decode("latin-1"))
            path = "/" + parsed.path.lstrip("/")  # "//evil.example/x" would be scheme-relative
            value = (path + (f"?{parsed.query}" if parsed.query else "")).encode("latin-1")
        out.append((name, value))
    return out


class JsonRoutingErrors:
    """ASGI middleware: the outer router's plain-text 404/405 become the service's JSON error body.

    It also makes every redirect's ``Location`` relative (:func:`relative_locations`), whichever
    router answered it.

    Only non-JSON 404/405 answers are rewritten: the routes' own (an unknown feedback id) are
    JSON already and pass through untouched. Not counted in the error metrics: an unknown path
    would be a new label value per scanner probe.
    """

    REWRITTEN = (404, 405)

    def __init__(self, app: Callable[[Message, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Optional[Message] = None  # the plain-text response start, answered when its body ends

        async def send_json_errors(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                if message["status"] in self.REWRITTEN and not _is_json(message.get("headers", [])):
                    held = message
                    return
                if 300 <= message["status"] < 400:
                    message = {**message, "headers": relative_locations(message.get("headers", []))}
            elif message["type"] == "http.response.body" and held is not None:
                if message.get("more_body", False):
                    return  # the plain-text body is dropped, chunk by chunk
                start, held = held, None
                await self._send_json(start, scope, send)
                return
            await send(message)

        await self.app(scope, receive, send_json_errors)

    @staticmethod
    async def _send_json(start: Message, scope: Message, send: Send) -> None:
        status = int(start["status"])
        kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        allow = next((v.decode("latin-1") for k, v in kept if k.lower() == b"allow"), None)
        detail = routing_error_detail(status, scope.get("method", ""), scope.get("path", ""), allow)
        body = json.dumps(error_body(status, detail)).encode("utf-8")
        headers = [*kept, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and v.split(b";")[0].strip().lower() == b"application/json"
               for k, v in headers)
