"""Per-model admission: max_concurrent_requests and max_queued_requests.

The gate's mechanics on their own (no processes: it is pure asyncio), then
through a running dynllm with real backends: the 429 beyond the limits and
how fast it comes, the line moving in order, and a client that leaves while
it waits in line."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from dynllm.admission import Admission, Gate
from dynllm.errors import QueueTimeout, TooManyRequests
from tests.conftest import ConfigFactory, RunningApp, apoll, serve
from tests.test_dispatch import config_for, fake_model

# ---- the gate alone -------------------------------------------------------------------------


async def test_gate_admits_up_to_the_limit_then_queues_in_order_then_refuses() -> None:
    gate = Gate("m")
    await gate.enter(2, 2, 10)
    await gate.enter(2, 2, 10)
    assert gate.active == 2 and gate.waiting == 0
    order: list[int] = []

    async def wait(n: int) -> None:
        await gate.enter(2, 2, 10)
        order.append(n)

    first = asyncio.create_task(wait(1))
    second = asyncio.create_task(wait(2))
    await apoll(lambda: gate.waiting == 2, timeout=1)
    with pytest.raises(TooManyRequests) as refused:
        await gate.enter(2, 2, 10)
    status, headers, _ = refused.value.render()
    assert status == 429 and headers == {"Retry-After": "1"}
    assert "max_concurrent_requests: 2" in refused.value.message
    gate.leave()  # a slot changes hands: active stays 2
    await first
    assert order == [1] and gate.active == 2 and gate.waiting == 1
    gate.leave()
    await second
    assert order == [1, 2] and gate.active == 2 and gate.waiting == 0
    gate.leave()
    gate.leave()
    assert gate.active == 0


async def test_no_queue_limit_means_any_number_wait() -> None:
    gate = Gate("m")
    await gate.enter(1, None, 10)
    waiters = [asyncio.create_task(gate.enter(1, None, 10)) for _ in range(50)]
    await apoll(lambda: gate.waiting == 50, timeout=1)
    for _ in range(50):
        gate.leave()
    await asyncio.gather(*waiters)
    gate.leave()
    assert (gate.active, gate.waiting) == (0, 0)


async def test_a_request_that_leaves_the_line_is_taken_out() -> None:
    gate = Gate("m")
    await gate.enter(1, 1, 10)
    leaving = asyncio.create_task(gate.enter(1, 1, 10))
    await apoll(lambda: gate.waiting == 1, timeout=1)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert gate.waiting == 0  # its place is free at once
    staying = asyncio.create_task(gate.enter(1, 1, 10))
    await apoll(lambda: gate.waiting == 1, timeout=1)
    gate.leave()
    await staying
    assert (gate.active, gate.waiting) == (1, 0)


async def test_a_request_handed_a_slot_as_it_leaves_passes_it_on() -> None:
    gate = Gate("m")
    await gate.enter(1, None, 10)
    leaving = asyncio.create_task(gate.enter(1, None, 10))
    next_one = asyncio.create_task(gate.enter(1, None, 10))
    await apoll(lambda: gate.waiting == 2, timeout=1)
    gate.leave()  # hands the slot to `leaving`...
    leaving.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await asyncio.wait_for(next_one, 1)  # the slot went on
    assert (gate.active, gate.waiting) == (1, 0)
    gate.leave()
    assert gate.active == 0


async def test_waiting_past_the_queue_timeout_is_a_503() -> None:
    gate = Gate("m")
    await gate.enter(1, None, 10)
    began = time.monotonic()
    with pytest.raises(QueueTimeout) as timed_out:
        await gate.enter(1, None, 0.2)
    assert 0.2 <= time.monotonic() - began < 1
    assert timed_out.value.status == 503 and "queue_timeout_seconds" in timed_out.value.message
    assert (gate.active, gate.waiting) == (1, 0)


def test_admission_makes_one_gate_per_model() -> None:
    admission = Admission()
    spec: Any = type("Spec", (), {"name": "m"})()
    assert admission.gate(spec) is admission.gate(spec)
    assert admission.waiting("m") == 0 and admission.waiting("other") == 0


# ---- through dynllm ---------------------------------------------------------------------------


def _limited(**limits: Any) -> dict[str, Any]:
    return fake_model("m", **limits)


async def _hold(app: RunningApp, seconds: float = 30) -> asyncio.Task[httpx.Response]:
    """A request that occupies a slot of 'm' (the backend waits before answering)."""
    return asyncio.create_task(app.chat("m", fake_delay=seconds))


async def _stop(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_beyond_the_limits_a_429_with_retry_after_within_50_ms(
    make_config: ConfigFactory,
) -> None:
    config = config_for(make_config, [_limited(max_concurrent_requests=2, max_queued_requests=1)])
    async with serve(config) as app:
        assert (await app.chat("m")).status_code == 200  # loaded, warm
        gate = app.services.admission.gates["m"]
        busy = [await _hold(app), await _hold(app)]
        await apoll(lambda: gate.active == 2, timeout=5)
        queued = await _hold(app)
        await apoll(lambda: gate.waiting == 1, timeout=5)
        try:
            timings = []
            for _ in range(20):
                began = time.perf_counter()
                refused = await app.chat("m")
                timings.append((time.perf_counter() - began) * 1000)
                assert refused.status_code == 429, refused.text
                assert refused.headers["retry-after"] == "1"
                error = refused.json()["error"]
                assert error["code"] == "too_many_requests"
                assert error["type"] == "rate_limit_error"
            timings.sort()
            print(
                f"429 beyond the limits: median {timings[10]:.1f} ms, "
                f"max {timings[-1]:.1f} ms over {len(timings)} requests"
            )
            assert timings[-1] < 50
            # nothing reached the backend for them, and nobody else was counted
            assert (gate.active, gate.waiting) == (2, 1)
            slot = app.services.scheduler.slots["m"]
            assert slot.in_flight == 2
        finally:
            await _stop(*busy, queued)
        await apoll(lambda: gate.active == 0 and gate.waiting == 0, timeout=5)


async def test_the_line_moves_in_order_and_serves_everyone(make_config: ConfigFactory) -> None:
    config = config_for(make_config, [_limited(max_concurrent_requests=1)])
    async with serve(config) as app:
        assert (await app.chat("m")).status_code == 200
        gate = app.services.admission.gates["m"]
        slot = app.services.scheduler.slots["m"]
        peak = 0
        finished: list[int] = []

        async def one(n: int, delay: float) -> None:
            nonlocal peak
            response = await app.chat("m", fake_delay=delay)
            assert response.status_code == 200
            peak = max(peak, slot.in_flight)
            finished.append(n)

        tasks = [asyncio.create_task(one(0, 1.0))]  # holds the slot while the line forms
        await apoll(lambda: gate.active == 1, timeout=5)
        for n in range(1, 6):
            tasks.append(asyncio.create_task(one(n, 0.05)))
            await apoll(lambda n=n: gate.waiting == n, timeout=5)
        await asyncio.gather(*tasks)
        assert finished == list(range(6))  # first come, first served
        assert peak == 1  # never two at the backend
        assert (gate.active, gate.waiting) == (0, 0)


async def test_a_client_leaving_while_queued_at_the_gate(make_config: ConfigFactory) -> None:
    config = config_for(make_config, [_limited(max_concurrent_requests=1, max_queued_requests=1)])
    async with serve(config) as app:
        assert (await app.chat("m")).status_code == 200
        gate = app.services.admission.gates["m"]
        busy = await _hold(app, seconds=1.0)
        await apoll(lambda: gate.active == 1, timeout=5)
        leaving = asyncio.create_task(app.chat("m"))
        await apoll(lambda: gate.waiting == 1, timeout=5)
        leaving.cancel()
        left = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await apoll(lambda: gate.waiting == 0, timeout=0.5, interval=0.005)
        print(f"out of the line {1000 * (time.monotonic() - left):.0f} ms after the client left")
        # its place is free: another may queue (not a 429)
        second = asyncio.create_task(app.chat("m"))
        await apoll(lambda: gate.waiting == 1, timeout=5)
        assert (await busy).status_code == 200
        assert (await second).status_code == 200
        assert (gate.active, gate.waiting) == (0, 0)
        slot = app.services.scheduler.slots["m"]
        assert slot.in_flight == 0 and slot.pending == 0


async def test_a_model_without_limits_has_no_gate(make_config: ConfigFactory) -> None:
    async with serve(config_for(make_config, [fake_model("m")])) as app:
        results = await asyncio.gather(*(app.chat("m") for _ in range(8)))
        assert all(r.status_code == 200 for r in results)
        assert app.services.admission.gates == {}
