"""Hot reload through a running dynllm with real backend processes (the
generic stand-in, started by the command backend): added, changed, removed
and unchanged models, a broken file, requests running through the reload,
SIGHUP and ``dynllm reload`` on a real dynllm process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from tests.conftest import ConfigFactory, RunningApp, apoll, poll, serve, subprocess_env
from tests.test_dispatch import fake_model


def models() -> list[dict[str, Any]]:
    return [fake_model("A"), fake_model("B"), fake_model("C")]


def rewrite(path: Path, models: list[dict[str, Any]], **top: Any) -> None:
    """The same file (same port, state file, port range) with other models."""
    data = yaml.safe_load(path.read_text())
    data["models"] = [
        {"path": "fake.gguf", "backend": "llamacpp", "vram_mb": 1000, **m} for m in models
    ]
    data.update(top)
    path.write_text(yaml.safe_dump(data))


async def pid(app: RunningApp, name: str) -> int | None:
    value = (await app.admin_models())[name]["pid"]
    return value if isinstance(value, int) else None


def environ_of(pid: int) -> dict[str, str]:
    return psutil.Process(pid).environ()


async def test_added_changed_removed_and_unchanged_models(make_config: ConfigFactory) -> None:
    path, config = make_config.write_and_load(models(), enabled_backends=["llamacpp", "command"])
    async with serve(config, config_path=path) as app:
        for name in "ABC":
            assert (await app.chat(name)).status_code == 200
        before = {name: await pid(app, name) for name in "ABC"}
        rewrite(path, [fake_model("A"), fake_model("B", env={"SETTING": "2"}), fake_model("D"),
                       fake_model("A2", aliases=["a-two"])])  # fmt: skip
        started = time.monotonic()
        answer = await app.client.post("/admin/reload", json={})
        took = time.monotonic() - started
        assert answer.status_code == 200, answer.text
        plan = answer.json()
        print(f"reload answered in {1000 * took:.0f} ms: {plan}")
        assert plan["added"] == ["A2", "D"] and plan["changed"] == ["B"]
        assert plan["removed"] == ["C"] and plan["restart_needed"] == []
        # Unchanged: the same process.
        assert await pid(app, "A") == before["A"]
        assert (await app.chat("A")).status_code == 200
        # Changed and idle: restarted with the new settings once stopped.
        await apoll(lambda: psutil.pid_exists(before["B"]) is False, timeout=10)
        assert (await app.chat("B")).status_code == 200
        new_b = await pid(app, "B")
        assert new_b is not None and new_b != before["B"]
        assert environ_of(new_b)["SETTING"] == "2"
        # Removed: unloaded (idle) and gone from every listing; requests get 404.
        listed = await app.admin_models()
        assert "C" not in listed
        ids = [m["id"] for m in (await app.client.get("/v1/models")).json()["data"]]
        assert "C" not in ids and "D" in ids and "a-two" in ids
        assert (await app.chat("C")).status_code == 404
        assert before["C"] is not None and not psutil.pid_exists(before["C"])
        # Added: served at once, by name and by alias.
        assert (await app.chat("D")).status_code == 200
        assert (await app.chat("a-two")).status_code == 200


async def test_a_broken_file_is_refused_and_the_old_config_keeps_running(
    make_config: ConfigFactory,
) -> None:
    path, config = make_config.write_and_load(models(), enabled_backends=["llamacpp", "command"])
    async with serve(config, config_path=path) as app:
        assert (await app.chat("A")).status_code == 200
        running = await pid(app, "A")
        good = path.read_text()
        path.write_text(good + "\nnot_a_key: [\n")  # not even YAML
        refused = await app.client.post("/admin/reload", json={})
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "invalid_config" and str(path) in error["message"]
        path.write_text(good)
        rewrite(path, [{**fake_model("A"), "vram_mb": -5}])  # YAML, but invalid
        refused = await app.client.post("/admin/reload", json={})
        assert refused.status_code == 400 and "vram_mb" in refused.json()["error"]["message"]
        assert (await app.chat("A")).status_code == 200 and await pid(app, "A") == running
        assert set(await app.admin_models()) == {"A", "B", "C"}


async def test_requests_running_through_a_reload_all_succeed(make_config: ConfigFactory) -> None:
    """200 requests to a changed and an unchanged model, in flight and
    arriving while the config is reloaded: every one gets its answer; the
    changed model switches once it is idle."""
    path, config = make_config.write_and_load(models(), enabled_backends=["llamacpp", "command"])
    async with serve(config, config_path=path) as app:
        for name in "AB":
            assert (await app.chat(name)).status_code == 200
        old_b = await pid(app, "B")

        async def one(i: int) -> int:
            await asyncio.sleep((i % 20) * 0.005)
            return (await app.chat("AB"[i % 2], fake_delay=0.05)).status_code

        requests = [asyncio.create_task(one(i)) for i in range(200)]
        slots = app.services.scheduler.slots
        # Reload while some are in flight (and the rest still to come).
        await apoll(lambda: slots["A"].in_flight + slots["B"].in_flight > 0, timeout=10)
        rewrite(path, [fake_model("A"), fake_model("B", env={"SETTING": "3"}), fake_model("C")])
        reload = await app.client.post("/admin/reload", json={})
        assert reload.status_code == 200 and reload.json()["changed"] == ["B"]
        statuses = await asyncio.gather(*requests)
        counts = {s: statuses.count(s) for s in set(statuses)}
        print(f"200 requests through a reload: {counts}")
        assert statuses == [200] * 200
        # Once idle, B restarts with the new settings.
        await apoll(lambda: not psutil.pid_exists(old_b or 0), timeout=10)
        assert (await app.chat("B")).status_code == 200
        new_b = await pid(app, "B")
        assert new_b is not None and environ_of(new_b)["SETTING"] == "3"


async def test_global_settings_apply_at_once_and_the_address_needs_a_restart(
    make_config: ConfigFactory,
) -> None:
    path, config = make_config.write_and_load(models(), enabled_backends=["llamacpp", "command"])
    async with serve(config, config_path=path) as app:
        data = yaml.safe_load(path.read_text())
        port = data["server"]["port"]
        rewrite(path, models(), total_vram_mb=4321, api_keys=["k-123"],
                server={"host": "127.0.0.1", "port": port + 1})  # fmt: skip
        answer = await app.client.post("/admin/reload", json={})
        assert answer.status_code == 200
        assert answer.json()["restart_needed"] == ["server.port"]
        assert (await app.client.get("/v1/models")).status_code == 401  # keys at once
        listing = await app.client.get("/admin/models", headers={"x-api-key": "k-123"})
        assert listing.json()["vram_total_mb"] == 4321
        assert app.services.config.server.port == port  # still where it listens


def test_sighup_and_dynllm_reload_on_a_real_process(
    make_config: ConfigFactory, dynllm_process: Any
) -> None:
    path, config = make_config.write_and_load(
        [fake_model("A")], enabled_backends=["llamacpp", "command"]
    )
    proc = dynllm_process(path)
    url = f"http://127.0.0.1:{config.server.port}"

    def listed() -> set[str]:
        try:
            answer = httpx.get(f"{url}/v1/models", timeout=2, trust_env=False)
        except httpx.HTTPError:
            return set()
        return {m["id"] for m in answer.json()["data"]} if answer.status_code == 200 else set()

    poll(lambda: "A" in listed(), timeout=30)
    rewrite(path, [fake_model("A"), fake_model("B")])
    os.kill(proc.pid, signal.SIGHUP)
    started = time.monotonic()
    poll(lambda: "B" in listed(), timeout=10)
    print(f"SIGHUP: the new model listed after {1000 * (time.monotonic() - started):.0f} ms")
    assert proc.poll() is None  # SIGHUP reloads; it does not stop dynllm
    rewrite(path, [fake_model("B")])
    result = subprocess.run(
        [sys.executable, "-m", "dynllm", "reload", "-c", str(path)],
        env=subprocess_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "A" in result.stdout  # it says what was removed
    assert listed() == {"B"}
    path.write_text("models: [\n")
    result = subprocess.run(
        [sys.executable, "-m", "dynllm", "reload", "-c", str(path)],
        env=subprocess_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, (result.stdout, result.stderr)  # refused: invalid config
    assert listed() == {"B"}


async def test_a_reload_keeps_discovered_models_and_variants_and_scans_new_folders(
    make_config: ConfigFactory, models_dir: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "models", tmp_path / "more"
    first.mkdir()
    second.mkdir()
    shutil.copy(models_dir / "tiny.gguf", first / "tiny.gguf")
    shutil.copy(models_dir / "tiny.gguf", second / "other.gguf")
    top: dict[str, Any] = {
        "discovery": True,
        "models_dir": str(first),
        "rescan_interval_seconds": 0,
    }
    path, config = make_config.write_and_load(
        [fake_model("A")], enabled_backends=["llamacpp", "command"], **top
    )
    async with serve(config, config_path=path) as app:
        assert (await app.chat("tiny")).status_code == 200
        assert (await app.chat("tiny", n_ctx=512)).status_code == 200
        running = {name: await pid(app, name) for name in ("tiny", "tiny@n_ctx=512")}
        assert all(running.values())
        more = {**top, "model_dirs": [str(second)], "rescan_interval_seconds": 0.3}
        rewrite(path, [fake_model("A"), fake_model("B")], **more)
        answer = await app.client.post("/admin/reload", json={})
        assert answer.status_code == 200, answer.text
        assert answer.json()["added"] == ["B"] and answer.json()["removed"] == []
        for name, before in running.items():  # untouched: the same processes
            assert await pid(app, name) == before
        # The new folder is scanned right after the reload.
        await apoll(lambda: app.services.registry.find("other") is not None, timeout=10)
        assert (await app.chat("other")).status_code == 200
        # The reload turned the periodic rescan on: a new file appears by itself.
        shutil.copy(models_dir / "tiny.gguf", second / "late.gguf")
        await apoll(lambda: app.services.registry.find("late") is not None, timeout=10)
        rewrite(path, [fake_model("A")], **{**top, "discovery": False})
        answer = await app.client.post("/admin/reload", json={})
        assert set(answer.json()["removed"]) == {"B", "tiny", "tiny@n_ctx=512", "other", "late"}
        for before in running.values():
            await apoll(lambda p=before: not psutil.pid_exists(p), timeout=10)
        assert (await app.chat("tiny")).status_code == 404
