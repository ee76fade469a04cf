"""Loading progress: SSE comments for a streaming request that waits for a cold model.

A streaming request (``"stream": true`` on chat, completions or responses)
for a model that is not ready when it arrives would otherwise see nothing
until the model has loaded, often many seconds: clients and proxies in
between give up on a silent connection.  When loading progress is on
(``loading_progress``, default true) and the answer has not begun after
``GRACE_SECONDS``, dynllm starts the event stream itself (200,
``text/event-stream``) and sends one comment line a second::

    : loading MODEL 3.2s

(``queued`` while it waits for VRAM or a concurrency slot, ``loading`` while
its backend starts, ``waiting`` once it is ready and the backend has not
answered yet).  SSE clients ignore comment lines (the openai client, Open
WebUI, browsers' EventSource), and proxies count them as traffic.

Once the stream has begun, the backend's answer goes into it: its events
are relayed as they come, but its status and headers cannot be (the status
line is gone); an error, dynllm's (a failed load, a timeout) or the
backend's, arrives as one SSE ``data: {"error": {...}}`` event that ends the
stream, which the openai client raises as an ``APIError``.  A model that
answers within the grace period answers exactly as without loading progress.

The ticker is its own task and the only writer until ``stop``: it marks the
response started right after the status line went out, with no ``await`` in
between, so whoever sends next (the relay, an error) knows whether it must
write a status line.  A ticker cancelled in ``send`` has written nothing
(uvicorn waits for the socket to drain before writing), so ``stop`` is a
plain cancel.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import Send

from dynllm.events import ModelState
from dynllm.proxy import SSE_NO_BUFFERING, Exchange
from dynllm.scheduler import Slot

log = logging.getLogger("dynllm.api")

GRACE_SECONDS = 0.5
"""Before the stream is started by dynllm: a model that answers sooner keeps
its own status and headers; a slower one still shows its first bytes well
within a second."""
INTERVAL_SECONDS = 1.0
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), *SSE_NO_BUFFERING]
_WORDS = {
    ModelState.UNLOADED: "queued",
    ModelState.UNLOADING: "queued",
    ModelState.LOADING: "loading",
    ModelState.READY: "waiting",
}


def comment(word: str, name: str, seconds: float) -> bytes:
    return f": {word} {name} {seconds:.1f}s\n\n".encode()


class LoadingProgress:
    """Started by the dispatcher for a streaming request whose model is not
    ready; stopped as soon as the answer (or an error) is in hand."""

    __slots__ = ("_task", "ex", "name", "send", "slot", "started_at")

    def __init__(self, send: Send, ex: Exchange, slot: Slot, started_at: float) -> None:
        self.send = send
        self.ex = ex
        self.slot = slot
        self.name = slot.name
        self.started_at = started_at
        self._task = asyncio.create_task(self._run(), name=f"progress-{self.name}")

    def stop(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        ex = self.ex
        started = self.started_at
        try:
            await asyncio.sleep(max(0.0, started + GRACE_SECONDS - time.monotonic()))
            if ex.started:  # the answer came first
                return
            await self.send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            # No await between the status line and these: see the module docstring.
            ex.started = ex.progress = True
            ex.status = 200
            while True:
                elapsed = time.monotonic() - started
                line = comment(_WORDS[self.slot.state], self.name, elapsed)
                await self.send({"type": "http.response.body", "body": line, "more_body": True})
                ex.sent += len(line)
                # On the second, counted from the request's arrival.
                await asyncio.sleep(INTERVAL_SECONDS - (elapsed % INTERVAL_SECONDS))
        except OSError as exc:  # the client went away: its watcher ends the request
            log.debug("loading progress for '%s' stopped: %s", self.name, exc)
