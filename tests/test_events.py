"""Lifecycle events and backend output as server-sent events.

The hubs on their own (a slow reader is dropped, never waited for; a failing
subscriber is logged), then through a real server: ``GET /admin/events`` and
``GET /admin/models/{m}/logs?follow=true`` with the fake llama-server as the
backend, a client that disconnects, keepalives, and a SIGTERM while a stream
is open (the real CLI in its own process).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynllm.api import sse
from dynllm.events import (
    EventHub,
    LifecycleEvent,
    LineHub,
    ModelState,
    Reason,
    log_event,
)
from tests.conftest import ConfigFactory, apoll, poll, serve
from tests.support.net import http_ok
from tests.support.sse import SSEReader

CONTRACT_FIELDS = {"model", "from", "to", "reason", "detail", "at", "duration_s"}


def event(n: int = 0, model: str = "A") -> LifecycleEvent:
    return LifecycleEvent(
        model, ModelState.UNLOADED, ModelState.LOADING, Reason.REQUESTED, None, float(n), None
    )


# ---- the hubs ---------------------------------------------------------------------------------


async def test_a_reader_that_falls_behind_is_dropped_and_publish_never_waits() -> None:
    hub = EventHub(feed_limit=10)
    slow, fast = hub.feed(), hub.feed()
    got: list[LifecycleEvent] = []
    hub.subscribe(got.append)
    started = time.perf_counter()
    for n in range(10_000):
        hub.publish(event(n))
        if n % 5 == 0:  # the fast reader keeps up
            assert await fast.get(0) is not None
    per_event_us = (time.perf_counter() - started) / 10_000 * 1e6
    print(f"publish with one stalled and one live feed: {per_event_us:.1f} us per event")
    assert len(got) == 10_000  # the synchronous subscribers saw everything
    assert slow.closed and slow.overflowed and not fast.closed
    assert hub.streams == 1  # the slow one is gone from the hub
    # The slow reader gets what was buffered, then a note, then the end.
    chunks = [c async for c in sse.relay(lambda: (slow, []), lambda e: b"x", keepalive=5)]
    assert chunks == [sse.CONNECTED, b"x" * 10, sse.FELL_BEHIND]


async def test_relay_sends_keepalives_and_ends_when_the_hub_closes() -> None:
    hub = EventHub()
    body = sse.relay(lambda: (hub.feed(), [b"first\n\n"]), lambda e: b"e", keepalive=0.05)
    assert await anext(body) == sse.CONNECTED + b"first\n\n"
    assert hub.streams == 1
    assert await anext(body) == sse.KEEPALIVE
    hub.publish(event())
    hub.publish(event(1))
    assert await anext(body) == b"ee"  # what came meanwhile, in one write
    hub.close()
    with pytest.raises(StopAsyncIteration):
        await anext(body)
    assert hub.streams == 0
    late = hub.feed()  # a stream opened after close ends at once
    assert late.closed and await late.get(1) is None


async def test_a_failing_subscriber_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = EventHub()
    got: list[LifecycleEvent] = []

    def broken(event: LifecycleEvent) -> None:
        raise ValueError("subscriber bug")

    hub.subscribe(broken)
    hub.subscribe(got.append)
    feed = hub.feed()
    with caplog.at_level(logging.ERROR, logger="dynllm.events"):
        hub.publish(event())
    assert len(got) == 1 and await feed.get(0) == [event()]
    assert "a lifecycle subscriber failed" in caplog.text and "subscriber bug" in caplog.text


async def test_line_hub_sends_each_model_its_own_lines() -> None:
    hub = LineHub()
    a, b = hub.feed("A"), hub.feed("B")
    hub.publish("A", "a1")
    hub.publish("C", "nobody follows C")
    hub.publish("B", "b1")
    assert await a.get(0) == ["a1"] and await b.get(0) == ["b1"]
    a.close()
    assert hub.streams == 1
    b.close()
    assert hub.streams == 0 and not hub._feeds  # no empty sets left behind


def test_the_log_line_of_each_kind_of_event(caplog: pytest.LogCaptureFixture) -> None:
    ready = LifecycleEvent(
        "A", ModelState.LOADING, ModelState.READY, Reason.ADMIN, None, 0.0, 1.5, pid=7, port=9100
    )
    crash = LifecycleEvent(
        "A", ModelState.READY, ModelState.UNLOADED, Reason.CRASHED, "code -9", 0.0, 60.0
    )
    note = LifecycleEvent(
        "A", ModelState.UNLOADED, ModelState.UNLOADED, Reason.COOLDOWN, "not tried for 5 s", 0, None
    )
    with caplog.at_level(logging.INFO, logger="dynllm.lifecycle"):
        for e in (ready, crash, note):
            log_event(e)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("INFO", "'A' loading -> loaded (admin) on port 9100, pid 7 after 1.50 s"),
        ("ERROR", "'A' loaded -> unloaded (crashed: code -9) after 60.00 s"),
        ("WARNING", "'A' unloaded, cooldown: not tried for 5 s"),
    ]
    assert caplog.records[0].model == "A"  # type: ignore[attr-defined]  # (for the JSON log)


# ---- through the server -----------------------------------------------------------------------


def _events(frames: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    return [(f["model"], f["from"], f["to"], f["reason"]) for f in frames]


async def test_events_stream_through_the_app(make_config: ConfigFactory) -> None:
    config = make_config(
        [
            {"name": "A", "vram_mb": 6000},
            {"name": "B", "vram_mb": 6000},
            {"name": "C", "extra_args": ["--fake-exit-during-load", "3"]},
        ],
        load_failure_cooldown_seconds=30,
    )
    async with serve(config) as app, app.client.stream("GET", "/admin/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        stream = SSEReader(response)
        assert await stream.frame() == ": connected"

        r = await app.client.post("/admin/models/load", json={"model": "A"})
        assert r.status_code == 200
        frame = await stream.frame()
        assert frame is not None and frame.startswith("event: lifecycle\ndata: {")
        first = json.loads(frame.split("data: ", 1)[1])
        assert set(first) == CONTRACT_FIELDS
        assert (first["model"], first["from"], first["to"], first["reason"]) == (
            "A",
            "unloaded",
            "loading",
            "admin",
        )
        loaded = await stream.data()
        assert (loaded["to"], loaded["reason"]) == ("loaded", "admin")
        assert loaded["duration_s"] > 0 and abs(loaded["at"] - time.time()) < 60
        print(f"A loaded in {loaded['duration_s']:.3f} s (event duration_s)")

        assert (await app.chat("B")).status_code == 200  # evicts A
        frames = await stream.until(lambda f: f["model"] == "B" and f["to"] == "loaded")
        assert sorted(_events(frames)) == sorted(
            [
                ("A", "loaded", "unloading", "evicted"),
                ("B", "unloaded", "loading", "requested"),
                ("A", "unloading", "unloaded", "evicted"),
                ("B", "loading", "loaded", "requested"),
            ]
        )
        assert all(f["detail"] == "to make room for 'B'" for f in frames if f["model"] == "A")

        pid = (await app.admin_models())["B"]["pid"]
        os.kill(pid, signal.SIGKILL)  # the backend this test had dynllm start
        crash = await stream.data()
        assert (crash["model"], crash["from"], crash["to"], crash["reason"]) == (
            "B",
            "loaded",
            "unloaded",
            "crashed",
        )
        assert "code -9" in crash["detail"]

        assert (await app.chat("C")).status_code >= 500
        frames = await stream.until(lambda f: f["reason"] == "cooldown")
        assert _events(frames) == [
            ("C", "unloaded", "loading", "requested"),
            ("C", "loading", "unloaded", "load_failed"),
            ("C", "unloaded", "unloaded", "cooldown"),
        ]
        assert "model file is corrupt" in frames[1]["detail"]
        assert frames[2]["detail"].endswith("not tried again for 30 s")

        r = await app.client.post("/admin/models/load", json={"model": "A"})
        r = await app.client.post("/admin/models/unload", json={"model": "A"})
        frames = await stream.until(lambda f: f["to"] == "unloaded")
        assert _events(frames)[-2:] == [
            ("A", "loaded", "unloading", "admin"),
            ("A", "unloading", "unloaded", "admin"),
        ]


async def test_keepalive_and_a_client_that_leaves(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "A"}])
    async with serve(config) as app:
        hub = app.services.events
        hub.keepalive_seconds = 0.2
        async with app.client.stream("GET", "/admin/events") as response:
            stream = SSEReader(response)
            assert await stream.frame() == ": connected"
            assert hub.streams == 1
            started = time.monotonic()
            assert await stream.frame() == ": keepalive"
            waited = time.monotonic() - started
            print(f"keepalive after {waited:.2f} s (keepalive_seconds 0.2)")
            assert 0.1 < waited < 2
        # The client closed its connection: its subscription goes with it.
        await apoll(lambda: hub.streams == 0, timeout=5)
        lines = app.services.lines
        async with app.client.stream("GET", "/admin/models/A/logs?follow=true") as response:
            assert await SSEReader(response).frame() == ": connected"
            assert lines.streams == 1
        await apoll(lambda: lines.streams == 0, timeout=5)
        # Still working for the next client.
        async with app.client.stream("GET", "/admin/events") as response:
            stream = SSEReader(response)
            assert await stream.frame() == ": connected"
            await app.client.post("/admin/models/load", json={"model": "A"})
            assert (await stream.data())["to"] == "loading"


async def test_logs_follow_sends_the_tail_then_new_lines_across_restarts(
    make_config: ConfigFactory,
) -> None:
    config = make_config([{"name": "A"}])
    async with serve(config) as app:
        assert (await app.client.post("/admin/models/load", json={"model": "A"})).status_code == 200
        tail = (await app.client.get("/admin/models/A/logs", params={"lines": 3})).json()["lines"]
        assert len(tail) == 3
        url = "/admin/models/A/logs?follow=true&lines=3"
        async with app.client.stream("GET", url) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            stream = SSEReader(response)
            assert await stream.frame() == ": connected"
            assert [(await stream.data())["line"] for _ in range(3)] == tail
            assert (await app.chat("A")).status_code == 200  # the backend logs each request
            line = await stream.data()
            assert line["model"] == "A" and "POST /v1/chat/completions" in line["line"], (
                "backend output does not reach the follow stream: ProcessEffects must pass "
                "on_line (LineHub.publish for the model) to BackendProcess.spawn"
            )
            old_pid = (await app.admin_models())["A"]["pid"]
            await app.client.post("/admin/models/unload", json={"model": "A"})
            await app.client.post("/admin/models/load", json={"model": "A"})
            new_pid = (await app.admin_models())["A"]["pid"]
            assert new_pid != old_pid
            # The next process's output arrives on the same stream.
            frames = await stream.until(lambda f: f"[{new_pid}]" in f["line"])
            print(f"follow stream: {len(frames)} line(s) until the restarted backend's first")
        r = await app.client.get("/admin/models/nope/logs?follow=true")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_backend_output_is_logged_at_backend_log_level(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    for level, expected in (("info", logging.INFO), ("warning", logging.WARNING)):
        config = make_config([{"name": "A"}], backend_log_level=level)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="dynllm.backend"):
            async with serve(config) as app:
                await app.client.post("/admin/models/load", json={"model": "A"})
        records = [r for r in caplog.records if r.name == "dynllm.backend.A"]
        assert records, "no backend line was logged"
        lines = [r for r in records if "main: model loaded" in r.getMessage()]
        assert lines and all(r.levelno == expected for r in lines), (
            level,
            [(r.levelname, r.getMessage()) for r in records[:5]],
        )
        assert lines[0].model == "A"  # type: ignore[attr-defined]  # tagged by model
        print(f"backend_log_level {level}: {len(records)} line(s) at {lines[0].levelname}")


def test_sigterm_with_an_open_events_stream_ends_it_and_exits_promptly(
    make_config: ConfigFactory, dynllm_process: Any, tmp_path: Path
) -> None:
    """uvicorn waits for open responses before the lifespan's shutdown: the
    stream must end at once, not hold the process up to its graceful timeout
    (stop_timeout_seconds + 5 s in dynllm.cli)."""
    path, config = make_config.write_and_load([{"name": "A"}])
    graceful = int(config.stop_timeout_seconds) + 5
    log = tmp_path / "dynllm.log"
    proc = dynllm_process(path, log)
    base = f"http://127.0.0.1:{config.server.port}"
    with httpx.Client(base_url=base, trust_env=False, timeout=30) as http:
        poll(lambda: http_ok(http), 30)
        assert http.post("/admin/models/load", json={"model": "A"}).status_code == 200
        with http.stream("GET", "/admin/events") as response:
            chunks = response.iter_text()
            assert next(chunks) == ": connected\n\n"
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            for _ in chunks:  # until the server ends the stream
                pass
            ended = time.monotonic() - started
        assert proc.wait(graceful + 10) in (0, -signal.SIGTERM)
        exited = time.monotonic() - started
    print(f"SIGTERM with an open /admin/events: stream ended after {ended:.2f} s, "
          f"process exited after {exited:.2f} s (graceful timeout {graceful} s)")  # fmt: skip
    assert ended < 2 and exited < graceful - 2, (ended, exited)
    output = log.read_text()
    assert "timeout graceful shutdown exceeded" not in output
    assert "'A' loaded -> unloading (shutdown)" in output  # the store and log still saw it
