"""BackendProcess against the fake llama-server: pipes, readiness, exit, stop; and
against the tree backend: stop and crash take every process it started, and
readiness never probes a listener the backend does not own."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest

from dynllm.app import instance_marker
from dynllm.backends.base import MARKER_ENV
from dynllm.errors import BackendExited, BackendStartFailed, LoadTimeout
from dynllm.supervisor import LOG_LINES, BackendProcess, PortHeldElsewhere, ProcState
from tests.conftest import FAKE_SERVER, ConfigFactory
from tests.support.net import free_port
from tests.support.trees import (
    kill_all,
    read_tree,
    reaped,
    requests_seen,
    start_squatter,
    stop,
    tree_command,
)


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
    assert state_of(proc) is ProcState.EXITED


def state_of(proc: BackendProcess) -> ProcState:
    """The state now (mypy keeps an earlier assert's narrowing across awaits)."""
    return proc.state


def fake_argv(port: int, *extra: str) -> list[str]:
    return [sys.executable, str(FAKE_SERVER), "-m", "x", "--port", str(port), "--alias", "t",
            *extra]  # fmt: skip


async def test_output_is_logged_at_its_level_tagged_by_model_and_passed_on(
    probe: httpx.AsyncClient, env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="dynllm.backend"):
        proc = await BackendProcess.spawn(
            "t", fake_argv(port), env, log_level="warning", on_line=seen.append
        )
        try:
            await proc.wait_ready(probe, f"http://127.0.0.1:{port}/health", interval=0.02,
                                  timeout=30)  # fmt: skip
        finally:
            await proc.stop(3)
    records = [r for r in caplog.records if r.name == "dynllm.backend.t"]
    print(f"{len(records)} backend line(s) logged, levels {sorted({r.levelname for r in records})}")
    assert any("model loaded" in r.getMessage() for r in records)
    assert all(r.levelno == logging.WARNING and r.model == "t" for r in records)  # type: ignore[attr-defined]
    assert seen == list(proc.lines) == [r.getMessage() for r in records]  # every line, in order


async def test_a_failing_line_follower_does_not_stop_the_draining(
    probe: httpx.AsyncClient, env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """An unread pipe would block the backend once it fills: lines are still
    read (and kept) when the follower raises."""

    def broken(line: str) -> None:
        raise RuntimeError("follower bug")

    port = free_port()
    proc = await BackendProcess.spawn(
        "t", fake_argv(port, "--fake-stderr-spam", "20000"), env, on_line=broken
    )
    try:
        await proc.wait_ready(probe, f"http://127.0.0.1:{port}/health", interval=0.02, timeout=30)
        assert len(proc.lines) == LOG_LINES
    finally:
        await proc.stop(3)
    failures = [r for r in caplog.records if "passing a line" in r.getMessage()]
    assert len(failures) == 1 and "follower bug" in caplog.text  # once, not per line


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


# ---- the whole tree (issue 8 item 7) and the port's owner (item 8) ----------------


async def spawn_tree(
    tmp_path: Path, probe: httpx.AsyncClient
) -> tuple[BackendProcess, dict[str, psutil.Process]]:
    """The tree backend, ready: main, a SIGTERM-ignoring child, a setsid'ed daemon."""
    port = free_port()
    pids = tmp_path / "pids"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = await BackendProcess.spawn("t", tree_command(pids, port=str(port)), env)
    tree = read_tree(pids)
    await proc.wait_ready(
        probe, f"http://127.0.0.1:{port}/health", interval=0.02, timeout=10, port=port
    )
    return proc, tree


async def test_stop_takes_the_whole_tree(tmp_path: Path, probe: httpx.AsyncClient) -> None:
    proc, tree = await spawn_tree(tmp_path, probe)
    try:
        began = time.monotonic()
        await proc.stop(0.5)
        took = time.monotonic() - began
        # Everything is gone, and reaped, by the time stop() returns.
        left = [role for role, p in tree.items() if not reaped(p)]
        print(f"stop(grace 0.5 s) returned after {took:.2f} s; left: {left}")
        assert left == []
        assert 0.5 <= took < 2.0  # the ignoring child got SIGKILL at the grace
        assert proc.state is ProcState.EXITED
    finally:
        await proc.stop(0.5)
        kill_all(list(tree.values()))


async def test_a_crash_of_the_main_process_takes_the_tree(
    tmp_path: Path, probe: httpx.AsyncClient
) -> None:
    seen: list[bool] = []
    proc, tree = await spawn_tree(tmp_path, probe)
    # on_exit (where the scheduler frees the port and VRAM) runs only once all are gone.
    proc._on_exit = lambda p: seen.append(all(reaped(m) for m in tree.values()))
    try:
        began = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.exited.wait(), 5)
        took = time.monotonic() - began
        print(f"crash: the whole tree gone {took:.3f} s after the main process was killed")
        assert seen == [True]
        assert took < 1.0
    finally:
        await proc.stop(0.5)
        kill_all(list(tree.values()))


async def test_readiness_never_probes_a_squatter(tmp_path: Path, probe: httpx.AsyncClient) -> None:
    """A squatter took the port before the backend could: not even the
    readiness probe reaches it; the backend is told the port is someone else's."""
    port = free_port()
    log = tmp_path / "squatter.log"
    squatter = start_squatter(port, log)
    go = tmp_path / "go"
    go.mkdir()
    (go / f"go-{port}").touch()  # the backend binds at once (and keeps retrying)
    argv = tree_command(tmp_path / "pids", "--ports-file", str(tmp_path / "ports"),
                        "--go-dir", str(go), port=str(port))  # fmt: skip
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = await BackendProcess.spawn("t", argv, env)
    tree = read_tree(tmp_path / "pids")
    try:
        began = time.monotonic()
        with pytest.raises(PortHeldElsewhere) as info:
            await proc.wait_ready(
                probe, f"http://127.0.0.1:{port}/health", interval=0.02, timeout=10, port=port
            )
        print(f"squatter noticed after {time.monotonic() - began:.3f} s; "
              f"requests it got: {requests_seen(log)}")  # fmt: skip
        assert info.value.port == port
        assert requests_seen(log) == []
    finally:
        await proc.stop(0.5)
        stop(squatter)
        kill_all(list(tree.values()))
