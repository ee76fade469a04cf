"""The route layer through a running dynllm: every (route, model type) pair,
error shapes, what a backend's failure looks like, and a client that leaves
at every step.  The backends are real processes: the generic OpenAI/KServe
stand-in (tests/support/fake_openai_server.py) started by the ``command``
backend, so every route family has something real to reach."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynllm.api.routes import ROUTES, Body, Route
from dynllm.config import ModelType
from dynllm.registry import SERVES
from tests.conftest import ConfigFactory, RunningApp, apoll, serve

FAKE = Path(__file__).parent / "support" / "fake_openai_server.py"


def fake_model(name: str, model_type: str = "llm", **extra: Any) -> dict[str, Any]:
    argv = [sys.executable, str(FAKE), "--host", "{host}", "--port", "{port}", "--name", "{name}"]
    return {
        "name": name,
        "backend": "command",
        "model_type": model_type,
        "vram_mb": 100,
        "command": argv + extra.pop("fake_args", []),
        **extra,
    }


def config_for(make_config: ConfigFactory, models: list[dict[str, Any]], **top: Any) -> Any:
    return make_config(models, enabled_backends=["llamacpp", "command"], **top)


async def call(app: RunningApp, route: Route, model: str) -> httpx.Response:
    """One minimal valid request on ``route`` for ``model``."""
    path = route.path.replace("{name}", model)
    if route.body is Body.MULTIPART:
        return await app.client.post(
            path, data={"model": model}, files={"file": ("a.wav", b"RIFF....WAVE", "audio/wav")}
        )
    if route.body is Body.NONE:
        return await app.client.get(path)
    if route.body is Body.RAW:
        return await app.client.post(path, json={"inputs": []})
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "prompt": "hi",
        "input": "hi",
        "query": "q",
        "documents": ["a"],
    }
    return await app.client.post(path, json=body)


async def backend_stats(app: RunningApp, model: str) -> dict[str, Any]:
    port = (await app.admin_models())[model]["port"]
    async with httpx.AsyncClient(trust_env=False) as client:
        return dict((await client.get(f"http://127.0.0.1:{port}/fake/stats")).json())


async def test_every_route_for_every_model_type(make_config: ConfigFactory) -> None:
    """2xx where the model type serves the route, else a 400 in the route's
    shape naming what the model serves; nothing is loaded for a refusal."""
    models = [fake_model(f"m-{kind.value}", kind.value) for kind in ModelType]
    async with serve(config_for(make_config, models)) as app:
        for kind in ModelType:
            name = f"m-{kind.value}"
            for route in ROUTES:
                response = await call(app, route, name)
                served = route.family in SERVES[kind]
                where = f"{route.path} x {kind.value}"
                if served:
                    assert response.status_code == 200, (where, response.text)
                    continue
                assert response.status_code == 400, (where, response.text)
                error = response.json()["error"]
                message = error if route.path.startswith("/v2") else error["message"]
                assert f"model_type '{kind.value}'" in message, (where, message)
                wanted = ", ".join(sorted(f.value for f in SERVES[kind]))
                assert message.endswith(f"it serves: {wanted}"), (where, message)
        # every model type was loaded by its own routes, never by a refused one
        loaded = await app.admin_models()
        assert all(m["load_count"] == 1 for m in loaded.values()), loaded


async def test_kserve_ready_answers_from_dynllm_state_without_loading(
    make_config: ConfigFactory,
) -> None:
    async with serve(config_for(make_config, [fake_model("clf", "classification")])) as app:
        for path in ("/v2/models/clf/ready", "/v2/models/clf/versions/3/ready"):
            not_ready = await app.client.get(path)
            assert not_ready.status_code == 400
            assert not_ready.json() == {"error": "Model 'clf' is not ready: it is unloaded"}
        assert await app.spawned_pids() == []
        unknown = await app.client.get("/v2/models/nope/ready")
        assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
        for path in ("/v2/health/live", "/v2/health/ready", "/v2"):
            assert (await app.client.get(path)).status_code == 200
        assert await app.spawned_pids() == []
        metadata = await app.client.get("/v2/models/clf")  # loads on demand
        assert metadata.status_code == 200 and metadata.json()["name"] == "clf"
        assert (await app.client.get("/v2/models/clf/ready")).json() == {
            "name": "clf",
            "ready": True,
        }


async def test_kserve_binary_extension_passes_through_byte_for_byte(
    make_config: ConfigFactory,
) -> None:
    import hashlib

    async with serve(config_for(make_config, [fake_model("clf", "classification")])) as app:
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "BYTES",
                        "shape": [300],
                        "parameters": {"binary_data_size": 300},
                    }
                ]
            }
        ).encode()
        raw = bytes(range(256)) + b"\x00\xff" * 22
        sent = header + raw
        response = await app.client.post(
            "/v2/models/clf/versions/1/infer",
            content=sent,
            headers={
                "Inference-Header-Content-Length": str(len(header)),
                "Content-Type": "application/octet-stream",
            },
        )
        assert response.status_code == 200, response.text
        seen = (await backend_stats(app, "clf"))["seen"][-1]
        assert seen["path"] == "/v2/models/clf/versions/1/infer"
        assert seen["sha256"] == hashlib.sha256(sent).hexdigest()  # request: untouched
        assert hashlib.sha256(response.content).hexdigest() == seen["sent_sha256"]  # answer too
        split = int(response.headers["inference-header-content-length"])
        assert response.content[split:] == raw[::-1]


async def test_backend_errors_keep_their_status_in_the_route_shape(
    make_config: ConfigFactory,
) -> None:
    async with serve(config_for(make_config, [fake_model("m")])) as app:
        refused = await app.chat("m", fake_status=422, fake_message="field x is wrong")
        assert refused.status_code == 422
        assert refused.json() == {
            "error": {
                "message": "field x is wrong",
                "type": "invalid_request_error",
                "code": "422",
            }
        }


async def test_a_backend_that_reads_and_drops_gets_the_request_once(
    make_config: ConfigFactory,
) -> None:
    async with serve(config_for(make_config, [fake_model("m")])) as app:
        response = await app.chat("m", fake_drop=True)
        assert response.status_code == 502
        message = response.json()["error"]["message"]
        assert message == (
            "The backend for 'm' closed the connection without answering; the request was "
            "not sent again because the backend may have read it"
        )
        stats = await backend_stats(app, "m")
        assert stats["requests"] == 1  # exactly once
        assert app.services.scheduler.slots["m"].in_flight == 0


# ---- a client that leaves --------------------------------------------------------------


async def _leave(task: asyncio.Task[Any]) -> float:
    task.cancel()
    left = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    return left


async def _in_flight_back_to_zero(app: RunningApp, model: str, left: float) -> None:
    slot = app.services.scheduler.slots[model]
    await apoll(lambda: slot.in_flight == 0 and slot.pending == 0, timeout=0.5, interval=0.005)
    print(f"in_flight back to 0 {1000 * (time.monotonic() - left):.0f} ms after the client left")


async def _backend_saw_it_go(app: RunningApp, model: str, left: float) -> None:
    async def gone() -> bool:
        return bool((await backend_stats(app, model))["gone"] == 1)

    deadline = time.monotonic() + 0.5
    while not await gone():
        assert time.monotonic() < deadline, "the backend did not see the connection close"
        await asyncio.sleep(0.01)
    print(f"backend saw the close {1000 * (time.monotonic() - left):.0f} ms after")


async def test_client_leaving_before_the_first_byte(make_config: ConfigFactory) -> None:
    async with serve(config_for(make_config, [fake_model("m")])) as app:
        assert (await app.chat("m")).status_code == 200  # loaded
        task = asyncio.create_task(app.chat("m", fake_delay=30))
        await apoll(lambda: app.services.scheduler.slots["m"].in_flight == 1, timeout=5)
        left = await _leave(task)
        await _backend_saw_it_go(app, "m", left)
        await _in_flight_back_to_zero(app, "m", left)


async def _leave_after_the_first_bytes(app: RunningApp, body: dict[str, Any]) -> None:
    started = asyncio.Event()

    async def read() -> None:
        async with app.client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for _ in response.aiter_raw():
                started.set()

    task = asyncio.create_task(read())
    await asyncio.wait_for(started.wait(), timeout=10)
    left = await _leave(task)
    await _backend_saw_it_go(app, "m", left)
    await _in_flight_back_to_zero(app, "m", left)


async def test_client_leaving_during_a_plain_body(make_config: ConfigFactory) -> None:
    async with serve(config_for(make_config, [fake_model("m")])) as app:
        body = {"model": "m", "messages": [], "fake_tokens": 200, "fake_rate": 10}
        await _leave_after_the_first_bytes(app, body)


async def test_client_leaving_during_a_stream(make_config: ConfigFactory) -> None:
    async with serve(config_for(make_config, [fake_model("m")])) as app:
        body = {"model": "m", "messages": [], "stream": True, "fake_tokens": 200, "fake_rate": 10}
        await _leave_after_the_first_bytes(app, body)


async def test_client_leaving_while_its_model_loads(make_config: ConfigFactory) -> None:
    model = fake_model("slow", fake_args=["--load-seconds", "1.5"])
    async with serve(config_for(make_config, [model])) as app:
        slot = app.services.scheduler.slots["slow"]
        task = asyncio.create_task(app.chat("slow"))
        await apoll(lambda: slot.state.value == "loading", timeout=5)
        left = await _leave(task)
        await _in_flight_back_to_zero(app, "slow", left)
        # nobody waits any more: the load still finishes, and the model idles
        await apoll(lambda: slot.state.value == "loaded", timeout=10)
        assert slot.in_flight == 0 and slot.load_count == 1
        assert (await backend_stats(app, "slow"))["requests"] == 0


async def test_client_leaving_while_queued_evicts_and_loads_nothing(
    make_config: ConfigFactory,
) -> None:
    models = [fake_model("a", vram_mb=600), fake_model("b", vram_mb=600)]
    async with serve(config_for(make_config, models, total_vram_mb=1000)) as app:
        scheduler = app.services.scheduler
        busy = asyncio.create_task(
            app.chat("a", stream=True, fake_tokens=30, fake_rate=10)  # ~3 s on A
        )
        await apoll(lambda: scheduler.slots["a"].in_flight == 1, timeout=10)
        pid_a = (await app.admin_models())["a"]["pid"]
        waiting = asyncio.create_task(app.chat("b"))  # needs A's VRAM: queued
        await apoll(lambda: scheduler.queue_length() == 1, timeout=5)
        left = await _leave(waiting)
        await apoll(lambda: scheduler.queue_length() == 0, timeout=0.5, interval=0.005)
        print(f"left the queue {1000 * (time.monotonic() - left):.0f} ms after the client left")
        assert (await busy).status_code == 200  # A's stream ran to its end
        assert (await app.chat("a")).status_code == 200  # after A's release pumped the queue
        models_now = await app.admin_models()
        assert models_now["a"]["status"] == "loaded" and models_now["a"]["pid"] == pid_a
        assert models_now["b"]["status"] == "unloaded" and models_now["b"]["load_count"] == 0


# ---- uploads ----------------------------------------------------------------------------


def test_a_50_mb_upload_reaches_the_backend_intact_in_bounded_memory(
    make_config: ConfigFactory, dynllm_process: Any
) -> None:
    """dynllm runs as its own process so its RSS can be sampled during the upload."""
    import hashlib
    import threading

    import psutil

    from tests.conftest import poll
    from tests.support.net import http_ok

    path, config = make_config.write_and_load(
        [fake_model("stt", "transcription")], enabled_backends=["command"]
    )
    proc = dynllm_process(path)
    base = f"http://127.0.0.1:{config.server.port}"
    with httpx.Client(base_url=base, timeout=60, trust_env=False) as http:
        poll(lambda: http_ok(http) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, proc.stderr.read().decode()
        files = {"file": ("small.wav", b"RIFF" * 1000, "audio/wav")}
        warm = http.post("/v1/audio/transcriptions", data={"model": "stt"}, files=files)
        assert warm.status_code == 200, warm.text  # backend loaded, code paths warm

        audio = hashlib.sha256(b"seed").digest() * (50 * (1 << 20) // 32)  # 50 MiB
        dynllm = psutil.Process(proc.pid)
        baseline = dynllm.memory_info().rss
        peak = baseline
        uploading = True
        samples = 0

        def sample() -> None:
            nonlocal peak, samples
            while uploading:
                peak = max(peak, dynllm.memory_info().rss)
                samples += 1
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            response = http.post(
                "/v1/audio/transcriptions",
                data={"model": "stt", "response_format": "json"},
                files={"file": ("big.wav", audio, "audio/wav")},
            )
        finally:
            uploading = False
            sampler.join()
        assert response.status_code == 200, response.text
        port = http.get("/admin/models").json()["models"][0]["port"]
        seen = httpx.get(f"http://127.0.0.1:{port}/fake/stats", trust_env=False).json()["seen"]
        assert seen[-1]["file_bytes"] == len(audio) and seen[-1]["model"] == "stt"
        assert seen[-1]["file_sha256"] == hashlib.sha256(audio).hexdigest()
        growth_mb = (peak - baseline) / (1 << 20)
        print(
            f"50 MiB upload: dynllm RSS {baseline / (1 << 20):.1f} MiB -> peak "
            f"{peak / (1 << 20):.1f} MiB (+{growth_mb:.1f} MiB)"
        )
        assert growth_mb < 16


async def test_upload_limit_answers_413_before_reading_the_body(
    make_config: ConfigFactory,
) -> None:
    config = config_for(make_config, [fake_model("stt", "transcription")], max_upload_mb=1)
    async with serve(config) as app:
        big = {"file": ("a.wav", b"x" * (1 << 20), "audio/wav")}
        refused = await app.client.post(
            "/v1/audio/transcriptions", data={"model": "stt"}, files=big
        )
        assert refused.status_code == 413
        assert refused.json()["error"]["message"] == (
            "The request body is larger than the limit of 1 MB"
        )
        assert await app.spawned_pids() == []


async def test_a_missing_backend_program_is_a_503_naming_it(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config([{"name": "m"}], backend={"llamacpp_binary": "/nowhere/llama-server"})
    async with serve(config) as app:
        startup = "the llamacpp backend program '/nowhere/llama-server' of model 'm' was not found"
        assert startup in caplog.text  # said at startup, before any request
        response = await app.chat("m")
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "backend_not_installed"
        assert error["message"].startswith(
            "The llamacpp backend program '/nowhere/llama-server' of model 'm' was not found"
        )
        assert "pip install" in error["message"]
        assert await app.spawned_pids() == []


async def test_unknown_routes_answer_in_their_family_shape(make_config: ConfigFactory) -> None:
    async with serve(make_config([{"name": "m"}])) as app:
        kserve = await app.client.get("/v2/repository/index")
        assert kserve.status_code == 404
        assert kserve.json() == {"error": "Unknown route: GET /v2/repository/index"}
        openai = await app.client.get("/v1/nothing")
        assert openai.status_code == 404 and openai.json()["error"]["code"] == "not_found"
        wrong = await app.client.get("/v1/chat/completions")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        infer = await app.client.get("/v2/models/m/infer")
        assert infer.status_code == 405 and "error" in infer.json()


async def test_odd_json_never_gets_a_500(make_config: ConfigFactory) -> None:
    async with serve(make_config([{"name": "m"}])) as app:
        json_type = {"content-type": "application/json"}
        for body, status in [
            (b'{"model": "m", "x": ' + b"1" * 5000 + b"}", 400),
            (b"[" * 100_000, 400),
            (b'{"model": "\\ud800"}', 404),
            (b'{"model": "m", "messages": [{"role": "user", "content": "\\udc00"}]}', 200),
        ]:
            for path in ("/v1/chat/completions", "/admin/models/unload"):
                response = await app.client.post(path, content=body, headers=json_type)
                if path.startswith("/admin") and status == 200:
                    assert response.status_code == 400  # messages: not an admin field
                    continue
                assert response.status_code == status, (path, body[:40], response.text)


async def test_json_bodies_over_max_body_mb_get_413(make_config: ConfigFactory) -> None:
    async with serve(make_config([{"name": "m"}], max_body_mb=1)) as app:
        big = b'{"model": "m", "pad": "' + b"x" * (1 << 20) + b'"}'
        declared = await app.client.post(
            "/v1/chat/completions", content=big, headers={"content-type": "application/json"}
        )
        assert declared.status_code == 413
        assert declared.json()["error"]["message"] == (
            "The request body is larger than the limit of 1 MB"
        )

        async def chunked() -> AsyncIterator[bytes]:
            for start in range(0, len(big), 64 << 10):
                yield big[start : start + (64 << 10)]

        streamed = await app.client.post(
            "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
        assert await app.spawned_pids() == []


async def test_request_settings_and_ttl_are_read_then_kept_from_the_backend(
    make_config: ConfigFactory,
) -> None:
    """Small bodies (parsed on the loop) and large ones (in the helper
    process) alike: ``ttl`` / ``keep_alive`` set the idle timer, settings
    the backend does not read make no variant, and none of them reaches it."""
    config = config_for(make_config, [fake_model("m")], idle_timeout_seconds=300)
    ours = {
        "ttl": 42,
        "n_ctx": 512,
        "backend": "command",
        "device": "cpu",
        "gpu_memory_utilization": 0.5,
    }
    async with serve(config) as app:
        for padding, keep in ((0, 42.0), (2 << 20, 7.0)):  # the second is past INLINE_JSON_BYTES
            extra = {"keep_alive": "7s"} if padding else {}
            body = {"model": "m", "messages": [{"role": "user", "content": "x" * padding}],
                    **ours, **extra}  # fmt: skip
            answer = await app.client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            seen = (await backend_stats(app, "m"))["seen"][-1]
            assert seen["keys"] == ["messages", "model"], seen
            models = await app.admin_models()
            assert models["m"]["unload_after_seconds"] == keep
            assert set(models) == {"m"}  # nothing the command backend reads: no variant
        assert (await app.chat("m")).status_code == 200  # no ttl: back to the config's
        assert (await app.admin_models())["m"]["unload_after_seconds"] == 300
