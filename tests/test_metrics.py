"""``GET /metrics``: parsed with prometheus-client's own parser, its counters
move by exactly the requests, loads, unloads, evictions and crashes a test
made; the gauges read the live state; it is an admin route.

First against a scheduler with the recorded fake effects and request records
built by hand, then through a real server with the fake llama-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynllm.admission import Admission
from dynllm.events import EventHub
from dynllm.metrics import UNKNOWN_MODEL, Metrics
from dynllm.requestlog import RequestRecord
from dynllm.scheduler import Scheduler
from tests.conftest import ConfigFactory, apoll, serve
from tests.test_scheduler import AB, FakeEffects, make_config, spec

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
CHAT = "/v1/chat/completions"


def parse(text: str) -> Samples:
    """Every sample of the exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of counters and histogram counts that moved (gauges and sums left out)."""
    moved = {}
    for key, v in after.items():
        name = key[0]
        if not (name.endswith("_total") or name.endswith("_count")):
            continue
        if name.startswith("process_"):
            continue
        if (d := v - before.get(key, 0.0)) != 0:
            moved[key] = d
    return moved


def record(model: str = "A", status: int = 200, **fields: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "model": model,
        "route": CHAT,
        "status": status,
        "queued_ms": 0.0,
        "load_ms": 0.0,
        "cold": False,
        "ttfb_ms": 12.0,
        "duration_ms": 40.0,
        "bytes_out": 300,
        "prompt_tokens": None,
        "completion_tokens": None,
    }
    return RequestRecord(**{**base, **fields})


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


async def test_counters_move_by_exactly_what_happened() -> None:
    hub = EventHub()
    s = Scheduler(make_config(AB), FakeEffects(), hub.publish)
    metrics = Metrics(s, Admission())
    hub.subscribe(metrics.on_event)
    before = parse(metrics.exposition().decode())

    (await s.acquire(spec(s, "A"))).release()
    (await s.acquire(spec(s, "B"))).release()  # evicts A
    await s.unload(spec(s, "B"))
    metrics.observe_request(record(cold=True, load_ms=1500.0, prompt_tokens=7, completion_tokens=3))
    metrics.observe_request(record())
    metrics.observe_request(record(status=499, ttfb_ms=None, duration_ms=5.0))
    metrics.observe_request(record(model="no-such-model", status=404, completion_tokens=0))

    moved = delta(before, parse(metrics.exposition().decode()))
    print("moved:", *sorted(f"{k[0]}{dict(sorted(k[1]))} +{v:g}" for k, v in moved.items()))
    assert moved == {
        key("dynllm_model_loads_total", model="A", reason="requested"): 1,
        key("dynllm_model_loads_total", model="B", reason="requested"): 1,
        key("dynllm_model_load_duration_seconds_count", model="A"): 1,
        key("dynllm_model_load_duration_seconds_count", model="B"): 1,
        key("dynllm_model_unloads_total", model="A", reason="evicted"): 1,
        key("dynllm_model_unloads_total", model="B", reason="admin"): 1,
        key("dynllm_requests_total", model="A", route=CHAT, status="200"): 2,
        key("dynllm_requests_total", model="A", route=CHAT, status="499"): 1,
        key("dynllm_requests_total", model=UNKNOWN_MODEL, route=CHAT, status="404"): 1,
        key("dynllm_request_duration_seconds_count", model="A", route=CHAT): 3,
        key("dynllm_request_duration_seconds_count", model=UNKNOWN_MODEL, route=CHAT): 1,
        key("dynllm_request_ttfb_seconds_count", model="A", route=CHAT): 2,  # 499: no first byte
        key("dynllm_request_ttfb_seconds_count", model=UNKNOWN_MODEL, route=CHAT): 1,
        key("dynllm_request_cold_start_seconds_count", model="A"): 1,
        key("dynllm_tokens_total", model="A", kind="prompt"): 7,
        key("dynllm_tokens_total", model="A", kind="completion"): 3,
    }
    after = parse(metrics.exposition().decode())
    assert value(after, "dynllm_request_cold_start_seconds_sum", model="A") == 1.5
    assert value(after, "dynllm_request_duration_seconds_sum", model="A", route=CHAT) == 0.085
    # The request that never got a byte went into the 0.01 s duration bucket.
    assert value(after, "dynllm_request_duration_seconds_bucket", model="A", route=CHAT, le="0.01")
    assert value(after, "dynllm_vram_budget_mb") == 8000


async def test_gauges_read_the_live_state() -> None:
    hub = EventHub()
    fx = FakeEffects(auto=False)
    s = Scheduler(make_config(AB), fx, hub.publish)
    metrics = Metrics(s, Admission())

    def gauges() -> Samples:
        return parse(metrics.exposition().decode())

    loading = asyncio.create_task(s.acquire(spec(s, "A")))
    await asyncio.sleep(0)
    g = gauges()
    assert value(g, "dynllm_model_state", model="A", state="loading") == 1
    assert value(g, "dynllm_model_state", model="A", state="unloaded") == 0
    assert value(g, "dynllm_model_queued_requests", model="A") == 1  # waits for the load
    assert value(g, "dynllm_vram_used_mb") == 6000
    assert value(g, "dynllm_model_vram_mb", model="A") == 6000
    fx.open("start:A")
    lease = await loading
    g = gauges()
    assert value(g, "dynllm_model_state", model="A", state="loaded") == 1
    assert value(g, "dynllm_model_in_flight_requests", model="A") == 1
    assert value(g, "dynllm_model_queued_requests", model="A") == 0
    queued = asyncio.create_task(s.acquire(spec(s, "B")))  # A is busy: B waits for VRAM
    await asyncio.sleep(0)
    assert value(gauges(), "dynllm_model_queued_requests", model="B") == 1
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    lease.release()
    g = gauges()
    assert value(g, "dynllm_model_in_flight_requests", model="A") == 0
    assert value(g, "dynllm_model_queued_requests", model="B") == 0
    assert value(g, "dynllm_model_vram_mb", model="B") == 0


async def test_metrics_through_the_app(make_config: ConfigFactory) -> None:
    config = make_config(
        [
            {"name": "A", "vram_mb": 6000},
            {"name": "B", "vram_mb": 6000},
            {"name": "C", "vram_mb": 100, "extra_args": ["--fake-exit-during-load", "2"]},
        ]
    )
    tokens = {(m, k): 0 for m in "AB" for k in ("prompt", "completion")}

    def count(model: str, usage: dict[str, int]) -> None:
        for kind in ("prompt", "completion"):
            tokens[model, kind] += usage[f"{kind}_tokens"]

    async with serve(config) as app:

        async def scrape() -> Samples:
            r = await app.client.get("/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain; version=")
            return parse(r.text)

        before = await scrape()
        for model in ("A", "A", "B", "B"):  # the first B evicts A
            r = await app.chat(model, max_tokens=4)
            assert r.status_code == 200
            count(model, r.json()["usage"])
        # A streamed request (A is loaded again, evicting B): its usage comes in the
        # final chunk of the stream.
        body = {"stream": True, "max_tokens": 5, "stream_options": {"include_usage": True}}
        payload = {"model": "A", "messages": [{"role": "user", "content": "hi"}], **body}
        async with app.client.stream("POST", CHAT, json=payload) as stream:
            text = (await stream.aread()).decode()
        usage = [json.loads(line[6:])["usage"] for line in text.split("\n") if '"usage"' in line]
        count("A", usage[-1])
        assert (await app.chat("nope")).status_code == 404
        c_status = (await app.chat("C")).status_code  # its load fails
        assert c_status >= 500
        assert (await app.client.post("/admin/models/unload", json={"model": "A"})).is_success
        assert (await app.client.post("/admin/models/load", json={"model": "B"})).is_success
        os.kill((await app.admin_models())["B"]["pid"], signal.SIGKILL)
        await apoll(lambda: app.services.scheduler.slots["B"].handle is None, timeout=10)
        after = await scrape()

    moved = delta(before, after)
    print("moved:", *sorted(f"{k[0]}{dict(sorted(k[1]))} +{v:g}" for k, v in moved.items()))
    c = str(c_status)
    expected = {
        key("dynllm_requests_total", model="A", route=CHAT, status="200"): 3,
        key("dynllm_requests_total", model="B", route=CHAT, status="200"): 2,
        key("dynllm_requests_total", model="C", route=CHAT, status=c): 1,
        key("dynllm_requests_total", model=UNKNOWN_MODEL, route=CHAT, status="404"): 1,
        key("dynllm_request_duration_seconds_count", model="A", route=CHAT): 3,
        key("dynllm_request_duration_seconds_count", model="B", route=CHAT): 2,
        key("dynllm_request_duration_seconds_count", model="C", route=CHAT): 1,
        key("dynllm_request_duration_seconds_count", model=UNKNOWN_MODEL, route=CHAT): 1,
        key("dynllm_request_ttfb_seconds_count", model="A", route=CHAT): 3,
        key("dynllm_request_ttfb_seconds_count", model="B", route=CHAT): 2,
        key("dynllm_request_ttfb_seconds_count", model="C", route=CHAT): 1,
        key("dynllm_request_ttfb_seconds_count", model=UNKNOWN_MODEL, route=CHAT): 1,
        # Cold: the first A, the first B, the streamed A (B had evicted it), C.
        key("dynllm_request_cold_start_seconds_count", model="A"): 2,
        key("dynllm_request_cold_start_seconds_count", model="B"): 1,
        key("dynllm_request_cold_start_seconds_count", model="C"): 1,
        key("dynllm_model_loads_total", model="A", reason="requested"): 2,
        key("dynllm_model_loads_total", model="B", reason="requested"): 1,
        key("dynllm_model_loads_total", model="B", reason="admin"): 1,
        key("dynllm_model_loads_total", model="C", reason="requested"): 1,
        key("dynllm_model_load_duration_seconds_count", model="A"): 2,
        key("dynllm_model_load_duration_seconds_count", model="B"): 2,
        key("dynllm_model_unloads_total", model="A", reason="evicted"): 1,
        key("dynllm_model_unloads_total", model="B", reason="evicted"): 1,
        key("dynllm_model_unloads_total", model="A", reason="admin"): 1,
        key("dynllm_model_crashes_total", model="C", reason="load_failed"): 1,
        key("dynllm_model_crashes_total", model="B", reason="crashed"): 1,
        **{key("dynllm_tokens_total", model=m, kind=k): n for (m, k), n in tokens.items() if n},
    }
    assert moved == expected
    print(f"tokens the backend reported: {tokens}")
    assert value(after, "dynllm_model_state", model="B", state="unloaded") == 1
    assert value(after, "dynllm_vram_used_mb") == 0
    assert value(after, "dynllm_vram_budget_mb") == 8000


@pytest.mark.parametrize("keys", [True, False])
async def test_metrics_is_an_admin_route(make_config: ConfigFactory, keys: bool) -> None:
    extra: dict[str, Any] = {"api_keys": ["inference"], "admin_api_keys": ["admin"]} if keys else {}
    config = make_config([{"name": "A"}], **extra)
    async with serve(config) as app:
        if keys:
            assert (await app.client.get("/metrics")).status_code == 401
            inference = {"Authorization": "Bearer inference"}
            assert (await app.client.get("/metrics", headers=inference)).status_code == 403
            r = await app.client.get("/metrics", headers={"Authorization": "Bearer admin"})
        else:  # no keys: this machine only (the test client is on loopback)
            r = await app.client.get("/metrics")
        assert r.status_code == 200
        assert value(parse(r.text), "dynllm_model_state", model="A", state="unloaded") == 1


async def test_in_flight_and_queued_gauges_through_the_app(make_config: ConfigFactory) -> None:
    """A slow stream holds A's one slot (max_concurrent_requests: 1); a second
    request waits for it: the gauges and /admin/models show 1 and 1."""
    config = make_config(
        [{"name": "A", "max_concurrent_requests": 1, "extra_args": ["--fake-token-rate", "20"]}]
    )
    async with serve(config) as app:
        payload = {"model": "A", "messages": [], "max_tokens": 40, "stream": True}
        async with app.client.stream("POST", CHAT, json=payload) as first:
            assert first.status_code == 200
            second = asyncio.create_task(app.chat("A", max_tokens=1))
            await apoll(lambda: app.services.admission.waiting("A") == 1, timeout=10)
            samples = parse((await app.client.get("/metrics")).text)
            in_flight = value(samples, "dynllm_model_in_flight_requests", model="A")
            queued = value(samples, "dynllm_model_queued_requests", model="A")
            print(f"one request streaming, one waiting: in_flight {in_flight}, queued {queued}")
            assert (in_flight, queued) == (1, 1)
            assert (await app.admin_models())["A"]["queued"] == 1
            await first.aread()
        assert (await second).status_code == 200
        samples = parse((await app.client.get("/metrics")).text)
        assert value(samples, "dynllm_model_in_flight_requests", model="A") == 0
        assert value(samples, "dynllm_model_queued_requests", model="A") == 0
