"""Header handling on the forwarding path. Pure."""

from __future__ import annotations

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


def raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers.items()]


def test_response_headers_for_event_streams() -> None:
    sse = raw({"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked",
               "Connection": "close", "Server": "llama.cpp"})  # fmt: skip
    out = {k.lower(): v for k, v in response_headers(sse, "text/event-stream")}
    assert out[b"x-accel-buffering"] == b"no" and out[b"cache-control"] == b"no-cache"
    assert b"transfer-encoding" not in out and b"connection" not in out
    assert out[b"server"] == b"llama.cpp"
    plain = response_headers(
        raw({"content-type": "application/json", "content-length": "5"}), "application/json"
    )
    assert dict(plain) == {b"content-type": b"application/json", b"content-length": b"5"}
    own = response_headers(
        raw({"Content-Type": "text/event-stream", "X-Accel-Buffering": "yes"}), "text/event-stream"
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
