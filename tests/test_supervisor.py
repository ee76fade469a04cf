"""BackendProcess against the fake llama-server: pipes, readiness, exit, stop."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import httpx
import pytest

from dynllm.errors import BackendExited, LoadTimeout
from dynllm.supervisor import LOG_LINES, BackendProcess, ProcState
from tests.conftest import FAKE_SERVER, free_port

MARK = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


async def start(*extra: str) -> tuple[BackendProcess, str]:
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
    return await BackendProcess.spawn("t", argv, MARK), f"http://127.0.0.1:{port}/health"


@pytest.fixture
async def probe() -> httpx.AsyncClient:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client  # type: ignore[misc]


async def test_heavy_output_is_drained_and_kept_in_a_ring(probe: httpx.AsyncClient) -> None:
    proc, url = await start("--fake-stderr-spam", "20000")
    try:
        await proc.wait_ready(probe, url, interval=0.02, timeout=30)
        assert proc.state is ProcState.READY
        assert len(proc.lines) == LOG_LINES
    finally:
        await proc.stop(3)
    assert proc.state is ProcState.EXITED


async def test_exit_during_load_is_reported_at_once(probe: httpx.AsyncClient) -> None:
    proc, url = await start("--fake-exit-during-load", "7")
    start_time = time.monotonic()
    with pytest.raises(BackendExited) as info:
        await proc.wait_ready(probe, url, interval=0.5, timeout=30)
    assert time.monotonic() - start_time < 1.0  # not at the poll interval or the timeout
    assert info.value.exit_code == 7
    assert any("fake load failure" in line for line in info.value.stderr_tail)
    await proc.stop(1)


async def test_load_timeout(probe: httpx.AsyncClient) -> None:
    proc, url = await start("--fake-never-ready")
    try:
        with pytest.raises(LoadTimeout):
            await proc.wait_ready(probe, url, interval=0.05, timeout=0.5)
        assert proc.state is ProcState.STARTING
    finally:
        await proc.stop(1)
    assert proc.returncode is not None


async def test_stop_is_idempotent_and_escalates(probe: httpx.AsyncClient) -> None:
    proc, url = await start("--fake-ignore-sigterm")
    await proc.wait_ready(probe, url, interval=0.02, timeout=10)
    began = time.monotonic()
    await asyncio.gather(proc.stop(0.5), proc.stop(0.5))
    await proc.stop(0.5)
    assert 0.5 <= time.monotonic() - began < 2.0
    assert proc.returncode == -9


async def test_exit_callback_fires_for_a_crash(probe: httpx.AsyncClient) -> None:
    seen: list[int | None] = []
    port = free_port()
    argv = [sys.executable, str(FAKE_SERVER), "-m", "x", "--port", str(port)]
    proc = await BackendProcess.spawn("t", argv, MARK, on_exit=lambda p: seen.append(p.returncode))
    await proc.wait_ready(probe, f"http://127.0.0.1:{port}/health", interval=0.02, timeout=10)
    os.kill(proc.pid, 9)
    await asyncio.wait_for(proc.exited.wait(), 1.0)
    assert seen == [-9]
    assert not proc.stopping


async def test_missing_binary_is_a_clear_error() -> None:
    from dynllm.errors import BackendStartFailed

    with pytest.raises(BackendStartFailed, match="no-such-binary"):
        await BackendProcess.spawn("t", ["/nonexistent/no-such-binary"], MARK)
