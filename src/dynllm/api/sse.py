"""Server-sent event streams of the admin API: lifecycle events and backend output.

A stream opens its feed when its body starts (so a response that never
starts holds no feed), sends ``: connected``, then everything the feed
buffers, batched per write, with a ``: keepalive`` comment after each quiet
``keepalive`` seconds.  It ends when its feed closes: at shutdown (the app
closes the hubs), or when its client fell ``FEED_LIMIT`` items behind (it is
told so in a last comment).  A client that disconnects cancels the body
(Starlette watches for ``http.disconnect``), and the feed is closed with it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from starlette.responses import StreamingResponse

from dynllm.events import Feed
from dynllm.proxy import SSE_NO_BUFFERING

CONNECTED = b": connected\n\n"
KEEPALIVE = b": keepalive\n\n"
FELL_BEHIND = b": this stream fell behind and was closed; reconnect to go on\n\n"
HEADERS = {name.decode(): value.decode() for name, value in SSE_NO_BUFFERING}

T = TypeVar("T")


def frame(data: dict[str, Any], event: str | None = None) -> bytes:
    """One SSE message; JSON escapes every newline, so ``data`` is one line."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def relay(
    open_feed: Callable[[], tuple[Feed[T], list[bytes]]],
    render: Callable[[T], bytes],
    keepalive: float,
) -> AsyncIterator[bytes]:
    """The stream's body.  ``open_feed`` returns the feed and what to send
    before its items (the log tail), taken in the same step so nothing falls
    between them."""
    feed, first = open_feed()
    try:
        yield CONNECTED + b"".join(first)
        while True:
            batch = await feed.get(keepalive)
            if batch is None:
                if feed.overflowed:
                    yield FELL_BEHIND
                return
            yield b"".join(render(item) for item in batch) if batch else KEEPALIVE
    finally:
        feed.close()


def response(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=HEADERS)
