#!/usr/bin/env python3
"""Test stand-in for a backend that starts processes of its own (NOT a real server).

    tree_backend.py --port P [--host H] [--pids FILE] [--ignorer] [--daemon]
                    [--ports-file FILE --go-dir DIR [--exit-if-taken]]

Before it binds its port it can start:

``--ignorer``  a child that ignores SIGTERM and stays in the backend's group;
``--daemon``   a daemon: fork, ``setsid``, fork again, the middle process
               exits (the classic double fork), so the daemon is neither in
               the backend's group nor below it in the process tree.

Neither watches its parent: they run until killed, like the helpers a real
server leaks.  With ``--pids``, each process appends ``<role> <pid>`` to
FILE once it runs (roles: main, ignorer, daemon).

With ``--ports-file``, the backend appends its port to that file and waits
for ``DIR/go-<port>`` before binding (a test can take the port first,
race-free); if the port is taken it keeps retrying instead of exiting, as
servers that wait for their port do; with ``--exit-if-taken`` it exits 3
saying only ``startup failed`` (no words a bind-failure check knows).

It answers ``GET /health`` (200) and ``POST /v1/chat/completions`` with a
chat completion whose content is ``served by <pid>``.  Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def note(pids: str | None, role: str) -> None:
    if pids:
        fd = os.open(pids, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{role} {os.getpid()}\n".encode())
        finally:
            os.close(fd)


def sleep_forever() -> None:
    while True:
        time.sleep(3600)


def start_ignorer(pids: str | None) -> None:
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        note(pids, "ignorer")
        sleep_forever()


def start_daemon(pids: str | None) -> None:
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            note(pids, "daemon")
            sleep_forever()
        os._exit(0)
    os.waitpid(middle, 0)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"tree-backend[{os.getpid()}] {format % args}\n")

    def _send(self, status: int, payload: dict[str, object]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": "not found"})
            return
        message = {"role": "assistant", "content": f"served by {os.getpid()}"}
        self._send(
            200,
            {
                "id": "chatcmpl-tree",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": "tree",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
            },
        )


def wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.01)


def bind(host: str, port: int, retry: bool, quiet_exit: bool) -> ThreadingHTTPServer:
    while True:
        try:
            return ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            if quiet_exit:
                sys.stderr.write("startup failed\n")
                sys.exit(3)
            if not retry:
                raise
            sys.stderr.write(f"port {port} is busy ({exc}); retrying\n")
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pids")
    parser.add_argument("--ignorer", action="store_true")
    parser.add_argument("--daemon", action="store_true")
    parser.add_argument("--ports-file")
    parser.add_argument("--go-dir")
    parser.add_argument("--exit-if-taken", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # Forks first, while this process has one thread.
    if args.ignorer:
        start_ignorer(args.pids)
    if args.daemon:
        start_daemon(args.pids)
    note(args.pids, "main")
    if args.ports_file:
        with open(args.ports_file, "a") as f:
            f.write(f"{args.port}\n")
        wait_for(Path(args.go_dir or ".") / f"go-{args.port}")
    server = bind(args.host, args.port, bool(args.ports_file), args.exit_if_taken)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
