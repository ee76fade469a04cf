"""dynllm.proctree: finding a backend's processes (subreaper, tag, group), who
owns a port's listener, the marker scan, and terminate().  Real processes:
the tree backend (tests/support/tree_backend.py) started by BackendProcess."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest

from dynllm import proctree
from dynllm.backends.base import MARKER_ENV, MODEL_ENV
from dynllm.proctree import PortOwner, find_marked, read_stat, terminate
from dynllm.supervisor import BackendProcess
from tests.support.net import free_port
from tests.support.trees import gone, kill_all, read_tree, reaped, tree_command

SLEEPER = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"  # noqa: E501


def sleeper(env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A process of this test's own (own session, ignores SIGTERM); returns
    once it runs."""
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER], env=env, stdout=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == b"1\n"
    return proc


@pytest.fixture
async def probe() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


def test_dynllm_can_become_a_subreaper() -> None:
    assert proctree.become_subreaper() is True


def test_read_stat_reads_this_process() -> None:
    me = read_stat(os.getpid())
    assert me is not None
    assert (me.pid, me.ppid, me.pgrp, me.sid) == (
        os.getpid(), os.getppid(), os.getpgrp(), os.getsid(0)
    )  # fmt: skip
    assert not me.zombie
    assert read_stat(2**22 + 1) is None  # beyond pid_max: nobody


async def test_members_are_the_whole_tree_and_nothing_else(
    tmp_path: Path, probe: httpx.AsyncClient
) -> None:
    """The daemon left the group and the parent chain; it is found by the tag
    among dynllm's own descendants (it came back to dynllm, the subreaper).
    A process of this test's own, untagged and in its own session, is not."""
    port = free_port()
    pids = tmp_path / "pids"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    stranger = sleeper()
    backend = await BackendProcess.spawn("t", tree_command(pids, port=str(port)), env)
    tree = read_tree(pids)
    try:
        await backend.wait_ready(
            probe, f"http://127.0.0.1:{port}/health", interval=0.02, timeout=10, port=port
        )
        daemon = tree["daemon"]
        assert daemon.ppid() == os.getpid()  # re-parented to the subreaper, not init
        assert os.getsid(daemon.pid) != os.getsid(backend.pid)
        assert os.getpgid(daemon.pid) != backend.pgid
        members = {p.pid for p in await asyncio.to_thread(backend.tree.members)}
        print(f"members: {sorted(members)}; reported: {sorted(p.pid for p in tree.values())}")
        assert members == {p.pid for p in tree.values()}
        assert stranger.pid not in members
        assert os.getpid() not in members
    finally:
        await backend.stop(0.5)
        stranger.kill()
        stranger.wait()
        kill_all(list(tree.values()))
    assert all(reaped(p) for p in tree.values())


async def test_port_owner_tells_nobody_the_backend_and_another_process_apart(
    tmp_path: Path, probe: httpx.AsyncClient
) -> None:
    port = free_port()
    pids = tmp_path / "pids"
    go = tmp_path / "go"
    go.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    argv = tree_command(pids, "--ports-file", str(tmp_path / "ports"), "--go-dir", str(go),
                        port=str(port))  # fmt: skip
    backend = await BackendProcess.spawn("t", argv, env)
    tree = read_tree(pids)
    try:
        # It waits for the go file: nothing listens on its port yet.
        assert await asyncio.to_thread(backend.tree.port_owner, port) is PortOwner.NOBODY
        (go / f"go-{port}").touch()
        await backend.wait_ready(
            probe, f"http://127.0.0.1:{port}/health", interval=0.02, timeout=10, port=port
        )
        assert await asyncio.to_thread(backend.tree.port_owner, port) is PortOwner.BACKEND
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            theirs = other.getsockname()[1]
            # A listener of this test's process is not the backend's, though
            # dynllm (this process) is the backend's parent.
            assert await asyncio.to_thread(backend.tree.port_owner, theirs) is PortOwner.OTHER
    finally:
        await backend.stop(0.5)
        kill_all(list(tree.values()))


def test_find_marked_finds_leftovers_by_marker_only(tmp_path: Path) -> None:
    marker = secrets.token_hex(8)
    procs = []
    try:
        for value in (marker, "another-instance", None):
            env = {"PATH": "/usr/bin:/bin", MODEL_ENV: "leftover"}
            if value is not None:
                env[MARKER_ENV] = value
            procs.append(sleeper(env))
        started = time.monotonic()
        found = find_marked(MARKER_ENV, marker)
        print(f"marker scan of the machine: {(time.monotonic() - started) * 1000:.1f} ms")
        assert [(m.proc.pid, m.model) for m in found] == [(procs[0].pid, "leftover")]
        assert "SIGTERM" in found[0].cmdline
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def test_terminate_escalates_to_sigkill_after_the_grace() -> None:
    proc = sleeper()
    try:
        stat = read_stat(proc.pid)
        assert stat is not None
        started = time.monotonic()
        await terminate([stat], grace=0.3)
        took = time.monotonic() - started
        print(f"SIGTERM-ignoring process gone {took:.2f} s after terminate (grace 0.3 s)")
        assert 0.3 <= took < 2.0
        assert gone(psutil.Process(proc.pid))
        assert proc.wait(5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
