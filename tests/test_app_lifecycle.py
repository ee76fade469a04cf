"""dynllm end to end against the fake llama-server: real processes, real HTTP, real SQLite.

These are the scheduling guarantees users rely on: eviction, single-flight
loads, no head-of-line blocking, streams never cut, idle unload, crash and
misbehaviour handling.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ConfigFactory, RunningApp, apoll, serve

TWO_BIG = [{"name": "A", "vram_mb": 6000}, {"name": "B", "vram_mb": 6000}]


def db_rows(path: str) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return {r["name"]: dict(r) for r in db.execute("SELECT * FROM models")}


async def read_sse(response: httpx.Response) -> list[Any]:
    events: list[Any] = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def content_of(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )


async def stream_chat(app: RunningApp, model: str, tokens: int) -> tuple[list[Any], float]:
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        "stream": True,
    }
    async with app.client.stream("POST", "/v1/chat/completions", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["x-accel-buffering"] == "no"
        events = await read_sse(response)
    return events, time.monotonic()


async def test_second_model_evicts_first_and_all_views_agree(make_config: ConfigFactory) -> None:
    config = make_config(TWO_BIG, total_vram_mb=8000)
    async with serve(config) as app:
        r = await app.chat("A")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith("tok0")
        pid_a = (await app.admin_models())["A"]["pid"]

        r = await app.chat("B")
        assert r.status_code == 200, r.text
        admin = await app.admin_models()
        assert admin["A"]["status"] == "unloaded" and admin["A"]["pid"] is None
        assert admin["B"]["status"] == "loaded" and admin["B"]["pid"] != pid_a
        assert not _alive(pid_a)

        listed = {m["id"]: m for m in (await app.client.get("/v1/models")).json()["data"]}
        assert listed["A"]["status"] == "unloaded" and listed["B"]["status"] == "loaded"
        assert listed["B"]["backend"] == "llamacpp" and listed["B"]["model_type"] == "llm"

        await app.services.store.flush()
        rows = db_rows(config.db_file.as_posix())
        assert rows["A"]["status"] == "unloaded" and rows["A"]["pid"] is None
        assert rows["B"]["status"] == "loaded"
        assert rows["B"]["pid"] == admin["B"]["pid"] and rows["B"]["port"] == admin["B"]["port"]
        assert rows["A"]["load_count"] == 1 and rows["B"]["load_count"] == 1
        health = (await app.client.get("/health")).json()
        assert health["vram_used_mb"] == 6000


async def test_fifty_concurrent_cold_requests_spawn_once(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    spawn_log = tmp_path / "spawns.log"
    config = make_config(
        [
            {
                "name": "A",
                "extra_args": ["--fake-load-seconds", "0.5", "--fake-spawn-log", str(spawn_log)],
            }
        ]
    )
    async with serve(config) as app:
        responses = await asyncio.gather(*(app.chat("A") for _ in range(50)))
        assert [r.status_code for r in responses] == [200] * 50
        assert len(spawn_log.read_text().splitlines()) == 1
        assert (await app.admin_models())["A"]["load_count"] == 1


async def test_slow_load_does_not_block_a_loaded_model(make_config: ConfigFactory) -> None:
    config = make_config(
        [
            {"name": "A", "vram_mb": 100},
            {"name": "B", "vram_mb": 100, "extra_args": ["--fake-load-seconds", "3"]},
        ]
    )
    async with serve(config) as app:
        assert (await app.chat("A")).status_code == 200
        b = asyncio.create_task(app.chat("B"))
        await apoll(lambda: app.services.scheduler.slots["B"].state.value == "loading", 5)
        latencies = []
        for _ in range(5):
            start = time.monotonic()
            assert (await app.chat("A")).status_code == 200
            latencies.append(time.monotonic() - start)
        assert app.services.scheduler.slots["B"].state.value == "loading"
        print(f"A latencies while B loads: max {max(latencies) * 1000:.1f} ms")
        assert max(latencies) < 0.5, latencies
        assert (await b).status_code == 200


async def _stream_blocks_eviction(
    make_config: ConfigFactory, queue_timeout: float
) -> dict[str, Any]:
    config = make_config(
        [
            {"name": "A", "vram_mb": 6000, "extra_args": ["--fake-token-rate", "40"]},
            {"name": "B", "vram_mb": 6000},
        ],
        queue_timeout_seconds=queue_timeout,
    )
    async with serve(config) as app:
        stream = asyncio.create_task(stream_chat(app, "A", 200))  # 5 s at 40 tokens/s
        await apoll(lambda: app.services.scheduler.slots["A"].in_flight == 1, 10)
        b_response = await app.chat("B")
        b_done = time.monotonic()
        events, stream_end = await stream
        return {"events": events, "stream_end": stream_end, "b": b_response, "b_done": b_done}


async def test_long_stream_is_never_evicted_and_queue_times_out(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    other = ConfigFactory(tmp_path / "second", make_config.models_dir)
    (tmp_path / "second").mkdir()
    served, refused = await asyncio.gather(
        _stream_blocks_eviction(make_config, queue_timeout=60),
        _stream_blocks_eviction(other, queue_timeout=2),
    )
    for outcome in (served, refused):
        events = outcome["events"]
        assert events[-1] == "[DONE]"
        assert content_of(events).split() == [f"tok{i}" for i in range(200)]
    assert served["b"].status_code == 200
    assert served["b_done"] >= served["stream_end"] - 0.05  # B only after A's last byte
    assert refused["b"].status_code == 503
    assert refused["b"].json()["error"]["code"] == "queue_timeout"
    assert int(refused["b"].headers["retry-after"]) >= 1
    assert refused["b_done"] < refused["stream_end"]
    print(
        f"B served {served['b_done'] - served['stream_end']:+.3f} s after A's last byte; "
        f"with queue timeout 2 s B got 503 {refused['stream_end'] - refused['b_done']:.1f} s "
        "before A's stream ended"
    )


async def test_idle_unload_is_timely_and_never_cuts_a_stream(make_config: ConfigFactory) -> None:
    config = make_config(
        [{"name": "A", "unload_time": 2, "extra_args": ["--fake-token-rate", "40"]}],
        idle_check_interval_seconds=0.5,
    )
    async with serve(config) as app:
        events, ended = await stream_chat(app, "A", 200)  # a 5 s stream, 2.5x the timeout
        assert events[-1] == "[DONE]"
        assert len(content_of(events).split()) == 200
        slots = app.services.scheduler.slots
        assert slots["A"].state.value == "loaded"
        await apoll(lambda: slots["A"].state.value == "unloaded", timeout=10, interval=0.05)
        unloaded_after = time.monotonic() - ended
        print(f"unloaded {unloaded_after:.2f} s after the 5 s stream's last byte (limit 3.5)")
        assert 2 <= unloaded_after <= 2 + 0.5 + 1, unloaded_after


async def test_backend_killed_externally_is_noticed_and_restarted(
    make_config: ConfigFactory,
) -> None:
    config = make_config([{"name": "A"}])
    async with serve(config) as app:
        assert (await app.chat("A")).status_code == 200
        pid = (await app.admin_models())["A"]["pid"]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        await apoll(lambda: app.services.scheduler.slots["A"].state.value == "unloaded", 1.0, 0.01)
        noticed = time.monotonic() - killed
        print(f"external SIGKILL noticed after {noticed * 1000:.0f} ms")
        assert noticed < 1.0
        admin = (await app.admin_models())["A"]
        assert admin["pid"] is None and admin["port"] is None
        assert "exited unexpectedly with code -9" in admin["last_error"]
        assert app.services.scheduler.ports.leased == frozenset()
        r = await app.chat("A")
        assert r.status_code == 200
        assert (await app.admin_models())["A"]["pid"] not in (None, pid)


async def test_exit_during_load_fails_waiters_fast_with_stderr(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "A", "extra_args": ["--fake-exit-during-load", "3"]}])
    async with serve(config) as app:
        start = time.monotonic()
        responses = await asyncio.gather(*(app.chat("A") for _ in range(5)))
        failed_after = time.monotonic() - start
        print(f"5 waiters failed {failed_after * 1000:.0f} ms after the request (exit at ~100 ms)")
        assert failed_after < 1.0
        for r in responses:
            assert r.status_code == 502
            error = r.json()["error"]
            assert error["code"] == "backend_exited"
            assert "code 3" in error["message"]
            assert "fake load failure" in error["message"]
        admin = (await app.admin_models())["A"]
        assert admin["status"] == "unloaded" and "fake load failure" in admin["last_error"]


async def test_never_healthy_backend_is_killed_at_load_timeout(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    spawn_log = tmp_path / "spawns.log"
    config = make_config(
        [{"name": "A", "load_timeout_seconds": 1.5,
          "extra_args": ["--fake-never-ready", "--fake-spawn-log", str(spawn_log)]}]
    )  # fmt: skip
    async with serve(config) as app:
        start = time.monotonic()
        r = await app.chat("A")
        elapsed = time.monotonic() - start
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "load_timeout"
        print(f"load_timeout 1.5 s: 504 after {elapsed:.2f} s")
        assert 1.5 <= elapsed < 3.0
        pid = int(spawn_log.read_text().split()[0])
        assert not _alive(pid)


async def test_backend_ignoring_sigterm_is_killed_after_grace(make_config: ConfigFactory) -> None:
    config = make_config(
        [{"name": "A", "extra_args": ["--fake-ignore-sigterm"]}], stop_timeout_seconds=1
    )
    async with serve(config) as app:
        assert (await app.chat("A")).status_code == 200
        pid = (await app.admin_models())["A"]["pid"]
        start = time.monotonic()
        r = await app.client.post("/admin/models/unload", json={"model": "A"})
        elapsed = time.monotonic() - start
        assert r.status_code == 200 and r.json()["unloaded"] is True
        print(f"SIGTERM ignored: unload took {elapsed:.2f} s with stop_timeout 1 s")
        assert 1.0 <= elapsed < 2.5, elapsed
        assert not _alive(pid)


async def test_mid_stream_crash_ends_stream_with_error_event(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "A", "extra_args": ["--fake-crash-after-chunks", "3"]}])
    async with serve(config) as app:
        events, _ = await stream_chat(app, "A", 50)
        assert "[DONE]" not in events
        assert len(events) == 4
        assert events[-1]["error"]["code"] == "backend_failed_mid_stream"
        assert events[-1]["error"]["type"] == "backend_error"
        slots = app.services.scheduler.slots
        await apoll(lambda: slots["A"].state.value == "unloaded", 1.0)
        assert slots["A"].in_flight == 0
        assert (await app.chat("A")).status_code == 200  # restarted on demand


async def test_client_disconnect_closes_upstream_and_releases(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "A", "extra_args": ["--fake-token-rate", "20"]}])
    async with serve(config) as app:
        payload = {"model": "A", "messages": [], "max_tokens": 1000, "stream": True}
        async with app.client.stream("POST", "/v1/chat/completions", json=payload) as response:
            async for _line in response.aiter_lines():
                break
        slot = app.services.scheduler.slots["A"]
        await apoll(lambda: slot.in_flight == 0, 2.0)
        port = slot.port

        def upstream_idle() -> bool:
            stats = httpx.get(f"http://127.0.0.1:{port}/fake/stats").json()
            return bool(stats["active_streams"] == 0)

        await apoll(upstream_idle, 2.0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("alias", ["a-alias"])
async def test_aliases_resolve_everywhere(make_config: ConfigFactory, alias: str) -> None:
    config = make_config([{"name": "A", "aliases": [alias]}])
    async with serve(config) as app:
        r = await app.chat(alias)
        assert r.status_code == 200 and r.json()["model"] == "A"
        r = await app.client.post("/admin/models/unload", json={"model": alias})
        assert r.json()["unloaded"] is True and r.json()["name"] == "A"
        r = await app.client.post("/admin/models/load", json={"model": alias})
        assert r.json()["status"] == "loaded"
        listed = (await app.client.get(f"/v1/models/{alias}")).json()
        assert listed["id"] == alias and listed["parent"] == "A"  # the alias's own entry
