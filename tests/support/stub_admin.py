"""A stand-in for a dynllm's admin API, for the client paths a real dynllm
cannot be made to take on demand: an older dynllm without ``/admin/reload``
(404), a reload that succeeds or refuses a config, a log stream that goes on
only when the test says so, a server that is not dynllm at all.

Standard library only (``http.server`` in a thread), on 127.0.0.1 and a port
the OS picked.  Each route is a function of the request returning what to
send; every request is recorded (method, path, headers, body) so a test can
check what the client sent.

    with StubAdmin({("POST", "/admin/reload"): reply(404, {"detail": "Not Found"})}) as stub:
        ... stub.url ...
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: Callable[[], Iterator[bytes]] | None = None
    """Sent one by one and flushed (an event stream); the connection then closes."""


Route = Callable[[Seen], Reply]


def reply(status: int, body: Any) -> Route:
    """A JSON answer."""
    data = json.dumps(body).encode()
    return lambda _: Reply(status, {"Content-Type": "application/json"}, data)


def event_stream(chunks: Callable[[], Iterator[bytes]]) -> Route:
    return lambda _: Reply(200, {"Content-Type": "text/event-stream"}, chunks=chunks)


@dataclass
class StubAdmin:
    routes: dict[tuple[str, str], Route]
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(
                    self.command,
                    parts.path,
                    parts.query,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                stub.seen.append(seen)
                route = stub.routes.get((self.command, parts.path))
                answer = route(seen) if route else Reply(404, {}, b'{"detail":"Not Found"}')
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if answer.chunks is None:
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                    return
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    for chunk in answer.chunks():
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client stopped reading: what a follower does

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                return  # the test's output is the client's, not this server's

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StubAdmin:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
