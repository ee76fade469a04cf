"""BackendProcess against the fake llama-server: pipes, readiness, exit, stop."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from dynllm.app import instance_marker
from dynllm.backends.base import MARKER_ENV
from dynllm.errors import BackendExited, BackendStartFailed, LoadTimeout
from dynllm.supervisor import LOG_LINES, BackendProcess, ProcState
from tests.conftest import FAKE_SERVER, ConfigFactory, free_port


@pytest.fixture
def env(make_config: ConfigFactory) -> dict[str, str]:
    """The environment of a backend, with the marker the leak check looks for
    (make_config registers it)."""
    config = make_config([{"name": "t"}])
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), MARKER_ENV: instance_marker(config)}


async def start(env: dict[str, str], *extra: str) -> tuple[BackendProcess, str]:
    port = free_port()
    argv = [
        sys.executable,
        str(FAKE_SERVER),
        "-m",
        "x",
        "--port",
        str(port),
        "--alias",
        "t",
        *extra,
    ]
    return await BackendProcess.spawn("t", argv, env), f"http://127.0.0.1:{port}/health"


@pytest.fixture
async def probe() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


async def test_heavy_output_is_drained_and_kept_in_a_ring(
    probe: httpx.AsyncClient, env: dict[str, str]
) -> None:
    proc, url = await start(env, "--fake-stderr-spam", "20000")
    try:
        await proc.wait_ready(probe, url, interval=0.02, timeout=30)
        assert proc.state is ProcState.READY
        assert len(proc.lines) == LOG_LINES
    finally:
        await proc.stop(3)
    assert proc.state is ProcState.EXITED


async def test_exit_during_load_is_reported_at_once(
    probe: httpx.AsyncClient, env: dict[str, str]
) -> None:
    proc, url = await start(env, "--fake-exit-during-load", "7")
    try:
        start_time = time.monotonic()
        with pytest.raises(BackendExited) as info:
            await proc.wait_ready(probe, url, interval=0.5, timeout=30)
        assert time.monotonic() - start_time < 1.0  # not at the poll interval or the timeout
        assert info.value.exit_code == 7
        assert any("fake load failure" in line for line in info.value.stderr_tail)
    finally:
        await proc.stop(1)


async def test_load_timeout(probe: httpx.AsyncClient, env: dict[str, str]) -> None:
    proc, url = await start(env, "--fake-never-ready")
    try:
        with pytest.raises(LoadTimeout):
            await proc.wait_ready(probe, url, interval=0.05, timeout=0.5)
        assert proc.state is ProcState.STARTING
    finally:
        await proc.stop(1)
    assert proc.returncode is not None


async def test_stop_is_idempotent_and_escalates(
    probe: httpx.AsyncClient, env: dict[str, str]
) -> None:
    proc, url = await start(env, "--fake-ignore-sigterm")
    try:
        await proc.wait_ready(probe, url, interval=0.02, timeout=10)
        began = time.monotonic()
        await asyncio.gather(proc.stop(0.5), proc.stop(0.5))
        await proc.stop(0.5)
        assert 0.5 <= time.monotonic() - began < 2.0
        assert proc.returncode == -9
    finally:
        await proc.stop(0.5)


async def test_exit_callback_fires_for_a_crash(
    probe: httpx.AsyncClient, env: dict[str, str]
) -> None:
    seen: list[int | None] = []
    port = free_port()
    argv = [sys.executable, str(FAKE_SERVER), "-m", "x", "--port", str(port)]
    proc = await BackendProcess.spawn("t", argv, env, on_exit=lambda p: seen.append(p.returncode))
    try:
        await proc.wait_ready(probe, f"http://127.0.0.1:{port}/health", interval=0.02, timeout=10)
        os.kill(proc.pid, 9)
        await asyncio.wait_for(proc.exited.wait(), 1.0)
        assert seen == [-9]
        assert proc.state is ProcState.EXITED  # reaped by the watcher, nobody stopped it
    finally:
        await proc.stop(1)
    assert seen == [-9]  # stopping a process already gone does not report it again


async def test_missing_binary_is_a_clear_error(env: dict[str, str]) -> None:
    with pytest.raises(BackendStartFailed, match="no-such-binary"):
        await BackendProcess.spawn("t", ["/nonexistent/no-such-binary"], env)
