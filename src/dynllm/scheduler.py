"""Which backends run: admission, single-flight loads, eviction, queueing, idle unload.

The scheduler is the one owner of every model's lifecycle state.  All of its
decisions are taken synchronously (no ``await`` between looking at the state
and changing it), so concurrent requests cannot both decide to start the same
model; the side effects (spawning, stopping) go through the small ``Effects``
interface, which tests replace with a recorded fake.

Model states and their edges (each taken in one place)::

    UNLOADED  -> LOADING     _begin_load      (admitted: VRAM reserved)
    LOADING   -> READY       _start           (backend answered its probe)
    LOADING   -> UNLOADED    _load_done       (start failed, timed out, cancelled,
                                               even before the load task first ran)
    READY     -> UNLOADING   _begin_unload    (evicted, idle, by hand, shutdown)
    READY     -> UNLOADED    _on_exit         (backend died on its own)
    UNLOADING -> UNLOADED    _unload          (process reaped)

Every edge goes through ``_move``, which emits a ``LifecycleEvent`` (model,
from, to, reason, detail, durations; see ``dynllm.events``) to the one
subscriber the scheduler was given (in the app: the ``EventHub``, which feeds
the store, the metrics, the log and the event streams).  A cooldown is
announced the same way, as a note without a change of state.

A model holds VRAM in LOADING, READY and UNLOADING: memory counts as free
only once the process is gone.

A model whose load failed (not one that was cancelled) cools down: further
requests are refused (``CoolingDown``, 503 + Retry-After) until the cooldown
has passed, and it doubles with each failure in a row up to
``load_failure_cooldown_max_seconds``; a load that succeeds resets it.  A
load that fails because the backend ran out of GPU memory while idle models
were loaded (the books were wrong: something else holds VRAM, or an estimate
is low) evicts those idle models and tries once more, never twice.

Cancellation: a client that leaves cancels the task inside ``acquire``.  Every
exit from ``acquire`` (lease, error, cancel at any ``await``) goes through
``_settle``, which takes the request out of the queue, uncounts it from
``pending`` and pumps the queue.  A queued request is skipped by the pump as
soon as its task is cancelled (its turn future is cancelled with it), so it
never causes an eviction or a load.  Loads are shared and shielded: one waiter
leaving never cancels one; a load nobody waits for any more still finishes and
the model idles until the idle job unloads it.  Stops are never cut short
either: whoever waits for one (a load, ``unload``, the idle job, shutdown)
waits without cancelling it, so VRAM is never booked free while a process
still holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from dynllm import ledger
from dynllm.config import Config, ModelConfig
from dynllm.errors import (
    BackendExited,
    BackendStartFailed,
    CoolingDown,
    DynllmError,
    InsufficientVRAM,
    ModelBusy,
    ModelNotFound,
    ModelTooLarge,
    QueueTimeout,
    ShuttingDown,
    Unavailable,
)
from dynllm.events import LifecycleEvent, Reason
from dynllm.events import ModelState as ModelState  # where callers have found it
from dynllm.ports import BACKEND_HOST, PortPool
from dynllm.reload import ReloadPlan

log = logging.getLogger("dynllm.scheduler")

PORT_ATTEMPTS = 3
RETRY_AFTER_SECONDS = 5.0
EXIT_NOTICE_SECONDS = 5.0
"""How long ``replace`` waits for the supervisor to report an exit it has not
reported yet (it first collects the process's last output, up to ~1 s)."""

# What backends print when the GPU (or the host, for its buffers) has no room:
# CUDA/HIP/torch ("CUDA out of memory", "CUDA error: out of memory",
# "cudaMalloc failed: out of memory", torch.OutOfMemoryError), llama.cpp
# ("alloc_tensor_range: failed to allocate CUDA0 buffer", "unable to allocate
# CUDA0 buffer", "ggml_backend_cuda_buffer_type_alloc_buffer: allocating ...
# cudaMalloc failed", Vulkan's ErrorOutOfDeviceMemory) and vLLM ("No available
# memory for the cache blocks", "Free memory on device ... is less than desired
# GPU memory utilization"), and C++'s std::bad_alloc (llama.cpp out of host
# memory: "failed to initialize the context: std::bad_alloc").  llama.cpp's
# "failed to allocate ... pinned memory" is a warning it survives, so it does
# not count.
_OUT_OF_MEMORY = re.compile(
    r"out of memory|outofmemoryerror|erroroutofdevicememory|cudamalloc failed|hipmalloc failed"
    r"|std::bad_alloc"
    r"|(?:failed|unable) to allocate(?!.*pinned memory)"
    r"|no available memory for the cache blocks|less than desired gpu memory utilization",
    re.IGNORECASE,
)


def out_of_memory(lines: Iterable[str]) -> bool:
    """Whether a backend's last output says it ran out of memory.  Pure."""
    return any(_OUT_OF_MEMORY.search(line) for line in lines)


_EDGES: dict[ModelState, frozenset[ModelState]] = {
    ModelState.UNLOADED: frozenset({ModelState.LOADING}),
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.UNLOADED}),
    ModelState.READY: frozenset({ModelState.UNLOADING, ModelState.UNLOADED}),
    ModelState.UNLOADING: frozenset({ModelState.UNLOADED}),
}


class PortTaken(Exception):
    """The backend could not bind its port; the scheduler retries on another."""


class Handle(Protocol):
    """A started backend, as the scheduler sees it."""

    pid: int
    pgid: int
    started_at: float

    @property
    def returncode(self) -> int | None: ...

    def stderr_tail(self, n: int = 20) -> list[str]: ...


class Effects(Protocol):
    async def start(
        self, spec: ModelConfig, port: int, on_exit: Callable[[Handle], None]
    ) -> Handle:
        """Spawn the backend and return once it is ready.  On any failure the
        process is already gone and a DynllmError (or PortTaken) is raised.
        If cancelled, the process is stopped before CancelledError propagates,
        also when the cancel arrives while start is already stopping it after
        a failure (a load timeout): the scheduler books its VRAM and port free
        as soon as start raises.  The scheduler cancels a start at most once.
        A handle is returned only while its exit has not been reported yet:
        ``on_exit`` is ignored until start has returned the handle."""
        ...

    async def stop(self, handle: Handle) -> None:
        """Stop and reap; idempotent."""
        ...

    def logs(self, name: str) -> list[str]:
        """The recent output (stdout and stderr) of the latest backend of
        ``name``, kept after it exited."""
        ...


Emit = Callable[[LifecycleEvent], None]
"""Receives every lifecycle event, inside the transition: must not block."""
Usage = Callable[[str, float | None], None]
"""Receives (model, last_used wall time) from ``flush_usage``."""


@dataclass(eq=False)
class Slot:
    spec: ModelConfig
    state: ModelState = ModelState.UNLOADED
    handle: Handle | None = None
    port: int | None = None
    in_flight: int = 0
    pending: int = 0
    """Requests that waited on the load and have not taken their lease yet."""
    generation: int = 0
    loaded_seq: int = 0
    loaded_at: float | None = None
    last_used: float = 0.0
    last_used_wall: float | None = None
    load_count: int = 0
    last_error: str | None = None
    failures: int = 0
    """Loads that failed in a row (a cancelled one does not count)."""
    cooldown_until: float | None = None
    """No new load before this (scheduler clock), after a failed one."""
    load: asyncio.Future[None] | None = None
    load_task: asyncio.Task[None] | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    since: float | None = None
    """When the model entered its state (scheduler clock); None before its first move."""
    cancel_reason: Reason | None = None
    """Why the current load was cancelled, once it is."""
    next_spec: ModelConfig | None = None
    """A reloaded config changed how its backend starts: the new settings,
    taken once the running backend is idle and stopped."""
    retiring: bool = False
    """A reloaded config removed it: unloaded once idle, then dropped."""
    keep: float | None = None
    """Idle seconds the last finished request asked for (``ttl`` /
    ``keep_alive``; 0: unload at once, inf: never); None: the config's."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def busy(self) -> bool:
        return self.state is not ModelState.READY or self.in_flight > 0 or self.pending > 0


class Lease:
    """A right to send requests to a ready backend, held until the response ends."""

    __slots__ = ("_handle", "_scheduler", "_slot", "generation", "keep", "port", "released", "spec")

    def __init__(self, scheduler: Scheduler, slot: Slot) -> None:
        self._scheduler = scheduler
        self._slot = slot
        self.spec = slot.spec
        self.generation = slot.generation
        assert slot.port is not None and slot.handle is not None
        self.port: int = slot.port
        self._handle: Handle = slot.handle
        self.released = False
        self.keep: float | None = None
        """The idle timeout the request asked for, applied when it ends."""

    @property
    def base_url(self) -> str:
        return f"http://{BACKEND_HOST}:{self.port}"

    @property
    def backend_exited(self) -> bool:
        """Whether the backend this lease points at is gone: its process has
        exited (maybe not yet reported to the scheduler) or was taken away."""
        return self.generation != self._slot.generation or self._handle.returncode is not None

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._scheduler._release(self._slot, self.generation, self.keep)


@dataclass(eq=False, slots=True)
class _Request:
    """One call of ``acquire``: what it is counted in, so that every exit
    (``_settle``) can uncount it."""

    slot: Slot
    reason: Reason = Reason.REQUESTED
    """The reason of a load this request begins."""
    turn: asyncio.Future[None] | None = None
    """While queued for VRAM: resolved by the pump when the request may go
    ahead, cancelled with the request's task (the pump then skips it)."""
    counted: bool = False
    """Counted in ``slot.pending``: waiting for a load, or let through by the pump."""


class Scheduler:
    def __init__(
        self,
        config: Config,
        effects: Effects,
        emit: Emit | None = None,
        *,
        usage: Usage | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.effects = effects
        self.ports = PortPool(config.backend.port_range_start, config.backend.port_range_end)
        self.slots: dict[str, Slot] = {m.name: Slot(m) for m in config.models}
        self._emit: Emit = emit if emit is not None else (lambda event: None)
        self._usage: Usage = usage if usage is not None else (lambda name, at: None)
        self._clock = clock
        self._wall = wall
        self._queue: deque[_Request] = deque()
        self._seq = 0
        self._closing = False
        self._unloads: set[asyncio.Task[None]] = set()
        self._used: set[Slot] = set()
        self._reloading = False
        """Some slot waits to take a reloaded config's settings or to go."""

    def restore(self, rows: dict[str, dict[str, Any]]) -> None:
        """Carry the history a previous run left in the state file (after
        reconciliation): cumulative load counts and the last error."""
        for name, row in rows.items():
            slot = self.slots.get(name)
            if slot is not None:
                slot.load_count = int(row["load_count"])
                slot.last_error = row.get("last_error")

    # ---- transitions -------------------------------------------------------------
    def _move(
        self,
        slot: Slot,
        new: ModelState,
        reason: Reason,
        detail: str | None = None,
        *,
        at: float | None = None,
    ) -> None:
        """The one place a model's state changes; emits the event.  The
        slot's facts (handle, port, load count, last error) are set first."""
        old = slot.state
        if new not in _EDGES[old]:
            raise RuntimeError(f"{slot.name}: illegal transition {old} -> {new}")
        now = self._clock()
        duration = None if slot.since is None else now - slot.since
        slot.state, slot.since = new, now
        self._emit(self._event(slot, old, reason, detail, duration, at))

    def _note(self, slot: Slot, reason: Reason, detail: str) -> None:
        """An event without a change of state (a cooldown began)."""
        self._emit(self._event(slot, slot.state, reason, detail, None, None))

    def _event(
        self,
        slot: Slot,
        old: ModelState,
        reason: Reason,
        detail: str | None,
        duration: float | None,
        at: float | None,
    ) -> LifecycleEvent:
        h = slot.handle
        return LifecycleEvent(
            model=slot.name,
            from_state=old,
            to_state=slot.state,
            reason=reason,
            detail=detail,
            at=self._wall() if at is None else at,
            duration_s=duration,
            pid=h.pid if h else None,
            pgid=h.pgid if h else None,
            proc_started_at=h.started_at if h else None,
            port=slot.port,
            vram_mb=slot.spec.vram_mb,
            load_count=slot.load_count,
            last_error=slot.last_error,
        )

    # ---- admission -----------------------------------------------------------------
    def residents(self) -> list[ledger.Resident]:
        return [
            ledger.Resident(
                name=s.name,
                vram_mb=s.spec.vram_mb,
                loaded_seq=s.loaded_seq,
                last_used=s.last_used,
                busy=s.busy,
                pinned=s.spec.pinned,
            )
            for s in self.slots.values()
            if s.state is not ModelState.UNLOADED
        ]

    def plan(self, slot: Slot) -> ledger.Decision:
        return ledger.plan(
            slot.spec.vram_mb,
            self.config.total_vram_mb,
            self.residents(),
            self.config.eviction_policy,
        )

    async def acquire(self, spec: ModelConfig, reason: Reason = Reason.REQUESTED) -> Lease:
        """A lease on a ready backend for ``spec``, loading it first if needed
        (a load it begins carries ``reason`` in its events).

        Joins a load already in flight; evicts idle models the ledger names;
        waits in FIFO order (up to queue_timeout_seconds) when only busy models
        stand in the way.  Raises a DynllmError when the model cannot be served.

        Cancelling the calling task at any point is safe: the request leaves
        the queue, is uncounted, and the queue moves on; a load it started or
        joined goes on for the others (or, with nobody left, finishes and
        idles).  A lease returned is counted in flight until ``release``."""
        slot = self.slots.get(spec.name)
        if slot is None or slot.retiring:  # removed by a reload meanwhile
            raise ModelNotFound(f"The model '{spec.name}' does not exist")
        request = _Request(slot, reason)
        try:
            return await self._acquire(request)
        finally:
            self._settle(request)

    async def _acquire(self, request: _Request) -> Lease:
        slot = request.slot
        deadline = self._clock() + self.config.queue_timeout_seconds
        while True:
            if self._closing:
                raise ShuttingDown("dynllm is shutting down")
            if slot.state is ModelState.READY:
                return self._lease(request)
            if slot.state is ModelState.LOADING:
                assert slot.load is not None
                self._count(request)  # before the await: nothing evicts it meanwhile
                # Shielded: this request leaving must not cancel a shared load.
                await asyncio.shield(slot.load)
                continue  # READY (or taken away again meanwhile: look afresh)
            self._uncount(request)  # its load is over; the model is not there
            if slot.state is ModelState.UNLOADING:
                await slot.stopped.wait()
                continue
            self._check_cooldown(slot)
            if not self._queue:  # others waiting for VRAM first: no overtaking
                decision = self.plan(slot)
                if not isinstance(decision, ledger.Wait):
                    self._admit(slot, decision, request.reason)
                    continue
            await self._wait_turn(request, deadline)

    async def replace(self, lease: Lease) -> Lease:
        """A lease on a new backend for the model of ``lease`` (released),
        whose backend exited before the request could be sent.

        The scheduler may not have heard of the exit yet (the supervisor first
        collects the process's last output): wait for it (bounded), so the
        model is restarted instead of leased again on the dead backend."""
        slot = lease._slot
        if slot.generation == lease.generation:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXIT_NOTICE_SECONDS):
                    await slot.stopped.wait()
        return await self.acquire(lease.spec)

    def _check_cooldown(self, slot: Slot) -> None:
        """Refuse a new load while the model cools down after failed ones."""
        if slot.cooldown_until is None:
            return
        left = slot.cooldown_until - self._clock()
        if left <= 0:
            return
        raise CoolingDown(
            f"Loading '{slot.name}' failed {slot.failures} time(s) in a row; it is not tried "
            f"again for {math.ceil(left)} s (load_failure_cooldown_seconds). "
            f"Last error: {slot.last_error}",
            retry_after=left,
        )

    def clear_cooldown(self, spec: ModelConfig) -> None:
        """Let the next request try to load ``spec`` at once (an admin who fixed
        the cause); the failure count stays until a load succeeds."""
        self.slots[spec.name].cooldown_until = None

    def _lease(self, request: _Request) -> Lease:
        """Turn the request into a request in flight; no await in between."""
        self._uncount(request)
        request.slot.in_flight += 1
        return Lease(self, request.slot)

    def _count(self, request: _Request) -> None:
        if not request.counted:
            request.counted = True
            request.slot.pending += 1

    def _uncount(self, request: _Request) -> None:
        if request.counted:
            request.counted = False
            request.slot.pending -= 1

    def _settle(self, request: _Request) -> None:
        """The one exit of ``acquire`` (lease, error or cancellation): leave
        the queue, drop the ``pending`` count, let the queue move on.  A model
        nobody waits for any more may be what the queue's head was waiting for."""
        turn, request.turn = request.turn, None
        if turn is not None:
            turn.cancel()  # a served turn stays served (and was popped by the pump)
            if turn.cancelled():  # never served: still queued unless the pump dropped it
                with contextlib.suppress(ValueError):
                    self._queue.remove(request)
        self._uncount(request)
        self._pump()

    def _admit(self, slot: Slot, decision: ledger.Decision, reason: Reason) -> None:
        """Act on a decision that does not wait.  Synchronous on purpose."""
        if isinstance(decision, ledger.Fits):
            self._begin_load(slot, [], reason)
        elif isinstance(decision, ledger.Evict):
            self._begin_load(slot, [self.slots[name] for name in decision.victims], reason)
        elif isinstance(decision, ledger.Impossible):
            if not decision.pinned:  # the budget itself is the reason
                raise ModelTooLarge(
                    f"The model '{slot.name}' {decision.reason}; raise total_vram_mb"
                )
            raise InsufficientVRAM(f"Cannot load '{slot.name}': {decision.reason}")
        else:
            raise AssertionError(decision)

    async def _wait_turn(self, request: _Request, deadline: float) -> None:
        """Queue until the pump lets this request go ahead (or the deadline passes).

        The task awaits the turn future itself (no shield): cancelling the task
        cancels the turn at once, so the pump can no longer act for a request
        that has left, even before its task runs again."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        request.turn = turn
        self._queue.append(request)
        self._pump()
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
            # cancellation that arrives as the awaited future completes.
            async with asyncio.timeout(max(deadline - self._clock(), 0)):
                await turn
        except TimeoutError:
            if turn.cancelled():  # the timeout came first
                raise QueueTimeout(
                    f"The model '{request.slot.name}' needs VRAM held by busy models; gave up "
                    f"after {self.config.queue_timeout_seconds:g} s (queue_timeout_seconds)",
                    retry_after=RETRY_AFTER_SECONDS,
                ) from None
            turn.result()  # served in the same tick the time ran out: go ahead (or raise)

    def _pump(self) -> None:
        """Serve queued requests in arrival order while the head can go ahead.

        A request let through while its model loads (or is ready) is counted in
        ``pending`` right here, before it runs again, so nothing can evict the
        model in between.  A request whose task was cancelled is dropped unseen."""
        if self._reloading:
            self._retire_idle()
        while self._queue and not self._closing:
            head = self._queue[0]
            assert head.turn is not None
            if head.turn.done():
                self._queue.popleft()
                continue
            slot = head.slot
            if slot.state is ModelState.UNLOADED:
                decision = self.plan(slot)
                if isinstance(decision, ledger.Wait):
                    return
                try:
                    self._admit(slot, decision, head.reason)
                except DynllmError as exc:
                    self._queue.popleft()
                    head.turn.set_exception(exc)
                    continue
            self._queue.popleft()
            if slot.state in (ModelState.LOADING, ModelState.READY):
                self._count(head)
            head.turn.set_result(None)

    def _release(self, slot: Slot, generation: int, keep: float | None = None) -> None:
        if generation != slot.generation:
            return  # that backend is gone; its bookkeeping was reset with it
        slot.in_flight -= 1
        slot.last_used = self._clock()
        slot.last_used_wall = self._wall()
        slot.keep = keep  # the idle deadline counts from the end of this request
        self._used.add(slot)  # written by flush_usage(), not per request
        if slot.in_flight == 0:
            self._pump()
            if keep == 0 and _may_unload_idle(slot) and not self._closing:
                self._begin_unload(slot, Reason.IDLE, "its last request asked for keep_alive 0")

    # ---- loading -------------------------------------------------------------------
    def _begin_load(self, slot: Slot, victims: list[Slot], reason: Reason) -> None:
        detail = f"to make room for '{slot.name}'"
        stops = [self._begin_unload(v, Reason.EVICTED, detail) for v in victims]
        loop = asyncio.get_running_loop()
        load: asyncio.Future[None] = loop.create_future()
        slot.load = load
        # Nobody may be waiting (preload, admin load): don't warn about it.
        load.add_done_callback(lambda f: f.cancelled() or f.exception())
        slot.cancel_reason = None
        self._move(slot, ModelState.LOADING, reason)
        task = asyncio.create_task(self._load(slot, stops, reason), name=f"load-{slot.name}")
        slot.load_task = task
        # A done callback, not a try/finally in _load: a task cancelled before
        # its first step never runs its body, and must not leave LOADING behind.
        # Bound to this load's future: by the time the callback runs, the
        # backend may have crashed and a new load of the model begun.
        task.add_done_callback(partial(self._load_done, slot, load))

    def _cancel_load(self, slot: Slot, reason: Reason) -> None:
        """Cancel the model's load, once: a second cancel would cut short the
        stop that the first one started (the process would still run while
        its VRAM and port are booked free)."""
        task = slot.load_task
        if task is not None and not task.cancelling():
            slot.cancel_reason = reason
            task.cancel()

    async def _load(self, slot: Slot, stops: list[asyncio.Task[None]], reason: Reason) -> None:
        """Stop the victims, then start the backend; ``reason``: why the load
        began (its READY event carries it)."""
        await _wait_stops(stops)
        try:
            await self._start(slot, reason)
        except BackendExited as exc:
            victims = self._oom_victims(slot, exc)
            if not victims:
                raise
            names = ", ".join(f"'{v.name}'" for v in victims)
            log.warning(
                "'%s' ran out of GPU memory while loading; unloading idle %s and trying once more",
                slot.name,
                names,
            )
            detail = f"'{slot.name}' ran out of GPU memory while loading"
            await _wait_stops([self._begin_unload(v, Reason.EVICTED, detail) for v in victims])
            await self._start(slot, reason)  # once: a second failure is a failure

    def _oom_victims(self, slot: Slot, exc: BackendExited) -> list[Slot]:
        """The idle models to evict before retrying a load that ran out of
        memory: every idle, unpinned one (the books were wrong, so not just
        as many as the books say).  None: not out of memory, or nothing idle."""
        if not out_of_memory(exc.stderr_tail) and not out_of_memory(self.effects.logs(slot.name)):
            return []
        names = ledger.idle_unpinned(self.residents())
        return [self.slots[name] for name in names if name != slot.name]

    def _load_done(self, slot: Slot, load: asyncio.Future[None], task: asyncio.Task[None]) -> None:
        """Resolve the load's shared future from how its task ended."""
        assert not load.done()
        if slot.load_task is task:
            slot.load_task = None
        result: BaseException | None
        if task.cancelled():
            result = Unavailable(f"loading '{slot.name}' was cancelled")
        else:
            exc = task.exception()
            if exc is None or isinstance(exc, DynllmError):
                result = exc
            else:
                log.error("unexpected error while loading '%s'", slot.name, exc_info=exc)
                result = BackendStartFailed(
                    f"loading '{slot.name}' failed unexpectedly; see dynllm's log"
                )
        if result is None:
            load.set_result(None)
        else:
            # A failed load ends in LOADING (only this callback leaves it then).
            slot.last_error = str(result)
            if task.cancelled():
                reason = slot.cancel_reason or Reason.LOAD_FAILED  # (only _cancel_load cancels)
                self._move(slot, ModelState.UNLOADED, reason, slot.last_error)
            else:
                cooldown = self._cool_down(slot)
                self._move(slot, ModelState.UNLOADED, Reason.LOAD_FAILED, slot.last_error)
                if cooldown is not None:
                    self._note(slot, Reason.COOLDOWN, cooldown)
            load.set_exception(result)
        self._pump()

    def _cool_down(self, slot: Slot) -> str | None:
        """One more failure in a row: no new load before the cooldown, which
        doubles per failure up to the maximum (0: no cooldown).  What to say
        about it, or None when there is none."""
        slot.failures += 1
        first = self.config.load_failure_cooldown_seconds
        if first <= 0:
            return None
        cap = self.config.load_failure_cooldown_max_seconds
        seconds = min(first * 2 ** min(slot.failures - 1, 62), cap)
        slot.cooldown_until = self._clock() + seconds
        return f"failed to load {slot.failures} time(s) in a row; not tried again for {seconds:g} s"

    async def _start(self, slot: Slot, reason: Reason) -> None:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = self.ports.lease()
            try:
                handle = await self.effects.start(slot.spec, port, partial(self._on_exit, slot))
            except PortTaken:
                log.warning("'%s' could not bind port %d (try %d)", slot.name, port, attempt)
                self.ports.quarantine(port)
                continue
            except BaseException:
                self.ports.release(port)
                raise
            self._seq += 1
            now_wall = self._wall()
            slot.handle, slot.port = handle, port
            slot.generation += 1
            slot.loaded_seq = self._seq
            slot.loaded_at = now_wall
            slot.last_used, slot.last_used_wall = self._clock(), now_wall
            slot.load_count += 1
            slot.last_error = None
            slot.failures, slot.cooldown_until = 0, None
            slot.stopped = asyncio.Event()
            self._move(slot, ModelState.READY, reason, at=now_wall)
            return
        raise BackendStartFailed(
            f"backend for '{slot.name}' could not bind a port after {PORT_ATTEMPTS} tries"
        )

    # ---- unloading -----------------------------------------------------------------
    def _begin_unload(
        self, slot: Slot, reason: Reason, detail: str | None = None
    ) -> asyncio.Task[None]:
        assert slot.handle is not None
        self._move(slot, ModelState.UNLOADING, reason, detail)
        task = asyncio.create_task(
            self._unload(slot, slot.handle, reason, detail), name=f"unload-{slot.name}"
        )
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)
        return task

    async def _unload(self, slot: Slot, handle: Handle, reason: Reason, detail: str | None) -> None:
        try:
            await self.effects.stop(handle)
        finally:
            self._backend_gone(slot, reason, detail)

    def _backend_gone(self, slot: Slot, reason: Reason, detail: str | None) -> None:
        """The process is gone: free its port and VRAM, wake whoever waits."""
        if slot.port is not None:
            self.ports.release(slot.port)
        slot.handle, slot.port = None, None
        slot.generation += 1
        slot.in_flight = 0
        slot.keep = None  # a request's ttl lasts as long as the backend it was sent to
        self._move(slot, ModelState.UNLOADED, reason, detail)
        slot.stopped.set()
        self._pump()

    def _on_exit(self, slot: Slot, handle: Handle) -> None:
        """The process is gone.  Only a death nobody asked for is handled here."""
        # A stop we asked for runs in UNLOADING (or LOADING, for a failed start).
        if handle is not slot.handle or slot.state is not ModelState.READY:
            return
        tail = " | ".join(handle.stderr_tail(5))
        slot.last_error = f"backend exited unexpectedly with code {handle.returncode}: {tail}"
        self._backend_gone(slot, Reason.CRASHED, slot.last_error)

    # ---- reload ------------------------------------------------------------------
    def reconfigure(self, config: Config, plan: ReloadPlan) -> None:
        """Apply a reloaded config (what changed: ``reload.plan_reload``).

        Global settings (budget, policy, timeouts) apply at once; new models
        appear; models whose process stays the same take their new settings at
        once; changed models keep serving on their running backend and restart
        with the new settings once idle; removed models unload once idle and
        go.  Synchronous: no request sees half of it."""
        self.config = config
        specs = {m.name: m for m in config.models}
        for name in plan.added:
            slot = self.slots.get(name)
            if slot is None:
                self.slots[name] = Slot(specs[name])
                continue
            # Removed earlier and back before its backend stopped (a file
            # replaced between two scans): the same slot, so its running
            # process stays booked; restarted once idle if it starts differently.
            slot.retiring = False
            if slot.spec != specs[name]:
                slot.next_spec = specs[name]
        for name in plan.updated:
            self.slots[name].spec = specs[name]
        for name in plan.changed:
            self.slots[name].next_spec = specs[name]
        for name in plan.removed:
            self.slots[name].retiring = True
        # Slots an earlier reconfigure left waiting to retire still wait.
        self._reloading = self._reloading or bool(plan.changed or plan.removed or plan.added)
        self._pump()

    def _retire_idle(self) -> None:
        """Take reloaded settings and drop removed models where nothing runs
        or waits; stop the idle backends that stand in the way."""
        still = False
        for slot in list(self.slots.values()):
            if slot.next_spec is None and not slot.retiring:
                continue
            idle = not slot.in_flight and not self.waiting(slot)
            if slot.state is ModelState.UNLOADED and (idle or not slot.retiring):
                if slot.retiring:
                    del self.slots[slot.name]
                    self._note(slot, Reason.RELOAD, "removed from the config")
                    continue
                assert slot.next_spec is not None
                slot.spec, slot.next_spec = slot.next_spec, None  # no process: at once
                continue
            still = True
            if slot.state is ModelState.READY and idle:
                why = "removed from the config" if slot.retiring else "its settings changed"
                self._begin_unload(slot, Reason.RELOAD, why)
        self._reloading = still

    def waiting(self, slot: Slot) -> int:
        """Requests waiting for ``slot``: joined to its load, let through by the
        pump and not yet leased, or queued for VRAM to load it."""
        queued = sum(
            1 for r in self._queue if r.slot is slot and r.turn is not None and not r.turn.done()
        )
        return slot.pending + queued

    async def unload(
        self, spec: ModelConfig, *, force: bool = False, reason: Reason = Reason.ADMIN
    ) -> bool:
        """Unload by hand (or for ``reason``).  A model serving or awaited by
        requests is refused (ModelBusy) unless ``force``.  Returns whether
        anything was running.

        The decision is taken before the first await; cancelling the caller
        afterwards does not cut the stop (or the cancelled load) short."""
        slot = self.slots[spec.name]
        if slot.state is ModelState.UNLOADED:
            return False
        if slot.state is ModelState.UNLOADING:
            await slot.stopped.wait()
            return True
        waiting = self.waiting(slot)
        if (slot.in_flight or waiting) and not force:
            raise ModelBusy(
                f"The model '{slot.name}' is serving {slot.in_flight} request(s) and "
                f"{waiting} more wait for it; retry later or send "
                '{"force": true} to stop it anyway'
            )
        if slot.state is ModelState.LOADING:
            assert slot.load is not None
            self._cancel_load(slot, reason)
            with contextlib.suppress(DynllmError):
                await asyncio.shield(slot.load)
            return True
        await asyncio.shield(self._begin_unload(slot, reason))
        return True

    def flush_usage(self) -> None:
        """Persist ``last_used`` of models used since the last call.  Called by
        the periodic job: one write per model per period instead of one per
        request keeps SQLite (and its thread) off the hot path."""
        for slot in self._used:
            self._usage(slot.name, slot.last_used_wall)
        self._used.clear()

    def idle_victims(self) -> list[Slot]:
        now = self._clock()
        return [
            s
            for s in self.slots.values()
            if _may_unload_idle(s)
            and not math.isinf(timeout := self.unload_after(s))
            and now - s.last_used >= timeout
        ]

    def unload_after(self, slot: Slot) -> float:
        """Idle seconds before ``slot`` unloads: what its last request asked
        for, else its config's."""
        return slot.keep if slot.keep is not None else self.config.unload_after(slot.spec)

    async def unload_idle(self) -> list[str]:
        self.flush_usage()
        victims = self.idle_victims()
        tasks = [
            self._begin_unload(s, Reason.IDLE, f"unused for {self.unload_after(s):g} s")
            for s in victims
        ]
        if tasks:
            await asyncio.shield(asyncio.gather(*tasks))  # never cut a stop short
        return [s.name for s in victims]

    async def shutdown(self) -> None:
        self._closing = True
        self.flush_usage()
        while self._queue:
            turn = self._queue.popleft().turn
            if turn is not None and not turn.done():
                turn.set_exception(ShuttingDown("dynllm is shutting down"))
        loads = [s.load_task for s in self.slots.values() if s.load_task is not None]
        for slot in self.slots.values():
            self._cancel_load(slot, Reason.SHUTDOWN)
        await asyncio.gather(*loads, return_exceptions=True)
        for slot in self.slots.values():
            if slot.state is ModelState.READY:
                self._begin_unload(slot, Reason.SHUTDOWN)
        if self._unloads:
            await asyncio.wait(list(self._unloads))  # waits without cancelling them

    # ---- views ----------------------------------------------------------------------
    def snapshot(self, slot: Slot) -> dict[str, Any]:
        h = slot.handle
        cooldown_until = None  # wall-clock time, like last_used
        if slot.cooldown_until is not None and (left := slot.cooldown_until - self._clock()) > 0:
            cooldown_until = self._wall() + left
        return {
            "status": slot.state.value,
            "port": slot.port,
            "pid": h.pid if h else None,
            "vram_mb": slot.spec.vram_mb,
            "loaded_at": slot.loaded_at if h else None,
            "last_used": slot.last_used_wall,
            "in_flight": slot.in_flight,
            "load_count": slot.load_count,
            "last_error": slot.last_error,
            "consecutive_failures": slot.failures,
            "cooldown_until": cooldown_until,
            "pinned": slot.spec.pinned,
            "unload_after_seconds": _json_seconds(self.unload_after(slot)),
        }

    def queue_length(self) -> int:
        return len(self._queue)

    def used_vram_mb(self) -> int:
        return ledger.used_mb(self.residents())


def _may_unload_idle(slot: Slot) -> bool:
    """Ready, nothing in flight or waiting, and not pinned (pinned models
    are only unloaded by hand)."""
    return slot.state is ModelState.READY and not slot.busy and not slot.spec.pinned


async def _wait_stops(stops: list[asyncio.Task[None]]) -> None:
    """Wait for evictions without cancelling them if the waiter is cancelled:
    a stop cut short would free VRAM a process still holds."""
    if stops:
        await asyncio.wait(stops)
        errors = [e for e in (stop.exception() for stop in stops) if e is not None]
        if errors:
            raise errors[0]


def _json_seconds(value: float) -> float | None:
    return None if math.isinf(value) else value
