"""Reading a text/event-stream response frame by frame (tests only)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx


class SSEReader:
    """Frames of an httpx streaming response, each waited for with a deadline."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._chunks: AsyncIterator[str] = response.aiter_text()
        self._buffer = ""
        self.ended = False

    async def frame(self, timeout: float = 10.0) -> str | None:
        """The next frame (without its blank line), or None at the end of the stream."""
        async with asyncio.timeout(timeout):
            while "\n\n" not in self._buffer:
                try:
                    self._buffer += await anext(self._chunks)
                except StopAsyncIteration:
                    self.ended = True
                    return None
        frame, self._buffer = self._buffer.split("\n\n", 1)
        return frame

    async def data(self, timeout: float = 10.0) -> dict[str, Any]:
        """The JSON of the next frame that has data (comments are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.frame(timeout)
                if frame is None:
                    raise AssertionError("the stream ended")
                lines = frame.split("\n")
                data = [line for line in lines if line.startswith("data: ")]
                if data:
                    assert len(data) == 1, frame
                    parsed: dict[str, Any] = json.loads(data[0][len("data: ") :])
                    return parsed

    async def until(self, predicate: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Data frames up to and including the first one ``predicate`` accepts."""
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                seen.append(await self.data(timeout))
                if predicate(seen[-1]):
                    return seen
