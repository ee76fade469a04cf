#!/usr/bin/env python3
"""A squatter for the port-identity tests: an HTTP server on a port a backend
was about to bind, that answers everything with 200 and writes down what it got.

    squatter.py --port P --log FILE

Once it listens it creates FILE (empty); every request it receives appends
``METHOD PATH`` to FILE.  It answers like a backend would (a health 200, a
chat completion saying ``squatter``), so a request that reaches it would
succeed and go unnoticed without FILE.  Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOG = Path()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self) -> None:
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"{self.command} {self.path}\n".encode())
        finally:
            os.close(fd)
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        message = {"role": "assistant", "content": "squatter"}
        body = json.dumps(
            {"status": "ok", "object": "chat.completion", "model": "tree",
             "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        ).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer


def main() -> None:
    global LOG
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    LOG = Path(args.log)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    LOG.touch()  # listening now: the test may let the backend try its bind
    server.serve_forever()


if __name__ == "__main__":
    main()
