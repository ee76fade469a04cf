"""Issue 8 items 7 and 8 through dynllm: everything a backend starts dies with
it, and requests only ever reach the backend's own listener.

The backend is tests/support/tree_backend.py behind the ``command`` backend:
it starts a child that ignores SIGTERM and a daemon that double-forked and
called ``setsid`` (so it is in neither the backend's group nor below it in
the process tree), and writes their pids to a file.  Every test asserts that
all of them are gone -- on unload, on a crash of the main process, on
dynllm's clean shutdown and after ``kill -9`` of a real ``dynllm`` process
followed by a new start -- and prints how long it took.
"""

from __future__ import annotations

import asyncio
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.conftest import ConfigFactory, RunningApp, apoll, poll, serve
from tests.support.net import free_port_range, http_ok
from tests.support.trees import (
    gone,
    kill_all,
    read_tree,
    reap_ours,
    reaped,
    requests_seen,
    start_squatter,
    stop,
    tree_command,
)

GRACE = 1.0  # stop_timeout_seconds: the SIGTERM-ignoring child is killed after it


def tree_model(pids: Path, *extra: str, children: bool = True) -> dict[str, Any]:
    command = tree_command(pids, *extra, children=children)
    return {"name": "tree", "backend": "command", "command": command}


def tree_top(**extra: Any) -> dict[str, Any]:
    return {"enabled_backends": ["command"], "stop_timeout_seconds": GRACE, **extra}


async def load(app: RunningApp) -> str:
    response = await app.chat("tree")
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    assert isinstance(content, str)
    return content


async def watch(
    tree: dict[str, psutil.Process], began: float, timeout: float = 15
) -> dict[str, float]:
    """Seconds after ``began`` at which each process was gone and reaped."""
    when: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(when) < len(tree) and time.monotonic() < deadline:
        for role, proc in tree.items():
            if role not in when and reaped(proc):
                when[role] = time.monotonic() - began
        await asyncio.sleep(0.002)
    return when


def report(event: str, when: dict[str, float]) -> str:
    return "; ".join(f"{role} gone {when[role]:.3f} s after {event}" for role in sorted(when))


async def test_unload_stops_the_whole_tree(make_config: ConfigFactory, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    config = make_config([tree_model(pids)], **tree_top())
    async with serve(config) as app:
        await load(app)
        tree = read_tree(pids)
        try:
            daemon = tree["daemon"]
            # The premise: the daemon left the backend's session and parent
            # chain; it came back to dynllm (this process), the subreaper.
            assert os.getsid(daemon.pid) != os.getsid(tree["main"].pid)
            assert daemon.ppid() == os.getpid()
            began = time.monotonic()
            watcher = asyncio.create_task(watch(tree, began))
            response = await app.client.post("/admin/models/unload", json={"model": "tree"})
            answered = time.monotonic() - began
            assert response.status_code == 200, response.text
            # All gone and reaped when the unload returns: nothing to wait for.
            assert [role for role, p in tree.items() if not reaped(p)] == []
            when = await watcher
            print(f"unload answered after {answered:.3f} s; {report('unload', when)}")
            # (The reaped check above is the guarantee; the watcher only sees a
            # death at its next look, up to one poll plus scheduling later.)
            assert when["daemon"] < 0.5 and when["main"] < 0.5  # they obey SIGTERM
            assert GRACE <= when["ignorer"] < GRACE + 1.0  # SIGKILL at the grace
            assert (await app.admin_models())["tree"]["status"] == "unloaded"
        finally:
            kill_all(list(tree.values()))


async def test_a_crash_of_the_main_process_stops_the_tree_before_the_slot_frees(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    config = make_config([tree_model(pids)], **tree_top())
    async with serve(config) as app:
        await load(app)
        tree = read_tree(pids)
        try:
            began = time.monotonic()
            watcher = asyncio.create_task(watch(tree, began))
            tree["main"].kill()
            await apoll(lambda: app.services.scheduler.slots["tree"].state == "unloaded", 10)
            freed = time.monotonic() - began
            # The model counts as unloaded (port and VRAM free) only now that
            # every process of its tree is gone.
            assert [role for role, p in tree.items() if not reaped(p)] == []
            when = await watcher
            print(f"crash: slot freed {freed:.3f} s after kill -9 of the main process; "
                  f"{report('the crash', when)}")  # fmt: skip
            assert max(when.values()) <= freed < 1.0
            # And the next request starts a fresh backend.
            assert (await load(app)).startswith("served by")
            fresh = read_tree(pids)
            assert fresh["main"].pid != tree["main"].pid
        finally:
            kill_all(list(tree.values()))


async def test_clean_shutdown_stops_the_whole_tree(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    config = make_config([tree_model(pids)], **tree_top())
    tree: dict[str, psutil.Process] = {}
    try:
        async with serve(config) as app:
            await load(app)
            tree = read_tree(pids)
            began = time.monotonic()
        took = time.monotonic() - began
        left = [role for role, p in tree.items() if not reaped(p)]
        print(f"clean shutdown took {took:.3f} s; processes of the tree left after it: {left}")
        assert left == []
    finally:
        kill_all(list(tree.values()))


def test_kill_9_of_dynllm_then_a_new_start_stops_the_leftovers(
    make_config: ConfigFactory, tmp_path: Path, dynllm_process: Any
) -> None:
    pids = tmp_path / "pids"
    path, config = make_config.write_and_load([tree_model(pids)], **tree_top())
    base = f"http://127.0.0.1:{config.server.port}"
    first = dynllm_process(path)
    tree: dict[str, psutil.Process] = {}
    try:
        with httpx.Client(base_url=base, timeout=30, trust_env=False) as http:
            poll(lambda: first.poll() is not None or http_ok(http), 30, 0.05)
            assert first.poll() is None, first.stderr.read().decode()
            chat = {"model": "tree", "messages": [{"role": "user", "content": "hi"}]}
            response = http.post("/v1/chat/completions", json=chat)
            assert response.status_code == 200, response.text
            tree = read_tree(pids)

            first.kill()
            first.wait()
            # The main process dies by its parent-death signal; the ignoring
            # child and the daemon outlive dynllm: the case the marker is for.
            poll(lambda: gone(tree["main"]), 5)
            assert not gone(tree["ignorer"]) and not gone(tree["daemon"])
            print(f"after kill -9 of dynllm: main gone; still running: "
                  f"ignorer {tree['ignorer'].pid}, daemon {tree['daemon'].pid}")  # fmt: skip

            began = time.monotonic()
            second = dynllm_process(path)
            poll(lambda: gone(tree["ignorer"]) and gone(tree["daemon"]), 15, 0.005)
            stopped = time.monotonic() - began
            poll(lambda: second.poll() is not None or http_ok(http), 30, 0.05)
            serving = time.monotonic() - began
            assert second.poll() is None
            print(
                f"new start: leftovers gone {stopped:.2f} s after it began (grace {GRACE:g} s "
                f"for the SIGTERM-ignoring one); serving after {serving:.2f} s"
            )
            assert stopped < serving  # stopped before it serves
        second.terminate()
        _, err = second.communicate(timeout=30)
        log = err.decode()
        for role in ("ignorer", "daemon"):
            assert f"pid {tree[role].pid} (model 'tree')" in log, log
    finally:
        kill_all(list(tree.values()))
        reap_ours(list(tree.values()))


async def test_a_squatter_on_the_port_gets_no_request(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    """20 loads, each with a squatter that binds the backend's chosen port
    after dynllm started the backend on it and before the backend binds: the
    load moves to another port, the real backend answers, and the squatter
    receives nothing."""
    pids, ports, go = tmp_path / "pids", tmp_path / "ports", tmp_path / "go"
    go.mkdir()
    start, end = free_port_range(60)
    extra = ("--ports-file", str(ports), "--go-dir", str(go))
    ports_top = {"port_range_start": start, "port_range_end": end}
    model = {**tree_model(pids, *extra, children=False), "vram_mb": 0}
    config = make_config([model], **tree_top(backend=ports_top))
    tries, squatted_requests = 20, 0
    async with serve(config) as app:
        for attempt in range(tries):
            seen = len(ports.read_text().splitlines()) if ports.exists() else 0
            request = asyncio.create_task(app.chat("tree"))
            chosen = await apoll(partial(_port_line, ports, seen), 15)
            log = tmp_path / f"squatter-{attempt}.log"
            squatter = await asyncio.to_thread(start_squatter, chosen, log)
            try:
                (go / f"go-{chosen}").touch()  # now the backend tries to bind
                while not request.done():  # every later port binds at once
                    for line in ports.read_text().splitlines()[seen + 1 :]:
                        (go / f"go-{line}").touch()
                    await asyncio.sleep(0.005)
                response = await request
                assert response.status_code == 200, response.text
                model = (await app.admin_models())["tree"]
                assert model["port"] != chosen
                content = response.json()["choices"][0]["message"]["content"]
                assert content == f"served by {model['pid']}"
                squatted_requests += len(requests_seen(log))
                assert requests_seen(log) == []
            finally:
                stop(squatter)
            unload = await app.client.post("/admin/models/unload", json={"model": "tree"})
            assert unload.status_code == 200
    print(f"squatter received {squatted_requests} requests in {tries} tries")
    assert squatted_requests == 0


def _port_line(ports: Path, seen: int) -> int | None:
    """The port of the next backend started, once it has written it."""
    if not ports.exists():
        return None
    lines = ports.read_text().splitlines()
    return int(lines[seen]) if len(lines) > seen else None
