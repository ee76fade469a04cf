"""Per-model admission: ``max_concurrent_requests`` and ``max_queued_requests``.

A model with ``max_concurrent_requests: N`` serves at most N requests at once
(counted from admission until the response ends, its load included); the
next ones wait here in arrival order, up to ``max_queued_requests`` of them
(no bound when unset).  One more is refused at once with 429
``too_many_requests`` and ``Retry-After``, before its body reaches a backend
or any load starts: a client that can retry learns it in a millisecond
instead of after a queue timeout.  A request that waits here longer than
``queue_timeout_seconds`` gets 503 ``queue_timeout``, as in the scheduler's
queue.

``max_queued_requests`` bounds the wait for a concurrency slot, so it has an
effect only together with ``max_concurrent_requests``.

A model without a ``max_concurrent_requests`` never reaches this module: the
dispatcher checks the spec first, so the common path costs one attribute
read.

Every exit releases what it took: a request that leaves while it waits (its
client disconnected) is taken out of the line; one that was handed a slot in
the same tick it was cancelled hands the slot on.  ``Gate.enter`` and
``Gate.leave`` are the only two operations, and ``leave`` is called exactly
once per successful ``enter`` (the dispatcher's ``finally``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING

from dynllm.config import ModelConfig
from dynllm.errors import QueueTimeout, TooManyRequests

if TYPE_CHECKING:
    from dynllm.scheduler import Scheduler, Slot

RETRY_AFTER_SECONDS = 1.0
"""What a refused client is told to wait: requests to one model usually end
within seconds, so a short retry is the useful hint."""


class Gate:
    """The admission line of one model."""

    __slots__ = ("active", "name", "waiters")

    def __init__(self, name: str) -> None:
        self.name = name
        self.active = 0
        """Requests admitted and not finished."""
        self.waiters: deque[asyncio.Future[None]] = deque()
        """Requests waiting for a slot, in arrival order (only live ones: a
        request that leaves takes itself out)."""

    @property
    def waiting(self) -> int:
        return len(self.waiters)

    async def enter(self, limit: int, queue_limit: int | None, timeout: float) -> None:
        """Return once the request may go ahead (``leave`` must follow);
        raise ``TooManyRequests`` at once when the line is full, or
        ``QueueTimeout`` after ``timeout`` seconds in line."""
        if self.active < limit and not self.waiters:  # nobody overtakes the line
            self.active += 1
            return
        if queue_limit is not None and len(self.waiters) >= queue_limit:
            raise TooManyRequests(
                f"The model '{self.name}' is serving {self.active} request(s) "
                f"(max_concurrent_requests: {limit}) and {len(self.waiters)} more wait "
                f"(max_queued_requests: {queue_limit}); retry shortly",
                retry_after=RETRY_AFTER_SECONDS,
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(turn)
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
            # cancellation that arrives as the awaited future completes.
            async with asyncio.timeout(timeout):
                await turn
        except TimeoutError:
            if turn.cancelled():  # the timeout came first
                raise QueueTimeout(
                    f"The model '{self.name}' is serving {limit} request(s) "
                    f"(max_concurrent_requests); gave up waiting after {timeout:g} s "
                    "(queue_timeout_seconds)",
                    retry_after=RETRY_AFTER_SECONDS,
                ) from None
            # handed a slot in the same tick the time ran out: go ahead
        except BaseException:  # cancelled: the client left
            if turn.done() and not turn.cancelled():
                self.leave()  # handed a slot just as it left: pass it on
            raise
        finally:
            if turn.cancelled():  # never served: out of the line
                with contextlib.suppress(ValueError):
                    self.waiters.remove(turn)

    def leave(self) -> None:
        """A finished request's slot goes to the first in line, or is freed."""
        while self.waiters:
            turn = self.waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot changes hands: active stays
                return
        self.active -= 1


class Admission:
    """The gates of all models, made on first use."""

    __slots__ = ("gates",)

    def __init__(self) -> None:
        self.gates: dict[str, Gate] = {}

    def gate(self, spec: ModelConfig) -> Gate:
        gate = self.gates.get(spec.name)
        if gate is None:
            gate = self.gates[spec.name] = Gate(spec.name)
        return gate

    def waiting(self, name: str) -> int:
        """Requests waiting for a concurrency slot of ``name``."""
        gate = self.gates.get(name)
        return 0 if gate is None else gate.waiting


def queued(scheduler: Scheduler, admission: Admission, slot: Slot) -> int:
    """Requests waiting for ``slot``'s model, wherever they wait: for its load
    or for VRAM (the scheduler), or for a max_concurrent_requests slot (here).
    The one definition of "queued" for /admin/models and /metrics."""
    return scheduler.waiting(slot) + admission.waiting(slot.spec.name)
