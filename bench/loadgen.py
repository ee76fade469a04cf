"""Open-loop load client that times every SSE chunk.

Raw asyncio HTTP/1.1 (keep-alive, chunked decoding) so the client's own cost
per chunk is small and the same for every target.  Requests start at their
scheduled times whether or not earlier ones have finished, and latency is
measured from the scheduled time (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field

CONTENT = re.compile(rb'"content":\s*"c\d')  # a token of the paced backend
ANY_CONTENT = re.compile(rb'"content":\s*"[^"]')  # a non-empty token of any backend
MASTER_KEY = "sk-bench-0123456789abcdef"  # LiteLLM wants a master key; the others ignore it
TOKEN = MASTER_KEY.encode()


@dataclass
class Result:
    scheduled: float
    status: int = 0
    first: float | None = None
    first_content: float | None = None
    end: float | None = None
    events: list[float] = field(default_factory=list)
    chunks: int = 0
    done: bool = False
    error: str | None = None

    @property
    def latency(self) -> float | None:
        return None if self.end is None else self.end - self.scheduled

    @property
    def ttfc(self) -> float | None:
        return None if self.first is None else self.first - self.scheduled

    @property
    def first_token(self) -> float | None:
        """Seconds from the scheduled start to the first content chunk."""
        return None if self.first_content is None else self.first_content - self.scheduled

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.events, self.events[1:], strict=False)]


class Connection:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        content: re.Pattern[bytes] = CONTENT,
    ) -> None:
        self.reader, self.writer, self.content = reader, writer, content

    @classmethod
    async def open(cls, host: str, port: int, content: re.Pattern[bytes] = CONTENT) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer, content)

    def close(self) -> None:
        self.writer.close()

    async def post(self, host: str, path: str, payload: dict[str, object], result: Result) -> bool:
        """Send one request and read the whole response; returns whether the
        connection can be reused."""
        body = json.dumps(payload).encode()
        self.writer.write(
            b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer %s\r\ncontent-length: %d\r\n\r\n%s"
            % (path.encode(), host.encode(), TOKEN, len(body), body)
        )
        reader = self.reader
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        result.status = int(lines[0].split(b" ", 2)[1])
        length, chunked, keep = None, False, True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                keep = False
        pending = b""
        if chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                data = (await reader.readexactly(size + 2))[:-2]
                pending = self._events(self.content, pending + data, result)
        elif length is not None:
            pending = self._events(self.content, await reader.readexactly(length), result)
        else:
            pending = self._events(self.content, await reader.read(), result)
            keep = False
        result.end = time.perf_counter()
        if result.first is None:
            result.first = result.end
        return keep

    @staticmethod
    def _events(content: re.Pattern[bytes], buffer: bytes, result: Result) -> bytes:
        if not buffer.startswith(b"data:") and b"\n\n" not in buffer:
            return buffer if buffer.startswith(b"data") else b""
        *complete, rest = buffer.split(b"\n\n")
        now = time.perf_counter()
        for event in complete:
            if not event.startswith(b"data:"):
                continue
            if result.first is None:
                result.first = now
            result.events.append(now)
            if event.startswith(b"data: [DONE]"):
                result.done = True
            elif b'"error"' in event[:20]:
                result.error = event.decode(errors="replace")[:200]
            elif content.search(event):
                if result.first_content is None:
                    result.first_content = now
                result.chunks += 1  # LiteLLM adds chunks of its own: count only the backend's
        return rest


class Target:
    """One way of reaching the backend: direct, through dynllm, through LiteLLM."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        path: str = "/v1/chat/completions",
        content: re.Pattern[bytes] = CONTENT,
    ) -> None:
        self.name, self.host, self.port, self.path = name, host, port, path
        self.content = content
        self._idle: deque[Connection] = deque()

    async def send(self, payload: dict[str, object], result: Result) -> None:
        reused = bool(self._idle)
        conn = (
            self._idle.pop()
            if reused
            else await Connection.open(self.host, self.port, self.content)
        )
        try:
            keep = await conn.post(f"{self.host}:{self.port}", self.path, payload, result)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            conn.close()
            if reused and result.status == 0:
                # The server closed an idle keep-alive connection (uvicorn does
                # after 5 s): retry on a fresh one, as HTTP clients do.
                await self.send(payload, result)
                return
            result.error = repr(exc)
            result.end = time.perf_counter()
            return
        if keep:
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


async def open_loop(
    target: Target,
    payload: dict[str, object],
    starts: list[float],
    timeout: float,
) -> list[Result]:
    """Start one request at each offset in ``starts`` (seconds from now)."""
    base = time.perf_counter() + 0.05
    results = [Result(scheduled=base + offset) for offset in starts]

    async def one(result: Result) -> None:
        delay = result.scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await target.send(payload, result)

    tasks = [asyncio.create_task(one(r)) for r in results]
    _done, pending = await asyncio.wait(tasks, timeout=timeout + (starts[-1] if starts else 0))
    for task in pending:
        task.cancel()
    for result in results:
        if result.end is None:
            result.error = result.error or "timed out"
    return results
