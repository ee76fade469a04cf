"""The connection limits of dynllm's HTTP server (src/dynllm/server.py):
header and body-idle timeouts and the connection cap, through a real uvicorn
server built as the ``dynllm`` command builds it, on real sockets that send a
byte at a time.  The backend is the generic stand-in (fake_openai_server.py)
started by the ``command`` backend.  Timeouts are small so the tests are quick;
the code path is the one the defaults (10 s, 30 s) take."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import httpx
import pytest

from dynllm.config import Config
from tests.conftest import ConfigFactory, apoll, serve
from tests.test_dispatch import fake_model

HEADER_TIMEOUT = 1.0
BODY_IDLE = 0.5
SLACK = 0.6  # timer and scheduling delay allowed past a timeout on a busy 2-core machine
JSON_TYPE = {"content-type": "application/json"}


def limited_config(make_config: ConfigFactory, **top: Any) -> Config:
    top = {"header_timeout_seconds": HEADER_TIMEOUT, "body_idle_timeout_seconds": BODY_IDLE, **top}
    return make_config([fake_model("m")], enabled_backends=["llamacpp", "command"], **top)


class Raw:
    """One client connection on a plain socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def dribble(self, data: bytes, pause: float) -> None:
        """``data`` a byte at a time, ``pause`` apart, until sent or cut off."""
        with contextlib.suppress(ConnectionError):
            for i in range(len(data)):
                await self.send(data[i : i + 1])
                await asyncio.sleep(pause)

    async def closed_by_server(self, timeout: float) -> float:
        """The monotonic time at which the server closed the connection."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    if not await self.reader.read(65536):
                        return time.monotonic()
                except ConnectionError:
                    return time.monotonic()

    async def response(self, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        """One response with a Content-Length: status, headers, body."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers["content-length"]))
        return status, headers, body

    def close(self) -> None:
        self.writer.close()


def request_head(method: str, path: str, port: int, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chat_body(**extra: Any) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    return json.dumps(body).encode()


async def test_headers_sent_a_byte_at_a_time_are_cut_at_the_header_timeout(
    make_config: ConfigFactory,
) -> None:
    """A slowloris client (one byte every 0.2 s, never finishing) and one
    that connects and sends nothing are both dropped at header_timeout."""
    async with serve(limited_config(make_config)) as app:
        endless = request_head("GET", "/health", app.port)[:-4] + b"\r\nX-Pad: " + b"a" * 1000
        slow, silent = await Raw.open(app.port), await Raw.open(app.port)
        start = time.monotonic()
        dribbling = asyncio.create_task(slow.dribble(endless, 0.2))
        slow_closed = await slow.closed_by_server(HEADER_TIMEOUT + 10)
        silent_closed = await silent.closed_by_server(HEADER_TIMEOUT + 10)
        await dribbling
        for raw in (slow, silent):
            raw.close()
        slow_after, silent_after = slow_closed - start, silent_closed - start
        print(
            f"\nheader_timeout {HEADER_TIMEOUT} s: a byte every 0.2 s dropped after "
            f"{slow_after:.2f} s; a silent connection after {silent_after:.2f} s"
        )
        for after in (slow_after, silent_after):
            assert HEADER_TIMEOUT - 0.05 <= after <= HEADER_TIMEOUT + SLACK


async def test_one_byte_a_second_is_dropped_at_10_s_by_default(make_config: ConfigFactory) -> None:
    """The issue's figure, at the default header_timeout_seconds."""
    config = make_config([fake_model("m")], enabled_backends=["llamacpp", "command"])
    assert config.header_timeout_seconds == 10
    async with serve(config) as app:
        raw = await Raw.open(app.port)
        start = time.monotonic()
        endless = request_head("GET", "/health", app.port)[:-4] + b"\r\nX-Pad: " + b"a" * 100
        dribbling = asyncio.create_task(raw.dribble(endless, 1.0))
        after = await raw.closed_by_server(30) - start
        await dribbling
        raw.close()
        print(f"\none byte a second, default header_timeout: dropped after {after:.2f} s")
        assert 10 - 0.05 <= after <= 10 + SLACK


async def test_keep_alive_requests_have_their_own_header_clock(
    make_config: ConfigFactory,
) -> None:
    """Idle keep-alive time between requests is not header time; a later
    request's clock starts at its first byte, and it is cut like the first."""
    async with serve(limited_config(make_config)) as app:
        raw = await Raw.open(app.port)
        head = request_head("GET", "/health", app.port)
        await raw.send(head)
        assert (await raw.response())[0] == 200
        # Idle longer than the header timeout (uvicorn's keep-alive is 5 s).
        await asyncio.sleep(HEADER_TIMEOUT * 1.5)
        await raw.send(head[:10])
        await asyncio.sleep(HEADER_TIMEOUT * 0.6)  # 2.1 s since connect, 0.6 s since its first byte
        await raw.send(head[10:])
        assert (await raw.response())[0] == 200
        third = time.monotonic()
        dribbling = asyncio.create_task(raw.dribble(head[:-4] + b"\r\nX-Pad: " + b"a" * 100, 0.2))
        after = await raw.closed_by_server(HEADER_TIMEOUT + 10) - third
        await dribbling
        raw.close()
        print(f"\na third request dribbled on the same connection: dropped after {after:.2f} s")
        assert HEADER_TIMEOUT - 0.05 <= after <= HEADER_TIMEOUT + SLACK


@pytest.mark.parametrize(
    ("path", "kserve"),
    [
        ("/v1/chat/completions", False),
        ("/v2/models/m/infer", True),
        ("/admin/models/unload", False),  # a FastAPI route
    ],
)
async def test_a_stalled_body_gets_408_in_the_route_shape(
    make_config: ConfigFactory, path: str, kserve: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(limited_config(make_config)) as app:
        # uvicorn's loggers do not propagate to the root logger caplog listens
        # on, and its logging setup (in serve_limited) drops earlier handlers.
        logging.getLogger("uvicorn.error").addHandler(caplog.handler)
        raw = await Raw.open(app.port)
        await raw.send(request_head("POST", path, app.port, length=100) + b'{"model": "m"')
        stalled = time.monotonic()
        status, headers, body = await raw.response(timeout=BODY_IDLE + 10)
        answered = time.monotonic() - stalled
        await raw.closed_by_server(5)
        raw.close()
        print(f"\n{path}: body idle {BODY_IDLE} s -> {status} after {answered:.2f} s, closed")
        assert status == 408
        assert headers["connection"] == "close"
        error = json.loads(body)["error"]
        message = error if kserve else error["message"]
        assert message == f"The request body stopped arriving: no byte for {BODY_IDLE:g} s"
        if not kserve:
            assert error["code"] == "request_timeout"
        assert BODY_IDLE - 0.05 <= answered <= BODY_IDLE + SLACK
    logging.getLogger("uvicorn.error").removeHandler(caplog.handler)
    # The route saw its client leave mid-body: no traceback in the log.
    assert "Exception in ASGI application" not in caplog.text


async def test_an_upload_that_keeps_moving_is_never_cut(make_config: ConfigFactory) -> None:
    """A body sent in pieces 0.2 s apart (under the 0.5 s idle timeout) for
    ~3 s, six times the timeout, is served."""
    async with serve(limited_config(make_config)) as app:
        body = chat_body(padding="x" * 40)
        pieces = 15
        size = -(-len(body) // pieces)
        raw = await Raw.open(app.port)
        start = time.monotonic()
        await raw.send(request_head("POST", "/v1/chat/completions", app.port, len(body)))
        for i in range(0, len(body), size):
            await asyncio.sleep(0.2)
            await raw.send(body[i : i + size])
        took = time.monotonic() - start
        status, _, answer = await raw.response()
        raw.close()
        print(f"\nbody in {pieces} pieces over {took:.2f} s (idle timeout {BODY_IDLE} s): {status}")
        assert took > 5 * BODY_IDLE
        assert status == 200, answer
        assert json.loads(answer)["choices"][0]["message"]["content"] == "tok0 tok1 tok2"


async def test_waiting_for_an_answer_and_a_long_stream_are_never_cut(
    make_config: ConfigFactory,
) -> None:
    """The body clock stops at the body's end: a 1.5 s wait for the answer
    and a 2 s stream (3 to 4 times the idle timeout) complete."""
    async with (
        serve(limited_config(make_config)) as app,
        httpx.AsyncClient(base_url=app.base_url, timeout=30, trust_env=False) as client,
    ):
        start = time.monotonic()
        slow = await client.post(
            "/v1/chat/completions", content=chat_body(fake_delay=1.5), headers=JSON_TYPE
        )
        waited = time.monotonic() - start
        assert slow.status_code == 200, slow.text
        start = time.monotonic()
        events = []
        async with client.stream(
            "POST",
            "/v1/chat/completions",
            content=chat_body(stream=True, fake_tokens=10, fake_rate=5),
            headers=JSON_TYPE,
        ) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        streamed = time.monotonic() - start
        print(
            f"\nanswer after {waited:.2f} s and a {streamed:.2f} s stream, idle timeout {BODY_IDLE}"
        )
        assert waited > 2 * BODY_IDLE and streamed > 3 * BODY_IDLE
        assert len(events) == 11 and events[-1] == "[DONE]"


async def test_connections_beyond_max_connections_get_503_in_the_route_shape(
    make_config: ConfigFactory,
) -> None:
    """max_connections 2: an open SSE stream and an idle keep-alive
    connection fill it; a third connection gets 503 too_many_connections (in
    the KServe shape on /v2) and is closed; once one closes, a new one is
    served, and the stream is never disturbed."""
    async with (
        serve(limited_config(make_config, max_connections=2)) as app,
        httpx.AsyncClient(base_url=app.base_url, timeout=30, trust_env=False) as streamer,
    ):
        events: list[str] = []
        started = asyncio.Event()

        async def stream() -> None:
            body = chat_body(stream=True, fake_tokens=30, fake_rate=10)
            async with streamer.stream(
                "POST", "/v1/chat/completions", content=body, headers=JSON_TYPE
            ) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        streaming = asyncio.create_task(stream())
        await asyncio.wait_for(started.wait(), 30)
        idle = await Raw.open(app.port)
        await idle.send(request_head("GET", "/health", app.port))
        assert (await idle.response())[0] == 200
        assert app.limits.admitted == 2

        refused: dict[str, Any] = {}
        for path in ("/health", "/v2/health/ready"):
            extra = await Raw.open(app.port)
            await extra.send(request_head("GET", path, app.port))
            status, headers, body = await extra.response()
            await extra.closed_by_server(5)
            extra.close()
            assert status == 503 and headers["retry-after"] == "1"
            assert headers["connection"] == "close"
            refused[path] = json.loads(body)["error"]
        assert refused["/health"]["code"] == "too_many_connections"
        message = "dynllm is serving its limit of 2 connections; try again shortly"
        assert refused["/health"]["message"] == message
        assert refused["/v2/health/ready"] == message  # KServe's {"error": "..."}

        idle.close()
        await apoll(lambda: app.limits.admitted == 1, timeout=5)
        again = await Raw.open(app.port)
        await again.send(request_head("GET", "/health", app.port))
        assert (await again.response())[0] == 200
        again.close()
        assert not streaming.done()  # the checks ran while the stream was open
        await asyncio.wait_for(streaming, 30)
        print(f"\nmax_connections 2: 2 refused with 503, stream of {len(events)} events whole")
        assert len(events) == 31 and events[-1] == "[DONE]"
