"""Reading request bodies: whole JSON, and uploads spooled without holding them.

JSON bodies are read whole and parsed once for ``model``: on the event loop
up to ``INLINE_JSON_BYTES`` (the common case), in a helper process beyond it
(see ``jsonwork``: a 50 MB array of ``{}`` would stall every client for 1.5 s).
Multipart and raw bodies may be hundreds of MB (audio, tensors): they go into
a ``Spool`` (memory up to ``SPOOL_MEMORY_BYTES``, then a temporary file) and
are streamed to the backend from there.  A multipart body is fed to a
streaming parser as it arrives, which notes where the ``model`` field's value
lies; if the backend insists on its own model name, exactly those bytes are
replaced on the way out and everything else reaches it byte for byte.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.types import Receive, Scope

from dynllm.errors import (
    BadRequest,
    InvalidJSON,
    InvalidMultipart,
    PayloadTooLarge,
    UnsupportedMediaType,
)

SPOOL_MEMORY_BYTES = 1 << 20
READ_CHUNK_BYTES = 256 << 10
MAX_MODEL_FIELD_BYTES = 4096
REQUEST_SETTINGS = (
    "backend",
    "device",
    "n_gpu_layers",
    "n_ctx",
    "gpu_memory_utilization",
    "max_model_len",
)
"""Body fields that choose how the model runs (``catalog``: variants)."""
LIFETIME_FIELDS = ("ttl", "keep_alive")
REQUEST_FIELDS = frozenset(REQUEST_SETTINGS + LIFETIME_FIELDS)
"""Body fields dynllm reads and removes before the body goes to the backend."""
INLINE_JSON_BYTES = 1 << 20
"""JSON bodies up to this are parsed on the event loop: at most ~20 ms even
for the slowest kind (a 1 MiB array of ``{}``; 2 ms for a chat body)."""


class ClientGone(Exception):
    """The client disconnected before its body was complete."""


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


def check_length(scope: Scope, limit: int) -> None:
    """413 from the declared Content-Length alone, before any body byte is read."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise PayloadTooLarge(_too_large(limit))


def _too_large(limit: int) -> str:
    return f"The request body is larger than the limit of {limit / (1 << 20):g} MB"


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body in one piece (see ``read_pieces``)."""
    pieces, _ = await read_pieces(receive, limit)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


async def read_pieces(receive: Receive, limit: int) -> tuple[list[bytes], int]:
    """The whole request body (JSON routes) as the pieces it came in, and its
    size; PayloadTooLarge past ``limit`` bytes (a chunked body is counted as
    it comes), ClientGone if the client left first."""
    pieces: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(_too_large(limit))
        pieces.append(chunk)
        if not message.get("more_body", False):
            return pieces, size


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidJSON("The request body is nested too deeply") from None
    except ValueError:  # Python's cap on integer digits (4300 by default)
        raise InvalidJSON("The request body holds a number with too many digits") from None
    if not isinstance(data, dict):
        raise InvalidJSON("The request body must be a JSON object")
    return data


def requested_model(data: dict[str, Any]) -> str:
    return model_name(data.get("model"))


def model_name(model: object) -> str:
    """The ``model`` value of a JSON body, if it names one."""
    if not isinstance(model, str) or not model:
        raise BadRequest("The request must name a model: a non-empty string 'model' field")
    return model


@dataclass
class Spool:
    """A request body on its way to a backend: held in memory up to a size,
    then in a temporary file (uploads); or kept as the pieces it arrived in (a
    large JSON body: joining 60 MB into one ``bytes``, or handing it to the
    client library in one write, stalls the event loop for ~60 ms each)."""

    file: tempfile.SpooledTemporaryFile[bytes] | None
    size: int = 0
    replace: tuple[int, int, bytes] | None = None
    """(start, end, new bytes): a span to swap on the way out (the model field;
    file bodies only)."""
    handed_over: bool = False
    """The last ``stream`` went to its end: the client library asked for more
    after writing the last piece, so the whole body left this process."""
    pieces: list[bytes] | None = None

    @classmethod
    def new(cls) -> Spool:
        return cls(tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES))

    @classmethod
    def of_pieces(cls, pieces: list[bytes]) -> Spool:
        return cls(None, sum(len(piece) for piece in pieces), pieces=pieces)

    def write(self, data: bytes) -> None:
        assert self.file is not None
        self.file.write(data)
        self.size += len(data)

    @property
    def length(self) -> int:
        """The size of what ``stream`` yields."""
        if self.replace is None:
            return self.size
        start, end, new = self.replace
        return self.size - (end - start) + len(new)

    async def stream(self) -> AsyncIterator[bytes]:
        """The body as it goes to the backend; each call starts from the beginning."""
        self.handed_over = False
        if self.pieces is not None:
            for piece in self.pieces:
                for start in range(0, len(piece), READ_CHUNK_BYTES):
                    yield piece[start : start + READ_CHUNK_BYTES]  # the piece itself if smaller
            self.handed_over = True
            return
        file = self.file
        assert file is not None
        spans: list[tuple[int, int] | bytes] = [(0, self.size)]
        if self.replace is not None:
            start, end, new = self.replace
            spans = [(0, start), new, (end, self.size)]
        for span in spans:
            if isinstance(span, bytes):
                yield span
                continue
            position, stop = span
            while position < stop:
                file.seek(position)
                chunk = file.read(min(READ_CHUNK_BYTES, stop - position))
                if not chunk:
                    return
                position += len(chunk)
                yield chunk
        self.handed_over = True

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.pieces = None


async def spool_body(receive: Receive, limit: int, spool: Spool, feed: Any = None) -> None:
    """Receive the whole body into ``spool`` (``feed(chunk)`` sees each piece
    first); PayloadTooLarge past ``limit`` bytes, ClientGone if the client left."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            if spool.size + len(chunk) > limit:
                raise PayloadTooLarge(_too_large(limit))
            if feed is not None:
                feed(chunk, spool.size)
            spool.write(chunk)
        if not message.get("more_body", False):
            return


class ModelField:
    """Feeds a multipart body to a streaming parser and remembers where the
    first form field named ``model`` has its value (absolute byte offsets)."""

    def __init__(self, content_type: bytes | None) -> None:
        kind, params = parse_options_header(content_type or b"")
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data":
            raise UnsupportedMediaType(
                "This route takes a multipart/form-data body, like the OpenAI audio API"
            )
        if not boundary:
            raise InvalidMultipart(
                "This route takes a multipart/form-data body (with a boundary in its "
                "Content-Type), like the OpenAI audio API"
            )
        self.start: int | None = None
        self.end: int | None = None
        self.value = bytearray()
        self._base = 0
        self._chunk = b""
        self._in_model = False
        self._done = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._part_begin,
                    "on_header_field": self._on_header_field,
                    "on_header_value": self._on_header_value,
                    "on_header_end": self._header_end,
                    "on_part_data": self._part_data,
                    "on_part_end": self._part_end,
                },
            )
        except FormParserError:  # python-multipart takes boundaries up to 256 bytes
            raise InvalidMultipart("The multipart boundary is too long") from None

    def feed(self, chunk: bytes, offset: int) -> None:
        if self._done:  # the rest is the upload itself: no need to parse it
            return
        self._base = offset
        self._chunk = chunk
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise InvalidMultipart(f"The multipart body is malformed: {exc}") from None

    def _part_begin(self) -> None:
        self._in_model = False

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header_field).lower() == b"content-disposition":
            _, params = parse_options_header(bytes(self._header_value))
            self._in_model = params.get(b"name") == b"model" and self.start is None
        self._header_field.clear()
        self._header_value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_model:
            return
        if data is self._chunk:
            first, last = self._base + start, self._base + end
        else:
            # Bytes the parser held back at the end of the previous chunk (they
            # looked like the start of a boundary): they lie just before this one.
            first, last = self._base - (end - start), self._base
        if self.start is None:
            self.start = first
        self.end = last
        self.value += data[start:end]
        if len(self.value) > MAX_MODEL_FIELD_BYTES:
            raise InvalidMultipart("The multipart 'model' field is too long")

    def _part_end(self) -> None:
        if self._in_model:
            if self.start is None:  # an empty value
                self.start = self.end = -1
            self._in_model = False
            self._done = True

    def model(self) -> str:
        if self.start is None or self.start < 0 or not self.value:
            raise BadRequest("The request must name a model: a non-empty 'model' form field")
        if not self._done:  # the body ended inside the value: only its first bytes came
            raise InvalidMultipart("The multipart body ends inside its 'model' field")
        try:
            return self.value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("The 'model' form field is not valid UTF-8") from None
