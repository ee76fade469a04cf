"""ProcessEffects: the scheduler's real side effects against the fake llama-server
(and the tree backend, for a port a squatter took)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dynllm.app import instance_marker
from dynllm.errors import BackendExited, ModelFileMissing
from dynllm.launcher import ProcessEffects
from dynllm.scheduler import PortTaken
from tests.conftest import ConfigFactory, apoll
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
async def probe() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


async def test_a_taken_port_is_reported_as_port_taken(
    make_config: ConfigFactory, probe: httpx.AsyncClient
) -> None:
    config = make_config([{"name": "A"}])  # registers its marker for the leak check
    effects = ProcessEffects(config, instance_marker(config), probe)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(PortTaken):
            await effects.start(config.models[0], port, lambda h: None)


async def test_start_then_stop(make_config: ConfigFactory, probe: httpx.AsyncClient) -> None:
    config = make_config([{"name": "A"}])
    effects = ProcessEffects(config, instance_marker(config), probe)
    handle = await effects.start(config.models[0], free_port(), lambda h: None)
    try:
        assert handle.returncode is None
        assert any("/health" in line for line in effects.logs("A"))  # its output is captured
    finally:
        await effects.stop(handle)
    assert handle.returncode == 0


async def test_missing_model_file(
    make_config: ConfigFactory, probe: httpx.AsyncClient, tmp_path: Path
) -> None:
    config = make_config([{"name": "A", "path": str(tmp_path / "absent.gguf")}])
    effects = ProcessEffects(config, instance_marker(config), probe)
    with pytest.raises(ModelFileMissing, match=r"absent\.gguf"):
        await effects.start(config.models[0], free_port(), lambda h: None)


async def test_a_squatter_is_port_taken_and_gets_nothing(
    make_config: ConfigFactory, probe: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A squatter binds the port after the backend was started on it and
    before the backend binds (which then keeps retrying): the backend is
    stopped, whole tree, and reported as PortTaken before any request -- the
    readiness probe included -- reaches the squatter."""
    port = free_port()
    go = tmp_path / "go"
    go.mkdir()
    pids, ports = tmp_path / "pids", tmp_path / "ports"
    command = tree_command(pids, "--ports-file", str(ports), "--go-dir", str(go))
    config = make_config([{"name": "A", "backend": "command", "command": command}],
                         enabled_backends=["command"], stop_timeout_seconds=0.5)  # fmt: skip
    effects = ProcessEffects(config, instance_marker(config), probe)
    log = tmp_path / "squatter.log"
    start = asyncio.create_task(effects.start(config.models[0], port, lambda h: None))
    await apoll(lambda: ports.exists() and ports.read_text() == f"{port}\n", timeout=15)
    tree = read_tree(pids)  # its children run; the backend waits for the go file
    squatter = await asyncio.to_thread(start_squatter, port, log)
    try:
        (go / f"go-{port}").touch()
        began = time.monotonic()
        with pytest.raises(PortTaken):
            await start
        print(f"PortTaken {time.monotonic() - began:.3f} s after the backend tried to bind; "
              f"squatter requests: {requests_seen(log)}")  # fmt: skip
        assert [role for role, p in tree.items() if not reaped(p)] == []
        assert requests_seen(log) == []
    finally:
        if not start.done():
            start.cancel()
        stop(squatter)
        kill_all(list(tree.values()))


async def test_a_backend_that_exits_while_a_squatter_holds_its_port_is_port_taken(
    make_config: ConfigFactory, probe: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The backend exits with words no bind-failure check knows; someone
    else listens on its port: that is PortTaken (another port), not a failed
    load.  A long poll interval makes the exit, not a poll, notice it."""
    port = free_port()
    go = tmp_path / "go"
    go.mkdir()
    ports = tmp_path / "ports"
    command = tree_command(tmp_path / "pids", "--ports-file", str(ports), "--go-dir", str(go),
                           "--exit-if-taken", children=False)  # fmt: skip
    config = make_config([{"name": "A", "backend": "command", "command": command}],
                         enabled_backends=["command"], health_poll_interval_ms=60_000)  # fmt: skip
    effects = ProcessEffects(config, instance_marker(config), probe)
    log = tmp_path / "squatter.log"
    start = asyncio.create_task(effects.start(config.models[0], port, lambda h: None))
    await apoll(lambda: ports.exists() and ports.read_text() == f"{port}\n", timeout=15)
    squatter = await asyncio.to_thread(start_squatter, port, log)
    try:
        (go / f"go-{port}").touch()
        with pytest.raises(PortTaken) as info:
            await asyncio.wait_for(start, 15)
        assert isinstance(info.value.__cause__, BackendExited)
        assert info.value.__cause__.stderr_tail == ["startup failed"]
        assert requests_seen(log) == []
    finally:
        if not start.done():
            start.cancel()
        stop(squatter)


@pytest.mark.parametrize("check", [True, False])
async def test_port_owner_check_can_be_turned_off_for_a_port_held_by_design(
    make_config: ConfigFactory, probe: httpx.AsyncClient, tmp_path: Path, check: bool
) -> None:
    """A server reached through a port another process holds by design (the
    squatter stands in for docker-proxy of ``docker run -p``; the command
    itself never listens): refused as PortTaken while the check is on, used
    when ``port_owner_check: false``."""
    port = free_port()
    log = tmp_path / "proxy.log"
    holder = await asyncio.to_thread(start_squatter, port, log)
    command = [sys.executable, "-c", "import time; time.sleep(120)"]
    config = make_config(
        [{"name": "A", "backend": "command", "command": command, "port_owner_check": check}],
        enabled_backends=["command"],
        stop_timeout_seconds=0.5,
    )
    effects = ProcessEffects(config, instance_marker(config), probe)
    try:
        if check:
            with pytest.raises(PortTaken):
                await asyncio.wait_for(effects.start(config.models[0], port, lambda h: None), 15)
            assert requests_seen(log) == []
        else:
            handle = await asyncio.wait_for(
                effects.start(config.models[0], port, lambda h: None), 15
            )
            assert requests_seen(log) == ["GET /health"]  # the probe reached the holder
            await effects.stop(handle)
    finally:
        stop(holder)


async def test_a_cancel_during_the_stop_of_a_failed_load_waits_for_the_process(
    make_config: ConfigFactory, probe: httpx.AsyncClient
) -> None:
    """A load times out; while its backend (ignoring SIGTERM) is being
    stopped, the load is cancelled (an admin unload, shutdown).  ``start``
    must not give up before the process is gone: the scheduler books its
    VRAM and port free the moment ``start`` raises."""
    grace = 1.0
    config = make_config(
        [{"name": "A", "extra_args": ["--fake-never-ready", "--fake-ignore-sigterm"],
          "load_timeout_seconds": 0.3}],
        stop_timeout_seconds=grace,
    )  # fmt: skip
    effects = ProcessEffects(config, instance_marker(config), probe)
    start = asyncio.create_task(effects.start(config.models[0], free_port(), lambda h: None))
    await apoll(lambda: "A" in effects.processes, timeout=15)
    process = effects.processes["A"]
    await apoll(lambda: process.state.value == "stopping", timeout=15)  # timed out, stopping
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    print(f"start raised with the process exit code {process.returncode}")
    assert process.returncode is not None  # gone (SIGKILLed after the grace) before it raised
    assert process.exited.is_set()
