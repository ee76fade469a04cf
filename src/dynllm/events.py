"""Lifecycle events and the fan-out that carries them (and backend output) to
whoever listens.

The scheduler's one transition point (``Scheduler._move``) builds a
``LifecycleEvent`` for every change of a model's state and hands it to an
``EventHub``.  The hub calls its synchronous subscribers in order -- the
store (its durable shadow), the metrics, the log -- and puts the event in the
bounded buffer of every stream (``GET /admin/events``).  Nothing else writes
lifecycle state.

A stream never slows the scheduler: ``publish`` only appends to a buffer.
A stream whose client reads too slowly fills its buffer (``FEED_LIMIT``
items); it is then closed and dropped, and its client is told so (it may
reconnect and read ``/admin/models`` afresh) instead of silently missing
events.  ``LineHub`` does the same for backend output, per model
(``GET /admin/models/{m}/logs?follow=true``).

Closing a hub ends every stream at once: the lifespan does it when the server
is asked to stop, so open streams do not hold up uvicorn's graceful shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

log = logging.getLogger("dynllm.events")
lifecycle_log = logging.getLogger("dynllm.lifecycle")

FEED_LIMIT = 1000
"""Items a stream may have waiting before its client counts as too slow."""
KEEPALIVE_SECONDS = 15.0
"""A comment line this often on an idle stream: proxies and clients see traffic."""


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "loaded"
    UNLOADING = "unloading"


class Reason(StrEnum):
    """Why a model's state changed.  Every event of one load (or one unload)
    carries the reason it began with: ``requested`` on unloaded -> loading and
    on loading -> loaded; ``idle`` on loaded -> unloading and on unloading ->
    unloaded."""

    REQUESTED = "requested"
    """A request needed the model (or came back after its backend died)."""
    PRELOAD = "preload"
    """``preload_models`` at startup."""
    ADMIN = "admin"
    """``POST /admin/models/load`` or ``/unload`` (``dynllm load/unload``)."""
    IDLE = "idle"
    """Unused for longer than its ``unload_time``."""
    EVICTED = "evicted"
    """Made room for another model; ``detail`` names it."""
    CRASHED = "crashed"
    """The backend exited on its own while loaded; ``detail`` has its code and last output."""
    LOAD_FAILED = "load_failed"
    """The backend did not become ready; ``detail`` says why."""
    COOLDOWN = "cooldown"
    """After failed loads, no new load for a while (a note; the state stays unloaded)."""
    RELOAD = "reload"
    """The config was reloaded: the model changed or was removed."""
    SHUTDOWN = "shutdown"
    """dynllm is stopping."""


CRASH_REASONS = frozenset({Reason.CRASHED, Reason.LOAD_FAILED})


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """One change of a model's state (``from_state`` -> ``to_state``), or a
    note about it where both are equal (``cooldown``).

    ``at`` is wall-clock time (unix seconds); ``duration_s`` the time spent in
    ``from_state`` (on loading -> loaded: the load; on unloading -> unloaded:
    the stop), None when the model had not moved since dynllm started.  The
    remaining fields are the model's facts after the change, as the store
    keeps them."""

    model: str
    from_state: ModelState
    to_state: ModelState
    reason: Reason
    detail: str | None
    at: float
    duration_s: float | None
    pid: int | None = None
    pgid: int | None = None
    proc_started_at: float | None = None
    port: int | None = None
    vram_mb: int = 0
    load_count: int = 0
    last_error: str | None = None

    def public(self) -> dict[str, Any]:
        """What ``GET /admin/events`` sends for it."""
        return {
            "model": self.model,
            "from": self.from_state.value,
            "to": self.to_state.value,
            "reason": self.reason.value,
            "detail": self.detail,
            "at": self.at,
            "duration_s": self.duration_s,
        }


Subscriber = Callable[[LifecycleEvent], None]
T = TypeVar("T")


class Feed(Generic[T]):
    """One stream's buffer.  ``put`` never blocks: past ``limit`` items the
    feed closes itself (``overflowed``); the reader then gets what was
    buffered and the end."""

    __slots__ = ("_items", "_on_close", "_wake", "closed", "limit", "overflowed")

    def __init__(self, limit: int, on_close: Callable[[Feed[T]], None]) -> None:
        self.limit = limit
        self._items: deque[T] = deque()
        self._wake = asyncio.Event()
        self._on_close = on_close
        self.closed = False
        self.overflowed = False

    def put(self, item: T) -> None:
        if self.closed:
            return
        if len(self._items) >= self.limit:
            self.overflowed = True
            self.close()
            return
        self._items.append(item)
        self._wake.set()

    def close(self) -> None:
        """End the feed (idempotent): the reader gets what is buffered, then None."""
        if not self.closed:
            self.closed = True
            self._wake.set()
            self._on_close(self)

    async def get(self, timeout: float) -> list[T] | None:
        """Everything buffered, waiting up to ``timeout`` s for something:
        ``[]`` when nothing came (time for a keepalive), None once closed and
        drained."""
        if not self._items and not self.closed:
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                return []
        self._wake.clear()
        if self._items:
            items = list(self._items)
            self._items.clear()
            return items
        return None if self.closed else []


class EventHub:
    """Lifecycle events to synchronous subscribers and to stream feeds."""

    def __init__(self, feed_limit: int = FEED_LIMIT) -> None:
        self.feed_limit = feed_limit
        self.keepalive_seconds = KEEPALIVE_SECONDS
        self._subscribers: list[Subscriber] = []
        self._feeds: set[Feed[LifecycleEvent]] = set()
        self.closed = False

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def publish(self, event: LifecycleEvent) -> None:
        """Called by the scheduler inside a transition: never blocks, never raises."""
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:
                # The state has already changed; a failing subscriber (a bug)
                # must not leave the scheduler's bookkeeping half done.
                log.exception("a lifecycle subscriber failed on %s", event)
        for feed in list(self._feeds):
            feed.put(event)

    def feed(self) -> Feed[LifecycleEvent]:
        """A new stream of the events from now on (closed at once if the hub is)."""
        feed: Feed[LifecycleEvent] = Feed(self.feed_limit, self._feeds.discard)
        if self.closed:
            feed.close()
        else:
            self._feeds.add(feed)
        return feed

    @property
    def streams(self) -> int:
        return len(self._feeds)

    def close(self) -> None:
        """End every stream; later ones end at once."""
        self.closed = True
        for feed in list(self._feeds):
            feed.close()


class LineHub:
    """Backend output lines, per model, to the feeds following that model.
    ``publish`` costs one dict lookup when nobody follows."""

    def __init__(self, feed_limit: int = FEED_LIMIT) -> None:
        self.feed_limit = feed_limit
        self._feeds: dict[str, set[Feed[str]]] = {}
        self.closed = False

    def publish(self, model: str, line: str) -> None:
        feeds = self._feeds.get(model)
        if feeds:
            for feed in list(feeds):
                feed.put(line)

    def feed(self, model: str) -> Feed[str]:
        """A new feed of ``model``'s lines from now on, across its restarts."""

        def forget(feed: Feed[str]) -> None:
            feeds = self._feeds.get(model)
            if feeds is not None:
                feeds.discard(feed)
                if not feeds:
                    del self._feeds[model]

        feed: Feed[str] = Feed(self.feed_limit, forget)
        if self.closed:
            feed.close()
        else:
            self._feeds.setdefault(model, set()).add(feed)
        return feed

    @property
    def streams(self) -> int:
        return sum(len(feeds) for feeds in self._feeds.values())

    def close(self) -> None:
        self.closed = True
        for feeds in list(self._feeds.values()):
            for feed in list(feeds):
                feed.close()


def log_event(event: LifecycleEvent) -> None:
    """The log's subscriber: one line per event, tagged by model."""
    level = logging.INFO
    if event.reason in CRASH_REASONS and event.to_state is ModelState.UNLOADED:
        level = logging.ERROR
    elif event.reason is Reason.COOLDOWN:
        level = logging.WARNING
    if not lifecycle_log.isEnabledFor(level):
        return
    if event.from_state is event.to_state:  # a note, not a change: say just that
        text = f"'{event.model}' {event.to_state}, {event.reason}: {event.detail}"
        lifecycle_log.log(level, "%s", text, extra={"model": event.model, "event": event.public()})
        return
    text = f"'{event.model}' {event.from_state} -> {event.to_state} ({event.reason}"
    text += f": {event.detail})" if event.detail else ")"
    if event.to_state is ModelState.READY:
        text += f" on port {event.port}, pid {event.pid}"
    if event.duration_s is not None and event.to_state in (ModelState.READY, ModelState.UNLOADED):
        text += f" after {event.duration_s:.2f} s"
    lifecycle_log.log(level, "%s", text, extra={"model": event.model, "event": event.public()})
