"""Stalled clients do not hold a connection: a deadline for request headers, an idle limit for bodies.

uvicorn (under ``bentoml serve`` 1.4.39) has no timeout between the connection opening and the
request headers being complete, nor between body chunks: ``timeout_keep_alive`` only runs
*after* a response, and BentoML's ``traffic.timeout`` (300 s here, for slow batches) starts when
the app is called. So a client that sends half a request line holds a connection for ever, and
one that stops mid-body holds it for five minutes. BentoML offers no setting for either, hence:

- :func:`install_header_deadline` wraps uvicorn's httptools protocol (the one ``http="auto"``
  picks when ``httptools`` is installed, as ``requirements.lock`` pins it): a connection whose
  request headers are not complete within ``MEDATTN_HEADER_TIMEOUT_S`` seconds of its opening
  (or of the previous response) is answered 408 and closed.
- :class:`BodyIdleTimeout`, an ASGI middleware, waits at most ``MEDATTN_BODY_IDLE_TIMEOUT_S``
  seconds for each chunk of a request body; a client silent that long gets 408 (JSON, through
  the app's error handlers) and the connection is closed.

Both are read from the environment when the service module is imported (0 disables one).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Awaitable, Callable, MutableMapping

import anyio

from medattn.serving.backend import HttpProblem

log = logging.getLogger("medattn.serving")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_IDLE_TIMEOUT_S = 30.0


def timeout_from_env(name: str, default: float) -> float:
    """A non-negative number of seconds from the environment (0 = no limit); one-line error otherwise."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name}={raw!r} must be a finite number of seconds >= 0")
    return value


class RequestBodyTimeout(HttpProblem):
    """The client stopped sending its request body."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"no request body data for {seconds:g} s; send the body without pauses")


class BodyIdleTimeout:
    """ASGI middleware: each ``http.request`` message of a body must arrive within ``seconds``.

    Only while the body is incomplete: once its last chunk arrived, ``receive`` is passed
    through untouched (a streaming response may wait on it for a disconnect for as long as it likes).
    """

    def __init__(self, app: Callable[[Message, Receive, Send], Awaitable[None]], seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.seconds <= 0:
            await self.app(scope, receive, send)
            return
        body_complete = False

        async def receive_within_deadline() -> Message:
            nonlocal body_complete
            if body_complete:
                return await receive()
            with anyio.move_on_after(self.seconds) as waited:
                message = await receive()
            if waited.cancelled_caught:
                raise RequestBodyTimeout(self.seconds)
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_complete = True
            return message

        async def send_closing_on_timeout(message: Message) -> None:
            # A 408 leaves the rest of the body unread: the connection cannot carry another request.
            if message["type"] == "http.response.start" and message["status"] == 408:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_within_deadline, send_closing_on_timeout)


_TIMEOUT_BODY = json.dumps({"error": "request timeout",
                            "detail": "request headers not complete in time"}).encode()
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                     b"connection: close\r\ncontent-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n"
                     + _TIMEOUT_BODY)


def install_header_deadline(seconds: float) -> bool:
    """Close connections whose request headers take longer than ``seconds``; True if installed.

    The deadline starts when the connection opens and again when a request begins after a
    response (uvicorn's keep-alive timer covers the idle time in between), and ends when the
    headers are complete. Idempotent; ``seconds <= 0`` installs nothing.
    """
    if seconds <= 0:
        return False
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        log.warning("httptools is not installed: request headers have no deadline")
        return False
    if getattr(HttpToolsProtocol, "medattn_header_deadline", None) is not None:
        HttpToolsProtocol.medattn_header_deadline = seconds
        return True
    HttpToolsProtocol.medattn_header_deadline = seconds
    made, begin, complete, lost = (HttpToolsProtocol.connection_made, HttpToolsProtocol.on_message_begin,
                                   HttpToolsProtocol.on_headers_complete, HttpToolsProtocol.connection_lost)

    def _arm(self: Any) -> None:
        _disarm(self)
        self._medattn_header_timer = self.loop.call_later(self.medattn_header_deadline, _expire, self)

    def _disarm(self: Any) -> None:
        timer = getattr(self, "_medattn_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._medattn_header_timer = None

    def _expire(self: Any) -> None:
        self._medattn_header_timer = None
        if self.transport is not None and not self.transport.is_closing():
            log.info("closed a connection from %s: request headers not complete within %g s",
                     "%s:%d" % self.client if self.client else "?", self.medattn_header_deadline)
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        _arm(self)

    def on_message_begin(self: Any) -> None:
        begin(self)
        if getattr(self, "_medattn_header_timer", None) is None:
            _arm(self)

    def on_headers_complete(self: Any) -> None:
        _disarm(self)
        complete(self)

    def connection_lost(self: Any, exc: Any) -> None:
        _disarm(self)
        lost(self, exc)

    HttpToolsProtocol.connection_made = connection_made
    HttpToolsProtocol.on_message_begin = on_message_begin
    HttpToolsProtocol.on_headers_complete = on_headers_complete
    HttpToolsProtocol.connection_lost = connection_lost
    return True


def install_client_timeouts(service: Any) -> None:
    """Both deadlines for a BentoML service, from ``MEDATTN_HEADER_TIMEOUT_S`` / ``MEDATTN_BODY_IDLE_TIMEOUT_S``."""
    install_header_deadline(timeout_from_env("MEDATTN_HEADER_TIMEOUT_S", DEFAULT_HEADER_TIMEOUT_S))
    body_idle = timeout_from_env("MEDATTN_BODY_IDLE_TIMEOUT_S", DEFAULT_BODY_IDLE_TIMEOUT_S)
    if body_idle > 0:
        service.add_asgi_middleware(BodyIdleTimeout, seconds=body_idle)
