"""Scheduler decisions against a recorded fake of its side effects: no processes, no sleeps.

Every fake start and stop blocks on a future the test resolves, so each
interleaving is driven explicitly.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from dynllm.config import Config, ModelConfig, parse_config
from dynllm.errors import (
    BackendExited,
    CoolingDown,
    InsufficientVRAM,
    ModelBusy,
    QueueTimeout,
    Unavailable,
)
from dynllm.events import LifecycleEvent, Reason
from dynllm.reload import plan_reload
from dynllm.scheduler import Handle, ModelState, PortTaken, Scheduler, out_of_memory
from dynllm.store import columns

_pids = itertools.count(1000)


@dataclass(eq=False)
class FakeHandle:
    name: str
    port: int
    on_exit: Callable[[Handle], None]
    pid: int = field(default_factory=lambda: next(_pids))
    started_at: float = 0.0
    returncode: int | None = None
    pgid: int = 0

    def __post_init__(self) -> None:
        self.pgid = self.pid

    def stderr_tail(self, n: int = 20) -> list[str]:
        return ["boom"]

    def crash(self, code: int = 1) -> None:
        self.returncode = code
        self.on_exit(self)


class FakeEffects:
    """Records starts and stops; each completes when the test says so
    (or at once with ``auto=True``)."""

    def __init__(self, auto: bool = True) -> None:
        self.auto = auto
        self.log: list[tuple[str, str]] = []
        self.gates: dict[str, asyncio.Future[None]] = {}
        self.handles: dict[str, FakeHandle] = {}
        self.fail_next: dict[str, BaseException] = {}

    def gate(self, key: str) -> asyncio.Future[None]:
        if key not in self.gates:
            self.gates[key] = asyncio.get_running_loop().create_future()
        return self.gates[key]

    def open(self, key: str) -> None:
        self.gate(key).set_result(None)

    async def start(self, spec: ModelConfig, port: int, on_exit: Any) -> Handle:
        self.log.append(("start", spec.name))
        if not self.auto:
            await self.gate(f"start:{spec.name}")
            del self.gates[f"start:{spec.name}"]
        if spec.name in self.fail_next:
            raise self.fail_next.pop(spec.name)
        handle = FakeHandle(spec.name, port, on_exit)
        self.handles[spec.name] = handle
        return handle

    async def stop(self, handle: Handle) -> None:
        assert isinstance(handle, FakeHandle)
        self.log.append(("stop", handle.name))
        if not self.auto:
            await self.gate(f"stop:{handle.name}")
            del self.gates[f"stop:{handle.name}"]
        handle.returncode = 0
        handle.on_exit(handle)

    def logs(self, name: str) -> list[str]:
        handle = self.handles.get(name)
        return handle.stderr_tail() if handle else []

    def starts(self, name: str | None = None) -> int:
        return sum(1 for op, n in self.log if op == "start" and (name is None or n == name))


class Clock:
    """A clock the test moves; ``step`` > 0 makes every reading advance it
    (a deadline computed and checked in one synchronous step then passes)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.step = 0.0

    def __call__(self) -> float:
        now = self.now
        self.now += self.step
        return now


def make_config(models: list[dict[str, Any]], **top: Any) -> Config:
    for m in models:
        m.setdefault("path", f"/models/{m['name']}.gguf")
        m.setdefault("backend", "llamacpp")
    return parse_config(
        {
            "total_vram_mb": 8000,
            "queue_timeout_seconds": 5,
            "backend": {"port_range_start": 41000, "port_range_end": 41050},
            "models": models,
            **top,
        }
    )


class Records(list[tuple[str, dict[str, Any]]]):
    """What the store would write for each lifecycle event, as (model, row
    fields); ``events`` holds the events themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[LifecycleEvent] = []

    def __call__(self, event: LifecycleEvent) -> None:
        self.events.append(event)
        if fields := columns(event):
            self.append((event.model, fields))

    def edges(self, name: str) -> list[tuple[str, str, str]]:
        """(from, to, reason) of each event of ``name``."""
        return [
            (e.from_state.value, e.to_state.value, e.reason.value)
            for e in self.events
            if e.model == name
        ]


def make(
    models: list[dict[str, Any]], auto: bool = True, **top: Any
) -> tuple[Scheduler, FakeEffects, Clock, Records]:
    effects = FakeEffects(auto=auto)
    clock = Clock()
    records = Records()
    scheduler = Scheduler(
        make_config(models, **top),
        effects,
        records,
        clock=clock,
        wall=clock,
    )
    return scheduler, effects, clock, records


def spec(s: Scheduler, name: str) -> ModelConfig:
    return s.slots[name].spec


async def settle() -> None:
    """Let every runnable task take its next step (no time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


AB = [{"name": "A", "vram_mb": 6000}, {"name": "B", "vram_mb": 6000}]


async def test_acquire_loads_then_reuses() -> None:
    s, fx, _, records = make(AB)
    lease = await s.acquire(spec(s, "A"))
    assert s.slots["A"].state is ModelState.READY
    assert s.slots["A"].in_flight == 1
    lease.release()
    lease.release()  # idempotent
    assert s.slots["A"].in_flight == 0
    (await s.acquire(spec(s, "A"))).release()
    assert fx.starts("A") == 1
    statuses = [f["status"] for n, f in records if n == "A" and "status" in f]
    assert statuses == ["loading", "loaded"]


async def test_second_model_evicts_idle_first() -> None:
    s, fx, _, _ = make(AB)
    (await s.acquire(spec(s, "A"))).release()
    (await s.acquire(spec(s, "B"))).release()
    assert fx.log == [("start", "A"), ("stop", "A"), ("start", "B")]
    assert s.slots["A"].state is ModelState.UNLOADED
    assert s.slots["B"].state is ModelState.READY
    assert s.used_vram_mb() == 6000
    assert s.ports.leased == frozenset({s.slots["B"].port})


async def test_concurrent_first_requests_share_one_load() -> None:
    s, fx, _, _ = make(AB, auto=False)
    tasks = [asyncio.create_task(s.acquire(spec(s, "A"))) for _ in range(50)]
    await settle()
    assert fx.starts() == 1
    assert s.slots["A"].pending == 50  # all wait on the same load, none spawned again
    fx.open("start:A")
    leases = await asyncio.gather(*tasks)
    assert fx.starts() == 1
    assert s.slots["A"].in_flight == 50
    for lease in leases:
        lease.release()
    assert s.slots["A"].in_flight == 0


async def test_load_does_not_block_loaded_models() -> None:
    s, fx, _, _ = make([{"name": "A", "vram_mb": 100}, {"name": "B", "vram_mb": 100}])
    (await s.acquire(spec(s, "A"))).release()
    fx.auto = False
    slow = asyncio.create_task(s.acquire(spec(s, "B")))
    await settle()
    assert s.slots["B"].state is ModelState.LOADING
    lease = await asyncio.wait_for(s.acquire(spec(s, "A")), timeout=1)  # no await on B's load
    lease.release()
    assert not slow.done()
    fx.open("start:B")
    (await slow).release()


async def test_busy_model_is_never_evicted_request_waits_then_runs() -> None:
    s, fx, _, _ = make(AB)
    a_lease = await s.acquire(spec(s, "A"))
    b = asyncio.create_task(s.acquire(spec(s, "B")))
    await settle()
    assert not b.done()
    assert s.queue_length() == 1
    assert ("stop", "A") not in fx.log
    a_lease.release()  # last byte of A's stream
    b_lease = await asyncio.wait_for(b, timeout=1)
    assert fx.log == [("start", "A"), ("stop", "A"), ("start", "B")]
    b_lease.release()


async def test_queue_timeout_gives_503_with_retry_after() -> None:
    s, _fx, _, _ = make(AB, queue_timeout_seconds=0.05)
    a_lease = await s.acquire(spec(s, "A"))
    with pytest.raises(QueueTimeout) as info:
        await s.acquire(spec(s, "B"))
    assert info.value.status == 503
    assert "Retry-After" in info.value.headers()
    assert s.queue_length() == 0
    assert s.slots["A"].state is ModelState.READY
    a_lease.release()


async def test_queue_is_fifo() -> None:
    models = [{"name": n, "vram_mb": 6000} for n in "ABC"]
    s, fx, _, _ = make(models)
    a_lease = await s.acquire(spec(s, "A"))
    b = asyncio.create_task(s.acquire(spec(s, "B")))
    await settle()
    c = asyncio.create_task(s.acquire(spec(s, "C")))
    await settle()
    assert s.queue_length() == 2
    a_lease.release()
    b_lease = await asyncio.wait_for(b, timeout=1)
    await settle()
    assert not c.done()  # B is busy now; C waits for it
    b_lease.release()
    (await asyncio.wait_for(c, timeout=1)).release()
    assert [n for op, n in fx.log if op == "start"] == ["A", "B", "C"]


async def test_cancelled_waiter_leaves_the_queue() -> None:
    s, fx, _, _ = make(AB)
    a_lease = await s.acquire(spec(s, "A"))
    b = asyncio.create_task(s.acquire(spec(s, "B")))
    await settle()
    b.cancel()
    await settle()
    assert s.queue_length() == 0
    a_lease.release()
    await settle()
    assert fx.starts("B") == 0


async def test_pinned_models_make_it_impossible() -> None:
    s, _fx, _, _ = make(
        [{"name": "A", "vram_mb": 6000, "pinned": True}, {"name": "B", "vram_mb": 6000}]
    )
    (await s.acquire(spec(s, "A"))).release()
    with pytest.raises(InsufficientVRAM, match="pinned"):
        await s.acquire(spec(s, "B"))
    assert s.slots["A"].state is ModelState.READY


async def test_lifo_and_lru_choose_different_victims() -> None:
    models = [{"name": n, "vram_mb": 3000} for n in "ABC"]
    for policy, victim in (("lru", "A"), ("lifo", "B")):  # DynLLM's LIFO kept the older A
        s, fx, clock, _ = make(models, eviction_policy=policy)
        (await s.acquire(spec(s, "A"))).release()
        clock.now += 1
        (await s.acquire(spec(s, "B"))).release()
        clock.now += 1
        (await s.acquire(spec(s, "B"))).release()  # A used least recently, B loaded last
        clock.now += 1
        (await s.acquire(spec(s, "C"))).release()
        stops = [n for op, n in fx.log if op == "stop"]
        assert stops == [victim], policy


async def test_failed_load_reaches_every_waiter_and_frees_everything() -> None:
    s, fx, clock, _records = make(AB, auto=False)
    fx.fail_next["A"] = BackendExited("exited with 1", exit_code=1, stderr_tail=["boom"])
    tasks = [asyncio.create_task(s.acquire(spec(s, "A"))) for _ in range(3)]
    await settle()
    fx.open("start:A")
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, BackendExited) for r in results)
    slot = s.slots["A"]
    assert slot.state is ModelState.UNLOADED
    assert slot.last_error == "exited with 1"
    assert s.used_vram_mb() == 0
    assert s.ports.leased == frozenset()
    # The next request after the cooldown tries again.
    clock.now += 5
    fx.auto = True
    (await s.acquire(spec(s, "A"))).release()
    assert fx.starts("A") == 2


async def test_port_taken_retries_on_another_port() -> None:
    s, fx, _, _ = make(AB)
    fx.fail_next["A"] = PortTaken(41000)
    lease = await s.acquire(spec(s, "A"))
    assert fx.starts("A") == 2
    first_port = 41000
    assert lease.port != first_port
    lease.release()


async def test_crash_while_loaded_releases_and_next_request_restarts() -> None:
    s, fx, _, records = make(AB)
    lease = await s.acquire(spec(s, "A"))
    fx.handles["A"].crash(code=-9)
    slot = s.slots["A"]
    assert slot.state is ModelState.UNLOADED
    assert "exited unexpectedly with code -9" in (slot.last_error or "")
    assert s.used_vram_mb() == 0 and s.ports.leased == frozenset()
    lease.release()  # the old lease is stale: no negative counts
    assert slot.in_flight == 0
    (await s.acquire(spec(s, "A"))).release()
    assert fx.starts("A") == 2
    assert any(
        f.get("last_error", "").startswith("backend exited")
        for n, f in records
        if f.get("last_error")
    )


async def test_idle_unload_respects_timeouts_leases_and_never() -> None:
    models = [
        {"name": "A", "vram_mb": 10, "unload_time": 2},
        {"name": "B", "vram_mb": 10, "unload_time": -1},
        {"name": "C", "vram_mb": 10},
    ]
    s, _fx, clock, _ = make(models, idle_timeout_seconds=50)
    for name in "ABC":
        (await s.acquire(spec(s, name))).release()
    held = await s.acquire(spec(s, "C"))
    clock.now += 1.9
    assert await s.unload_idle() == []
    clock.now += 0.2
    assert await s.unload_idle() == ["A"]
    clock.now += 1000
    assert await s.unload_idle() == []  # B never; C is serving a request
    held.release()  # idle counts from the end of the last response
    assert await s.unload_idle() == []
    clock.now += 50
    assert await s.unload_idle() == ["C"]
    assert s.slots["B"].state is ModelState.READY


async def test_manual_unload_refuses_busy_unless_forced() -> None:
    s, _fx, _, _ = make(AB)
    lease = await s.acquire(spec(s, "A"))
    with pytest.raises(ModelBusy):
        await s.unload(spec(s, "A"))
    assert await s.unload(spec(s, "A"), force=True) is True
    assert s.slots["A"].state is ModelState.UNLOADED
    lease.release()
    assert s.slots["A"].in_flight == 0
    assert await s.unload(spec(s, "A")) is False


async def test_forced_unload_during_load_cancels_it() -> None:
    s, _fx, _, _ = make(AB, auto=False)
    waiter = asyncio.create_task(s.acquire(spec(s, "A")))
    await settle()
    with pytest.raises(ModelBusy):  # a request waits for this load
        await s.unload(spec(s, "A"))
    assert s.slots["A"].pending == 1 and s.slots["A"].load_task is not None
    assert await s.unload(spec(s, "A"), force=True) is True
    with pytest.raises(Exception, match="cancelled"):
        await waiter
    assert s.slots["A"].state is ModelState.UNLOADED
    assert s.slots["A"].pending == 0
    assert s.ports.leased == frozenset()


async def test_request_during_unload_waits_then_reloads() -> None:
    s, fx, _, _ = make(AB)
    (await s.acquire(spec(s, "A"))).release()
    fx.auto = False
    unload = asyncio.create_task(s.unload(spec(s, "A")))
    await settle()
    assert s.slots["A"].state is ModelState.UNLOADING
    again = asyncio.create_task(s.acquire(spec(s, "A")))
    await settle()
    assert not again.done()
    fx.open("stop:A")
    await unload
    await settle()
    fx.open("start:A")
    (await asyncio.wait_for(again, timeout=1)).release()
    assert fx.starts("A") == 2


async def test_shutdown_stops_everything_and_rejects_new_work() -> None:
    s, fx, _, _ = make([{"name": "A", "vram_mb": 10}, {"name": "B", "vram_mb": 10}])
    (await s.acquire(spec(s, "A"))).release()
    (await s.acquire(spec(s, "B"))).release()
    await s.shutdown()
    assert sorted(n for op, n in fx.log if op == "stop") == ["A", "B"]
    assert all(slot.state is ModelState.UNLOADED for slot in s.slots.values())
    with pytest.raises(Exception, match="shutting down"):
        await s.acquire(spec(s, "A"))


async def test_pinned_model_is_not_idle_unloaded() -> None:
    s, _fx, clock, _ = make([{"name": "P", "vram_mb": 10, "pinned": True, "unload_time": 1}])
    (await s.acquire(spec(s, "P"))).release()
    clock.now += 10_000
    assert await s.unload_idle() == []
    assert await s.unload(spec(s, "P")) is True  # by hand only


async def test_a_crash_and_a_new_load_before_the_old_load_is_resolved() -> None:
    """A's load finishes; before its done callback runs, the backend crashes
    and a new load of A is admitted (the pump does that for a queued request,
    in the same tick).  The old callback must resolve only its own load:
    resolving the new one left A 'loading' with no load task and made its
    waiters spin."""
    s, fx, _, _ = make(AB, auto=False)
    first = asyncio.create_task(s.acquire(spec(s, "A")))
    await settle()
    slot = s.slots["A"]
    old_load = slot.load
    fx.open("start:A")
    await asyncio.sleep(0)  # the load task ends (READY); its callback runs next tick
    assert slot.state is ModelState.READY and old_load is not None and not old_load.done()
    fx.handles["A"].crash(code=-9)
    s._admit(slot, s.plan(slot), Reason.REQUESTED)  # what the pump does for a request queued for A
    new_load, new_task = slot.load, slot.load_task
    await settle()
    assert old_load.done()
    assert s.slots["A"].state is ModelState.LOADING  # (not narrowed by the READY above)
    assert slot.load is new_load and new_load is not None and not new_load.done()
    assert slot.load_task is new_task and new_task is not None
    assert not first.done()  # its backend crashed: it waits for the new load
    fx.open("start:A")
    lease = await asyncio.wait_for(first, timeout=1)
    assert fx.starts("A") == 2 and slot.in_flight == 1 and slot.pending == 0
    lease.release()


# ---- cooldown after failed loads --------------------------------------------------------


def _exited(name: str, *lines: str) -> BackendExited:
    """As the launcher reports a backend that exited while loading."""
    message = f"backend for '{name}' exited with code 1 while loading; last output:\n"
    return BackendExited(message + "\n".join(lines), exit_code=1, stderr_tail=list(lines))


async def test_failed_loads_cool_down_doubling_to_the_cap_and_a_success_resets() -> None:
    s, fx, clock, _ = make(AB, load_failure_cooldown_seconds=2, load_failure_cooldown_max_seconds=5)
    a, slot = spec(s, "A"), s.slots["A"]
    waits = []
    for failures in (1, 2, 3, 4):
        fx.fail_next["A"] = _exited("A", "error: cannot open model file")
        with pytest.raises(BackendExited):
            await s.acquire(a)
        with pytest.raises(CoolingDown) as cooling:  # no new try inside the window
            await s.acquire(a)
        assert cooling.value.status == 503 and cooling.value.code == "load_cooldown"
        assert f"failed {failures} time(s) in a row" in cooling.value.message
        assert "cannot open model file" in cooling.value.message
        wait = cooling.value.retry_after
        assert wait is not None
        waits.append(wait)
        assert cooling.value.headers() == {"Retry-After": str(max(1, round(wait)))}
        view = s.snapshot(slot)
        assert view["consecutive_failures"] == failures
        assert view["cooldown_until"] == pytest.approx(clock.now + wait)
        clock.now += wait - 0.01
        with pytest.raises(CoolingDown):
            await s.acquire(a)
        clock.now += 0.01
    assert waits == [2, 4, 5, 5]  # doubles, capped
    assert fx.starts("A") == 4  # one start per window, none inside
    (await s.acquire(a)).release()  # the window passed: tried again, and it loads
    assert slot.failures == 0 and slot.cooldown_until is None
    assert s.snapshot(slot)["cooldown_until"] is None
    assert s.snapshot(slot)["consecutive_failures"] == 0
    await s.unload(a)
    fx.fail_next["A"] = _exited("A", "boom")
    with pytest.raises(BackendExited):
        await s.acquire(a)
    with pytest.raises(CoolingDown) as again:
        await s.acquire(a)
    assert again.value.retry_after == 2  # reset: back to the first step


async def test_cooldown_off_cancelled_loads_and_clearing_it() -> None:
    s, fx, _, _ = make(AB, load_failure_cooldown_seconds=0)
    fx.fail_next["A"] = _exited("A", "boom")
    with pytest.raises(BackendExited):
        await s.acquire(spec(s, "A"))
    (await s.acquire(spec(s, "A"))).release()  # 0: no cooldown
    assert fx.starts("A") == 2
    s, fx, _, _ = make(AB, auto=False)
    t = asyncio.create_task(s.acquire(spec(s, "A")))
    await settle()
    assert await s.unload(spec(s, "A"), force=True) is True
    with pytest.raises(Unavailable):
        await t
    assert s.slots["A"].failures == 0 and s.slots["A"].cooldown_until is None  # not a failure
    fx.auto = True
    fx.fail_next["A"] = _exited("A", "boom")
    with pytest.raises(BackendExited):
        await s.acquire(spec(s, "A"))
    s.clear_cooldown(spec(s, "A"))  # an admin's forced load
    (await s.acquire(spec(s, "A"))).release()


# ---- out of memory ----------------------------------------------------------------------------

OOM_LINES = {
    "llama.cpp CUDA": "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9866.00 MiB on "
    "device 1: cudaMalloc failed: out of memory",
    "llama.cpp alloc": "alloc_tensor_range: failed to allocate CUDA0 buffer of size 151851674624",
    "llama.cpp load": "llama_model_load: error loading model: unable to allocate CUDA0 buffer",
    "llama.cpp Vulkan": "ggml_vulkan: vk::Device::allocateMemory: ErrorOutOfDeviceMemory",
    # The real llama-server of the dev dependencies, asked for a 200M-token
    # context under a 4 GB address-space limit:
    "llama.cpp host": "0.06.430.870 E llama_init_from_model: failed to initialize the context: "
    "std::bad_alloc",
    "CUDA": "RuntimeError: CUDA error: out of memory",
    "torch": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB.",
    "vLLM cache": "ValueError: No available memory for the cache blocks. Try increasing "
    "`gpu_memory_utilization` when initializing the engine.",
    "vLLM startup": "ValueError: Free memory on device cuda:0 (1.2/23.6 GiB) on startup is less "
    "than desired GPU memory utilization (0.9, 21.2 GiB). Decrease GPU memory utilization "
    "or reduce GPU memory used by other processes.",
}
NOT_OOM = [
    "ggml_cuda_host_malloc: failed to allocate 1900.00 MiB of pinned memory: invalid argument",
    "error: failed to open model file /models/x.gguf",
    "main: exiting due to model loading error",
    "",
]


def test_out_of_memory_matches_what_backends_print() -> None:
    for where, line in OOM_LINES.items():
        assert out_of_memory([line]), where
        assert out_of_memory(["INFO loading", line, "main: exiting"]), where
    for line in NOT_OOM:
        assert not out_of_memory([line]), line


THREE = [
    {"name": "A", "vram_mb": 2000},
    {"name": "B", "vram_mb": 2000},
    {"name": "P", "vram_mb": 1000, "pinned": True},
    {"name": "C", "vram_mb": 2000},
]


async def test_oom_evicts_the_idle_models_and_retries_once() -> None:
    s, fx, _, _ = make(THREE)
    for name in "ABP":
        (await s.acquire(spec(s, name))).release()
    held = await s.acquire(spec(s, "B"))  # busy: never evicted
    fx.fail_next["C"] = _exited("C", OOM_LINES["llama.cpp CUDA"], "main: exiting")
    lease = await s.acquire(spec(s, "C"))  # the books said it fits (7000 of 8000)
    assert [op for op in fx.log[3:]] == [("start", "C"), ("stop", "A"), ("start", "C")]
    assert s.slots["A"].state is ModelState.UNLOADED  # the idle one went
    assert s.slots["B"].state is ModelState.READY and s.slots["P"].state is ModelState.READY
    assert s.slots["C"].failures == 0
    lease.release()
    held.release()


async def test_a_second_oom_is_a_plain_failure_and_nothing_idle_means_no_retry() -> None:
    s, fx, _, _ = make(THREE)
    (await s.acquire(spec(s, "A"))).release()
    oom = _exited("C", OOM_LINES["torch"])
    fx.fail_next["C"] = oom

    async def start_again(spec: ModelConfig, port: int, on_exit: Any) -> Handle:
        fx.log.append(("start", spec.name))
        raise oom  # out of memory again

    real_start = fx.start
    calls = 0

    async def start(spec: ModelConfig, port: int, on_exit: Any) -> Handle:
        nonlocal calls
        calls += 1
        return await (real_start if calls == 1 else start_again)(spec, port, on_exit)

    fx.start = start  # type: ignore[method-assign]
    with pytest.raises(BackendExited):
        await s.acquire(spec(s, "C"))
    assert fx.starts("C") == 2  # one retry, never a loop
    assert ("stop", "A") in fx.log
    assert s.slots["C"].failures == 1 and s.slots["C"].cooldown_until is not None
    # Nothing idle to evict: an OOM is a plain failure at once.
    s2, fx2, _, _ = make(THREE)
    fx2.fail_next["C"] = _exited("C", OOM_LINES["vLLM cache"])
    with pytest.raises(BackendExited):
        await s2.acquire(spec(s2, "C"))
    assert fx2.starts("C") == 1


async def test_an_exit_that_is_not_oom_is_not_retried() -> None:
    s, fx, _, _ = make(THREE)
    (await s.acquire(spec(s, "A"))).release()
    fx.fail_next["C"] = _exited("C", NOT_OOM[0], "error: failed to open model file")
    with pytest.raises(BackendExited):
        await s.acquire(spec(s, "C"))
    assert fx.starts("C") == 1 and s.slots["A"].state is ModelState.READY


# ---- a backend that died under a lease ---------------------------------------------------------


async def test_replace_waits_for_the_exit_report_then_restarts() -> None:
    s, fx, _, _ = make(AB)
    lease = await s.acquire(spec(s, "A"))
    assert not lease.backend_exited
    handle = fx.handles["A"]
    handle.returncode = -9  # dead; the supervisor has not reported it yet
    assert lease.backend_exited
    lease.release()
    renewed = asyncio.create_task(s.replace(lease))
    await settle()
    assert not renewed.done() and fx.starts("A") == 1  # not leased again on the dead one
    handle.on_exit(handle)  # reported
    new = await asyncio.wait_for(renewed, timeout=1)
    assert fx.starts("A") == 2 and new.generation != lease.generation
    assert not new.backend_exited
    new.release()
    assert s.slots["A"].in_flight == 0


async def test_a_model_removed_and_back_before_it_stopped_keeps_its_slot_and_process() -> None:
    """A file replaced between two scans: the model is removed while busy,
    then added back; its running backend stays booked (no second process,
    no VRAM or port forgotten) and it is served on."""
    s, fx, _, _ = make(AB)
    held = await s.acquire(spec(s, "A"))
    config = s.config
    without = config.model_copy(update={"models": [m for m in config.models if m.name != "A"]})
    s.reconfigure(without, plan_reload(config, without))
    s.reconfigure(config, plan_reload(without, config))
    slot = s.slots["A"]
    assert not slot.retiring and slot.state is ModelState.READY and s.used_vram_mb() == 6000
    held.release()
    await settle()
    (await s.acquire(spec(s, "A"))).release()
    assert fx.starts("A") == 1  # the same process
    # A later reconfigure that removes nothing still retires what an earlier one removed.
    held = await s.acquire(spec(s, "A"))
    s.reconfigure(without, plan_reload(config, without))
    s.reconfigure(without, plan_reload(without, without))
    held.release()
    await settle()
    assert "A" not in s.slots and s.used_vram_mb() == 0


async def test_a_requests_keep_sets_the_idle_timer_and_zero_unloads_at_once() -> None:
    s, fx, clock, _ = make(AB, idle_timeout_seconds=300)
    lease = await s.acquire(spec(s, "A"))
    lease.keep = 2.0
    lease.release()
    assert s.unload_after(s.slots["A"]) == 2.0
    clock.now += 2.1
    assert await s.unload_idle() == ["A"]
    lease = await s.acquire(spec(s, "A"))
    lease.release()  # no keep: the config's again
    assert s.unload_after(s.slots["A"]) == 300
    other = await s.acquire(spec(s, "A"))
    lease = await s.acquire(spec(s, "A"))
    lease.keep = 0
    lease.release()  # another request still runs: not yet
    assert s.slots["A"].state is ModelState.READY
    other.keep = 0
    other.release()
    assert s.slots["A"].state is ModelState.UNLOADING
    await settle()
    assert s.slots["A"].state is ModelState.UNLOADED and fx.log[-1] == ("stop", "A")
