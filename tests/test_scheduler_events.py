"""The lifecycle events of ``Scheduler._move``: one per change of state, each
with its reason, detail and durations; and the store's rows derived from them
exactly as the scheduler wrote them before events existed.

Against the recorded fake effects of tests/test_scheduler.py: no processes,
no sleeps; the test clock sets every duration."""

from __future__ import annotations

import asyncio

import pytest

from dynllm.errors import BackendExited, CoolingDown
from dynllm.events import Reason
from dynllm.scheduler import ModelState
from tests.test_scheduler import AB, OOM_LINES, THREE, _exited, make, settle, spec

L, U, LG, UG = "loaded", "unloaded", "loading", "unloading"


async def test_a_requested_load_and_its_durations() -> None:
    s, fx, clock, records = make(AB, auto=False)
    task = asyncio.create_task(s.acquire(spec(s, "A")))
    await settle()
    clock.now += 2.5  # the backend takes 2.5 s to answer its probe
    fx.open("start:A")
    (await task).release()
    assert records.edges("A") == [(U, LG, "requested"), (LG, L, "requested")]
    first, ready = records.events
    assert first.duration_s is None  # never moved before: no time in "unloaded" to report
    assert ready.duration_s == pytest.approx(2.5)
    assert ready.at == s.slots["A"].loaded_at and ready.port == s.slots["A"].port
    assert ready.pid == fx.handles["A"].pid and ready.load_count == 1
    assert ready.public() == {
        "model": "A",
        "from": "loading",
        "to": "loaded",
        "reason": "requested",
        "detail": None,
        "at": ready.at,
        "duration_s": pytest.approx(2.5),
    }
    print(f"load duration reported: {ready.duration_s} s (clock moved 2.5 s)")


async def test_preload_and_admin_loads_say_so() -> None:
    s, _, _, records = make(AB)
    (await s.acquire(spec(s, "A"), Reason.PRELOAD)).release()
    assert records.edges("A") == [(U, LG, "preload"), (LG, L, "preload")]
    (await s.acquire(spec(s, "B"), Reason.ADMIN)).release()
    assert records.edges("B") == [(U, LG, "admin"), (LG, L, "admin")]


async def test_eviction_names_the_model_it_made_room_for() -> None:
    s, fx, clock, records = make(AB, auto=False)
    fx.auto = True
    (await s.acquire(spec(s, "A"))).release()
    clock.now += 60
    fx.auto = False
    task = asyncio.create_task(s.acquire(spec(s, "B")))
    await settle()
    clock.now += 0.75  # the stop takes 0.75 s
    fx.open("stop:A")
    await settle()
    fx.open("start:B")
    (await task).release()
    evicted = [e for e in records.events if e.model == "A"][2:]
    assert [(e.from_state, e.to_state, e.reason, e.detail) for e in evicted] == [
        (ModelState.READY, ModelState.UNLOADING, Reason.EVICTED, "to make room for 'B'"),
        (ModelState.UNLOADING, ModelState.UNLOADED, Reason.EVICTED, "to make room for 'B'"),
    ]
    assert evicted[0].duration_s == pytest.approx(60)  # time it was loaded
    assert evicted[1].duration_s == pytest.approx(0.75)  # the stop
    assert records.edges("B") == [(U, LG, "requested"), (LG, L, "requested")]
    # The order a reader of the stream sees: A's eviction starts before B loads.
    order = [(e.model, e.to_state.value) for e in records.events[2:]]
    assert order == [("A", UG), ("B", LG), ("A", U), ("B", L)]


async def test_idle_unload() -> None:
    s, _, clock, records = make([{"name": "A", "vram_mb": 10, "unload_time": 30}])
    (await s.acquire(spec(s, "A"))).release()
    clock.now += 31
    assert await s.unload_idle() == ["A"]
    assert records.edges("A")[2:] == [(L, UG, "idle"), (UG, U, "idle")]
    assert records.events[2].detail == "unused for 30 s"


async def test_crash_carries_the_exit_and_last_output() -> None:
    s, fx, _, records = make(AB)
    lease = await s.acquire(spec(s, "A"))
    fx.handles["A"].crash(code=-9)
    lease.release()
    crash = records.events[-1]
    assert (crash.from_state, crash.to_state, crash.reason) == (
        ModelState.READY,
        ModelState.UNLOADED,
        Reason.CRASHED,
    )
    assert crash.detail == "backend exited unexpectedly with code -9: boom"
    assert crash.last_error == crash.detail and crash.pid is None and crash.port is None


async def test_load_failure_then_a_cooldown_note() -> None:
    s, fx, _, records = make(AB, load_failure_cooldown_seconds=10)
    fx.fail_next["A"] = _exited("A", "error: cannot open model file")
    with pytest.raises(BackendExited):
        await s.acquire(spec(s, "A"))
    with pytest.raises(CoolingDown):
        await s.acquire(spec(s, "A"))
    assert records.edges("A") == [(U, LG, "requested"), (LG, U, "load_failed"), (U, U, "cooldown")]
    failed, cooldown = records.events[1:]
    assert failed.detail is not None and "cannot open model file" in failed.detail
    assert cooldown.detail == "failed to load 1 time(s) in a row; not tried again for 10 s"
    assert cooldown.duration_s is None


async def test_no_cooldown_note_when_cooldowns_are_off() -> None:
    s, fx, _, records = make(AB, load_failure_cooldown_seconds=0)
    fx.fail_next["A"] = _exited("A", "boom")
    with pytest.raises(BackendExited):
        await s.acquire(spec(s, "A"))
    assert records.edges("A") == [(U, LG, "requested"), (LG, U, "load_failed")]


async def test_admin_unload_and_a_load_cancelled_by_admin() -> None:
    s, fx, _, records = make(AB, auto=False)
    fx.auto = True
    (await s.acquire(spec(s, "A"))).release()
    assert await s.unload(spec(s, "A"))
    assert records.edges("A")[2:] == [(L, UG, "admin"), (UG, U, "admin")]
    fx.auto = False
    task = asyncio.create_task(s.acquire(spec(s, "B")))
    await settle()
    unload = asyncio.create_task(s.unload(spec(s, "B"), force=True))
    await settle()
    assert await unload
    with pytest.raises(Exception, match="cancelled"):
        await task
    assert records.edges("B") == [(U, LG, "requested"), (LG, U, "admin")]


async def test_reload_and_shutdown() -> None:
    s, fx, _, records = make(
        [{"name": "A", "vram_mb": 10}, {"name": "B", "vram_mb": 10}, {"name": "C", "vram_mb": 10}]
    )
    for name in "AB":
        (await s.acquire(spec(s, name))).release()
    assert await s.unload(spec(s, "A"), reason=Reason.RELOAD)
    assert records.edges("A")[2:] == [(L, UG, "reload"), (UG, U, "reload")]
    fx.auto = False
    loading = asyncio.create_task(s.acquire(spec(s, "C")))
    await settle()  # C's start waits on its gate
    fx.auto = True  # B's stop does not
    await s.shutdown()
    with pytest.raises(Exception, match="cancelled"):
        await loading
    assert records.edges("B")[2:] == [(L, UG, "shutdown"), (UG, U, "shutdown")]
    assert records.edges("C") == [(U, LG, "requested"), (LG, U, "shutdown")]


async def test_out_of_memory_eviction_says_why() -> None:
    s, fx, _, records = make(THREE)
    for name in "ABP":
        (await s.acquire(spec(s, name))).release()
    held = await s.acquire(spec(s, "B"))
    fx.fail_next["C"] = _exited("C", OOM_LINES["llama.cpp CUDA"])
    (await s.acquire(spec(s, "C"))).release()
    held.release()
    detail = "'C' ran out of GPU memory while loading"
    assert [(e.to_state, e.reason, e.detail) for e in records.events if e.model == "A"][2:] == [
        (ModelState.UNLOADING, Reason.EVICTED, detail),
        (ModelState.UNLOADED, Reason.EVICTED, detail),
    ]
    # One load of C (requested): the retry is part of it, not a second load.
    assert records.edges("C") == [(U, LG, "requested"), (LG, L, "requested")]


async def test_a_queued_request_keeps_its_reason() -> None:
    s, _, _, records = make(AB)
    held = await s.acquire(spec(s, "A"))  # busy: B waits in the queue for its VRAM
    waiting = asyncio.create_task(s.acquire(spec(s, "B"), Reason.ADMIN))
    await settle()
    assert s.slots["B"].state is ModelState.UNLOADED
    held.release()  # the pump evicts A for B
    (await waiting).release()
    assert records.edges("B") == [(U, LG, "admin"), (LG, L, "admin")]
    assert records.edges("A")[2:] == [(L, UG, "evicted"), (UG, U, "evicted")]


async def test_every_state_change_is_one_event_and_nothing_else_moves_state() -> None:
    """Between events, a model's state is what the last event said."""
    s, fx, _, records = make(AB)
    seen: dict[str, str] = {}

    def follow() -> None:
        for event in records.events[len(seen_events) :]:
            assert seen.get(event.model, U) == event.from_state.value
            seen[event.model] = event.to_state.value
            seen_events.append(event)
        for name, slot in s.slots.items():
            assert slot.state.value == seen.get(name, U), name

    seen_events: list[object] = []
    for name in ("A", "B", "A"):
        (await s.acquire(spec(s, name))).release()
        follow()
    fx.handles["A"].crash()
    follow()
    fx.fail_next["B"] = _exited("B", "boom")
    with pytest.raises(BackendExited):
        await s.acquire(spec(s, "B"))
    follow()
    await s.shutdown()
    follow()
    # 2 (A) + 4 (B evicts A) + 4 (A evicts B) + 1 (crash) + 3 (failure, cooldown note)
    assert len(seen_events) == len(records.events) == 14


async def test_store_rows_are_written_as_before_events() -> None:
    """The store's fields for each change, literally as the scheduler recorded
    them before it emitted events (the store is now their first subscriber)."""
    s, fx, _, records = make(AB)
    (await s.acquire(spec(s, "A"))).release()
    h = fx.handles["A"]
    port, loaded_at = s.slots["A"].port, s.slots["A"].loaded_at
    (await s.acquire(spec(s, "B"))).release()  # evicts A
    hb = fx.handles["B"]
    port_b, loaded_b = s.slots["B"].port, s.slots["B"].loaded_at
    hb.crash(code=3)
    fx.fail_next["A"] = _exited("A", "boom")
    with pytest.raises(BackendExited):
        await s.acquire(spec(s, "A"))
    crash = "backend exited unexpectedly with code 3: boom"
    failure = str(_exited("A", "boom"))
    assert list(records) == [
        ("A", {"status": "loading", "vram_mb": 6000}),
        ("A", {"status": "loaded", "pid": h.pid, "pgid": h.pgid, "proc_started_at": 0.0,
               "port": port, "loaded_at": loaded_at, "last_used": loaded_at, "load_count": 1,
               "last_error": None}),
        ("A", {"status": "unloading"}),
        ("B", {"status": "loading", "vram_mb": 6000}),
        ("A", {"status": "unloaded", "pid": None, "pgid": None, "port": None}),
        ("B", {"status": "loaded", "pid": hb.pid, "pgid": hb.pgid, "proc_started_at": 0.0,
               "port": port_b, "loaded_at": loaded_b, "last_used": loaded_b, "load_count": 1,
               "last_error": None}),
        ("B", {"status": "unloaded", "pid": None, "pgid": None, "port": None,
               "last_error": crash}),
        ("A", {"status": "loading", "vram_mb": 6000}),
        ("A", {"status": "unloaded", "pid": None, "port": None, "last_error": failure}),
    ]  # fmt: skip
