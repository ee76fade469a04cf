"""Fuzzing where a request names its model (issue 8, item 6): JSON bodies,
multipart forms cut into arbitrary chunks, KServe URL paths, and whole
requests of arbitrary bytes through the real ASGI app.  No input gets a 500.

The parsers are pure, so most properties call them directly; the last ones
send hand-made ASGI requests (any method, path, header and body bytes, cut
anywhere) into a running dynllm whose models are the OpenAI/KServe stand-in
on the ``command`` backend, so what gets past parsing reaches a real backend.

Deterministic for CI: derandomized, no example database.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import json
import string
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from dynllm.api import bodies
from dynllm.api.routes import KSERVE_PREFIX, ROUTES, Body, parse_kserve
from dynllm.app import instance_marker
from dynllm.errors import BadRequest, DynllmError, InvalidJSON, InvalidMultipart
from tests.conftest import ConfigFactory, RunningApp, backends_with_marker, poll, serve

FUZZ = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FAKE = Path(__file__).parent / "support" / "fake_openai_server.py"

# ---- JSON bodies ----------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
LONE_SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udbff\udbff"])
MODEL_VALUES = st.one_of(JSON_VALUES, st.text(), LONE_SURROGATES)
JSONISH_BYTES = st.one_of(
    st.binary(max_size=64),
    st.text(
        alphabet=st.sampled_from(list('{}[]":,0123456789.eE+-truefalsnl \\u"')), max_size=64
    ).map(str.encode),
    st.builds(lambda n: b'{"model": "m", "x": ' + b"[" * n + b"]" * n + b"}", st.integers(0, 3000)),
    st.builds(lambda n: b'{"model": "m", "n": 1' + b"0" * n + b"}", st.integers(0, 6000)),
    st.sampled_from([b"NaN", b'{"model": NaN}', b'{"model": Infinity}', b"\xef\xbb\xbf{}"]),
    st.sampled_from(["utf-16", "utf-32", "utf-8"]).map(lambda c: '{"model": "é"}'.encode(c)),
)


@FUZZ
@given(raw=JSONISH_BYTES)
def test_any_bytes_are_a_json_object_or_invalid_json(raw: bytes) -> None:
    try:
        data = bodies.parse_json_object(raw)
    except InvalidJSON as exc:
        assert exc.status == 400 and exc.message
        return
    assert isinstance(data, dict)
    try:
        model = bodies.requested_model(data)
    except BadRequest as exc:
        assert exc.status == 400
        return
    assert model == data["model"]


@FUZZ
@given(model=MODEL_VALUES, rest=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3))
def test_the_model_field_is_found_whatever_it_holds(model: Any, rest: dict[str, Any]) -> None:
    """A JSON object's ``model`` is the name when it is a non-empty string
    (lone surrogates included), else a 400; the other fields never matter."""
    raw = json.dumps({**rest, "model": model}).encode()
    data = bodies.parse_json_object(raw)
    if isinstance(model, str) and model:
        assert bodies.requested_model(data) == model
    else:
        with pytest.raises(BadRequest, match="must name a model"):
            bodies.requested_model(data)


# ---- multipart forms ------------------------------------------------------

BCHARS = string.ascii_letters + string.digits + "'()+_,-./:=?"  # RFC 2046 (space aside)
BOUNDARIES = st.text(alphabet=st.sampled_from(list(BCHARS)), min_size=1, max_size=70)
FIELD_NAMES = st.one_of(
    st.sampled_from(["model", "model", "file", "Model", "models", "language"]),
    st.text(
        alphabet=st.characters(blacklist_characters='"\\\r\n', blacklist_categories=["Cs"]),
        max_size=10,
    ),
)
VALUES = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20).map(str.encode),
    st.sampled_from([b"whisper", b"\r\n--", b"--", b"\r\n", b"\xff\xfe", b"x" * 4097]),
)


@dataclass(frozen=True)
class Part:
    name: str
    value: bytes
    filename: str | None
    content_type: str | None
    header_case: str  # "Content-Disposition" as the client spelled it


PARTS = st.builds(
    Part,
    FIELD_NAMES,
    VALUES,
    st.none() | st.sampled_from(["a.wav", "x y.bin", "ü.mp3"]),
    st.none() | st.sampled_from(["audio/wav", "application/octet-stream", "text/plain"]),
    st.sampled_from(["Content-Disposition", "content-disposition", "CONTENT-DISPOSITION"]),
)

MODEL_PARTS = st.builds(
    Part,
    st.just("model"),
    VALUES,
    st.none() | st.just("m.txt"),
    st.none() | st.just("text/plain"),
    st.sampled_from(["Content-Disposition", "content-disposition"]),
)
FORMS = st.builds(  # most forms have a model part, anywhere among the others
    lambda before, model, after: before + model + after,
    st.lists(PARTS, max_size=2),
    st.lists(MODEL_PARTS, max_size=1) | st.lists(MODEL_PARTS, min_size=1, max_size=1),
    st.lists(PARTS, max_size=2),
)


def build_form(boundary: str, parts: list[Part], preamble: bytes, epilogue: bytes) -> bytes:
    delimiter = b"--" + boundary.encode()
    out = preamble + delimiter
    for part in parts:
        disposition = f'form-data; name="{part.name}"'
        if part.filename is not None:
            disposition += f'; filename="{part.filename}"'
        head = f"\r\n{part.header_case}: {disposition}\r\n"
        if part.content_type is not None:
            head += f"Content-Type: {part.content_type}\r\n"
        out += head.encode() + b"\r\n" + part.value + b"\r\n" + delimiter
    return out + b"--\r\n" + epilogue


def feed(content_type: bytes, body: bytes, cuts: list[int]) -> bodies.ModelField:
    """``body`` fed to a ModelField in the pieces ``cuts`` makes, as spool_body does."""
    field = bodies.ModelField(content_type)
    offset = 0
    for chunk in pieces(body, cuts):
        field.feed(chunk, offset)
        offset += len(chunk)
    return field


def pieces(body: bytes, cuts: list[int]) -> list[bytes]:
    """``body`` cut at ``cuts`` (each taken modulo its length + 1)."""
    edges = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    return [body[start:end] for start, end in itertools.pairwise(edges)]


def expected_model(parts: list[Part]) -> bytes | None:
    """The reference: the first part named ``model`` (the form was built from these)."""
    return next((p.value for p in parts if p.name == "model"), None)


def test_multipart_model_field_matches_the_reference_whatever_the_cuts() -> None:
    """Forms of any parts, boundary and epilogue, fed in any pieces: the
    value found is the first ``model`` part's (the reference: the parts the
    form was built from), and its offsets span exactly that value, which is
    what dynllm rewrites for a backend that wants its own name."""
    outcomes = {"found": 0, "no model": 0, "too long": 0}

    @FUZZ
    @given(
        boundary=BOUNDARIES,
        parts=FORMS,
        # No preamble: RFC 2046 allows one, but python-multipart (dynllm's
        # parser, and that of FastAPI-based backends) refuses it, so clients
        # never send one; test_malformed_multipart_is_a_400_never_a_crash does.
        epilogue=st.sampled_from([b"", b"epilogue", b"\r\n--x--\r\n"]),
        cuts=st.lists(st.integers(min_value=0), max_size=12),
    )
    @example(  # the value ends in what looks like the start of a delimiter, cut just there
        boundary="B",
        parts=[Part("model", b"abc\r\n-", None, None, "Content-Disposition")],
        epilogue=b"",
        cuts=[57, 58],  # the value is body[53:59]; its "\r\n-" starts at 56
    )
    def one(boundary: str, parts: list[Part], epilogue: bytes, cuts: list[int]) -> None:
        delimiter = b"\r\n--" + boundary.encode()
        # A value holding the delimiter is not a value but the end of the part.
        assume(not any(delimiter in b"\r\n" + p.value + b"\r\n" for p in parts))
        body = build_form(boundary, parts, b"", epilogue)
        content_type = f'multipart/form-data; boundary="{boundary}"'.encode()
        wanted = expected_model(parts)
        try:
            field = feed(content_type, body, cuts)
            found = field.model()
        except InvalidMultipart as exc:  # only for an over-long model value
            assert wanted is not None and len(wanted) > bodies.MAX_MODEL_FIELD_BYTES, exc
            outcomes["too long"] += 1
            return
        except BadRequest as exc:  # no model field, an empty one, or not UTF-8
            assert wanted is None or wanted == b"" or not _utf8(wanted), (exc, wanted)
            outcomes["no model"] += 1
            return
        assert wanted is not None and found.encode("utf-8", "surrogatepass") == wanted
        assert field.start is not None and field.end is not None
        assert body[field.start : field.end] == wanted
        outcomes["found"] += 1

    one()
    print(f"multipart outcomes: {outcomes}")
    # Every branch was really reached, and mostly the one that finds a name.
    assert outcomes["found"] >= 100 and outcomes["no model"] >= 10, outcomes
    assert outcomes["too long"] >= 1, outcomes


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


CONTENT_TYPES = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"multipart/form-data",
            b"multipart/form-data; boundary=",
            b'multipart/form-data; boundary=""',
            b"multipart/form-data; boundary=B; boundary=C",
            b"MULTIPART/FORM-DATA; BOUNDARY=B",
            b"multipart/mixed; boundary=B",
            b"multipart/form-data; boundary=" + b"x" * 300,
            b"multipart/form-data; boundary=\xff\xfe",
        ]
    ),
)


@FUZZ
@given(
    content_type=CONTENT_TYPES,
    body=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda parts, cut, junk: junk[:3] + build_form("B", parts, b"", b"")[:cut] + junk,
            st.lists(PARTS, min_size=1, max_size=3),
            st.integers(0, 300),
            st.binary(max_size=20),
        ),
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_malformed_multipart_is_a_400_never_a_crash(
    content_type: bytes, body: bytes, cuts: list[int]
) -> None:
    """Any Content-Type, any bytes (a valid form cut short and followed by
    junk included): a model name, or a 4xx error of dynllm's; nothing else."""
    try:
        feed(content_type, body, cuts).model()
    except DynllmError as exc:
        assert exc.status in (400, 415), exc


@FUZZ
@given(
    before=st.lists(PARTS.filter(lambda p: p.name != "model"), max_size=2),
    value=st.text(min_size=1, max_size=20).map(str.encode),
    after=st.lists(PARTS, max_size=2),
    cut=st.integers(min_value=0),
    cuts=st.lists(st.integers(min_value=0), max_size=4),
)
def test_a_form_cut_short_never_names_a_model_by_part_of_its_name(
    before: list[Part], value: bytes, after: list[Part], cut: int, cuts: list[int]
) -> None:
    """A body that ends before the ``model`` value's closing delimiter is a
    400: its first bytes are not the name the client sent."""
    model = Part("model", value, None, None, "Content-Disposition")
    parts = [*before, model, *after]
    assume(not any(b"\r\n--B" in b"\r\n" + p.value + b"\r\n" for p in parts))
    body = build_form("B", parts, b"", b"")
    value_end = build_form("B", [*before, model], b"", b"").rindex(b"\r\n--B")
    truncated = body[: cut % (value_end + len(b"\r\n--B") + 1)]
    with pytest.raises(BadRequest):
        feed(b"multipart/form-data; boundary=B", truncated, cuts).model()
    assert feed(b"multipart/form-data; boundary=B", body, cuts).model().encode() == value


def test_a_form_that_ends_inside_the_model_field_is_a_400() -> None:
    """Found by the property above: a body cut off inside the ``model`` value
    (no delimiter after it) named the model by its first bytes, so
    ``llama-3-70b`` cut after ``llama-3`` would load another model."""
    body = build_form(
        "B", [Part("model", b"llama-3-70b", None, None, "Content-Disposition")], b"", b""
    )
    cut = body.index(b"-70b")
    with pytest.raises(BadRequest):
        feed(b"multipart/form-data; boundary=B", body[:cut], []).model()


def test_a_boundary_longer_than_the_parser_takes_is_a_400() -> None:
    """Found by the multipart fuzz: python-multipart refuses a boundary past
    256 bytes with its own exception from its constructor, which escaped
    ModelField (and became a 500 on the audio routes)."""
    with pytest.raises(InvalidMultipart):
        bodies.ModelField(b"multipart/form-data; boundary=" + b"B" * 257)


def test_a_boundary_longer_than_the_parser_takes_is_a_400_end_to_end(live: Live) -> None:
    headers = [(b"content-type", b"multipart/form-data; boundary=" + b"B" * 257)]
    status, answer_headers, answer = live.request(
        "POST", b"/v1/audio/transcriptions", headers, [b"--" + b"B" * 257 + b"--\r\n"]
    )
    check_answer("/v1/audio/transcriptions", status, answer_headers, answer)
    assert status == 400, answer


# ---- KServe URL paths -----------------------------------------------------

SEGMENT_TEXT = st.text(
    alphabet=st.one_of(st.sampled_from(list("/%.-_ ~?#;:@")), st.characters(codec="utf-8")),
    max_size=20,
)
SUFFIXES = st.sampled_from(["", "/infer", "/ready"])


@FUZZ
@given(path=st.one_of(st.text(), SEGMENT_TEXT.map(lambda s: KSERVE_PREFIX + s)))
def test_any_path_parses_to_parts_that_rebuild_it(path: str) -> None:
    """None, or a name and version that put back together give the same path."""
    parsed = parse_kserve(path)
    if parsed is None:
        return
    assert parsed.name and path == KSERVE_PREFIX + parsed.name + unquote(parsed.model_part)
    assert parsed.suffix in ("", "/infer", "/ready")
    assert parsed.version is None or (parsed.version and "/" not in parsed.version)


@FUZZ
@given(name=SEGMENT_TEXT, version=st.none() | SEGMENT_TEXT, suffix=SUFFIXES)
def test_a_model_name_with_slashes_percent_and_unicode_comes_back(
    name: str, version: str | None, suffix: str
) -> None:
    """Any name (``/``, ``%``, unicode) comes back from its URL, as long as the
    URL is not ambiguous: the name does not itself end the way a version or a
    suffix does (``.../versions/x``, ``.../infer``, ``.../ready``)."""
    assume(name and "/versions/" not in name + "/")
    assume(not name.endswith(("/infer", "/ready")))
    assume(version is None or (version and "/" not in version))
    assume(not (suffix == "" and version in ("infer", "ready")))
    # What the server hands the app: the client's percent-encoded path, decoded.
    raw = quote(KSERVE_PREFIX + name + (f"/versions/{version}" if version else "") + suffix)
    parsed = parse_kserve(unquote(raw))
    assert parsed is not None
    assert (parsed.name, parsed.version, parsed.suffix) == (name, version, suffix)


@FUZZ
@given(version=SEGMENT_TEXT, suffix=SUFFIXES)
@example(version="1?", suffix="/infer")
@example(version="1#x", suffix="/infer")
@example(version="..%2F..%2Fslots", suffix="")
def test_a_version_reaches_the_backend_as_the_client_sent_it(version: str, suffix: str) -> None:
    """The version goes into the backend's URL as the same text: never a
    query, a fragment or another path segment (the URL as aiohttp sends it)."""
    assume(version and "/" not in version)
    assume(not (suffix == "" and version in ("infer", "ready")))
    client_path = quote(f"/v2/models/clf/versions/{version}{suffix}")
    parsed = parse_kserve(unquote(client_path))
    assert parsed is not None and parsed.version == version
    url = URL("http://127.0.0.1:9/v2/models/clf" + parsed.model_part)
    segments = url.raw_path.split("/")
    assert segments[:5] == ["", "v2", "models", "clf", "versions"], url
    assert unquote(segments[5]) == version, url
    assert "/".join(segments[6:]) == suffix.lstrip("/"), url
    assert not url.raw_query_string and not url.raw_fragment, url


# ---- whole requests through the running app --------------------------------


def fake_model(name: str, kind: str) -> dict[str, Any]:
    argv = [sys.executable, str(FAKE), "--host", "{host}", "--port", "{port}", "--name", "{name}"]
    return {
        "name": name,
        "backend": "command",
        "model_type": kind,
        "vram_mb": 100,
        "path": "",
        "command": argv,
    }


@dataclass
class Live:
    running: RunningApp
    loop: asyncio.AbstractEventLoop

    def request(
        self, method: str, raw_path: bytes, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        future = asyncio.run_coroutine_threadsafe(
            asgi_request(self.running.app, method, raw_path, headers, chunks), self.loop
        )
        return future.result(timeout=60)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A running dynllm (lifespan, scheduler, real backends) on its own event
    loop thread, so hypothesis's synchronous examples can call into it."""
    tmp = tmp_path_factory.mktemp("fuzz-model-name")
    config = ConfigFactory(tmp, tmp)(
        [
            fake_model("m", "llm"),
            fake_model("a/b%20ü", "llm"),
            fake_model("clf", "classification"),
            fake_model("asr", "transcription"),
        ],
        enabled_backends=["command"],
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="dynllm-fuzz", daemon=True)
    thread.start()
    ready: concurrent.futures.Future[tuple[RunningApp, asyncio.Event]] = concurrent.futures.Future()

    async def run() -> None:
        stop = asyncio.Event()
        async with serve(config) as running:
            ready.set_result((running, stop))
            await stop.wait()

    served = asyncio.run_coroutine_threadsafe(run(), loop)
    try:
        running, stop = ready.result(timeout=60)
        yield Live(running, loop)
        loop.call_soon_threadsafe(stop.set)
        served.result(timeout=60)
    finally:
        served.cancel()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    marker = instance_marker(config)
    poll(lambda: not backends_with_marker({marker}), timeout=5)


async def asgi_request(
    app: Any, method: str, raw_path: bytes, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One request as uvicorn would hand it over: the path percent-decoded,
    the body in ``chunks``; after the body, ``receive`` waits until the
    response is complete and then says the client left."""
    path_bytes, _, query = raw_path.partition(b"?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(path_bytes.decode("ascii")),
        "raw_path": path_bytes,
        "root_path": "",
        "query_string": query,
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    pending = list(chunks) or [b""]
    done = asyncio.Event()
    started: list[dict[str, Any]] = []
    body = bytearray()

    async def receive() -> dict[str, Any]:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert not started, "two responses"
            started.append(message)
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    # An exception out of the app is what uvicorn turns into a 500.
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    assert started, "no response at all"
    return started[0]["status"], list(started[0].get("headers", [])), bytes(body)


def check_answer(path: str, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    assert status != 500, (path, body[:300])
    if status < 400:
        return
    kinds = [v for k, v in headers if k.lower() == b"content-type"]
    assert kinds and kinds[0].startswith(b"application/json"), (status, headers)
    error = json.loads(body)["error"]
    if path.startswith("/v2"):
        assert isinstance(error, str) and error
    else:
        assert set(error) == {"message", "type", "code"} and error["message"], error
    assert status < 500 or status in (502, 503, 504), (status, error)


ROUTE_PATHS = [r.path.replace("{name}", "m") for r in ROUTES] + [
    "/v2/models/clf/infer",
    "/v2/models/a%2Fb%2520%C3%BC/versions/1/ready",
    "/v2/models/%ff%fe/infer",
    "/v1/models/a%2Fb",
    "/admin/models/m/logs?lines=-99999999999999999999",
    "/admin/models/load",
    "/admin/models/unload-all?force=maybe",
    "/health",
    "/docs",
    "/openapi.json",
]
RAW_PATHS = st.one_of(  # the real routes first: most requests should get past routing
    st.sampled_from(ROUTE_PATHS).map(str.encode),
    st.sampled_from(ROUTE_PATHS).map(str.encode),
    st.sampled_from(ROUTE_PATHS).map(str.encode),
    st.binary(max_size=30).map(lambda b: b"/" + quote(b, safe="/").encode()),
    st.builds(
        lambda base, junk: base.encode() + quote(junk, safe="/%?").encode(),
        st.sampled_from(["/v1/", "/v2/models/", "/admin/models/", "/"]),
        st.text(max_size=20),
    ),
)
HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            b"content-type",
            b"content-length",
            b"host",
            b"authorization",
            b"x-api-key",
            b"transfer-encoding",
            b"origin",
            b"expect",
        ]
    ),
    st.binary(min_size=1, max_size=12),
)
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            b"application/json",
            b"application/json; charset=utf-16",
            b"multipart/form-data; boundary=B",
            b"multipart/form-data",
            b"text/plain",
            b"localhost",
            b"127.0.0.1:8000",
            b"evil.example",
            b"12",
            b"99999999999999999999999",
            b"-1",
            b"Bearer x",
        ]
    ),
    st.binary(max_size=30),
)
CONFIGURED = st.sampled_from(["m", "clf", "a/b%20ü"])
NAMES = st.one_of(CONFIGURED, CONFIGURED, CONFIGURED, st.sampled_from(["nope", ""]), MODEL_VALUES)
NAMED_BODIES = st.builds(
    lambda m, extra: json.dumps({"model": m, "messages": [], **extra}).encode(),
    NAMES,
    st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2),
)
JSON_BODIES = st.one_of(NAMED_BODIES, NAMED_BODIES, NAMED_BODIES, JSONISH_BYTES)
FORM_TYPES = st.sampled_from(
    [
        b"multipart/form-data; boundary=B",
        b'multipart/form-data; boundary="B"',
        b"multipart/form-data; boundary=C",
        b"multipart/form-data",
        b"multipart/form-data; boundary=" + b"B" * 257,
        b"application/json",
    ]
)
FORM_BODIES = st.builds(
    lambda before, name, after, cut, junk: (
        build_form(
            "B", [*before, Part("model", name, None, None, "Content-Disposition"), *after], b"", b""
        )[:cut]
        + junk
    ),
    st.lists(PARTS, max_size=2),
    st.sampled_from([b"asr", b"asr", b"m", b"a/b%20\xc3\xbc", b"\xff", b""]) | VALUES,
    st.lists(PARTS, max_size=2),
    st.sampled_from([10**6, 10**6, 10**6, 40, 80]),  # mostly whole, sometimes cut short
    st.sampled_from([b"", b"", b"junk", b"\r\n--B--\r\n"]),
)
KSERVE_PATHS = st.builds(
    lambda name, rest: KSERVE_PREFIX.encode() + quote(name, safe="").encode() + rest,
    st.sampled_from(["clf", "m", "a/b%20ü", "nope"]) | st.text(max_size=10),
    st.sampled_from([b"", b"/infer", b"/ready", b"/versions/1", b"/versions/1/infer", b"/x"]),
)
Request = tuple[str, bytes, bytes | None, bytes]  # method, raw path, content type, body
REQUESTS: st.SearchStrategy[Request] = st.one_of(
    # Requests shaped like each route's own (so they get deep: parsing, loading,
    # forwarding), with the parts that go wrong in real clients...
    st.tuples(
        st.just("POST"),
        st.sampled_from([r.path.encode() for r in ROUTES if r.body is Body.JSON]),
        st.sampled_from([b"application/json", b"application/json; charset=utf-8"]),
        JSON_BODIES,
    ),
    st.tuples(
        st.just("POST"),
        st.sampled_from([r.path.encode() for r in ROUTES if r.body is Body.MULTIPART]),
        FORM_TYPES,
        FORM_BODIES,
    ),
    st.tuples(
        st.sampled_from(["GET", "POST"]),
        KSERVE_PATHS,
        st.sampled_from([None, b"application/json", b"application/octet-stream"]),
        st.binary(max_size=60) | JSON_BODIES,
    ),
    st.tuples(
        st.sampled_from(["GET", "POST"]),
        st.sampled_from(
            [
                b"/admin/models/load",
                b"/admin/models/unload",
                b"/admin/models/unload-all?force=maybe",
                b"/admin/models/m/logs?lines=-99999999999999999999",
                b"/admin/models/a%2Fb%2520%C3%BC/logs",
                b"/v1/models/a%2Fb%2520%C3%BC",
            ]
        ),
        st.just(b"application/json"),
        JSON_BODIES,
    ),
    # ...and anything at all.
    st.tuples(
        st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "FOO"]),
        RAW_PATHS,
        st.none() | HEADER_VALUES,
        st.binary(max_size=100) | JSON_BODIES | FORM_BODIES,
    ),
)


def test_no_500_for_any_request(live: Live) -> None:
    """Any method, path, headers and body bytes, the body in any pieces:
    never a 500, and every error in its route's shape."""
    statuses: collections.Counter[int] = collections.Counter()

    @settings(FUZZ, max_examples=500)
    @given(
        request=REQUESTS,
        headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=3),
        cuts=st.lists(st.integers(min_value=0), max_size=4),
    )
    def one(request: Request, headers: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
        method, raw_path, content_type, body = request
        all_headers = [(b"host", b"127.0.0.1:8000")]
        if content_type is not None:
            all_headers.append((b"content-type", content_type))
        all_headers += headers
        status, answer_headers, answer = live.request(
            method, raw_path, all_headers, pieces(body, cuts)
        )
        statuses[status] += 1
        path = unquote(raw_path.partition(b"?")[0].decode("ascii"))
        try:
            check_answer(path, status, answer_headers, answer)
        except AssertionError as exc:  # the request itself, readable in the report
            raise AssertionError(f"{method} {raw_path!r} {all_headers!r} {body!r}: {exc}") from None

    one()
    print(f"request fuzz statuses: {dict(statuses)}")
    # Not all refused at the door: backends answered some, parsers refused others.
    assert statuses[200] >= 20 and statuses[400] >= 20, statuses


def test_a_control_character_in_a_forwarded_header_is_a_400(live: Live) -> None:
    """Found by the request fuzz: aiohttp refuses a header with a control
    character (ValueError before sending), which became a 500.  dynllm's
    httptools server turns such requests away first; under another ASGI
    server (h11 lets \\x01 and \\x7f through) they reach the proxy."""
    for name, value in [(b"x-a", b"a\x01b"), (b"x-a", b"a\x7fb"), (b"x\x00", b"v")]:
        headers = [(b"content-type", b"application/json"), (name, value)]
        status, answer_headers, answer = live.request(
            "POST", b"/v1/chat/completions", headers, [b'{"model": "m", "messages": []}']
        )
        check_answer("/v1/chat/completions", status, answer_headers, answer)
        assert status == 400, (name, value, answer)


def test_requests_that_name_a_model_reach_it(live: Live) -> None:
    """The end-to-end fuzz is not only refusals: a name with ``/``, ``%`` and
    unicode, in JSON, a form and a URL, loads its model and gets the
    backend's answer."""
    json_type = [(b"host", b"localhost"), (b"content-type", b"application/json")]
    name = "a/b%20ü"
    chat = json.dumps({"model": name, "messages": []}).encode()
    status, _, answer = live.request("POST", b"/v1/chat/completions", json_type, [chat])
    assert status == 200, answer
    assert json.loads(answer)["model"] == name
    form_type = [(b"host", b"localhost"), (b"content-type", b"multipart/form-data; boundary=B")]
    form = build_form(
        "B", [Part("model", name.encode(), None, None, "Content-Disposition")], b"", b""
    )
    status, _, answer = live.request("POST", b"/v1/audio/transcriptions", form_type, [form])
    assert status == 400 and b"does not serve" in answer  # an llm: refused, by name
    status, _, answer = live.request("GET", b"/v2/models/clf", [(b"host", b"localhost")], [])
    assert status == 200, answer
    status, _, answer = live.request(
        "GET", b"/v2/models/" + quote(name, safe="").encode() + b"/ready", [], []
    )
    assert status == 200, answer  # loaded by the chat above: found by its URL name
