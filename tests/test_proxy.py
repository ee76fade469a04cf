"""Header handling on the forwarding path. Pure."""

from __future__ import annotations

import httpx

from dynllm.proxy import make_client, request_headers, response_headers
from tests.test_scheduler import make_config


def test_request_headers_drop_hop_by_hop_and_keep_the_rest() -> None:
    raw = [
        (b"Host", b"proxy:8000"), (b"Connection", b"keep-alive"), (b"Content-Length", b"10"),
        (b"Transfer-Encoding", b"chunked"), (b"TE", b"trailers"), (b"Authorization", b"Bearer x"),
        (b"Content-Type", b"text/plain"), (b"X-Request-Id", b"42"),
    ]  # fmt: skip
    assert request_headers(raw) == [
        (b"Authorization", b"Bearer x"), (b"Content-Type", b"text/plain"), (b"X-Request-Id", b"42"),
    ]  # fmt: skip
    forced = request_headers(raw, b"application/json")
    assert (b"content-type", b"application/json") in forced
    assert (b"Content-Type", b"text/plain") not in forced


def test_response_headers_for_event_streams() -> None:
    sse = httpx.Headers({"content-type": "text/event-stream", "transfer-encoding": "chunked",
                         "connection": "close", "server": "llama.cpp"})  # fmt: skip
    out = dict(response_headers(sse))
    assert out[b"x-accel-buffering"] == b"no" and out[b"cache-control"] == b"no-cache"
    assert b"transfer-encoding" not in out and b"connection" not in out
    assert out[b"server"] == b"llama.cpp"
    plain = dict(
        response_headers(httpx.Headers({"content-type": "application/json", "content-length": "5"}))
    )
    assert plain == {b"content-type": b"application/json", b"content-length": b"5"}
    own = response_headers(
        httpx.Headers({"content-type": "text/event-stream", "x-accel-buffering": "yes"})
    )
    assert [v for k, v in own if k == b"x-accel-buffering"] == [b"yes"]  # the backend's own wins


async def test_shared_client_is_sized_for_many_streams_without_read_timeout() -> None:
    client = make_client(make_config([]))
    try:
        assert client.timeout.read is None and client.timeout.pool is None
        pool = client._transport._pool  # type: ignore[attr-defined]
        assert pool._max_connections >= 512
        assert client.trust_env is False
    finally:
        await client.aclose()
