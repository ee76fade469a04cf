"""Models without YAML, end to end with the real llama-server: a GGUF copied
into models_dir is served after a rescan and goes when removed; XandRouting's
README requests (model as a path, backend, device, n_gpu_layers, n_ctx, ttl)
and its management calls; variants as separate processes; ttl and
keep_alive; cache statistics."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import openai
import psutil

from tests.conftest import ConfigFactory, RunningApp, apoll, serve
from tests.support.binaries import llama_server_binary

CHEAP = {"context_size": 256, "n_gpu_layers": 0}


def discovery_config(make_config: ConfigFactory, folder: Path, **top: Any) -> Any:
    folder.mkdir(parents=True, exist_ok=True)
    return make_config(
        [],
        models_dir=str(folder),
        discovery=True,
        rescan_interval_seconds=0,
        discovered_defaults=CHEAP,
        backend={"llamacpp_binary": llama_server_binary()},
        **top,
    )


def with_tiny(
    make_config: ConfigFactory, models_dir: Path, tmp_path: Path, *, real: bool, **top: Any
) -> Any:
    """A models folder holding tiny.gguf, served by the real llama-server or its stand-in."""
    folder = tmp_path / "models"
    config = (discovery_config if real else fake_discovery_config)(make_config, folder, **top)
    shutil.copy(models_dir / "tiny.gguf", folder / "tiny.gguf")
    return config


async def listed(app: RunningApp) -> dict[str, dict[str, Any]]:
    answer = await app.client.get("/v1/models")
    assert answer.status_code == 200, answer.text
    return {m["id"]: m for m in answer.json()["data"]}


async def state_of(app: RunningApp, name: str) -> str | None:
    models = await app.admin_models()
    return models[name]["status"] if name in models else None


async def until_state(app: RunningApp, name: str, want: str, timeout: float) -> float:
    """Seconds until ``name`` is in state ``want`` (AssertionError past ``timeout``)."""
    started = time.monotonic()
    while (state := await state_of(app, name)) != want:
        took = time.monotonic() - started
        assert took < timeout, f"{name} still {state} after {took:.2f} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_gguf_copied_into_models_dir_is_served_after_a_rescan_and_goes_when_removed(
    make_config: ConfigFactory, models_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "models"
    config = discovery_config(make_config, folder)
    async with serve(config) as app:
        assert "org/tiny-Q8_0" not in await listed(app)
        target = folder / "org" / "tiny-Q8_0.gguf"
        target.parent.mkdir()
        shutil.copy(models_dir / "tiny.gguf", target)
        rescan = await app.client.post("/admin/models/rescan")
        assert rescan.status_code == 200, rescan.text
        assert rescan.json()["added"] == ["org/tiny-Q8_0"]
        entry = (await listed(app))["org/tiny-Q8_0"]
        assert entry["source"] == "discovered" and entry["backend"] == "llamacpp"

        client = openai.AsyncOpenAI(base_url=app.base_url + "/v1", api_key="none", max_retries=0)
        try:
            chat = await client.chat.completions.create(
                model="org/tiny-Q8_0", messages=[{"role": "user", "content": "Hi"}], max_tokens=5
            )
        finally:
            await client.close()
        assert chat.choices[0].finish_reason == "length"
        pid = (await app.admin_models())["org/tiny-Q8_0"]["pid"]
        assert pid and psutil.pid_exists(pid)

        target.unlink()
        started = time.monotonic()
        rescan = await app.client.post("/admin/models/rescan")
        assert rescan.json()["removed"] == ["org/tiny-Q8_0"]
        await apoll(lambda: not psutil.pid_exists(pid), timeout=15)
        assert "org/tiny-Q8_0" not in await listed(app)
        assert "org/tiny-Q8_0" not in await app.admin_models()
        print(
            "removed file: backend gone and model unlisted "
            f"{time.monotonic() - started:.2f} s after the rescan"
        )
        gone = await app.chat("org/tiny-Q8_0")
        assert gone.status_code == 404, gone.text


async def test_a_path_names_the_model_without_a_rescan_and_paths_outside_are_404(
    make_config: ConfigFactory, models_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "models"
    config = discovery_config(make_config, folder)
    outside = tmp_path / "elsewhere.gguf"
    shutil.copy(models_dir / "tiny.gguf", outside)
    async with serve(config) as app:
        (folder / "qwen-gguf").mkdir()
        shutil.copy(models_dir / "tiny.gguf", folder / "qwen-gguf" / "model-Q4_K_M.gguf")
        # XandRouting names the folder a download made; no rescan in between.
        answer = await app.chat(str(folder / "qwen-gguf"), max_tokens=3)
        assert answer.status_code == 200, answer.text
        assert "qwen-gguf/model-Q4_K_M" in await listed(app)
        for label in (str(outside), str(folder / ".." / "elsewhere.gguf"), "../elsewhere.gguf"):
            refused = await app.chat(label, max_tokens=3)
            assert refused.status_code == 404, (label, refused.text)
            assert refused.json()["error"]["code"] == "model_not_found"


async def test_xandrouting_readme_requests_and_management_calls(
    make_config: ConfigFactory, models_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "models"
    (folder / "qwen2.5-coder-7b-instruct-gguf").mkdir(parents=True)
    shutil.copy(
        models_dir / "tiny.gguf",
        folder / "qwen2.5-coder-7b-instruct-gguf" / "qwen2.5-coder-7b-instruct-q4_k_m.gguf",
    )
    config = discovery_config(make_config, folder)
    path = str(folder / "qwen2.5-coder-7b-instruct-gguf")
    async with serve(config) as app:
        # Its "Make Your First Request" body, unchanged but for the path.
        answer = await app.client.post(
            "/v1/chat/completions",
            json={
                "model": path,
                "backend": "llamacpp",
                "device": "cuda",
                "n_gpu_layers": 35,
                "messages": [
                    {"role": "system", "content": "You are a helpful coding assistant."},
                    {"role": "user", "content": "Write a Python function to calculate factorial"},
                ],
                "max_tokens": 20,
                "temperature": 0.7,
            },
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "chat.completion"
        assert {"id", "created", "model", "choices", "usage"} <= set(body)
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] == 20

        # Streaming, and the full request body of its API reference.
        async with app.client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": path,
                "backend": "llamacpp",
                "device": "cuda",
                "messages": [{"role": "user", "content": "Explain Docker in simple terms"}],
                "stream": True,
                "max_tokens": 12,
                "temperature": 0.7,
                "top_p": 1.0,
                "gpu_memory_utilization": 0.7,
                "ttl": 300,
                "n_gpu_layers": 35,
                "n_ctx": 512,
            },
        ) as stream:
            assert stream.status_code == 200
            lines = [line async for line in stream.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 12

        loaded = (await app.client.get("/v1/models/loaded")).json()
        assert loaded["total_count"] == len(loaded["loaded_models"]) == 2
        for entry in loaded["loaded_models"]:
            assert {
                "cache_key",
                "model_path",
                "backend",
                "device",
                "loaded_at",
                "ttl",
                "expires_at",
            } <= set(entry)
            assert entry["backend"] == "llamacpp" and entry["device"] == "cuda"
            assert entry["model_path"].endswith("qwen2.5-coder-7b-instruct-q4_k_m.gguf")
        by_key = {e["cache_key"]: e for e in loaded["loaded_models"]}
        n_ctx_variant = [k for k in by_key if "n_ctx=512" in k]
        assert len(n_ctx_variant) == 1, by_key
        assert by_key[n_ctx_variant[0]]["ttl"] == 300 and by_key[n_ctx_variant[0]]["expires_at"]
        print("loaded:", sorted(by_key))

        stats = (await app.client.get("/v1/models/stats")).json()
        assert {
            "total_models",
            "active_models",
            "total_requests",
            "cache_hits",
            "cache_misses",
            "hit_rate",
        } <= set(stats)
        assert stats["active_models"] == 2 and stats["total_requests"] == 2

        inventory = (await app.client.get("/v1/models/inventory")).json()
        assert inventory["total_models"] == 1
        model = inventory["models"][0]
        assert {"name", "path", "size_gb", "files", "recommended_backends"} <= set(model)
        assert model["recommended_backends"] == ["llamacpp"]
        assert model["files"][0]["type"] == "gguf" and "size_mb" in model["files"][0]
        assert "total_size_gb" in inventory

        exact = {"n_gpu_layers": 35, "n_ctx": 512}
        unload = await app.client.post(
            "/v1/models/unload",
            json={"model": path, "backend": "llamacpp", "device": "cuda", **exact},
        )
        assert unload.status_code == 200, unload.text
        assert unload.json()["unloaded"] == n_ctx_variant
        # XandRouting's body: every entry of that model on that backend and device.
        unload = await app.client.post(
            "/v1/models/unload", json={"model": path, "backend": "llamacpp", "device": "cuda"}
        )
        assert len(unload.json()["unloaded"]) == 1, unload.text
        assert (await app.client.get("/v1/models/loaded")).json()["total_count"] == 0
        assert (await app.chat(path, max_tokens=2)).status_code == 200
        everything = await app.client.post("/v1/models/unload-all")  # no body, as curl -X POST
        assert everything.status_code == 200, everything.text
        assert everything.json()["unloaded"] == [
            "qwen2.5-coder-7b-instruct-gguf/qwen2.5-coder-7b-instruct-q4_k_m"
        ]
        assert (await app.client.get("/v1/models/loaded")).json()["total_count"] == 0


async def test_two_contexts_are_two_processes_with_their_own_ttl(
    make_config: ConfigFactory, models_dir: Path, tmp_path: Path
) -> None:
    config = with_tiny(make_config, models_dir, tmp_path, real=True, total_vram_mb=8000)
    async with serve(config) as app:
        interval = app.config.idle_check_interval_seconds
        small = await app.chat("tiny", n_ctx=256, device="cuda", max_tokens=2)
        large = await app.chat("tiny", n_ctx=8192, device="cuda", max_tokens=2, ttl=2)
        ended = time.monotonic()
        assert small.status_code == large.status_code == 200, (small.text, large.text)
        models = await app.admin_models()
        a, b = models["tiny@n_gpu_layers=-1"], models["tiny@n_gpu_layers=-1,n_ctx=8192"]
        assert a["pid"] and b["pid"] and a["pid"] != b["pid"]
        assert 0 < a["vram_mb"] < b["vram_mb"]
        print(f"variants: n_ctx 256 -> {a['vram_mb']} MB, n_ctx 8192 -> {b['vram_mb']} MB")
        await until_state(app, "tiny@n_gpu_layers=-1,n_ctx=8192", "unloaded", 2 + interval + 1)
        took = time.monotonic() - ended
        assert took <= 2 + interval + 1
        assert not psutil.pid_exists(b["pid"])
        assert await state_of(app, "tiny@n_gpu_layers=-1") == "loaded"  # its own timer
        print(f"ttl 2: unloaded {took:.2f} s after the response (limit {2 + interval + 1} s)")


async def test_keep_alive_0_unloads_when_its_response_ends(
    make_config: ConfigFactory, models_dir: Path, tmp_path: Path
) -> None:
    # The idle job runs once a minute: only the end of the response can unload it.
    config = with_tiny(make_config, models_dir, tmp_path, real=True, idle_check_interval_seconds=60)
    async with serve(config) as app:
        assert (await app.chat("tiny", max_tokens=2)).status_code == 200
        pid = (await app.admin_models())["tiny"]["pid"]
        answer = await app.chat("tiny", keep_alive=0, max_tokens=2)
        assert answer.status_code == 200, answer.text
        took = await until_state(app, "tiny", "unloaded", app.config.stop_timeout_seconds + 2)
        assert not psutil.pid_exists(pid)
        print(f"keep_alive 0: backend gone {took:.2f} s after the response")


async def test_one_cold_and_three_warm_requests_are_one_miss_and_three_hits(
    make_config: ConfigFactory, models_dir: Path, tmp_path: Path
) -> None:
    config = with_tiny(make_config, models_dir, tmp_path, real=True)
    async with serve(config) as app:
        for _ in range(4):
            assert (await app.chat("tiny", max_tokens=2)).status_code == 200
        stats = (await app.client.get("/v1/models/stats")).json()
        print(
            "stats:",
            {k: stats[k] for k in ("total_requests", "cache_hits", "cache_misses", "hit_rate")},
        )
        assert (stats["cache_misses"], stats["cache_hits"], stats["hit_rate"]) == (1, 3, 0.75)
        assert stats["models"]["tiny"]["cache_hits"] == 3


async def test_yaml_models_refuse_request_settings_unless_allowed(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = make_config(
        [
            {"name": "fixed", **CHEAP},
            {"name": "open", "allow_request_overrides": True, **CHEAP},
        ],
        discovery=False,
    )
    async with serve(config) as app:
        refused = await app.chat("fixed", n_ctx=512)
        assert refused.status_code == 400, refused.text
        assert "allow_request_overrides" in refused.json()["error"]["message"]
        same = await app.chat("fixed", n_ctx=256, backend="llamacpp")  # its own settings
        assert same.status_code == 200, same.text
        variant = await app.chat("open", n_ctx=512)
        assert variant.status_code == 200, variant.text
        assert "open@n_ctx=512" in await app.admin_models()
        bad = await app.chat("open", n_ctx="big")
        assert bad.status_code == 400 and "n_ctx" in bad.json()["error"]["message"]
        bad = await app.chat("open", keep_alive="soon")
        assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]["message"]


def fake_discovery_config(make_config: ConfigFactory, folder: Path, **top: Any) -> Any:
    """Discovery with the llama-server stand-in (starts in tens of ms)."""
    folder.mkdir(parents=True, exist_ok=True)
    return make_config([], models_dir=str(folder), discovery=True, rescan_interval_seconds=0, **top)


async def test_settings_in_a_large_body_choose_the_variant_too(
    make_config: ConfigFactory, models_dir: Path, tmp_path: Path
) -> None:
    config = with_tiny(make_config, models_dir, tmp_path, real=False)
    async with serve(config) as app:
        big = "x" * (2 << 20)  # past the 1 MiB parsed on the event loop
        answer = await app.chat("tiny", device="cpu", messages=[{"role": "user", "content": big}])
        assert answer.status_code == 200, answer.text
        models = await app.admin_models()
        assert models["tiny@n_gpu_layers=0"]["status"] == "loaded"
        assert models["tiny"]["status"] == "unloaded"


async def test_variants_with_a_process_are_capped(
    make_config: ConfigFactory, models_dir: Path, tmp_path: Path
) -> None:
    config = with_tiny(make_config, models_dir, tmp_path, real=False, total_vram_mb=100000)
    async with serve(config) as app:
        for ctx in range(8):
            assert (await app.chat("tiny", n_ctx=100 + ctx)).status_code == 200
        refused = await app.chat("tiny", n_ctx=999)
        assert refused.status_code == 503, refused.text
        assert "variants" in refused.json()["error"]["message"] and refused.headers["retry-after"]
        assert (await app.chat("tiny", n_ctx=100)).status_code == 200  # a running one: served
        assert (await app.chat("tiny")).status_code == 200  # the model itself: served
        unload = await app.client.post("/v1/models/unload", json={"model": "tiny", "n_ctx": 101})
        assert unload.json()["unloaded"] == ["tiny@n_ctx=101"]
        assert (await app.chat("tiny", n_ctx=999)).status_code == 200


async def test_odd_model_names_are_404s_and_never_scan(
    make_config: ConfigFactory, models_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "models"
    config = fake_discovery_config(make_config, folder)
    (folder / ".cache").mkdir()
    shutil.copy(models_dir / "tiny.gguf", folder / ".cache" / "hidden.gguf")
    shutil.copy(models_dir / "tiny.gguf", folder / "half.gguf.incomplete")
    async with serve(config) as app:
        for label in ("/", "//", ".", "..", "gpt-4o", "a\x00b", "x" * 5000, ".cache/hidden",
                      str(folder / ".cache" / "hidden.gguf"), "half.gguf.incomplete"):  # fmt: skip
            answer = await app.chat(label)
            assert answer.status_code in (400, 404), (label[:20], answer.text)
        assert app.services.reloader._scans == 0  # none of them made a scan
