"""Request bodies: the multipart ``model`` field found in a stream cut anywhere,
rewritten in place with every other byte kept, spooling, size limits."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from dynllm.api import bodies
from dynllm.errors import (
    BadRequest,
    InvalidJSON,
    InvalidMultipart,
    PayloadTooLarge,
    UnsupportedMediaType,
)

BOUNDARY = "----dynllmtestboundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}".encode()


def form(*fields: tuple[str, bytes, str | None]) -> bytes:
    """A multipart body: (name, value, filename or None) per part."""
    out = b""
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"'
        if filename:
            disposition += f'; filename="{filename}"\r\nContent-Type: audio/wav'
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += value + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def feed_in_pieces(body: bytes, cuts: list[int]) -> tuple[bodies.ModelField, bodies.Spool]:
    field = bodies.ModelField(CONTENT_TYPE)
    spool = bodies.Spool.new()
    edges = [0, *cuts, len(body)]
    for start, end in itertools.pairwise(edges):
        chunk = body[start:end]
        field.feed(chunk, spool.size)
        spool.write(chunk)
    return field, spool


async def streamed(spool: bodies.Spool) -> bytes:
    return b"".join([chunk async for chunk in spool.stream()])


AUDIO = bytes(range(256)) * 40 + b"\r\n--" + BOUNDARY[:-3].encode() + b"tail"


@pytest.mark.parametrize("model_first", [True, False])
async def test_model_field_found_and_rewritten_whatever_the_cuts(model_first: bool) -> None:
    parts = [("model", b"whisper-alias", None), ("file", AUDIO, "a.wav"), ("language", b"en", None)]
    if not model_first:
        parts = [parts[1], parts[0], parts[2]]
    body = form(*parts)
    expected = body.replace(b"whisper-alias", b"/models/whisper@main")
    # every single cut, and pairs of cuts around the model field
    at = body.index(b"whisper-alias")
    cuts = [[i] for i in range(1, len(body), 7)] + [[at + i, at + i + 3] for i in range(-5, 15)]
    for cut in cuts:
        field, spool = feed_in_pieces(body, sorted(set(c for c in cut if 0 < c < len(body))))
        assert field.model() == "whisper-alias", cut
        assert (field.start, field.end) == (at, at + len(b"whisper-alias")), cut
        assert await streamed(spool) == body  # untouched unless asked
        assert field.start is not None and field.end is not None
        spool.replace = (field.start, field.end, b"/models/whisper@main")
        assert spool.length == len(expected)
        assert await streamed(spool) == expected, cut
        spool.close()


async def test_a_value_that_looks_like_a_boundary_keeps_its_offsets() -> None:
    """The parser holds back bytes that might start a boundary; when they turn
    out not to, they belong just before the next chunk."""
    tricky = b"name\r\n--" + BOUNDARY[:5].encode() + b"x"
    body = form(("model", tricky, None), ("file", b"abc", "a.wav"))
    at = body.index(tricky)
    for cut in range(at, at + len(tricky) + 1):
        field, spool = feed_in_pieces(body, [cut])
        assert field.value == tricky and (field.start, field.end) == (at, at + len(tricky)), cut
        spool.close()


def test_missing_or_empty_model_is_a_400() -> None:
    for body in (form(("file", b"abc", "a.wav")), form(("model", b"", None))):
        field, spool = feed_in_pieces(body, [])
        with pytest.raises(BadRequest, match="non-empty 'model' form field"):
            field.model()
        spool.close()


@pytest.mark.parametrize("content_type", [b"application/json", None, b"text/plain; boundary=x"])
def test_not_multipart_is_a_415(content_type: bytes | None) -> None:
    with pytest.raises(UnsupportedMediaType, match="multipart/form-data"):
        bodies.ModelField(content_type)


def test_multipart_without_a_boundary_is_a_400() -> None:
    with pytest.raises(InvalidMultipart, match="boundary"):
        bodies.ModelField(b"multipart/form-data")


def test_malformed_multipart_is_a_400() -> None:
    field = bodies.ModelField(CONTENT_TYPE)
    with pytest.raises(InvalidMultipart, match="malformed"):
        field.feed(b"not a boundary at all\r\n\r\n", 0)


def receiver(chunks: list[bytes], disconnect: bool = False) -> Any:
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    if disconnect:
        messages[-1]["more_body"] = True
        messages.append({"type": "http.disconnect"})

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    return receive


async def test_spool_counts_chunked_bodies_against_the_limit() -> None:
    spool = bodies.Spool.new()
    with pytest.raises(PayloadTooLarge, match="limit of"):
        await bodies.spool_body(receiver([b"x" * 600, b"x" * 600]), 1000, spool)
    assert spool.size == 600  # stopped at the chunk that crossed the limit
    spool.close()


async def test_spool_moves_to_disk_past_its_memory_size_and_streams_back() -> None:
    data = bytes(range(256)) * (bodies.SPOOL_MEMORY_BYTES // 128)  # 2 MiB
    spool = bodies.Spool.new()
    await bodies.spool_body(receiver([data[:999], data[999:]]), 1 << 30, spool)
    assert spool.file is not None
    assert spool.file._rolled  # type: ignore[attr-defined]  # on disk, not in memory
    assert await streamed(spool) == data
    assert await streamed(spool) == data  # again from the start (a retry)
    spool.close()


async def test_client_leaving_mid_body_is_noticed() -> None:
    with pytest.raises(bodies.ClientGone):
        await bodies.spool_body(receiver([b"abc"], disconnect=True), 100, bodies.Spool.new())
    with pytest.raises(bodies.ClientGone):
        await bodies.read_body(receiver([b"{"], disconnect=True), 100)


def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    scope = {"headers": [(b"content-length", b"2000")]}
    with pytest.raises(PayloadTooLarge):
        bodies.check_length(scope, 1000)
    bodies.check_length({"headers": [(b"content-length", b"1000")]}, 1000)


def test_deep_json_is_a_400_not_a_crash() -> None:
    with pytest.raises(InvalidJSON, match="nested too deeply"):
        bodies.parse_json_object(b"[" * 200_000)


def test_a_number_with_too_many_digits_is_a_400_without_library_words() -> None:
    with pytest.raises(InvalidJSON) as info:
        bodies.parse_json_object(b'{"model": "m", "x": ' + b"1" * 5000 + b"}")
    assert info.value.message == "The request body holds a number with too many digits"


def test_a_lone_surrogate_parses() -> None:
    data = bodies.parse_json_object(b'{"model": "\\ud800"}')
    assert bodies.requested_model(data) == "\ud800"


async def test_a_chunked_json_body_is_counted_against_the_limit() -> None:
    with pytest.raises(PayloadTooLarge, match="limit of"):
        await bodies.read_body(receiver([b"{" * 600, b"}" * 600]), 1000)
    assert await bodies.read_body(receiver([b"{}", b""]), 1000) == b"{}"


async def test_a_large_json_body_is_kept_in_its_pieces_and_streamed_in_them() -> None:
    """No 60 MB join or single write on the event loop: the pieces as they
    came, each sent as it is (cut to READ_CHUNK_BYTES if larger)."""
    big = b"x" * (bodies.READ_CHUNK_BYTES * 2 + 5)
    pieces, size = await bodies.read_pieces(receiver([b"ab", big, b"cd"]), 1 << 30)
    assert pieces == [b"ab", big, b"cd"] and size == len(big) + 4
    spool = bodies.Spool.of_pieces(pieces)
    assert spool.length == size
    sent = [piece async for piece in spool.stream()]
    assert [len(piece) for piece in sent] == [
        2,
        bodies.READ_CHUNK_BYTES,
        bodies.READ_CHUNK_BYTES,
        5,
        2,
    ]
    assert sent[0] is pieces[0] and b"".join(sent) == b"ab" + big + b"cd"
    assert spool.handed_over
    assert b"".join([piece async for piece in spool.stream()]) == b"".join(sent)  # again
