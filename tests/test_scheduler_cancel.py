"""Cancellation at every await of ``Scheduler.acquire`` and of the load/unload paths.

A client that leaves cancels the task inside ``acquire`` (or the task holding
its lease).  Each test cancels at one await point and checks the counts
(``in_flight``, ``pending``, ``queue_length()``), the states and the recorded
effects.  The fake effects block on futures the test resolves: no processes,
no sleeps.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dynllm.config import ModelConfig
from dynllm.errors import ModelBusy, QueueTimeout, Unavailable
from dynllm.scheduler import Handle, Lease, ModelState, Scheduler
from tests.test_scheduler import AB, FakeEffects, make, make_config, settle, spec


def counts(s: Scheduler, name: str) -> tuple[ModelState, int, int]:
    slot = s.slots[name]
    return slot.state, slot.in_flight, slot.pending


async def cancelled(task: asyncio.Task[Any]) -> None:
    """``task`` ends cancelled (not with an error, not with a lease)."""
    with pytest.raises(asyncio.CancelledError):
        await task


# ---- queued for VRAM -----------------------------------------------------------------


async def test_cancel_while_queued_never_evicts_or_loads() -> None:
    s, fx, _, _ = make(AB)
    a = await s.acquire(spec(s, "A"))
    b = asyncio.create_task(s.acquire(spec(s, "B")))
    await settle()
    assert s.queue_length() == 1
    b.cancel()
    # The same tick, before B's task runs again: A drains and the queue is
    # pumped.  B has left, so nothing may be evicted or loaded for it.
    a.release()
    assert fx.log == [("start", "A")]
    await cancelled(b)
    await settle()
    assert s.queue_length() == 0
    assert counts(s, "A") == (ModelState.READY, 0, 0)
    assert counts(s, "B") == (ModelState.UNLOADED, 0, 0)
    assert fx.log == [("start", "A")]
    assert s.used_vram_mb() == 6000


async def test_cancelled_queue_head_lets_the_next_request_go() -> None:
    models = [
        {"name": "A", "vram_mb": 6000},
        {"name": "B", "vram_mb": 6000},
        {"name": "C", "vram_mb": 2000},
    ]
    s, fx, _, _ = make(models)
    a = await s.acquire(spec(s, "A"))
    b = asyncio.create_task(s.acquire(spec(s, "B")))
    await settle()
    c = asyncio.create_task(s.acquire(spec(s, "C")))  # fits, but no overtaking
    await settle()
    assert s.queue_length() == 2 and not c.done()
    b.cancel()
    await cancelled(b)
    await settle()
    assert c.done()  # the queue moved on at once, A still serving
    c.result().release()
    assert s.queue_length() == 0
    assert fx.log == [("start", "A"), ("start", "C")]
    assert counts(s, "A") == (ModelState.READY, 1, 0)
    assert counts(s, "B") == (ModelState.UNLOADED, 0, 0)
    assert counts(s, "C") == (ModelState.READY, 0, 0)
    a.release()


async def test_queue_timeout_leaves_no_trace() -> None:
    s, fx, clock, _ = make(AB)
    a = await s.acquire(spec(s, "A"))
    clock.step = 10  # the deadline has passed by the time the request queues
    b = asyncio.create_task(s.acquire(spec(s, "B")))
    await settle()
    clock.step = 0
    with pytest.raises(QueueTimeout):
        await b
    assert s.queue_length() == 0
    assert counts(s, "B") == (ModelState.UNLOADED, 0, 0)
    assert counts(s, "A") == (ModelState.READY, 1, 0)
    a.release()
    await settle()
    assert fx.log == [("start", "A")]  # nothing is loaded for a request that left
    assert counts(s, "A") == (ModelState.READY, 0, 0)


async def test_turn_served_as_the_timeout_fires_goes_ahead() -> None:
    s, fx, clock, _ = make(AB)
    a = await s.acquire(spec(s, "A"))
    clock.step = 10
    b = asyncio.create_task(s.acquire(spec(s, "B")))
    await asyncio.sleep(0)  # B queues; its (already passed) timeout is due next
    clock.step = 0
    assert s.queue_length() == 1
    a.release()  # serves B (evicts A, loads B) in the same tick the timeout fires
    lease = await asyncio.wait_for(b, timeout=1)
    assert isinstance(lease, Lease)
    assert fx.log == [("start", "A"), ("stop", "A"), ("start", "B")]
    assert counts(s, "B") == (ModelState.READY, 1, 0)
    assert s.queue_length() == 0
    lease.release()
    assert counts(s, "B") == (ModelState.READY, 0, 0)


async def test_cancel_after_the_pump_let_it_through_keeps_the_load() -> None:
    s, fx, _, _ = make(AB)
    a = await s.acquire(spec(s, "A"))
    b = asyncio.create_task(s.acquire(spec(s, "B")))
    await settle()
    fx.auto = False
    a.release()  # the pump evicts A and admits B's load on B's behalf ...
    assert counts(s, "B") == (ModelState.LOADING, 0, 1)
    b.cancel()  # ... and B leaves before its task runs again
    await cancelled(b)
    await settle()
    # The load admitted for B goes on (its eviction is under way); nobody waits.
    assert counts(s, "B") == (ModelState.LOADING, 0, 0)
    assert s.queue_length() == 0
    fx.open("stop:A")
    await settle()
    fx.open("start:B")
    await settle()
    assert counts(s, "A") == (ModelState.UNLOADED, 0, 0)
    assert counts(s, "B") == (ModelState.READY, 0, 0)
    assert fx.log == [("start", "A"), ("stop", "A"), ("start", "B")]


# ---- waiting on a load -----------------------------------------------------------------


async def test_cancel_one_joiner_keeps_the_shared_load() -> None:
    s, fx, _, _ = make(AB, auto=False)
    tasks = [asyncio.create_task(s.acquire(spec(s, "A"))) for _ in range(3)]
    await settle()
    assert counts(s, "A") == (ModelState.LOADING, 0, 3)
    tasks[0].cancel()
    await cancelled(tasks[0])
    await settle()
    assert counts(s, "A") == (ModelState.LOADING, 0, 2)
    assert s.slots["A"].load_task is not None  # the load was not cancelled
    fx.open("start:A")
    leases = await asyncio.gather(*tasks[1:])
    assert counts(s, "A") == (ModelState.READY, 2, 0)
    assert fx.log == [("start", "A")]
    for lease in leases:
        lease.release()
    assert counts(s, "A") == (ModelState.READY, 0, 0)


async def test_cancel_only_waiter_lets_the_load_finish_then_idle() -> None:
    s, fx, clock, _ = make(AB, auto=False, idle_timeout_seconds=30)
    t = asyncio.create_task(s.acquire(spec(s, "A")))
    await settle()
    t.cancel()
    await cancelled(t)
    await settle()
    assert counts(s, "A") == (ModelState.LOADING, 0, 0)
    fx.open("start:A")
    await settle()
    assert counts(s, "A") == (ModelState.READY, 0, 0)
    assert s.queue_length() == 0
    clock.now += 29
    assert await s.unload_idle() == []
    clock.now += 1
    fx.auto = True
    assert await s.unload_idle() == ["A"]
    assert counts(s, "A") == (ModelState.UNLOADED, 0, 0)
    assert fx.log == [("start", "A"), ("stop", "A")]


async def test_cancel_after_the_load_finished_pumps_the_queue() -> None:
    s, fx, _, _ = make(AB, auto=False)
    a = asyncio.create_task(s.acquire(spec(s, "A")))
    await settle()
    b = asyncio.create_task(s.acquire(spec(s, "B")))  # A is loading: B must wait
    await settle()
    assert s.queue_length() == 1
    seen: list[ModelState] = []

    def leave(_: object) -> None:  # A's load is done, its waiter has not run yet
        seen.append(s.slots["A"].state)
        a.cancel()

    load = s.slots["A"].load
    assert load is not None
    load.add_done_callback(leave)
    fx.auto = True
    fx.open("start:A")
    await cancelled(a)
    await settle()
    assert seen == [ModelState.READY]
    assert b.done()  # not stalled until its queue timeout
    lease = b.result()
    assert fx.log == [("start", "A"), ("stop", "A"), ("start", "B")]
    assert counts(s, "A") == (ModelState.UNLOADED, 0, 0)
    assert counts(s, "B") == (ModelState.READY, 1, 0)
    assert s.queue_length() == 0
    lease.release()


async def test_cancel_while_waiting_for_an_unload() -> None:
    s, fx, _, _ = make(AB)
    (await s.acquire(spec(s, "A"))).release()
    fx.auto = False
    unload = asyncio.create_task(s.unload(spec(s, "A")))
    await settle()
    r = asyncio.create_task(s.acquire(spec(s, "A")))
    await settle()
    assert not r.done()
    r.cancel()
    await cancelled(r)
    fx.open("stop:A")
    assert await unload is True
    await settle()
    assert counts(s, "A") == (ModelState.UNLOADED, 0, 0)
    assert s.queue_length() == 0
    assert fx.log == [("start", "A"), ("stop", "A")]  # no reload for the one who left


# ---- lease holders -----------------------------------------------------------------------


async def test_cancelled_lease_holder_returns_in_flight_and_moves_the_queue() -> None:
    s, fx, _, _ = make(AB)
    forever: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def serve() -> None:
        lease = await s.acquire(spec(s, "A"))
        try:
            await forever  # relaying the response
        finally:
            lease.release()

    holder = asyncio.create_task(serve())
    await settle()
    assert counts(s, "A") == (ModelState.READY, 1, 0)
    b = asyncio.create_task(s.acquire(spec(s, "B")))
    await settle()
    assert s.queue_length() == 1
    holder.cancel()
    await cancelled(holder)
    lease = await asyncio.wait_for(b, timeout=1)
    assert counts(s, "A") == (ModelState.UNLOADED, 0, 0)
    assert counts(s, "B") == (ModelState.READY, 1, 0)
    assert fx.log == [("start", "A"), ("stop", "A"), ("start", "B")]
    lease.release()


async def test_release_is_idempotent_and_ignored_once_the_backend_is_gone() -> None:
    s, fx, _, _ = make(AB)
    old = await s.acquire(spec(s, "A"))
    assert await s.unload(spec(s, "A"), force=True) is True
    new = await s.acquire(spec(s, "A"))  # a new backend, a new generation
    assert counts(s, "A") == (ModelState.READY, 1, 0)
    old.release()
    old.release()
    assert counts(s, "A") == (ModelState.READY, 1, 0)
    new.release()
    new.release()
    assert counts(s, "A") == (ModelState.READY, 0, 0)
    assert fx.starts("A") == 2


# ---- unloading ---------------------------------------------------------------------------


async def test_unload_refuses_while_requests_wait_for_the_model() -> None:
    models = [
        {"name": "A", "vram_mb": 4000},
        {"name": "B", "vram_mb": 6000},
        {"name": "C", "vram_mb": 6000},
    ]
    s, fx, _, _ = make(models)
    c = await s.acquire(spec(s, "C"))
    a1 = asyncio.create_task(s.acquire(spec(s, "A")))
    await settle()
    b = asyncio.create_task(s.acquire(spec(s, "B")))
    await settle()
    a2 = asyncio.create_task(s.acquire(spec(s, "A")))
    await settle()
    assert s.queue_length() == 3
    fx.auto = False
    c.release()  # A1 goes ahead (evicting C); B waits for VRAM, A2 behind it
    await settle()
    assert counts(s, "A") == (ModelState.LOADING, 0, 1)
    assert s.queue_length() == 2
    assert s.waiting(s.slots["A"]) == 2
    with pytest.raises(ModelBusy, match="2 more wait"):
        await s.unload(spec(s, "A"))
    a1.cancel()
    await cancelled(a1)
    await settle()
    assert counts(s, "A") == (ModelState.LOADING, 0, 0)
    with pytest.raises(ModelBusy, match="1 more wait"):  # A2, queued for A
        await s.unload(spec(s, "A"))
    a2.cancel()
    await cancelled(a2)
    await settle()
    assert s.queue_length() == 1 and s.waiting(s.slots["A"]) == 0
    # Nobody waits: the load (still waiting for C's eviction) is cancelled,
    # but C's stop is not cut short.
    assert await asyncio.wait_for(s.unload(spec(s, "A")), timeout=1) is True
    assert counts(s, "A") == (ModelState.UNLOADED, 0, 0)
    assert s.slots["C"].state is ModelState.UNLOADING
    assert fx.log == [("start", "C"), ("stop", "C")]
    fx.open("stop:C")
    await settle()
    assert fx.log == [("start", "C"), ("stop", "C"), ("start", "B")]
    fx.open("start:B")
    lease = await asyncio.wait_for(b, timeout=1)
    assert counts(s, "B") == (ModelState.READY, 1, 0)
    assert s.queue_length() == 0
    assert fx.starts("A") == 0
    lease.release()


async def test_unload_refuses_while_a_joiner_has_not_taken_its_lease() -> None:
    s, fx, _, _ = make(AB, auto=False)
    t = asyncio.create_task(s.acquire(spec(s, "A")))
    await settle()
    seen: list[object] = []

    def probe(_: object) -> None:  # READY, its waiter not yet run
        seen.append(counts(s, "A"))
        attempt = s.unload(spec(s, "A"))
        try:
            attempt.send(None)  # the decision is taken before the first await
        except ModelBusy as exc:
            seen.append(type(exc))
        else:
            attempt.close()

    load = s.slots["A"].load
    assert load is not None
    load.add_done_callback(probe)
    fx.open("start:A")
    lease = await asyncio.wait_for(t, timeout=1)
    assert seen == [(ModelState.READY, 0, 1), ModelBusy]
    assert counts(s, "A") == (ModelState.READY, 1, 0)
    lease.release()
    fx.auto = True
    assert await s.unload(spec(s, "A")) is True
    assert fx.log == [("start", "A"), ("stop", "A")]


async def test_load_cancelled_before_its_first_step_leaves_no_loading() -> None:
    s, fx, _, records = make(AB, auto=False)
    t = asyncio.create_task(s.acquire(spec(s, "A")))
    await asyncio.sleep(0)  # the request admitted the load; its task has not run
    assert s.slots["A"].state is ModelState.LOADING and fx.log == []
    async with asyncio.timeout(1):  # not wait_for: no new task, nothing runs before it
        assert await s.unload(spec(s, "A"), force=True) is True
    with pytest.raises(Unavailable, match="cancelled"):
        await asyncio.wait_for(t, timeout=1)
    assert counts(s, "A") == (ModelState.UNLOADED, 0, 0)
    assert s.slots["A"].load_task is None
    assert fx.log == []
    assert s.ports.leased == frozenset() and s.used_vram_mb() == 0
    statuses = [f["status"] for n, f in records if n == "A" and "status" in f]
    assert statuses == ["loading", "unloaded"]


async def test_shutdown_before_a_load_first_runs() -> None:
    s, fx, _, _ = make(AB, auto=False)
    t = asyncio.create_task(s.acquire(spec(s, "A")))
    await asyncio.sleep(0)
    async with asyncio.timeout(1):
        await s.shutdown()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(t, timeout=1)
    assert counts(s, "A") == (ModelState.UNLOADED, 0, 0)
    assert fx.log == []


async def test_cancelled_unload_caller_does_not_cut_the_stop_short() -> None:
    s, fx, _, _ = make(AB)
    (await s.acquire(spec(s, "A"))).release()
    fx.auto = False
    unload = asyncio.create_task(s.unload(spec(s, "A")))
    await settle()
    unload.cancel()
    await cancelled(unload)
    await settle()
    assert s.slots["A"].state is ModelState.UNLOADING  # the process is still being stopped
    assert s.ports.leased == frozenset({41000})
    fx.open("stop:A")
    await settle()
    assert counts(s, "A") == (ModelState.UNLOADED, 0, 0)
    assert s.ports.leased == frozenset()


# ---- a load cancelled while it evicts or stops its own process ----------------------------


class LauncherLike(FakeEffects):
    """``start`` as the real launcher's: a cancelled start stops its process
    (shielded) before the cancel propagates; the process exits when the test
    opens ``exit:<name>``.  ``alive`` is the truth about processes."""

    def __init__(self) -> None:
        super().__init__(auto=False)
        self.alive: set[str] = set()

    async def start(self, spec: ModelConfig, port: int, on_exit: Any) -> Handle:
        self.alive.add(spec.name)
        try:
            return await super().start(spec, port, on_exit)
        except asyncio.CancelledError:
            await asyncio.shield(self.gate(f"exit:{spec.name}"))
            self.alive.discard(spec.name)
            raise


@pytest.mark.parametrize("second", ["unload", "shutdown"])
async def test_a_load_cancelled_twice_is_booked_free_only_once_its_process_exits(
    second: str,
) -> None:
    """An admin unload cancels a load; a second unload (or shutdown) while the
    launcher stops the half-started process must not cancel it again: that
    cut the stop short and booked VRAM and port free while the process ran."""
    fx = LauncherLike()
    s = Scheduler(make_config(AB), fx)
    t = asyncio.create_task(s.acquire(spec(s, "A")))
    await settle()
    assert fx.alive == {"A"} and counts(s, "A") == (ModelState.LOADING, 0, 1)
    first = asyncio.create_task(s.unload(spec(s, "A"), force=True))
    await settle()
    again = asyncio.create_task(
        s.unload(spec(s, "A"), force=True) if second == "unload" else s.shutdown()
    )
    await settle()
    # The process is still being stopped: everything stays booked.
    assert fx.alive == {"A"}
    assert s.slots["A"].state is ModelState.LOADING
    assert s.used_vram_mb() == 6000 and len(s.ports.leased) == 1
    print(f"{second} while the cancelled load stops its process: {s.used_vram_mb()} MB booked")
    fx.open("exit:A")
    async with asyncio.timeout(1):
        assert await first is True
        await again
    with pytest.raises(Unavailable, match="cancelled"):
        await t
    assert fx.alive == set()
    assert counts(s, "A") == (ModelState.UNLOADED, 0, 0)
    assert s.used_vram_mb() == 0 and s.ports.leased == frozenset()


@pytest.mark.parametrize("how", ["unload", "shutdown"])
async def test_cancelling_a_load_that_evicts_never_books_a_running_victim_unloaded(
    how: str,
) -> None:
    """B's load waits for A's eviction; cancelling B's load (an admin unload of
    B, or shutdown) leaves A booked until its process is gone, so nothing is
    started in the VRAM A still holds (the issue measured 12000 MB alive on
    an 8000 MB budget, the books saying 6000)."""
    s, fx, _, _ = make(AB)
    (await s.acquire(spec(s, "A"))).release()
    fx.auto = False
    b = asyncio.create_task(s.acquire(spec(s, "B")))
    await settle()
    assert counts(s, "A")[0] is ModelState.UNLOADING  # A's stop is under way
    assert counts(s, "B") == (ModelState.LOADING, 0, 1)
    if how == "unload":
        async with asyncio.timeout(1):
            assert await s.unload(spec(s, "B"), force=True) is True
        again = asyncio.create_task(s.acquire(spec(s, "B")))  # wants A's VRAM at once
        await settle()
    else:
        closing = asyncio.create_task(s.shutdown())
        await settle()
        assert not closing.done()  # shutdown waits for the victim's stop
    with pytest.raises(Unavailable):
        await b
    assert counts(s, "A")[0] is ModelState.UNLOADING
    assert s.used_vram_mb() >= 6000  # A's process still holds its VRAM
    assert fx.starts("B") == 0  # nothing started in it
    print(f"{how}: victim still booked ({s.used_vram_mb()} MB) until its process exits")
    fx.open("stop:A")
    await settle()
    assert counts(s, "A") == (ModelState.UNLOADED, 0, 0)
    if how == "unload":
        assert fx.log == [("start", "A"), ("stop", "A"), ("start", "B")]
        fx.open("start:B")
        (await asyncio.wait_for(again, timeout=1)).release()
    else:
        await asyncio.wait_for(closing, timeout=1)
        assert fx.starts("B") == 0 and s.used_vram_mb() == 0
    assert s.ports.leased == ({s.slots["B"].port} if how == "unload" else frozenset())
