#!/usr/bin/env python3
"""Test stand-in for "any OpenAI- or KServe-compatible server" (NOT a real inference server).

dynllm's ``command`` backend starts it for the tests of the route layer: one
process answers every route family (chat, completions, responses, embeddings,
rerank, audio transcriptions/translations/speech, images, KServe v2), so a
test can walk every (route, model type) pair and watch what reaches a
backend.  Standard library only; starts in tens of milliseconds.

    fake_openai_server.py --host H --port P [--name NAME] [--load-seconds S]

(``/health`` answers 503 for the first S seconds, like a backend loading.)

Behaviour is chosen per request by body fields (JSON routes), so one process
serves many cases.  ``fake_delay`` (seconds before the response starts),
``fake_tokens`` / ``fake_rate`` (tokens of a response and tokens per second;
with ``"stream": true`` as SSE, else a plain JSON body sent piece by piece),
``fake_drop`` (read the request, then drop the connection unanswered).

``GET /fake/stats`` reports what this process saw: requests, how many ended
because the client closed the connection (``gone``), completed ones, the
ones in progress (``active``) and, per request, path, size and sha256 of the
body received (JSON: also its top-level keys; multipart: of the whole body
and of the file part) and of the body sent.  It exits by itself within ~0.25 s of its parent dying.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sockwait import pause_unless_gone  # the module next to this script

WAV_HEADER = b"RIFF\x24\x08\x00\x00WAVEfmt "


class Gone(Exception):
    """The client closed the connection."""


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.gone = 0
        self.completed = 0
        self.active = 0
        self.seen: list[dict[str, Any]] = []

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "gone": self.gone,
                "completed": self.completed,
                "active": self.active,
                "seen": list(self.seen[-50:]),
            }


STATS = Stats()
NAME = "fake"
READY_AT = 0.0


def _multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """Form field name -> value (the file part's bytes for ``file``)."""
    boundary = content_type.split("boundary=", 1)[1].strip().strip('"').encode()
    fields: dict[str, bytes] = {}
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, _, value = part[2:].partition(b"\r\n\r\n")
        disposition = head.decode("latin-1")
        name = disposition.split('name="', 1)[1].split('"', 1)[0] if 'name="' in disposition else ""
        fields[name] = value[:-2]  # the CRLF before the next boundary
    return fields


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"fake-openai[{os.getpid()}] {format % args}\n")

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    # ---- plumbing
    def _serve(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/fake/stats":
            self._send(200, json.dumps(STATS.snapshot()).encode(), "application/json")
            return
        if path == "/health":
            if time.monotonic() < READY_AT:
                self._send(503, b'{"error":"loading"}', "application/json")
            else:
                self._send(200, b'{"status":"ok"}', "application/json")
            return
        with STATS.lock:
            STATS.requests += 1
            STATS.active += 1
        record: dict[str, Any] = {"path": path, "method": method}
        try:
            body = self._body()
            record.update(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
            with STATS.lock:
                STATS.seen.append(record)
            self._route(method, path, body, record)
            with STATS.lock:
                STATS.completed += 1
        except (Gone, ConnectionError, BrokenPipeError):
            self.close_connection = True
            with STATS.lock:
                STATS.gone += 1
        finally:
            with STATS.lock:
                STATS.active -= 1

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length)
        if len(data) < length:
            raise Gone
        return data

    def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _wait(self, seconds: float) -> None:
        """Sleep, but raise Gone as soon as the client hangs up."""
        if not pause_unless_gone(self.connection, seconds):
            raise Gone

    # ---- routes
    def _route(self, method: str, path: str, body: bytes, record: dict[str, Any]) -> None:
        if path.startswith("/v2/models/"):
            self._kserve(method, path, body, record)
            return
        if method != "POST":
            self._send(404, b'{"error":"not found"}', "application/json")
            return
        if path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            fields = _multipart(body, self.headers.get("Content-Type", ""))
            upload = fields.get("file", b"")
            record.update(
                model=fields.get("model", b"").decode(),
                file_bytes=len(upload),
                file_sha256=hashlib.sha256(upload).hexdigest(),
            )
            answer = {"text": f"heard {len(upload)} bytes", "model": record["model"]}
            self._send(200, json.dumps(answer).encode(), "application/json")
            return
        try:
            data = json.loads(body)
        except ValueError:
            self._send(400, b'{"detail":"body is not JSON"}', "application/json")
            return
        record["model"] = data.get("model")
        record["keys"] = sorted(data) if isinstance(data, dict) else []
        self._wait(float(data.get("fake_delay", 0)))
        if data.get("fake_drop"):
            self.connection.shutdown(socket.SHUT_RDWR)
            raise Gone
        if data.get("fake_status"):
            error = {"detail": data.get("fake_message", "refused by the fake")}
            self._send(int(data["fake_status"]), json.dumps(error).encode(), "application/json")
            return
        if path == "/v1/audio/speech":
            audio = WAV_HEADER + bytes(range(256)) * 8
            record["sent_sha256"] = hashlib.sha256(audio).hexdigest()
            self._send(200, audio, "audio/wav")
            return
        if path == "/v1/images/generations":
            image = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
            self._send(
                200,
                json.dumps({"created": 0, "data": [{"b64_json": image}]}).encode(),
                "application/json",
            )
            return
        if path == "/v1/embeddings":
            vectors = [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]
            payload = {"object": "list", "data": vectors, "model": record["model"]}
            self._send(200, json.dumps(payload).encode(), "application/json")
            return
        if path in ("/v1/rerank", "/rerank"):
            results = [
                {"index": i, "relevance_score": 1.0 / (i + 1)}
                for i, _ in enumerate(data.get("documents", []))
            ]
            self._send(200, json.dumps({"results": results}).encode(), "application/json")
            return
        self._generate(path, data)

    def _generate(self, path: str, data: dict[str, Any]) -> None:
        tokens = int(data.get("fake_tokens", 3))
        pause = 1.0 / float(data["fake_rate"]) if data.get("fake_rate") else 0.0
        words = [f"tok{i}" for i in range(tokens)]
        if data.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for word in words:
                event = {
                    "object": "chat.completion.chunk",
                    "model": data.get("model"),
                    "choices": [{"index": 0, "delta": {"content": word + " "}}],
                }
                self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
                self._wait(pause)
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
            return
        text = " ".join(words)
        if path == "/v1/chat/completions":
            answer: dict[str, Any] = {
                "object": "chat.completion",
                "model": data.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": text},
                    }
                ],
            }
        elif path == "/v1/responses":
            answer = {"object": "response", "model": data.get("model"), "output_text": text}
        else:
            answer = {
                "object": "text_completion",
                "model": data.get("model"),
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            }
        payload = json.dumps(answer).encode()
        if not pause:
            self._send(200, payload, "application/json")
            return
        # A slow plain body (chunked, as a large answer would go): one piece per "token".
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        step = max(1, len(payload) // max(tokens, 1))
        for start in range(0, len(payload), step):
            self._chunk(payload[start : start + step])
            self._wait(pause)
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _kserve(self, method: str, path: str, body: bytes, record: dict[str, Any]) -> None:
        name = path[len("/v2/models/") :].split("/", 1)[0]
        record["model"] = name
        if name != NAME:
            error = json.dumps({"error": f"Model with name {name} does not exist."}).encode()
            self._send(404, error, "application/json")
            return
        if method == "GET" and path.endswith("/ready"):
            self._send(200, b"", "application/json")
            return
        if method == "GET":
            meta = {
                "name": NAME,
                "versions": ["1"],
                "platform": "fake",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
            }
            self._send(200, json.dumps(meta).encode(), "application/json")
            return
        header_length = self.headers.get("Inference-Header-Content-Length")
        raw = body[int(header_length) :] if header_length else b""
        # The answer: a JSON header, then the request's raw tensor bytes reversed.
        out_header = json.dumps(
            {
                "model_name": NAME,
                "outputs": [
                    {
                        "name": "y",
                        "datatype": "BYTES",
                        "shape": [len(raw)],
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
            }
        ).encode()
        answer = out_header + raw[::-1]
        record["sent_sha256"] = hashlib.sha256(answer).hexdigest()
        self._send(
            200,
            answer,
            "application/octet-stream",
            Inference_Header_Content_Length=str(len(out_header)),
        )


def _exit_with_parent() -> None:
    parent = os.getppid()
    while True:
        time.sleep(0.25)
        if os.getppid() != parent:
            os._exit(0)


def main() -> None:
    global NAME, READY_AT
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--load-seconds", type=float, default=0.0)
    args = parser.parse_args()
    NAME = args.name
    READY_AT = time.monotonic() + args.load_seconds
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
