"""Forward one request to a leased backend and stream the answer back.

This is the hot path: bytes pass through untouched (no parsing, no
re-encoding, no buffering), and the lease is released in ``finally`` when the
last byte is sent, the client goes away (the dispatcher cancels the task that
runs this), or the backend fails.  A backend that fails after the response
has started ends an event stream with one SSE error event in the OpenAI
shape.  A backend's own error answer (status >= 400) is translated into the
route's error shape, its status kept.

A request is sent again only when it cannot have reached the backend whole:
the connection could not be opened, or writing the request failed because
the backend had closed it.  Once it was written, the backend may have read
(and acted on) it, and it is never sent again.  A request that could not be
sent because the lease's backend process has exited (a crash a moment
before) raises ``BackendGone`` at once instead of knocking on the dead port:
the dispatcher then sends it, once, to a restarted backend.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterable

import aiohttp
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from multidict import CIMultiDict
from starlette.types import Send

from dynllm.api.bodies import Spool
from dynllm.config import Config
from dynllm.errors import (
    BackendError,
    BadRequest,
    DynllmError,
    MidStreamFailure,
    Shape,
    from_backend,
)
from dynllm.scheduler import Lease

log = logging.getLogger("dynllm.proxy")

# RFC 9110 7.6.1 connection-specific fields, plus those the client library
# sets itself.  Bytes, lower case: compared with raw ASGI/aiohttp header names.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"expect",  # uvicorn answered the client's 100-continue; aiohttp would wait for one
        b"content-length",
    }
)
# The client's credentials are for dynllm, never for a backend.
_CREDENTIALS = frozenset({b"authorization", b"x-api-key", b"cookie"})
_REQUEST_DROP = HOP_BY_HOP | _CREDENTIALS
_REQUEST_DROP_TYPED = _REQUEST_DROP | {b"content-type"}
# The server adds its own Date; a backend's cookie must not reach clients.
_RESPONSE_DROP = (HOP_BY_HOP - {b"content-length"}) | {b"date", b"set-cookie"}
# An error answer keeps the backend's headers (Retry-After, WWW-Authenticate,
# request ids) but gets a new body, so not the ones describing the old one.
_ERROR_DROP = _RESPONSE_DROP | {b"content-length", b"content-type", b"content-encoding"}
CONNECT_ATTEMPTS = 5
MAX_ERROR_BODY = 64 << 10
KEEPALIVE_SECONDS = 4.0
MAX_CONNECTIONS = 1024  # to all backends together: room for many concurrent streams
WHOLE_BODY_BYTES = 1 << 20


class BackendGone(BackendError):
    """The request was not sent, and the lease's backend process has exited:
    a restarted backend may serve it (a 502 if nobody does)."""


_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of Linux's TCP_INFO
_TCP_INFO = getattr(socket, "TCP_INFO", None)


class LiveConnector(aiohttp.TCPConnector):
    """A pool that never hands out a connection the backend has already
    closed.  A backend that dies closes its connections; until the event loop
    has read that close, a pooled connection still looks usable, and a
    request written on it fails with no answer, which cannot be told apart
    from a backend that read the request and died (never sent again: a 502).
    The kernel knows at once: one getsockopt per reused connection (~1 us)
    asks it, so the request opens a new connection instead, which is refused
    by the dead port (and then sent to a restarted backend)."""

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        while (conn := await super()._get(key, traces)) is not None:
            if _peer_still_open(conn):
                return conn
            conn.close()  # dropped: the next pooled one, or a new connection
        return None


def _peer_still_open(conn: Connection) -> bool:
    transport = conn.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or _TCP_INFO is None:
        return True  # no way to ask: as before
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] == _TCP_ESTABLISHED)
    except OSError:
        return False


def make_client(config: Config) -> aiohttp.ClientSession:
    """The one client for all backends: sized for many concurrent streams and
    with no read timeout, so a slow long generation is never cut.

    aiohttp rather than httpx: on the bench its per-request cost is a
    fraction of httpx's (see the README's benchmark section)."""
    return aiohttp.ClientSession(
        connector=LiveConnector(
            limit=MAX_CONNECTIONS,
            limit_per_host=0,
            # Below the 5 s after which llama-server (cpp-httplib) and uvicorn
            # close an idle connection, so a pooled connection is dropped here
            # first instead of being reused just as the backend closes it.
            keepalive_timeout=KEEPALIVE_SECONDS,
            enable_cleanup_closed=True,
        ),
        # Never store a backend's cookies: they would ride along on every
        # other client's requests.
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=10.0,
            sock_read=config.upstream_read_timeout_seconds,
        ),
        auto_decompress=False,  # bytes pass through as the backend encoded them
        trust_env=False,  # an http_proxy in the service's env must not catch loopback
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
    )


def request_headers(
    raw: Iterable[tuple[bytes, bytes]], content_type: str | None = None
) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop ones, ready for aiohttp (decoded once);
    ``content_type`` replaces the client's."""
    drop = _REQUEST_DROP_TYPED if content_type else _REQUEST_DROP
    headers: CIMultiDict[str] = CIMultiDict(
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in raw
        if (name := k.lower()) not in drop and not name.startswith(b"proxy-")
    )
    if content_type:
        headers["content-type"] = content_type
    return headers


SSE_NO_BUFFERING: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends: pass each event on at once
)
"""The headers of every event stream dynllm sends: relayed ones (where the
backend did not set them), loading progress (api/progress) and the admin
streams (api/sse).  Here, not in api/sse, so the proxy imports no Starlette
responses for them."""


def response_headers(raw: Iterable[tuple[bytes, bytes]], is_sse: bool) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in raw if k.lower() not in _RESPONSE_DROP]
    if is_sse:
        present = {k.lower() for k, _ in out}
        out.extend(pair for pair in SSE_NO_BUFFERING if pair[0] not in present)
    return out


class Exchange:
    """One request's response as it goes, shared by whoever sends it (the
    relay, an error reply, loading progress), the disconnect watcher and the
    request record.  Plain slots: set in place, never copied.

    ``done`` is set just before the last body message, so the watcher can
    tell a client that left from a response that completed; ``started``
    once the status line went out (by the relay, an error reply or loading
    progress); ``progress`` when that start was loading progress's, so an
    event stream is open and the answer or its error goes into it."""

    __slots__ = (
        "cold",
        "completion_tokens",
        "done",
        "first_byte",
        "load_ms",
        "progress",
        "prompt_tokens",
        "queued_ms",
        "sent",
        "started",
        "status",
    )

    def __init__(self) -> None:
        self.started = False
        self.done = False
        self.progress = False
        self.status = 0
        self.first_byte: float | None = None
        """time.monotonic() when the answer's first body byte went out."""
        self.sent = 0
        """Body bytes sent to the client."""
        self.queued_ms = 0.0
        self.load_ms = 0.0
        self.cold = False
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    async def end_stream_with(self, send: Send, error: DynllmError) -> None:
        """End an event stream that already started with one SSE error event
        (the status is gone: the error's is what the record keeps)."""
        self.status = error.status
        await self.end_stream(send, error.sse_event())

    async def end_stream(self, send: Send, event: bytes) -> None:
        """Send ``event`` as the last message of an event stream that started."""
        if self.first_byte is None:
            self.first_byte = time.monotonic()
        self.done = True
        self.sent += len(event)
        await send({"type": "http.response.body", "body": event, "more_body": False})


USAGE_TAIL = 4096
"""How far from a body's end ``usage`` is looked for: OpenAI-shaped answers
put it last, or after little more than ``timings``."""
_DECODER = json.JSONDecoder()


def note_usage(ex: Exchange, tail: bytes) -> None:
    """Token counts from the last ``"usage"`` object in ``tail`` (the end of a
    JSON body, or a stream's last chunks): chat and completions' ``prompt_tokens``
    / ``completion_tokens``, the Responses API's ``input_tokens`` /
    ``output_tokens``.  A byte search and one small decode, never a parse of
    the whole body; anything unexpected leaves the counts unknown.

    ``"usage"`` with its quotes cannot occur inside a JSON string (a quote
    there is escaped), so a match is a key (or that exact string value)."""
    at = tail.rfind(b'"usage"')
    if at < 0:
        return
    text = tail[at + 7 :].decode("utf-8", "replace").lstrip()
    if not text.startswith(":"):
        return
    try:
        usage, _ = _DECODER.raw_decode(text, len(text) - len(text[1:].lstrip()))
    except ValueError:  # cut off, or not JSON after all
        return
    if not isinstance(usage, dict):
        return  # "usage": null in every chunk but the last (vLLM, include_usage)
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if type(prompt) is int:
        ex.prompt_tokens = prompt
    if type(completion) is int:
        ex.completion_tokens = completion


class UpstreamResponse:
    """An ASGI-style response that relays an upstream response chunk by chunk."""

    __slots__ = ("has_usage", "is_sse", "lease", "upstream")

    def __init__(self, upstream: aiohttp.ClientResponse, lease: Lease) -> None:
        self.upstream = upstream
        self.lease = lease
        content_type = upstream.headers.get("content-type", "")
        self.is_sse = content_type.startswith("text/event-stream")
        # Where a backend reports token usage: JSON bodies and event streams.
        self.has_usage = self.is_sse or "json" in content_type

    async def send_to(self, send: Send, ex: Exchange) -> None:
        complete = False
        try:
            complete = await self._relay(send, ex)
        finally:
            if complete:
                self.upstream.release()  # back to the pool if fully read
            else:  # the client left or the backend failed: the backend sees it closed
                self.upstream.close()
            self.lease.release()

    async def _relay(self, send: Send, ex: Exchange) -> bool:
        """Relay the answer; whether the backend's body was read to its end."""
        upstream = self.upstream
        if not ex.started:
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status,
                    "headers": response_headers(upstream.raw_headers, self.is_sse),
                }
            )
            ex.started = True
            ex.status = upstream.status
        elif not self.is_sse:
            # Loading progress already began an event stream, and the backend
            # answered the streaming request with something else: it cannot
            # go into the stream.
            name = self.lease.spec.name
            log.warning("backend for '%s' answered a streaming request without a stream", name)
            error = BackendError(
                f"The backend for '{name}' answered a streaming request without an event stream"
            )
            await ex.end_stream_with(send, error)
            return False
        sent = 0
        try:
            length = upstream.content_length
            if length is not None and length <= WHOLE_BODY_BYTES:
                # A small answer of known size (most non-streamed ones): one
                # body message instead of one per received piece plus an end.
                body = await upstream.read()
                ex.first_byte = time.monotonic()
                sent = len(body)
                if self.has_usage:
                    note_usage(ex, body[-USAGE_TAIL:])
                ex.done = True
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return True
            # Only the last two pieces are kept, for the usage chunk of a
            # stream (followed by "data: [DONE]", maybe in a piece of its own).
            previous = last = b""
            async for chunk in upstream.content.iter_any():
                if not sent:
                    ex.first_byte = time.monotonic()
                sent += len(chunk)
                previous, last = last, chunk
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if self.has_usage and sent:
                tail = last if b'"usage"' in last else previous + last
                note_usage(ex, tail[-2 * USAGE_TAIL :])
        except (TimeoutError, aiohttp.ClientError) as exc:
            name = self.lease.spec.name
            what = plain_failure(exc)
            log.warning("backend for '%s' failed mid-response: %s", name, what)
            error = MidStreamFailure(f"The backend for '{name}' failed mid-stream: {what}")
            if not self.is_sse:
                ex.status = error.status  # what the request amounted to
                raise  # the server drops the connection: the client sees a truncated body
            await ex.end_stream_with(send, error)
            return False
        finally:
            ex.sent += sent
        if ex.first_byte is None:
            ex.first_byte = time.monotonic()
        ex.done = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True


async def send_json_payload(
    send: Send, status: int, payload: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """One complete JSON response: the only place dynllm writes one by hand."""
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    raw += headers
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def send_error(
    send: Send,
    exc: DynllmError,
    shape: Shape = Shape.OPENAI,
    extra: Iterable[tuple[bytes, bytes]] = (),
    ex: Exchange | None = None,
) -> None:
    """``exc`` as a whole response in the route's ``shape`` (its headers,
    such as Retry-After, plus ``extra``); noted on ``ex`` when given."""
    status, headers, payload = exc.render(shape)
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if ex is not None:
        ex.started = ex.done = True
        ex.status, ex.sent, ex.first_byte = status, len(payload), time.monotonic()
    await send_json_payload(send, status, payload, [*raw, *extra])


class ErrorAnswer:
    """A backend's error answer, translated into the route's error shape."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    async def send_to(self, send: Send, ex: Exchange) -> None:
        ex.first_byte = time.monotonic()
        ex.status = self.status
        if ex.started:  # loading progress began an event stream: the error goes into it
            await ex.end_stream(send, b"data: " + self.body + b"\n\n")
            return
        # Both flags at once: the answer is whole in hand, nothing is left to cancel.
        ex.started = ex.done = True
        ex.sent += len(self.body)
        await send_json_payload(send, self.status, self.body, self.headers)


Answer = UpstreamResponse | ErrorAnswer


async def forward(
    client: aiohttp.ClientSession,
    lease: Lease,
    method: str,
    path: str,
    body: bytes | Spool | None,
    headers: Iterable[tuple[bytes, bytes]],
    query: bytes = b"",
    content_type: str | None = None,
    shape: Shape = Shape.OPENAI,
) -> Answer:
    """Send the request; the returned answer owns the lease from here on."""
    url = lease.base_url + path + ("?" + query.decode("latin-1") if query else "")
    sent_headers = request_headers(headers, content_type)
    if isinstance(body, Spool):
        sent_headers["content-length"] = str(body.length)
    attempt = 0
    try:  # any exit other than an answer (a cancel during backoff too) frees the lease
        while True:
            attempt += 1
            data = body.stream() if isinstance(body, Spool) else body
            try:
                upstream = await client.request(
                    method, url, data=data, headers=sent_headers, allow_redirects=False
                )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                unsent = not_sent(exc) or (isinstance(body, Spool) and not body.handed_over)
                if not unsent:
                    # Sent, at least in part: the backend may have read it; never again.
                    raise _no_answer(lease, exc, unsent) from exc
                # The connection could not be opened, or the backend closed it
                # before the request could be written (llama-server under a
                # burst of new connections): it cannot have read the request,
                # so trying again cannot repeat it.
                if lease.backend_exited:  # no retry reaches a dead process
                    name = lease.spec.name
                    log.warning("backend for '%s' exited before the request was sent", name)
                    raise BackendGone(
                        f"The backend for '{name}' exited before the request could be sent"
                    ) from exc
                if attempt == CONNECT_ATTEMPTS:
                    raise _no_answer(lease, exc, unsent) from exc
                log.debug("'%s' refused a connection (%s); retrying", lease.spec.name, exc)
                await asyncio.sleep(0.05 * attempt)
                continue
            except ValueError:  # after ClientError: aiohttp's InvalidURL is both
                # aiohttp refuses a control character in a header before sending
                # anything (httptools rejects them first; other ASGI servers do not).
                raise BadRequest(
                    "A request header holds a control character; it cannot be forwarded"
                ) from None
            if upstream.status < 400:
                return UpstreamResponse(upstream, lease)
            return await _error_answer(upstream, lease, shape)
    except BaseException:
        lease.release()
        raise


async def _error_answer(upstream: aiohttp.ClientResponse, lease: Lease, shape: Shape) -> Answer:
    """Read a backend's error answer and put it in the route's shape (an event
    stream or an oversized body is relayed as it is)."""
    length = upstream.content_length
    if upstream.headers.get("content-type", "").startswith("text/event-stream") or (
        length is not None and length > MAX_ERROR_BODY
    ):
        return UpstreamResponse(upstream, lease)
    try:
        body = await _read_up_to(upstream, MAX_ERROR_BODY)
    except (aiohttp.ClientError, TimeoutError) as exc:
        upstream.close()
        raise _no_answer(lease, exc) from exc
    except BaseException:  # cancelled: the client left
        upstream.close()
        raise
    if upstream.content.is_eof():
        upstream.release()
    else:
        upstream.close()
    lease.release()
    status, ours, payload = from_backend(upstream.status, body, lease.spec.name).render(shape)
    headers = [(k, v) for k, v in upstream.raw_headers if k.lower() not in _ERROR_DROP]
    headers += [(k.lower().encode(), v.encode()) for k, v in ours.items()]
    return ErrorAnswer(status, headers, payload)


async def _read_up_to(upstream: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes (``read(n)`` alone returns what has
    arrived so far: a body sent in pieces would be cut)."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await upstream.content.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


WRITE_FAILED = "Can not write request body"  # aiohttp's words when writing the request failed


def not_sent(exc: BaseException) -> bool:
    """Whether the request certainly did not reach the backend whole: the
    connection could not be opened, or writing the request onto it failed
    (the backend had already closed it).  A backend acts only on a complete
    request, so such a request may be sent again; any other failure may come
    after the backend read it."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return True
    return isinstance(exc, aiohttp.ClientOSError) and (exc.strerror or "").startswith(WRITE_FAILED)


def plain_failure(exc: BaseException) -> str:
    """What went wrong with a backend connection, in words (never a library repr)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "could not be reached (timed out opening a connection)"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "could not be reached (connection refused: is it still running?)"
        return "could not be reached (the connection could not be opened)"
    if not_sent(exc):
        return "closed the connection before the request could be sent"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "closed the connection without answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "stopped sending its answer midway"
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "did not answer in time (upstream_read_timeout_seconds)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"dropped the connection ({exc.strerror.lower()})"
    return "failed to answer"


def _no_answer(lease: Lease, exc: BaseException, unsent: bool = False) -> BackendError:
    what = plain_failure(exc)
    log.warning("backend for '%s' %s (%r)", lease.spec.name, what, exc)
    if not unsent:
        what += "; the request was not sent again because the backend may have read it"
    return BackendError(f"The backend for '{lease.spec.name}' {what}")
