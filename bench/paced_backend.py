"""Paced stand-in backend for benchmarks (not a model server).

Speaks enough of llama-server's command line and OpenAI routes for dynllm to
spawn it as a ``llamacpp`` backend, and emits SSE chunks on a fixed schedule,
so any difference between talking to it directly and through a proxy is the
proxy's.  Built on raw asyncio streams with uvloop to stay cheap per chunk.

Pacing switches (extra command-line arguments, i.e. a model's ``extra_args``):
    --chunk-interval-ms F   time between chunks (0 = as fast as the socket takes them)
    --first-chunk-delay-ms F  delay before the first chunk
    --chunks N              chunks per stream when the request gives no max_tokens
    --chunk-words N         words of text per chunk (chunk size)
    --load-ms F             answer 503 "Loading model" (as llama-server does) for
                            this long after start, to stand in for a model load

Each chunk's text starts with its index (``c17 ...``) so clients can check
order and count.  ``GET /health`` is 200 once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time

import uvloop

FILLER = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--alias", "-a", default="paced")
    p.add_argument("--chunk-interval-ms", type=float, default=20.0)
    p.add_argument("--first-chunk-delay-ms", type=float, default=0.0)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--chunk-words", type=int, default=1)
    p.add_argument("--load-ms", type=float, default=0.0)
    args, _unknown = p.parse_known_args(argv)  # -m, -c, -ngl and friends are ignored
    return args


class Paced:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = args.alias
        words = " ".join((FILLER * (1 + args.chunk_words // len(FILLER)))[: args.chunk_words])
        self.words = words
        self.ready_at = time.monotonic() + args.load_ms / 1000

    def chunk(self, i: int) -> bytes:
        body = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": self.model,
            "choices": [
                {"index": 0, "delta": {"content": f"c{i} {self.words} "}, "finish_reason": None}
            ],
        }
        data = b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
        return b"%x\r\n%s\r\n" % (len(data), data)

    def completion(self, n: int) -> bytes:
        text = " ".join(f"c{i}" for i in range(n))
        return json.dumps({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
        }).encode()  # fmt: skip

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                _method, path, _ = lines[0].split(b" ", 2)
                length = 0
                for line in lines[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length) if length else b""
                if time.monotonic() < self.ready_at:
                    payload = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
                    continue
                if path == b"/health" or path == b"/v1/models":
                    payload = b'{"status":"ok"}'
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
                    continue
                request = json.loads(body or b"{}")
                n = int(request.get("max_tokens") or self.args.chunks)
                if request.get("stream"):
                    await self.stream(writer, n)
                else:
                    payload = self.completion(n)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stream(self, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
        interval = self.args.chunk_interval_ms / 1000
        start = time.monotonic() + self.args.first_chunk_delay_ms / 1000
        for i in range(n):
            if interval or self.args.first_chunk_delay_ms:
                delay = start + i * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            writer.write(self.chunk(i))
            await writer.drain()
        done = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))


async def main() -> None:
    args = parse_args()
    paced = Paced(args)
    server = await asyncio.start_server(paced.handle, args.host, args.port, backlog=4096)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    uvloop.run(main())
