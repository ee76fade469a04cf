#!/usr/bin/env python3
"""Test stand-in for llama.cpp's ``llama-server`` (NOT a real inference server).

dynllm's integration tests launch this script in place of ``llama-server``. It accepts
the command line the proxy builds, opens the port at once, answers 503 "Loading model"
until a simulated load finishes, then serves OpenAI-shaped responses whose content is
deterministic (``"tok0 tok1 tok2 ..."``). It uses only the standard library, so it starts
in a few tens of milliseconds and needs no virtual environment.

Real llama-server flags understood (anything else is ignored, never fatal)::

    -m/--model PATH  --host H  --port P  -c/--ctx-size N  -ngl/--gpu-layers N
    -a/--alias NAME  --embedding(s)  --pooling X  --rerank(ing)  -t/--threads N
    --no-webui/--no-ui

Fake switches (extra command-line arguments; an unknown ``--fake-*`` is an error)::

    --fake-load-seconds F        seconds of "loading" (default 0.05): the port is open but
                                 every route answers 503 {"error":{"code":503,
                                 "message":"Loading model","type":"unavailable_error"}}
    --fake-never-ready           stay in the loading state forever
    --fake-exit-during-load CODE print a load error to stderr (including
                                 "error: fake load failure: model file is corrupt") and
                                 exit with CODE ~0.1 s after start, never becoming healthy
    --fake-crash-after-chunks N  die abruptly (os._exit(1)) right after the N-th SSE
                                 ``data:`` event of a streamed response ([DONE] counts;
                                 N=0 dies right after the response headers)
    --fake-ignore-sigterm        ignore SIGTERM; only SIGKILL stops the process
    --fake-token-rate TPS        tokens per second (default 0 = no delay); a non-streamed
                                 response takes tokens/TPS seconds
    --fake-tokens N              tokens per response when the request gives neither
                                 max_tokens, max_completion_tokens nor n_predict (default 8)
    --fake-spawn-log PATH        append "<pid> <alias> <port>" to PATH at startup (before
                                 binding, so failed starts are counted too)
    --fake-stderr-spam N         write N log lines to stdout and N to stderr at startup;
                                 the server stays "loading" until they are written
    --fake-bind-fail             exit 1 with "couldn't bind HTTP server socket" (also what
                                 happens when the port really is taken)
    --fake-no-orphan-exit        keep running when the parent dies (by default the fake
                                 exits within ~0.25 s of being orphaned, so a crashed test
                                 run leaves nothing behind)

Routes once ready: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (both with ``"stream": true`` support), ``POST /v1/embeddings``
(needs --embeddings), ``POST /v1/rerank`` and ``/rerank`` (need --reranking), plus the
un-prefixed aliases llama-server also serves. Like the real server, --embeddings or
--reranking turns the completion routes into 501s. Malformed JSON gets 500 with
llama-server's error shape. Every response carries ``X-Fake-Pid: <pid>``, and one line per
request is logged to stderr. ``GET /fake/stats`` (answered even while loading) reports
request and stream counters for tests.

SIGTERM and SIGINT end the process at once with exit code 0, open connections or not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple, NoReturn

from sockwait import pause_unless_gone  # the module next to this script

START = time.monotonic()
PID = os.getpid()
EMBEDDING_DIM = 8
EXIT_DURING_LOAD_DELAY = 0.1
_NUMBER = re.compile(r"^-\d+(\.\d*)?$|^-\.\d+$")
_LOG_LOCK = threading.Lock()


# --------------------------------------------------------------------------- logging


def log(message: str, *, tagged: bool = True) -> None:
    """Write one line to stderr; never raise (the parent may have closed the pipe)."""
    stream = sys.stderr
    if stream is None:
        return
    line = f"fake-llama-server[{PID}] {message}\n" if tagged else f"{message}\n"
    with _LOG_LOCK, contextlib.suppress(OSError, ValueError):
        stream.write(line)
        stream.flush()


def write_spam(count: int) -> None:
    """Emit ``count`` llama.cpp-looking lines on both stdout and stderr."""
    filler = "x" * 64
    streams = [stream for stream in (sys.stdout, sys.stderr) if stream is not None]
    for i in range(count):
        line = f"llama_model_loader: - kv {i:6d}: fake.spam.key str = {filler}\n"
        with _LOG_LOCK:
            for stream in streams:
                with contextlib.suppress(OSError, ValueError):
                    stream.write(line)
    for stream in streams:
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


# --------------------------------------------------------------------------- config


class Config(NamedTuple):
    model: str
    host: str
    port: int
    ctx_size: int
    alias: str
    embeddings: bool
    pooling: str | None
    reranking: bool
    load_seconds: float
    never_ready: bool
    exit_during_load: int | None
    crash_after_chunks: int | None
    ignore_sigterm: bool
    token_rate: float
    tokens: int
    spawn_log: str | None
    stderr_spam: int
    bind_fail: bool
    orphan_exit: bool

    @property
    def model_id(self) -> str:
        # llama-server accepts a comma-separated alias list; the first one is the id.
        return self.alias.split(",")[0]


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_args(argv: list[str]) -> tuple[Config, list[str]]:
    """Parse the command line; returns the config and the ignored arguments."""
    parser = argparse.ArgumentParser(
        prog="fake_llama_server.py",
        description="Fake llama-server for dynllm tests.",
        allow_abbrev=False,
    )
    known: set[str] = {"-h", "--help"}

    def add(*names: str, **kwargs: Any) -> None:
        known.update(names)
        parser.add_argument(*names, **kwargs)

    # Flags of the real llama-server.
    add("-m", "--model", default="")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8080)
    add("-c", "--ctx-size", type=int, default=4096)
    add("-ngl", "--gpu-layers", "--n-gpu-layers", default=None)
    add("-a", "--alias", default=None)
    add("--embedding", "--embeddings", dest="embeddings", action="store_true")
    add("--pooling", default=None)
    add("--rerank", "--reranking", dest="reranking", action="store_true")
    add("-t", "--threads", default=None)
    add("--no-webui", "--no-ui", dest="no_webui", action="store_true")
    # Misbehaviour switches.
    add("--fake-load-seconds", type=_non_negative_float, default=0.05)
    add("--fake-never-ready", action="store_true")
    add("--fake-exit-during-load", type=int, default=None, metavar="CODE")
    add("--fake-crash-after-chunks", type=_non_negative_int, default=None, metavar="N")
    add("--fake-ignore-sigterm", action="store_true")
    add("--fake-token-rate", type=_non_negative_float, default=0.0, metavar="TPS")
    add("--fake-tokens", type=_non_negative_int, default=8, metavar="N")
    add("--fake-spawn-log", default=None, metavar="PATH")
    add("--fake-stderr-spam", type=_non_negative_int, default=0, metavar="N")
    add("--fake-bind-fail", action="store_true")
    add("--fake-no-orphan-exit", action="store_true")

    # argparse would read an unknown real flag such as ``-mg`` as ``-m g`` or ``-n`` as an
    # abbreviation of ``-ngl``, so option tokens we do not define never reach it.
    kept: list[str] = []
    ignored: list[str] = []
    for token in argv:
        is_option = token.startswith("-") and token != "-" and not _NUMBER.match(token)
        if not is_option:
            kept.append(token)
            continue
        name = token.split("=", 1)[0] if token.startswith("--") else token
        if name in known:
            kept.append(token)
        elif name.startswith("--fake-"):
            parser.error(f"unknown fake switch: {token}")
        else:
            ignored.append(token)
    ns, extra = parser.parse_known_args(kept)

    alias = ns.alias or ns.model or "fake-model"
    config = Config(
        model=ns.model,
        host=ns.host,
        port=ns.port,
        ctx_size=ns.ctx_size,
        alias=alias,
        embeddings=ns.embeddings,
        pooling=ns.pooling,
        reranking=ns.reranking,
        load_seconds=ns.fake_load_seconds,
        never_ready=ns.fake_never_ready,
        exit_during_load=ns.fake_exit_during_load,
        crash_after_chunks=ns.fake_crash_after_chunks,
        ignore_sigterm=ns.fake_ignore_sigterm,
        token_rate=ns.fake_token_rate,
        tokens=ns.fake_tokens,
        spawn_log=ns.fake_spawn_log,
        stderr_spam=ns.fake_stderr_spam,
        bind_fail=ns.fake_bind_fail,
        orphan_exit=not ns.fake_no_orphan_exit,
    )
    return config, ignored + extra


# --------------------------------------------------------------------------- state


class State:
    """Readiness and counters shared by all request threads."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ready_at = START + config.load_seconds
        self.startup_done = threading.Event()
        self._lock = threading.Lock()
        self._next_id = 0
        self.requests_total = 0
        self.active_requests = 0
        self.max_active_requests = 0
        self.active_streams = 0
        self.streams_completed = 0
        self.streams_cancelled = 0

    def is_ready(self) -> bool:
        cfg = self.config
        if cfg.never_ready or cfg.exit_during_load is not None:
            return False
        return self.startup_done.is_set() and time.monotonic() >= self.ready_at

    def new_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def request_started(self) -> None:
        with self._lock:
            self.requests_total += 1
            self.active_requests += 1
            self.max_active_requests = max(self.max_active_requests, self.active_requests)

    def request_finished(self) -> None:
        with self._lock:
            self.active_requests -= 1

    def stream_started(self) -> None:
        with self._lock:
            self.active_streams += 1

    def stream_finished(self, *, completed: bool) -> None:
        with self._lock:
            self.active_streams -= 1
            if completed:
                self.streams_completed += 1
            else:
                self.streams_cancelled += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "pid": PID,
                "alias": self.config.alias,
                "port": self.config.port,
                "ready": self.is_ready(),
                "requests_total": self.requests_total,
                "active_requests": self.active_requests,
                "max_active_requests": self.max_active_requests,
                "active_streams": self.active_streams,
                "streams_completed": self.streams_completed,
                "streams_cancelled": self.streams_cancelled,
            }


# --------------------------------------------------------------------------- content


class RequestError(Exception):
    """An error answered with llama-server's ``{"error": {...}}`` shape."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


def error_body(status: int, message: str, error_type: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "type": error_type}}


def token_text(index: int) -> str:
    """Text of token ``index``; concatenating the pieces gives ``"tok0 tok1 ..."``."""
    return f"tok{index}" if index == 0 else f" tok{index}"


def count_words(value: Any) -> int:
    """Deterministic stand-in for a prompt's token count."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(count_words(item) if not isinstance(item, int) else 1 for item in value)
    if isinstance(value, dict):
        return count_words(value.get("content")) + count_words(value.get("text"))
    return 0


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return str(value["text"])
    return json.dumps(value, sort_keys=True)


def embed(text: str) -> list[float]:
    """A unit-length vector derived from the text's SHA-256."""
    import hashlib  # imported lazily: startup time matters more than style here

    digest = hashlib.sha256(text.encode("utf-8")).digest()
    raw = [(byte - 127.5) / 127.5 for byte in digest[:EMBEDDING_DIM]]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [round(v / norm, 6) for v in raw]


def relevance(query: str, document: str) -> float:
    """Share of the query's words found in the document (0..1)."""
    query_words = set(query.lower().split())
    if not query_words:
        return 0.0
    doc_words = set(document.lower().split())
    return round(len(query_words & doc_words) / len(query_words), 6)


# --------------------------------------------------------------------------- HTTP


class _ClientGone(Exception):
    """The client closed the connection; stop working on its request quietly."""


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], state: State) -> None:
        self.state = state
        super().__init__(address, FakeHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError | _ClientGone):
            return
        super().handle_error(request, client_address)


class FakeServer6(FakeServer):
    address_family = socket.AF_INET6


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llama.cpp-fake"
    sys_version = ""
    server: FakeServer

    # ---- plumbing

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def end_headers(self) -> None:
        self.send_header("X-Fake-Pid", str(PID))
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log(f"{self.client_address[0]}:{self.client_address[1]} {format % args}")

    @property
    def state(self) -> State:
        return self.server.state

    @property
    def config(self) -> Config:
        return self.server.state.config

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        self.state.request_started()
        try:
            body = self._read_body()
            path = self.path.split("?", 1)[0]
            if method == "GET" and path == "/fake/stats":
                self._send_json(200, self.state.snapshot())
                return
            if not self.state.is_ready():
                raise RequestError(503, "Loading model", "unavailable_error")
            handler = _ROUTES.get((method, path))
            if handler is None:
                raise RequestError(404, "File Not Found", "not_found_error")
            handler(self, body)
        except RequestError as exc:
            self._send_json(exc.status, error_body(exc.status, exc.message, exc.error_type))
        except (ConnectionError, TimeoutError, _ClientGone):
            self.close_connection = True
        finally:
            self.state.request_finished()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked_body()
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, "invalid Content-Length", "invalid_request_error") from None
        data = self.rfile.read(size)
        if len(data) < size:
            raise _ClientGone
        return data

    def _read_chunked_body(self) -> bytes:
        parts: list[bytes] = []
        while True:
            line = self.rfile.readline(65537)
            if not line:
                raise _ClientGone
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise RequestError(400, "bad chunked body", "invalid_request_error") from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            chunk = self.rfile.read(size + 2)
            if len(chunk) < size + 2:
                raise _ClientGone
            parts.append(chunk[:size])

    def _json_body(self, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            message = f"[json.exception.parse_error.101] parse error: {exc}"
            raise RequestError(500, message, "server_error") from None
        if not isinstance(body, dict):
            message = "[json.exception.type_error.302] request body must be a JSON object"
            raise RequestError(500, message, "server_error")
        return body

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _wait(self, seconds: float) -> None:
        """Sleep, but raise _ClientGone as soon as the client hangs up."""
        if not pause_unless_gone(self.connection, seconds):
            raise _ClientGone

    # ---- routes

    def route_health(self, _raw: bytes) -> None:
        self._send_json(200, {"status": "ok"})

    def route_models(self, _raw: bytes) -> None:
        model = {
            "id": self.config.model_id,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "llamacpp",
            "meta": {"n_ctx": self.config.ctx_size, "fake_pid": PID},
        }
        self._send_json(200, {"object": "list", "data": [model]})

    def route_chat(self, raw: bytes) -> None:
        self._completion(raw, chat=True)

    def route_text(self, raw: bytes) -> None:
        self._completion(raw, chat=False)

    def route_embeddings(self, raw: bytes) -> None:
        if not self.config.embeddings:
            raise RequestError(
                501,
                "This server does not support embeddings. Start it with `--embeddings`",
                "not_supported_error",
            )
        if self.config.pooling == "none":
            raise RequestError(
                400,
                "Pooling type 'none' is not OAI compatible. Please use a different pooling type",
                "invalid_request_error",
            )
        body = self._json_body(raw)
        value = body.get("input", body.get("content"))
        if isinstance(value, str) or (
            isinstance(value, list) and value and all(isinstance(v, int) for v in value)
        ):
            inputs: list[Any] = [value]
        elif isinstance(value, list) and value:
            inputs = value
        else:
            raise RequestError(400, '"input" must be provided', "invalid_request_error")
        use_base64 = body.get("encoding_format") == "base64"
        if use_base64:
            import base64
            import struct
        data = []
        for index, item in enumerate(inputs):
            vector = embed(as_text(item))
            encoded: Any = vector
            if use_base64:
                packed = struct.pack(f"<{len(vector)}f", *vector)
                encoded = base64.b64encode(packed).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = count_words(inputs)
        self._send_json(
            200,
            {
                "object": "list",
                "model": self.config.model_id,
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def route_rerank(self, raw: bytes) -> None:
        if not self.config.reranking:
            raise RequestError(
                501,
                "This server does not support reranking. Start it with `--reranking`",
                "not_supported_error",
            )
        body = self._json_body(raw)
        query = body.get("query")
        documents = body.get("documents", body.get("texts"))
        if not isinstance(query, str):
            raise RequestError(400, '"query" must be provided', "invalid_request_error")
        if not isinstance(documents, list) or not documents:
            raise RequestError(
                400, '"documents" must be a non-empty string array', "invalid_request_error"
            )
        texts = [as_text(doc) for doc in documents]
        results = [
            {"index": index, "relevance_score": relevance(query, text)}
            for index, text in enumerate(texts)
        ]
        results.sort(key=lambda r: (-r["relevance_score"], r["index"]))
        top_n = body.get("top_n")
        if isinstance(top_n, int) and not isinstance(top_n, bool) and top_n >= 0:
            results = results[:top_n]
        tokens = count_words(query) + count_words(texts)
        self._send_json(
            200,
            {
                "object": "list",
                "model": self.config.model_id,
                "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    # ---- completions

    def _completion(self, raw: bytes, *, chat: bool) -> None:
        cfg = self.config
        if cfg.embeddings or cfg.reranking:
            flag = "--embeddings" if cfg.embeddings else "--reranking"
            raise RequestError(
                501,
                f"This server does not support completions. Start it without `{flag}`",
                "not_supported_error",
            )
        body = self._json_body(raw)
        if chat:
            prompt = body.get("messages")
            if not isinstance(prompt, list):
                raise RequestError(400, "'messages' is required", "invalid_request_error")
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str | list):
                raise RequestError(400, '"prompt" must be provided', "invalid_request_error")

        n_tokens = cfg.tokens
        for key in ("max_tokens", "max_completion_tokens", "n_predict"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                n_tokens = value
                break
        prompt_tokens = count_words(prompt)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n_tokens,
            "total_tokens": prompt_tokens + n_tokens,
        }
        serial = self.state.new_id()
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-fake-{PID}-{serial}",
            "created": int(time.time()),
            "model": cfg.model_id,
            "system_fingerprint": "fake-llama-server",
        }
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            self._stream(meta, n_tokens, usage if include_usage else None, chat=chat)
            return

        if cfg.token_rate > 0 and n_tokens > 0:
            self._wait(n_tokens / cfg.token_rate)
        text = "".join(token_text(i) for i in range(n_tokens))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        obj = "chat.completion" if chat else "text_completion"
        self._send_json(200, {**meta, "object": obj, "choices": [choice], "usage": usage})

    def _stream(
        self,
        meta: dict[str, Any],
        n_tokens: int,
        usage: dict[str, Any] | None,
        *,
        chat: bool,
    ) -> None:
        cfg = self.config
        chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

        sent = 0

        def emit(payload: bytes) -> None:
            nonlocal sent
            event = b"data: " + payload + b"\n\n"
            frame = b"%x\r\n%s\r\n" % (len(event), event) if chunked else event
            self.wfile.write(frame)
            sent += 1
            maybe_crash()

        def maybe_crash() -> None:
            if cfg.crash_after_chunks is not None and sent >= cfg.crash_after_chunks:
                log(f"fake crash: dying after {sent} SSE chunk(s) of a streamed response")
                os._exit(1)

        def chunk(delta: str | None, finish: str | None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                piece: dict[str, Any] = {} if delta is None else {"content": delta}
                if delta is not None and sent == 0:
                    piece = {"role": "assistant", **piece}
                choice["delta"] = piece
            else:
                choice.update(text=delta or "", logprobs=None)
            obj = "chat.completion.chunk" if chat else "text_completion"
            return json.dumps({**meta, "object": obj, "choices": [choice]}).encode("utf-8")

        self.state.stream_started()
        completed = False
        try:
            maybe_crash()
            interval = 1.0 / cfg.token_rate if cfg.token_rate > 0 else 0.0
            for index in range(n_tokens):
                if interval:
                    self._wait(interval)
                emit(chunk(token_text(index), None))
            emit(chunk(None, "length"))
            if usage is not None:
                obj = "chat.completion.chunk" if chat else "text_completion"
                emit(json.dumps({**meta, "object": obj, "choices": [], "usage": usage}).encode())
            emit(b"[DONE]")
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            completed = True
        finally:
            self.state.stream_finished(completed=completed)


_ROUTES: dict[tuple[str, str], Callable[[FakeHandler, bytes], None]] = {}
for _path in ("/health", "/v1/health"):
    _ROUTES["GET", _path] = FakeHandler.route_health
for _path in ("/v1/models", "/models"):
    _ROUTES["GET", _path] = FakeHandler.route_models
for _path in ("/v1/chat/completions", "/chat/completions"):
    _ROUTES["POST", _path] = FakeHandler.route_chat
for _path in ("/v1/completions", "/completions"):
    _ROUTES["POST", _path] = FakeHandler.route_text
for _path in ("/v1/embeddings", "/embeddings"):
    _ROUTES["POST", _path] = FakeHandler.route_embeddings
for _path in ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking"):
    _ROUTES["POST", _path] = FakeHandler.route_rerank


# --------------------------------------------------------------------------- main


def _exit_now(_signum: int, _frame: Any) -> None:
    os._exit(0)


def _fail_load(code: int, model: str) -> NoReturn:
    for line in (
        f"srv    load_model: loading model '{model}'",
        "gguf_init_from_file: fake tensor data checksum mismatch",
        "llama_model_load: error loading model: fake load failure: model file is corrupt",
        "error: fake load failure: model file is corrupt",
        "srv  llama_server: exiting due to model loading error",
    ):
        log(line, tagged=False)
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    config, ignored = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if config.ignore_sigterm else _exit_now)
    signal.signal(signal.SIGINT, _exit_now)
    parent = os.getppid()

    if config.spawn_log:
        line = f"{PID} {config.alias} {config.port}\n".encode()
        fd = os.open(config.spawn_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    log(f"starting: alias={config.alias} model={config.model!r} {config.host}:{config.port}")
    if ignored:
        log(f"ignoring unsupported arguments: {' '.join(ignored)}")

    bind_error = "--fake-bind-fail" if config.bind_fail else ""
    server: FakeServer | None = None
    if not bind_error:
        server_cls = FakeServer6 if ":" in config.host else FakeServer
        try:
            server = server_cls((config.host, config.port), State(config))
        except OSError as exc:
            bind_error = str(exc)
    if server is None:
        log(
            f"srv         start: couldn't bind HTTP server socket, "
            f"hostname: {config.host}, port: {config.port} ({bind_error})"
        )
        log("srv  llama_server: exiting due to HTTP server error")
        sys.exit(1)

    state = server.state
    if config.port == 0:  # report the port the kernel picked
        config = config._replace(port=server.server_address[1])
        state.config = config
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log(f"main: server is listening on http://{config.host}:{config.port} - loading model")
    if config.exit_during_load is not None:
        delay = max(0.0, START + EXIT_DURING_LOAD_DELAY - time.monotonic())
        timer = threading.Timer(delay, _fail_load, (config.exit_during_load, config.model))
        timer.daemon = True
        timer.start()
    write_spam(config.stderr_spam)
    state.startup_done.set()

    announced = False
    while True:
        if config.orphan_exit and os.getppid() != parent:
            log("parent process is gone; exiting")
            os._exit(0)
        if not announced and state.is_ready():
            log("main: model loaded; all slots are idle")
            announced = True
        if announced or config.never_ready or config.exit_during_load is not None:
            time.sleep(0.25)
        else:
            time.sleep(min(0.25, max(0.005, state.ready_at - time.monotonic())))


if __name__ == "__main__":
    main()
