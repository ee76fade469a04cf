"""The forwarding path: header handling (pure), the retry policy (only a
connection that could not be opened is tried again), error translation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import MutableMapping
from typing import Any

import aiohttp
import pytest

from dynllm.api.bodies import Spool
from dynllm.errors import BackendError
from dynllm.proxy import (
    BackendGone,
    Exchange,
    LiveConnector,
    UpstreamResponse,
    forward,
    make_client,
    not_sent,
    note_usage,
    request_headers,
    response_headers,
)
from tests.support.net import free_port
from tests.test_scheduler import make_config


def test_request_headers_drop_hop_by_hop_and_credentials_and_keep_the_rest() -> None:
    raw = [
        (b"Host", b"proxy:8000"), (b"Connection", b"keep-alive"), (b"Content-Length", b"10"),
        (b"Transfer-Encoding", b"chunked"), (b"TE", b"trailers"), (b"Authorization", b"Bearer x"),
        (b"X-Api-Key", b"k"), (b"Cookie", b"session=1"), (b"Proxy-Authorization", b"Basic y"),
        (b"Proxy-Foo", b"z"), (b"Content-Type", b"text/plain"), (b"X-Request-Id", b"42"),
    ]  # fmt: skip
    assert list(request_headers(raw).items()) == [
        ("Content-Type", "text/plain"), ("X-Request-Id", "42"),
    ]  # fmt: skip
    forced = request_headers(raw, "application/json")
    assert forced.getall("content-type") == ["application/json"]  # the client's is replaced
    assert list(forced) == ["X-Request-Id", "content-type"]


def raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers.items()]


def test_response_headers_for_event_streams() -> None:
    sse = raw({"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked",
               "Connection": "close", "Server": "llama.cpp"})  # fmt: skip
    out = {k.lower(): v for k, v in response_headers(sse, is_sse=True)}
    assert out[b"x-accel-buffering"] == b"no" and out[b"cache-control"] == b"no-cache"
    assert b"transfer-encoding" not in out and b"connection" not in out
    assert out[b"server"] == b"llama.cpp"
    plain = response_headers(
        raw(
            {
                "content-type": "application/json",
                "content-length": "5",
                "Date": "x",
                "Set-Cookie": "s=1",
            }
        ),
        is_sse=False,
    )  # the server sets its own Date; a backend's cookie never reaches clients
    assert dict(plain) == {b"content-type": b"application/json", b"content-length": b"5"}
    own = response_headers(
        raw({"Content-Type": "text/event-stream", "X-Accel-Buffering": "yes"}), is_sse=True
    )
    assert [v for k, v in own if k.lower() == b"x-accel-buffering"] == [b"yes"]  # backend's wins


async def test_shared_client_is_sized_for_many_streams_without_read_timeout() -> None:
    client = make_client(make_config([]))
    try:
        assert client.timeout.total is None and client.timeout.sock_read is None
        assert client.connector is not None and client.connector.limit >= 512
        assert client.trust_env is False and client.auto_decompress is False
    finally:
        await client.close()


class _Lease:
    """Just what ``forward`` uses of a scheduler lease."""

    def __init__(self, port: int) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self.spec = type("Spec", (), {"name": "m"})()
        self.released = 0
        self.backend_exited = False

    def release(self) -> None:
        self.released += 1


async def _server_reading_then_dropping() -> tuple[asyncio.Server, int, list[bytes]]:
    """Reads each request whole, then drops the connection without answering."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
        length = int({k.lower(): v for k, v in fields.items()}[b"content-length"])
        seen.append(await reader.readexactly(length))
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


async def test_a_request_the_backend_read_is_never_sent_again() -> None:
    server, port, seen = await _server_reading_then_dropping()
    client = make_client(make_config([]))
    lease = _Lease(port)
    try:
        with pytest.raises(BackendError) as failed:
            await forward(client, lease, "POST", "/v1/x", b'{"a":1}', [])  # type: ignore[arg-type]
        assert seen == [b'{"a":1}']  # exactly once
        assert failed.value.status == 502 and lease.released == 1
        message = failed.value.message
        assert message.startswith("The backend for 'm' ")
        assert "not sent again" in message and "Error(" not in message, message
    finally:
        await client.close()
        server.close()


async def test_a_connection_that_cannot_be_opened_is_retried_then_502() -> None:
    port = free_port()  # nothing listens there
    client = make_client(make_config([]))
    lease = _Lease(port)
    try:
        started = time.monotonic()
        with pytest.raises(BackendError) as failed:
            await forward(client, lease, "POST", "/v1/x", b"{}", [])  # type: ignore[arg-type]
        elapsed = time.monotonic() - started
        print(f"a live backend refusing every connection: 502 after {1000 * elapsed:.0f} ms")
        assert not isinstance(failed.value, BackendGone)
        assert failed.value.message == (
            "The backend for 'm' could not be reached (connection refused: is it still running?)"
        )
        assert lease.released == 1
    finally:
        await client.close()


async def test_a_refused_connection_is_retried_until_the_backend_listens() -> None:
    port = free_port()
    client = make_client(make_config([]))
    lease = _Lease(port)
    attempts = 0
    server: asyncio.Server | None = None

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    real_request = client.request

    async def counting(*args: object, **kwargs: object) -> object:
        nonlocal attempts, server
        attempts += 1
        if attempts == 2:  # the backend starts listening between two tries
            server = await asyncio.start_server(answer, "127.0.0.1", port)
        return await real_request(*args, **kwargs)  # type: ignore[arg-type]

    client.request = counting  # type: ignore[method-assign,assignment]
    try:
        response = await forward(client, lease, "POST", "/v1/x", b"{}", [])  # type: ignore[arg-type]
        assert attempts == 2 and response.upstream.status == 200  # type: ignore[union-attr]
        assert await response.upstream.read() == b"ok"  # type: ignore[union-attr]
        response.upstream.release()  # type: ignore[union-attr]
    finally:
        await client.close()
        if server is not None:
            server.close()


async def test_a_refused_connection_to_a_backend_that_exited_is_handed_back_at_once() -> None:
    """Nothing listens because the lease's process has exited: forward stops
    knocking on the dead port (the retries took ~0.5 s and ended in a 502) and
    raises BackendGone, so the dispatcher can send the request to a restarted
    backend.  A process that exits while forward retries is noticed at the
    next try."""
    port = free_port()
    client = make_client(make_config([]))
    try:
        lease = _Lease(port)
        lease.backend_exited = True
        started = time.monotonic()
        with pytest.raises(BackendGone) as gone:
            await forward(client, lease, "POST", "/v1/x", b"{}", [])  # type: ignore[arg-type]
        elapsed = time.monotonic() - started
        print(f"refused by a backend that exited: handed back after {1000 * elapsed:.1f} ms")
        assert elapsed < 0.04  # no backoff at all
        assert gone.value.status == 502 and lease.released == 1
        assert gone.value.message == ("The backend for 'm' exited before the request could be sent")
        lease = _Lease(port)
        attempts = 0
        real_request = client.request

        async def counting(*args: object, **kwargs: object) -> object:
            nonlocal attempts
            attempts += 1
            lease.backend_exited = attempts >= 2  # the exit is seen after the first try
            return await real_request(*args, **kwargs)  # type: ignore[arg-type]

        client.request = counting  # type: ignore[method-assign,assignment]
        with pytest.raises(BackendGone):
            await forward(client, lease, "POST", "/v1/x", b"{}", [])  # type: ignore[arg-type]
        assert attempts == 2 and lease.released == 1
    finally:
        await client.close()


class _KeepAliveServer:
    """A blocking server in a thread: answers one request per connection and
    keeps the connection open until told to close it (a backend that dies
    closes it the same way), so the test controls exactly when the FIN goes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.port: int = self.sock.getsockname()[1]
        self.requests: list[int] = []  # per connection, requests read
        self.close_first = threading.Event()
        self.closed_first = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        while len(body) < length:
            body += conn.recv(65536)
        self.requests.append(1)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    def _run(self) -> None:
        first, _ = self.sock.accept()
        self._answer(first)
        self.close_first.wait(5)
        first.close()
        self.closed_first.set()
        try:
            second, _ = self.sock.accept()
        except OSError:  # closed by the test: no second connection came
            return
        with second:
            self._answer(second)

    def close(self) -> None:
        self.close_first.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a waiting accept()
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("live", [True, False], ids=["LiveConnector", "plain TCPConnector"])
async def test_a_pooled_connection_the_backend_closed_is_never_used(live: bool) -> None:
    """The backend closed a pooled connection (it died) and the event loop has
    not seen it yet: the request goes on a new connection (200), where a plain
    pool writes it on the closed one and gets a 502 that says it may have
    been read."""
    server = _KeepAliveServer()
    client = make_client(make_config([]))
    if not live:
        await client.close()
        client = aiohttp.ClientSession(connector=aiohttp.TCPConnector())
    assert isinstance(client.connector, LiveConnector) is live
    try:
        first = await forward(client, _Lease(server.port), "POST", "/v1/x", b"{}", [])  # type: ignore[arg-type]
        assert isinstance(first, UpstreamResponse) and await first.upstream.read() == b"ok"
        first.upstream.release()  # pooled
        server.close_first.set()
        # Blocking on purpose: the event loop must not run (and read the FIN)
        # between the close and the next request.
        assert server.closed_first.wait(5)
        lease = _Lease(server.port)
        if live:
            second = await forward(client, lease, "POST", "/v1/x", b"{}", [])  # type: ignore[arg-type]
            assert isinstance(second, UpstreamResponse) and await second.upstream.read() == b"ok"
            second.upstream.release()
            assert server.requests == [1, 1]  # on a second connection
        else:
            with pytest.raises(BackendError, match="may have read it"):
                await forward(client, lease, "POST", "/v1/x", b"{}", [])  # type: ignore[arg-type]
            assert server.requests == [1]
    finally:
        await client.close()
        server.close()


async def test_a_request_the_backend_read_is_never_handed_back_even_if_it_exited() -> None:
    """A backend that read the request and died: 502, never BackendGone (the
    request may have acted), even though its process is gone."""
    server, port, seen = await _server_reading_then_dropping()
    client = make_client(make_config([]))
    lease = _Lease(port)
    lease.backend_exited = True
    try:
        with pytest.raises(BackendError) as failed:
            await forward(client, lease, "POST", "/v1/x", b'{"a":1}', [])  # type: ignore[arg-type]
        assert not isinstance(failed.value, BackendGone)
        assert "not sent again" in failed.value.message and seen == [b'{"a":1}']
    finally:
        await client.close()
        server.close()


async def test_backend_cookies_are_never_replayed_to_other_requests() -> None:
    """A Set-Cookie from a backend must not ride along on later requests (from
    other users): the shared client keeps no cookie jar."""
    cookies: list[bytes | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            fields = {
                k.strip().lower(): v.strip()
                for k, v in (
                    line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line
                )
            }
            await reader.readexactly(int(fields.get(b"content-length", b"0")))
            cookies.append(fields.get(b"cookie"))
            writer.write(
                b"HTTP/1.1 200 OK\r\nset-cookie: session=alice; Path=/\r\n"
                b"content-length: 2\r\n\r\nok"
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = make_client(make_config([]))
    lease = _Lease(port)
    lease.base_url = f"http://localhost:{port}"  # a host name: a default jar would keep it
    try:
        for _ in range(2):
            response = await forward(client, lease, "POST", "/v1/x", b"{}", [])  # type: ignore[arg-type]
            assert isinstance(response, UpstreamResponse)
            assert await response.upstream.read() == b"ok"
            response.upstream.release()
        assert cookies == [None, None]
    finally:
        await client.close()
        server.close()


async def test_a_request_the_backend_closed_on_before_it_was_written_is_sent_again() -> None:
    """The first connection is reset after its first byte, while the request
    is still being written (the body is larger than the socket buffers): the backend cannot
    have read it, so it goes again, and arrives exactly once."""
    import hashlib
    import socket
    import struct

    body = bytes(range(256)) * (64 << 10)  # 16 MiB
    connections = 0
    complete: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            await reader.readexactly(1)  # the client is writing; 16 MiB cannot all be sent yet
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST
            return
        head = await reader.readuntil(b"\r\n\r\n")
        fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
        length = int({k.lower(): v for k, v in fields.items()}[b"content-length"])
        complete.append(hashlib.sha256(await reader.readexactly(length)).hexdigest())
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = make_client(make_config([]))
    lease = _Lease(server.sockets[0].getsockname()[1])
    spool = Spool.new()
    spool.write(body)
    try:
        response = await forward(client, lease, "POST", "/v1/x", spool, [])  # type: ignore[arg-type]
        assert await response.upstream.read() == b"ok"  # type: ignore[union-attr]
        response.upstream.release()  # type: ignore[union-attr]
        assert connections == 2 and complete == [hashlib.sha256(body).hexdigest()]
    finally:
        await client.close()
        server.close()
        spool.close()


def test_what_counts_as_not_sent() -> None:
    import aiohttp

    assert not_sent(aiohttp.ClientOSError(None, "Can not write request body for http://x/"))
    assert not not_sent(aiohttp.ClientOSError(104, "Connection reset by peer"))
    assert not not_sent(aiohttp.ServerDisconnectedError())


async def test_an_error_body_in_pieces_is_read_whole_and_keeps_the_backends_headers() -> None:
    body = b'{"error": {"message": "context length exceeded: 9000 > 4096", "code": 400}}'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(
            b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
            b"retry-after: 7\r\nx-request-id: abc\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        for piece in (body[:30], body[30:]):  # two chunks, apart
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = make_client(make_config([]))
    lease = _Lease(server.sockets[0].getsockname()[1])
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    try:
        answer = await forward(client, lease, "POST", "/v1/x", b"{}", [])  # type: ignore[arg-type]
        await answer.send_to(send, Exchange())
        assert sent[0]["status"] == 429 and lease.released == 1
        headers = dict(sent[0]["headers"])
        assert headers[b"retry-after"] == b"7" and headers[b"x-request-id"] == b"abc"
        assert b"transfer-encoding" not in headers
        assert json.loads(sent[1]["body"])["error"]["message"] == (
            "context length exceeded: 9000 > 4096"
        )
    finally:
        await client.close()
        server.close()


def test_expect_is_not_forwarded() -> None:
    raw = [(b"Expect", b"100-continue"), (b"X-Id", b"1")]
    assert list(request_headers(raw).items()) == [("X-Id", "1")]
    assert "expect" not in request_headers(raw, "application/json")


# ---- what the relay notes for the request record ---------------------------------------------


@pytest.mark.parametrize(
    ("tail", "tokens"),
    [
        (b'{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}',
         (12, 34)),
        # llama-server puts timings after it; spaces after the colon
        (b'"usage": {"prompt_tokens": 5, "completion_tokens": 7}, "timings": {"a": 1}}', (5, 7)),
        # the Responses API
        (b'"usage":{"input_tokens":3,"output_tokens":4,"output_tokens_details":{"r":0}}}', (3, 4)),
        # embeddings: no completion tokens
        (b'"usage":{"prompt_tokens":9,"total_tokens":9}}', (9, None)),
        # a stream's last chunks: the usage event, then [DONE]
        (b'data: {"choices":[{"delta":{}}],"usage":null}\n\ndata: {"choices":[],"usage":'
         b'{"prompt_tokens":1,"completion_tokens":2}}\n\ndata: [DONE]\n\n', (1, 2)),
        # nothing to find, or nothing usable
        (b'data: {"choices":[],"usage":null}\n\ndata: [DONE]\n\n', (None, None)),
        (b'{"content": "a \\"usage\\": {\\"prompt_tokens\\": 1} in the text"}', (None, None)),
        (b'"usage":{"prompt_tokens":1,"completion', (None, None)),  # cut off
        (b'"usage":{"prompt_tokens":true,"completion_tokens":"2"}}', (None, None)),
        (b'"type":"usage"}', (None, None)),
        (b"\xff\xfe not even text", (None, None)),
    ],
)  # fmt: skip
def test_usage_is_read_from_the_tail_only(tail: bytes, tokens: tuple[int | None, ...]) -> None:
    ex = Exchange()
    note_usage(ex, tail)
    assert (ex.prompt_tokens, ex.completion_tokens) == tokens


async def _serve_once(head: bytes, body: bytes) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + body)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _relay(server: asyncio.Server, ex: Exchange) -> list[MutableMapping[str, Any]]:
    client = make_client(make_config([]))
    lease = _Lease(server.sockets[0].getsockname()[1])
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    try:
        answer = await forward(client, lease, "POST", "/v1/x", b"{}", [])  # type: ignore[arg-type]
        await answer.send_to(send, ex)
        assert lease.released == 1
        return sent
    finally:
        await client.close()
        server.close()


async def test_a_relayed_body_is_counted_with_its_first_byte_and_usage() -> None:
    body = b'{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}'
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    ex = Exchange()
    before = time.monotonic()
    sent = await _relay(await _serve_once(head % len(body), body), ex)
    assert sent[0]["status"] == 200 and sent[1]["body"] == body
    assert (ex.status, ex.sent, ex.prompt_tokens, ex.completion_tokens) == (200, len(body), 2, 3)
    assert ex.first_byte is not None and ex.first_byte >= before and ex.done


async def test_an_answer_after_loading_progress_goes_into_the_open_stream() -> None:
    stream = b'data: {"choices":[]}\n\ndata: [DONE]\n\n'
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-backend: 1\r\n\r\n"
    ex = Exchange()
    ex.started = ex.progress = True  # loading progress sent the status line
    sent = await _relay(await _serve_once(head, stream), ex)
    assert all(m["type"] == "http.response.body" for m in sent)  # no second status line
    assert b"".join(m["body"] for m in sent) == stream and ex.sent == len(stream)
    # a backend that answers the streaming request with plain JSON: an error event
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
    ex = Exchange()
    ex.started = ex.progress = True
    (only,) = await _relay(await _serve_once(head, b"{}"), ex)
    assert only["body"].startswith(b"data: {") and not only["more_body"]
    assert json.loads(only["body"][6:])["error"]["message"] == (
        "The backend for 'm' answered a streaming request without an event stream"
    )
    assert ex.status == 502
    # a backend's error answer: one error event, its status kept for the record
    error = b'{"error": {"message": "context too long", "code": 400}}'
    head = (
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    )
    ex = Exchange()
    ex.started = ex.progress = True
    (only,) = await _relay(await _serve_once(head % len(error), error), ex)
    assert json.loads(only["body"][6:])["error"]["message"] == "context too long"
    assert only["body"].endswith(b"\n\n") and ex.status == 400
