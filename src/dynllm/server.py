"""The HTTP server: uvicorn, with dynllm's limits on each connection.

Three limits belong to connections, not to routes:

- ``header_timeout_seconds``: the request line and headers must be complete
  within it, counted from the connect for a connection's first request and
  from the first byte of each later one; otherwise the connection is closed
  (a client sending one byte a second is dropped at the timeout, not held
  forever).  The idle time between requests on a keep-alive connection stays
  uvicorn's ``timeout_keep_alive``.
- ``body_idle_timeout_seconds``: while a request body is incomplete, a pause
  that long with no byte received ends the request: a 408 in the route's
  error shape if no response has started, else the connection is closed.
  The clock restarts with every piece received, so an upload that keeps
  moving is never cut, however long it takes; and it stops at the body's end,
  so waiting for the answer or relaying a long stream is never timed.
- ``max_connections``: a connection opened while that many are open gets a
  503 ``too_many_connections`` (the route's error shape, ``Retry-After``,
  ``Connection: close``) for its request, instead of being served.  An open
  SSE stream counts as long as its connection is open.

Why in the protocol: the ASGI app is called only once the headers are
complete, so it cannot time them; and the body's clock has to see bytes as
they arrive.  uvicorn has neither timeout, and its ``limit_concurrency``
answers a text/plain 503 (and counts tasks as well as connections).  So
``LimitedHttpProtocol`` subclasses uvicorn's httptools protocol (what
uvicorn's "auto" picks when httptools is installed, as it is with
``uvicorn[standard]``) and hooks the parser's callbacks it already has.

Cost on the hot path: one timer per connection, armed at connect and
cancelled when the first request's headers are complete.  A later request
whose headers (and body) arrive in one read, the usual case, arms no timer at
all: one is armed only when a read leaves the headers or the body incomplete,
and a moving body pushes its deadline without re-arming (the timer checks the
time of the last byte when it fires).
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from dynllm.config import Config
from dynllm.errors import DynllmError, RequestTimeout, Shape, TooManyConnections
from dynllm.proxy import send_error

log = logging.getLogger("dynllm.server")

REFUSAL_LOG_SECONDS = 10.0
"""At most one warning per this many seconds while connections are refused."""

_IDLE, _HEADERS, _BODY = 0, 1, 2


def shape_of(path: str) -> Shape:
    return Shape.KSERVE if path.startswith("/v2") else Shape.OPENAI


@dataclass
class Limits:
    """One server's limits and its count of admitted connections."""

    header_timeout: float
    body_idle_timeout: float
    max_connections: int
    admitted: int = 0
    refused: int = 0
    """Requests refused since the last warning."""
    warned_at: float = -math.inf

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        return cls(
            config.header_timeout_seconds,
            config.body_idle_timeout_seconds,
            config.max_connections,
        )

    def admit(self) -> bool:
        if self.admitted >= self.max_connections:
            return False
        self.admitted += 1
        return True

    def note_refusal(self, now: float) -> None:
        self.refused += 1
        if now - self.warned_at >= REFUSAL_LOG_SECONDS:
            log.warning(
                "%d connections open (max_connections): refused %d request(s) with 503",
                self.admitted,
                self.refused,
            )
            self.warned_at, self.refused = now, 0


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the header and body-idle timeouts and
    the connection cap.  ``limits`` is set on the subclass ``protocol_for``
    makes for each server."""

    limits: ClassVar[Limits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _HEADERS
        self._since = 0.0
        """_HEADERS: when the headers began; _BODY: when the last body byte came."""
        self._timer: asyncio.TimerHandle | None = None
        self._admitted = False
        self._reply: asyncio.Task[None] | None = None

    # -- connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._admitted = self.limits.admit()
        self._since = self.loop.time()
        # Also what drops a connection that never sends a byte (uvicorn keeps
        # one forever: its keep-alive timer starts only after a response).
        self._timer = self.loop.call_later(self.limits.header_timeout, self._expired)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self.limits.admitted -= 1
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == _BODY:
            self._since = self.loop.time()
        super().data_received(data)
        if self._timer is None and self._phase != _IDLE and not self.transport.is_closing():
            self._timer = self.loop.call_at(self._since + self._timeout(), self._expired)

    # -- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:  # a later request: its own clock (the first's runs from connect)
            self._since = self.loop.time()
        self._phase = _HEADERS

    def on_headers_complete(self) -> None:
        self._cancel_timer()
        self._phase = _BODY
        self._since = self.loop.time()
        if self._admitted:
            super().on_headers_complete()
            return
        self.limits.note_refusal(self._since)
        app, self.app = self.app, self._refuse
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = _IDLE
        self._cancel_timer()

    # -- the limits

    def _timeout(self) -> float:
        if self._phase == _HEADERS:
            return self.limits.header_timeout
        return self.limits.body_idle_timeout

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._phase == _IDLE or self.transport.is_closing():
            return
        now = self.loop.time()
        cycle = self.cycle
        if self.flow.read_paused or (
            self._phase == _BODY and cycle is not None and cycle.waiting_for_100_continue
        ):
            # dynllm is the one not reading (a busy app, a pipelined request
            # waiting its turn) or the client waits for "100 Continue": the
            # client is not late, so its clock starts again.
            self._since = now
        deadline = self._since + self._timeout()
        if now < deadline:  # bytes came meanwhile: wait for the rest of the pause
            self._timer = self.loop.call_at(deadline, self._expired)
            return
        if self._phase == _HEADERS:
            self._headers_late()
        else:
            self._body_stalled()

    def _headers_late(self) -> None:
        log.debug("closing a connection whose request headers took over %gs", self._timeout())
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # An earlier request on this connection is still being answered (a
            # stream): let it finish, then close instead of waiting for the rest.
            cycle.keep_alive = False
            self._phase = _IDLE
            return
        self.transport.close()

    def _body_stalled(self) -> None:
        log.debug("request body idle for %gs: ending the request", self._timeout())
        cycle = self.cycle
        if cycle is None or cycle.response_started or self.pipeline:
            # Too late for a status (or another answer is on the wire first).
            self.transport.close()
            return
        error = RequestTimeout(
            f"The request body stopped arriving: no byte for {self._timeout():g} s"
        )
        self._phase = _IDLE
        self._reply = self.loop.create_task(self._send_error(cycle, error))

    async def _send_error(self, cycle: RequestResponseCycle, error: DynllmError) -> None:
        """The error through the request's own ASGI ``send``, then the
        connection closes (``Connection: close``); the app's pending
        ``receive()`` then answers ``http.disconnect``, so it stops quietly."""
        if cycle.response_started:  # the app answered meanwhile
            self.transport.close()
            return
        send = cast(Send, cycle.send)  # uvicorn types its events; the messages are the same
        await send_error(send, error, shape_of(cycle.scope["path"]), [CLOSE_HEADER])
        # Whatever the app still sends goes nowhere, as for a client that left
        # (not a RuntimeError for a second response).
        cycle.disconnected = True

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = TooManyConnections(
            f"dynllm is serving its limit of {self.limits.max_connections} connections; "
            "try again shortly",
            retry_after=1,
        )
        await send_error(send, error, shape_of(scope["path"]), [CLOSE_HEADER])


def protocol_for(config: Config) -> type[LimitedHttpProtocol]:
    """The protocol class for one server (its own count of connections)."""

    class Protocol(LimitedHttpProtocol):
        limits = Limits.from_config(config)

    return Protocol


def uvicorn_config(app: ASGIApp, config: Config, **options: Any) -> uvicorn.Config:
    """uvicorn's config for dynllm's app: the listen address and limits from
    ``config``; ``options`` for the rest (log level, graceful timeout...)."""
    return uvicorn.Config(
        app,
        host=config.server.host,
        port=config.server.port,
        http=protocol_for(config),
        **options,
    )
