"""Admin and status routes, preloading, and graceful shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx

from dynllm.app import instance_marker
from tests.conftest import (
    ConfigFactory,
    backends_with_marker,
    poll,
    serve,
    subprocess_env,
)
from tests.support.net import http_ok


async def test_admin_view_load_unload_and_logs(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "A", "pinned": True, "unload_time": -1}, {"name": "B"}])
    async with serve(config) as app:
        admin = await app.admin_models()
        assert set(admin) == {"A", "B"}
        assert admin["A"]["status"] == "unloaded" and admin["A"]["pinned"] is True
        assert admin["A"]["unload_after_seconds"] is None
        # No failed loads: no cooldown (tests/test_crash_and_retry.py fills these in).
        assert admin["A"]["consecutive_failures"] == 0 and admin["A"]["cooldown_until"] is None

        r = await app.client.post("/admin/models/load", content=b'{"model": "A"}')
        assert r.status_code == 415  # no JSON content type: a cross-origin simple request
        assert r.json()["error"]["code"] == "unsupported_media_type"
        assert (await app.admin_models())["A"]["status"] == "unloaded"
        r = await app.client.post("/admin/models/load", json={"model": "A"})
        assert r.status_code == 200 and r.json()["status"] == "loaded"
        admin = await app.admin_models()
        for key in ("port", "pid", "loaded_at", "last_used"):
            assert admin["A"][key] is not None, key
        assert admin["A"]["in_flight"] == 0 and admin["A"]["load_count"] == 1

        logs = await app.client.get("/admin/models/A/logs", params={"lines": 5})
        assert logs.status_code == 200 and 0 < len(logs.json()["lines"]) <= 5

        assert (await app.client.post("/admin/models/load", json={"model": "B"})).status_code == 200
        r = await app.client.post("/admin/models/unload-all", json={"force": True})
        assert sorted(r.json()["unloaded"]) == ["A", "B"]  # pinned models unload by hand
        assert await app.spawned_pids() == []

        r = await app.client.post("/admin/models/unload", json={"model": "A"})
        assert r.json()["unloaded"] is False  # idempotent


async def test_admin_unload_busy_model_needs_force(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "A", "extra_args": ["--fake-token-rate", "20"]}])
    async with serve(config) as app:
        payload = {"model": "A", "messages": [], "max_tokens": 400, "stream": True}
        async with app.client.stream("POST", "/v1/chat/completions", json=payload) as stream:
            lines = stream.aiter_lines()
            await lines.__anext__()
            r = await app.client.post("/admin/models/unload", json={"model": "A"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "model_busy"
            r = await app.client.post(
                "/admin/models/unload-all", headers={"content-type": "application/json"}
            )
            assert r.json() == {"unloaded": [], "busy": ["A"]}
            r = await app.client.post("/admin/models/unload-all", json={"force": "yes"})
            assert r.status_code == 400
            r = await app.client.post("/admin/models/unload", json={"model": "A", "force": True})
            assert r.status_code == 200 and r.json()["status"] == "unloaded"
            rest = [line async for line in lines if line.startswith("data: ")]
            assert "backend_failed_mid_stream" in rest[-1]


async def test_admin_bad_bodies(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "A"}])
    async with serve(config) as app:
        for body, status in [(b"nope", 400), (b"{}", 400), (b'{"model": "A", "x": 1}', 400),
                             (b'{"model": "zzz"}', 404)]:  # fmt: skip
            r = await app.client.post(
                "/admin/models/unload", content=body, headers={"content-type": "application/json"}
            )
            assert r.status_code == status, body
            assert set(r.json()["error"]) == {"message", "type", "code"}


async def test_health(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "A", "vram_mb": 1234}])
    async with serve(config) as app:
        await app.chat("A")
        health = (await app.client.get("/health")).json()
        assert health["status"] == "ok"
        assert health["models_loaded"] == 1 and health["vram_used_mb"] == 1234


async def test_preload_happens_before_traffic(make_config: ConfigFactory) -> None:
    config = make_config(
        [{"name": "A", "extra_args": ["--fake-load-seconds", "0.5"]}, {"name": "B"}],
        preload_models=["A"],
    )
    async with serve(config) as app:
        admin = await app.admin_models()  # the first request the server ever answers
        assert admin["A"]["status"] == "loaded" and admin["B"]["status"] == "unloaded"


def test_sigterm_stops_backends_gracefully(make_config: ConfigFactory, tmp_path: Path) -> None:
    path, config = make_config.write_and_load([{"name": "A"}, {"name": "B"}])
    log = (tmp_path / "dynllm.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynllm", "--config", str(path)],
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{config.server.port}", trust_env=False
        ) as http:
            poll(lambda: http_ok(http), 30)
            for model in ("A", "B"):
                assert (
                    http.post(
                        "/v1/chat/completions", json={"model": model, "messages": []}
                    ).status_code
                    == 200
                )
        assert len(backends_with_marker({instance_marker(config)})) == 2
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once its graceful shutdown is done; systemd
        # counts death by SIGTERM as a clean stop.
        assert proc.wait(20) in (0, -signal.SIGTERM)
        assert backends_with_marker({instance_marker(config)}) == []
        output = (tmp_path / "dynllm.log").read_text()
        for model in ("A", "B"):  # the log's lifecycle lines
            assert f"'{model}' loaded -> unloading (shutdown)" in output, output
            assert f"'{model}' unloading -> unloaded (shutdown) after" in output, output
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_logs_of_a_model_named_with_a_slash_zero_lines_and_uptime(
    make_config: ConfigFactory,
) -> None:
    config = make_config([{"name": "org/chat"}])
    async with serve(config) as app:
        assert (await app.chat("org/chat")).status_code == 200
        logs = await app.client.get("/admin/models/org/chat/logs")
        assert logs.status_code == 200 and logs.json()["model"] == "org/chat"
        assert logs.json()["lines"]  # the fake backend printed something
        none = await app.client.get("/admin/models/org/chat/logs", params={"lines": 0})
        assert none.json()["lines"] == []
        two = await app.client.get("/admin/models/org/chat/logs", params={"lines": 2})
        assert len(two.json()["lines"]) == 2
        health = (await app.client.get("/health")).json()
        assert 0 <= health["uptime_seconds"] < 60
