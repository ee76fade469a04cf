"""Forward one request to a leased backend and stream the answer back.

This is the hot path: bytes pass through untouched (no parsing, no
re-encoding, no buffering), and the lease is released in ``finally`` when the
last byte is sent, the client goes away, or the backend fails.  A backend
that fails after the response has started ends an event stream with one SSE
error event in the OpenAI shape.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import aiohttp
from multidict import CIMultiDict
from starlette.types import Receive, Scope, Send

from dynllm.config import Config
from dynllm.errors import BackendError, MidStreamFailure
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
        b"content-length",
    }
)
_REQUEST_DROP_TYPED = HOP_BY_HOP | {b"content-type"}
_RESPONSE_DROP = HOP_BY_HOP - {b"content-length"}
CONNECT_ATTEMPTS = 5
KEEPALIVE_SECONDS = 4.0
MAX_CONNECTIONS = 1024  # to all backends together: room for many concurrent streams
WHOLE_BODY_BYTES = 1 << 20


def make_client(config: Config) -> aiohttp.ClientSession:
    """The one client for all backends: sized for many concurrent streams and
    with no read timeout, so a slow long generation is never cut.

    aiohttp rather than httpx: on the bench its per-request cost is a
    fraction of httpx's (see the README's benchmark section)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
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
    drop = _REQUEST_DROP_TYPED if content_type else HOP_BY_HOP
    headers: CIMultiDict[str] = CIMultiDict(
        (k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if k.lower() not in drop
    )
    if content_type:
        headers["content-type"] = content_type
    return headers


def response_headers(raw: Iterable[tuple[bytes, bytes]], is_sse: bool) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in raw if k.lower() not in _RESPONSE_DROP]
    if is_sse:
        present = {k.lower() for k, _ in out}
        # Keep nginx and friends from buffering the stream.
        if b"x-accel-buffering" not in present:
            out.append((b"x-accel-buffering", b"no"))
        if b"cache-control" not in present:
            out.append((b"cache-control", b"no-cache"))
    return out


class UpstreamResponse:
    """An ASGI response that relays an upstream response chunk by chunk.

    For event streams it also watches for the client's disconnect, so an
    abandoned generation is cancelled upstream at once rather than at the
    next write (a backend may think for a long time before its next token).
    Other responses notice a vanished client when a write fails.
    """

    def __init__(self, upstream: aiohttp.ClientResponse, lease: Lease) -> None:
        self.upstream = upstream
        self.lease = lease
        self.is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher: asyncio.Task[None] | None = None
        gone = False
        relay = asyncio.current_task()
        assert relay is not None
        try:
            if self.is_sse:

                async def watch_disconnect() -> None:
                    nonlocal gone
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    gone = True
                    relay.cancel()

                watcher = asyncio.create_task(watch_disconnect())
            await self._relay(send)
        except asyncio.CancelledError:
            if not gone:
                raise  # not ours: shutdown or the server cancelled us
            relay.uncancel()
        except OSError:
            pass  # the client went away between writes
        finally:
            if watcher is not None:
                watcher.cancel()
            self.upstream.release()  # back to the pool if fully read, else closed
            self.lease.release()

    async def _relay(self, send: Send) -> None:
        upstream = self.upstream
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status,
                "headers": response_headers(upstream.raw_headers, self.is_sse),
            }
        )
        try:
            length = upstream.content_length
            if length is not None and length <= WHOLE_BODY_BYTES:
                # A small answer of known size (most non-streamed ones): one
                # body message instead of one per received piece plus an end.
                body = await upstream.read()
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            async for chunk in upstream.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (TimeoutError, aiohttp.ClientError) as exc:
            name = self.lease.spec.name
            log.warning("backend for '%s' failed mid-response: %r", name, exc)
            if not self.is_sse:
                raise  # the server drops the connection: the client sees a truncated body
            error = MidStreamFailure(f"The backend for '{name}' failed mid-stream: {exc!r}")
            await send({"type": "http.response.body", "body": error.sse_event(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def forward(
    client: aiohttp.ClientSession,
    lease: Lease,
    method: str,
    path: str,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    query: bytes = b"",
    content_type: str | None = None,
) -> UpstreamResponse:
    """Send the request; the returned response owns the lease from here on."""
    url = lease.base_url + path + ("?" + query.decode("latin-1") if query else "")
    sent_headers = request_headers(headers, content_type)
    attempt = 0
    try:  # any exit other than a response (a cancel during backoff too) frees the lease
        while True:
            attempt += 1
            try:
                upstream = await client.request(
                    method, url, data=body, headers=sent_headers, allow_redirects=False
                )
                return UpstreamResponse(upstream, lease)
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
                # A backend with a small connection pool (llama-server's HTTP
                # threads) drops connections it cannot take yet, before reading
                # the request: nothing was processed, so trying again is safe.
                if attempt == CONNECT_ATTEMPTS:
                    raise _no_answer(lease, exc) from exc
                log.debug("'%s' refused a connection (%r); retrying", lease.spec.name, exc)
                await asyncio.sleep(0.05 * attempt)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise _no_answer(lease, exc) from exc
    except BaseException:
        lease.release()
        raise


def _no_answer(lease: Lease, exc: BaseException) -> BackendError:
    return BackendError(f"The backend for '{lease.spec.name}' did not answer: {exc!r}")
