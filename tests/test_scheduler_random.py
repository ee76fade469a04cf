"""Thousands of random interleavings of everything that touches the scheduler.

A seeded random walk (one test per seed; the seed is in the test id, and a
failure prints the last steps) drives the scheduler through requests (some
cancelled at whatever ``await`` they have reached, some holding their lease
for a while), admin loads and unloads (forced or not, some callers
cancelled), idle checks, crashes of starting, ready and stopping backends,
load failures (plain, out-of-memory, timeouts, a taken port) and, at the end,
shutdown.  Between two actions the loop runs 0 to 3 times (sometimes until
nothing moves), so actions land inside every window between two steps of
the scheduler's tasks.

The fake effects (``World``) know the truth the scheduler only believes: a
process is alive from its spawn until it exits (crash, failed start, or a
stop that completed), and the scheduler hears of an exit only when the walk
delivers it, as the real supervisor reports it only after collecting the
process's last output.  Starts and stops take "virtual time": each waits for
the walk to open its gate.  Like the real launcher, a cancelled start stops
its process (shielded) before the cancellation propagates.

Checked after every step, and at every spawn and every state transition:

* the VRAM of the processes alive never exceeds the budget;
* a model the scheduler books as unloaded has no process alive, and a
  process alive keeps its port leased (VRAM and ports are free only once the
  process is gone), so the books never say less than what is alive;
* no model ever has two processes alive.

At quiescence (every lease released, every gate opened, every exit
delivered), and again after shutdown: every counter is back to zero
(in flight, pending, queued, waiting, loads, unloads) and the books equal
the processes alive, model by model, port by port.

Deterministic: no real time is involved (the queue timeout is far beyond the
walk's real duration; the scheduler's clock is the walk's).
``DYNLLM_RANDOM_SEEDS=N`` runs N seeds instead of the default.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from dynllm.config import ModelConfig, parse_config
from dynllm.errors import (
    BackendError,
    BackendExited,
    LoadTimeout,
    ModelBusy,
    Unavailable,
)
from dynllm.events import LifecycleEvent
from dynllm.launcher import run_to_the_end
from dynllm.scheduler import Handle, Lease, ModelState, PortTaken, Scheduler
from tests.support.net import free_port_range

BUDGET_MB = 8000
MODELS: list[dict[str, Any]] = [
    {"name": "A", "vram_mb": 3000},
    {"name": "B", "vram_mb": 3000, "unload_time": 20},
    {"name": "C", "vram_mb": 5000},
    {"name": "D", "vram_mb": 2000},
    {"name": "P", "vram_mb": 1000, "pinned": True},
    {"name": "Z", "vram_mb": 0},
]
STEPS = 300
SEEDS = int(os.environ.get("DYNLLM_RANDOM_SEEDS", "40"))
OOM_LINE = "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: " + (
    "cudaMalloc failed: out of memory"
)
# What acquire may answer besides a lease.  Anything else is a bug.
EXPECTED = (
    BackendError,  # load failures (BackendExited, BackendStartFailed)
    LoadTimeout,
    Unavailable,  # a cancelled load, ShuttingDown, CoolingDown, QueueTimeout
)


# ---- the fake world ---------------------------------------------------------------------


@dataclass(eq=False)
class Proc:
    """One fake backend process."""

    name: str
    vram_mb: int
    port: int
    on_exit: Callable[[Handle], None]
    pid: int
    pgid: int
    started_at: float = 0.0
    alive: bool = True
    returncode: int | None = None
    output: list[str] = field(default_factory=list)
    reported: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once its exit was reported to the scheduler (``on_exit`` called)."""
    ready: asyncio.Future[str] | None = None
    """While starting: resolved by the walk with how the start ends."""
    exit_gate: asyncio.Future[None] | None = None
    """While being stopped: resolved by the walk when it exits."""
    stopping: asyncio.Task[None] | None = None

    def stderr_tail(self, n: int = 20) -> list[str]:
        return self.output[-n:]


class World:
    """The scheduler's effects, and the truth about which processes live."""

    def __init__(self, check: Callable[[str], None]) -> None:
        self.procs: list[Proc] = []
        self.unreported: list[Proc] = []
        self._pids = itertools.count(1000)
        self._check = check

    def alive(self) -> list[Proc]:
        return [p for p in self.procs if p.alive]

    def alive_mb(self) -> int:
        return sum(p.vram_mb for p in self.alive())

    def starting(self) -> list[Proc]:
        return [p for p in self.procs if p.ready is not None and not p.ready.done()]

    def exiting(self) -> list[Proc]:
        return [p for p in self.procs if p.exit_gate is not None and not p.exit_gate.done()]

    def kill(self, proc: Proc, code: int) -> None:
        """The process is gone now; the scheduler hears of it only once reported."""
        if not proc.alive:
            return
        proc.alive = False
        proc.returncode = code
        self.unreported.append(proc)
        for gate in (proc.ready, proc.exit_gate):
            if gate is not None and not gate.done():
                gate.set_result("died")  # type: ignore[arg-type]

    def report(self, proc: Proc) -> None:
        """The supervisor reaped it and read its last output: tell the scheduler."""
        self.unreported.remove(proc)
        proc.reported.set()
        proc.on_exit(proc)

    async def start(
        self, spec: ModelConfig, port: int, on_exit: Callable[[Handle], None]
    ) -> Handle:
        pid = next(self._pids)
        proc = Proc(spec.name, spec.vram_mb, port, on_exit, pid=pid, pgid=pid)
        self.procs.append(proc)
        self._check(f"spawn of {spec.name}")
        proc.ready = asyncio.get_running_loop().create_future()
        try:
            outcome = await proc.ready
        except asyncio.CancelledError:
            # As the launcher does: the process is stopped before the cancel
            # propagates (a second cancel would cut this short: the scheduler
            # must never send one).
            await asyncio.shield(self.stop(proc))
            raise
        if outcome == "ready" and not proc.reported.is_set():
            # As the launcher: a process whose exit was already reported is not
            # returned (its readiness probe sees the exit); one that died but
            # is not reported yet is, and its report comes later.
            return proc
        if outcome == "timeout":  # stop it, then report; a cancel meanwhile waits for the stop
            await run_to_the_end(self.stop(proc))
            raise LoadTimeout(f"backend for '{spec.name}' was not ready in time")
        if proc.alive:  # it fails on its own: prints its last words, exits
            proc.output.append(OOM_LINE if outcome == "oom" else "error: cannot open model file")
            self.kill(proc, 1)
        await proc.reported.wait()
        if outcome == "port":
            raise PortTaken(port)
        raise BackendExited(
            f"backend for '{spec.name}' exited with code {proc.returncode} while loading",
            exit_code=proc.returncode,
            stderr_tail=proc.stderr_tail(),
        )

    def logs(self, name: str) -> list[str]:
        procs = [p for p in self.procs if p.name == name]
        return procs[-1].output if procs else []

    async def stop(self, handle: Handle) -> None:
        """Idempotent; concurrent callers share one stop, which is never cut short."""
        assert isinstance(handle, Proc)
        if handle.stopping is None:
            handle.stopping = asyncio.create_task(self._stop(handle))
        await asyncio.shield(handle.stopping)

    async def _stop(self, proc: Proc) -> None:
        if proc.alive:
            proc.exit_gate = asyncio.get_running_loop().create_future()
            await proc.exit_gate  # SIGTERM sent: it exits when the walk says (or dies first)
            self.kill(proc, 0)
        await proc.reported.wait()


# ---- the walk -----------------------------------------------------------------------------


async def run_once(times: int) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


class Walk:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.trace: list[str] = []
        self.violations: list[str] = []
        self.now = 1000.0
        start, end = free_port_range(30)
        config = parse_config(
            {
                "total_vram_mb": BUDGET_MB,
                "queue_timeout_seconds": 25,  # whole clock steps of 10 s: never a real wait
                "idle_timeout_seconds": 30,
                "load_failure_cooldown_seconds": 10,
                "load_failure_cooldown_max_seconds": 40,
                "backend": {"port_range_start": start, "port_range_end": end},
                "models": [
                    {"path": f"/models/{m['name']}.gguf", "backend": "llamacpp", **m}
                    for m in MODELS
                ],
            }
        )
        self.world = World(self.check)
        self.s = Scheduler(
            config, self.world, self.on_event, clock=lambda: self.now, wall=lambda: self.now
        )
        self.specs = [self.s.slots[m["name"]].spec for m in MODELS]
        self.requests: list[asyncio.Task[Lease]] = []
        self.leases: list[Lease] = []
        self.admin: list[asyncio.Task[Any]] = []
        self.stats: Counter[str] = Counter()

    # ---- checks
    def fail(self, what: str) -> None:
        self.violations.append(f"{what}\n  last steps: " + " | ".join(self.trace[-25:]))

    def on_event(self, event: LifecycleEvent) -> None:
        self.check(f"{event.model} -> {event.to_state}")

    def check(self, where: str) -> None:
        """What must hold at every moment."""
        alive = self.world.alive()
        if (mb := sum(p.vram_mb for p in alive)) > BUDGET_MB:
            self.fail(f"at {where}: {mb} MB alive > {BUDGET_MB} MB budget ({alive_names(alive)})")
        seen: set[str] = set()
        for proc in alive:
            if proc.name in seen:
                self.fail(f"at {where}: two processes of {proc.name} alive")
            seen.add(proc.name)
            slot = self.s.slots[proc.name]
            if slot.state is ModelState.UNLOADED:
                self.fail(f"at {where}: {proc.name} booked unloaded, its pid {proc.pid} alive")
            if proc.port not in self.s.ports.leased:
                self.fail(f"at {where}: port {proc.port} of live {proc.name} back in the pool")
        if self.s.used_vram_mb() < self.world.alive_mb():
            self.fail(f"at {where}: books {self.s.used_vram_mb()} MB < alive")

    def check_quiet(self, where: str) -> None:
        """What must hold once nothing moves: every count back to zero, books = truth."""
        s = self.s
        if s.queue_length():
            self.fail(f"{where}: {s.queue_length()} still queued")
        if s._unloads:
            self.fail(f"{where}: unloads still running")
        alive = self.world.alive()
        for slot in s.slots.values():
            name = slot.name
            counts = (slot.in_flight, slot.pending, s.waiting(slot))
            if counts != (0, 0, 0):
                self.fail(f"{where}: {name} in_flight/pending/waiting = {counts}")
            if slot.load_task is not None or (slot.load is not None and not slot.load.done()):
                self.fail(f"{where}: {name} still has a load")
            procs = [p for p in alive if p.name == name]
            if slot.state is ModelState.READY:
                if procs != [slot.handle]:  # exactly its own process (identity: eq=False)
                    self.fail(f"{where}: {name} READY but its processes alive are {procs}")
            elif slot.state is ModelState.UNLOADED:
                if procs or slot.handle is not None or slot.port is not None:
                    self.fail(f"{where}: {name} UNLOADED but {procs} / {slot.handle}")
            else:
                self.fail(f"{where}: {name} still {slot.state}")
        if s.used_vram_mb() != self.world.alive_mb():
            self.fail(f"{where}: books {s.used_vram_mb()} MB, alive {self.world.alive_mb()} MB")
        ready_ports = {sl.port for sl in s.slots.values() if sl.state is ModelState.READY}
        if s.ports.leased != ready_ports:
            self.fail(f"{where}: ports leased {set(s.ports.leased)} != ready {ready_ports}")

    def harvest(self) -> None:
        """Collect finished requests and admin calls; anything unexpected is a bug."""
        for task in [t for t in self.requests if t.done()]:
            self.requests.remove(task)
            if task.cancelled():
                continue
            exc = task.exception()
            if exc is None:
                self.leases.append(task.result())
                self.stats["leases"] += 1
            elif not isinstance(exc, EXPECTED):
                self.fail(f"acquire raised {exc!r}")
            else:
                self.stats[type(exc).__name__] += 1
        for task in [t for t in self.admin if t.done()]:
            self.admin.remove(task)
            if task.cancelled():
                continue
            exc = task.exception()
            if exc is not None and not isinstance(exc, ModelBusy):
                self.fail(f"{task.get_name()} raised {exc!r}")

    def evicting(self, name: str) -> bool:
        """``name`` is loading and waits for its victims' stops (not started yet)."""
        slot = self.s.slots[name]
        return (
            slot.state is ModelState.LOADING
            and not any(p.name == name for p in self.world.starting())
            and any(sl.state is ModelState.UNLOADING for sl in self.s.slots.values())
        )

    # ---- actions
    def pick(self, items: list[Any]) -> Any:
        return items[self.rng.randrange(len(items))] if items else None

    def act(self) -> None:
        rng, s, world = self.rng, self.s, self.world
        roll = rng.random()
        if roll < 0.25:
            spec = self.pick(self.specs)
            self.trace.append(f"acquire {spec.name}")
            self.requests.append(asyncio.create_task(s.acquire(spec)))
        elif roll < 0.35:
            if lease := self.pick(self.leases):
                self.leases.remove(lease)
                self.trace.append(f"release {lease.spec.name}")
                lease.release()
        elif roll < 0.41:
            if task := self.pick([t for t in self.requests if not t.done()]):
                self.trace.append("cancel a request")
                task.cancel()
        elif roll < 0.61:
            if proc := self.pick(world.starting()):
                outcome = rng.choices(
                    ["ready", "fail", "oom", "timeout", "port"], [70, 10, 10, 5, 5]
                )[0]
                self.trace.append(f"start of {proc.name}: {outcome}")
                assert proc.ready is not None
                proc.ready.set_result(outcome)
        elif roll < 0.73:
            if proc := self.pick(world.exiting()):
                self.trace.append(f"{proc.name} exits on SIGTERM")
                assert proc.exit_gate is not None
                proc.exit_gate.set_result(None)
        elif roll < 0.83:
            if proc := self.pick(world.unreported):
                self.trace.append(f"exit of {proc.name} pid {proc.pid} reported")
                world.report(proc)
        elif roll < 0.87:
            if proc := self.pick(world.alive()):
                at_once = rng.random() < 0.5
                self.trace.append(f"crash {proc.name} pid {proc.pid}{' reported' * at_once}")
                world.kill(proc, -9)
                if at_once:
                    world.report(proc)
        elif roll < 0.89:
            # A request finds its backend dead before sending (dispatch's crash race).
            if lease := self.pick([x for x in self.leases if x.backend_exited]):
                self.leases.remove(lease)
                self.trace.append(f"replace {lease.spec.name}")
                lease.release()
                self.requests.append(asyncio.create_task(s.replace(lease)))
                self.stats["replace"] += 1
        elif roll < 0.92:
            spec = self.pick(self.specs)
            force = rng.random() < 0.5
            self.trace.append(f"unload {spec.name} force={force}")
            if self.evicting(spec.name):
                self.stats["unload of a load that evicts"] += 1
            self.admin.append(asyncio.create_task(s.unload(spec, force=force), name="unload"))
        elif roll < 0.94:
            if task := self.pick([t for t in self.admin if not t.done()]):
                self.trace.append(f"cancel an admin {task.get_name()}")
                task.cancel()
        elif roll < 0.98:
            self.now += 10
            self.trace.append("idle check")
            self.admin.append(asyncio.create_task(s.unload_idle(), name="unload_idle"))
        else:
            self.now += 10
            self.trace.append("clock +10 s")

    async def step(self) -> None:
        self.act()
        # Let the tasks run 0-3 loop iterations (sometimes until still), so the
        # next action lands between any two steps of the scheduler's tasks.
        await run_once(self.rng.choice([0, 1, 1, 2, 3, 30]))
        self.harvest()
        self.check(f"step {len(self.trace)}")

    async def drain(self, where: str) -> None:
        """Release every lease, answer every gate, report every exit, until still."""
        for _ in range(200):
            self.harvest()
            busy = bool(
                self.requests
                or self.admin
                or self.leases
                or self.world.starting()
                or self.world.exiting()
                or self.world.unreported
                or self.s._unloads
                or any(sl.load_task for sl in self.s.slots.values())
            )
            if not busy:
                break
            for lease in self.leases:
                lease.release()
            self.leases.clear()
            for proc in self.world.starting():
                assert proc.ready is not None
                proc.ready.set_result("ready")
            for proc in self.world.exiting():
                assert proc.exit_gate is not None
                proc.exit_gate.set_result(None)
            for proc in list(self.world.unreported):
                self.world.report(proc)
            await run_once(30)
            self.check(f"{where} (draining)")
        else:
            self.fail(f"{where}: nothing settles")
        self.check_quiet(where)

    async def run(self, steps: int) -> None:
        for n in range(steps):
            await self.step()
            if n % 100 == 99:
                await self.drain(f"quiescence after step {n + 1}")
            if self.violations:
                return
        if self.rng.random() < 0.5:
            await self.drain("quiescence before shutdown")
        else:  # often leaves a load waiting for its evictions at shutdown
            for lease in self.leases:
                lease.release()
            self.leases.clear()
            for _ in range(3):
                spec = self.pick(self.specs)
                self.trace.append(f"acquire {spec.name}")
                self.requests.append(asyncio.create_task(self.s.acquire(spec)))
                await run_once(self.rng.choice([0, 1, 2]))
        self.trace.append("shutdown")
        self.stats["shutdown while a load evicts"] += any(map(self.evicting, self.s.slots))
        closing = asyncio.create_task(self.s.shutdown())
        for _ in range(20):  # the world goes on while dynllm stops
            await self.step()
        self.admin.append(closing)
        await self.drain("after shutdown")
        if self.world.alive() or self.s.used_vram_mb():
            self.fail("after shutdown: processes alive or VRAM booked")

    async def teardown(self) -> None:
        """Whatever happened (a violation ends the walk early): no task left
        waiting on the fake world, so the test's loop closes."""
        for task in self.requests + self.admin:
            task.cancel()
        for _ in range(10):
            for proc in self.world.alive():
                self.world.kill(proc, -9)
            for proc in list(self.world.unreported):
                self.world.report(proc)
            await run_once(10)


def alive_names(procs: list[Proc]) -> str:
    return ", ".join(f"{p.name}:{p.vram_mb}" for p in procs)


class _Watch(logging.Handler):
    """An error logged with a traceback is a bug; OOM retries are counted."""

    def __init__(self, walk: Walk) -> None:
        super().__init__(logging.WARNING)
        self.walk = walk

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.walk.fail(f"logged: {record.getMessage()} {record.exc_info[1]!r}")
        elif "ran out of GPU memory" in record.getMessage():
            self.walk.stats["OOM retry"] += 1


@pytest.mark.parametrize("seed", range(SEEDS))
async def test_random_interleavings_keep_vram_and_counts_true(seed: int) -> None:
    walk = Walk(seed)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, ctx: walk.fail(f"loop: {ctx.get('message')}"))
    handler = _Watch(walk)
    logger = logging.getLogger("dynllm.scheduler")
    logger.addHandler(handler)
    try:
        await walk.run(STEPS)
    finally:
        await walk.teardown()
        logger.removeHandler(handler)
        loop.set_exception_handler(None)
    print(
        f"seed {seed}: {len(walk.trace)} steps, {len(walk.world.procs)} spawns, "
        + ", ".join(f"{k} {v}" for k, v in sorted(walk.stats.items()))
    )
    assert not walk.violations, f"seed {seed}:\n" + "\n".join(walk.violations[:3])
