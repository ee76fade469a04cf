"""Crash races and load retries through a running dynllm, with real backend
processes (the generic stand-in tests/support/fake_openai_server.py, started
by the ``command`` backend):

* a request sent in the moment its backend died is served by a restarted
  backend, never a 502, while one that was in flight at the crash gets its
  502 and is never sent again;
* a model whose load keeps failing cools down (503 + Retry-After, doubling,
  capped, shown in /admin/models) and a successful load resets it;
* a backend that runs out of GPU memory while idle models are loaded gets one
  retry after they are evicted, never a loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import ConfigFactory, RunningApp, apoll, poll, serve
from tests.test_dispatch import FAKE, backend_stats, config_for, fake_model

OOM_BACKEND = Path(__file__).parent / "support" / "oom_backend.py"
SERVER_ARGV = [
    sys.executable,
    str(FAKE),
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--name",
    "{name}",
]


async def pid_of(app: RunningApp, model: str) -> int:
    pid = (await app.admin_models())[model]["pid"]
    assert isinstance(pid, int)
    return pid


# ---- crash races ----------------------------------------------------------------------------


def gone(pid: int, port: int) -> bool:
    """The backend is dead: its process has exited (a zombie until dynllm
    reaps it) and its sockets are closed (a zombie's other threads may still
    hold them a moment): its port refuses connections."""
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        pass
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:  # e.g. a timeout: the dying listener's backlog still holds the port
        return False
    return False


@pytest.mark.parametrize("delay_ms", [0, 10, 50])
async def test_a_request_sent_as_its_backend_dies_is_served_by_a_restarted_one(
    make_config: ConfigFactory, delay_ms: int, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL the backend; 0-50 ms after it is dead, send a request: 200 from
    a new backend (before: a 502 after ~510 ms of knocking on the dead port).

    "Dead" is the process gone, not the kill() call: a request that lands in
    the socket of a process still dying may be read by it, and a request that
    may have been read is never sent twice (the in-flight test below)."""
    async with serve(config_for(make_config, [fake_model("m")])) as app:
        handed_back = 0
        for _ in range(5):
            assert (await app.chat("m")).status_code == 200  # a pooled connection to it
            victim, port = await pid_of(app, "m"), (await app.admin_models())["m"]["port"]
            caplog.clear()
            os.kill(victim, signal.SIGKILL)
            # Blocking on purpose: dynllm (in this loop) must not notice meanwhile.
            poll(partial(gone, victim, port), timeout=5, interval=0.0005)
            if delay_ms:
                await asyncio.sleep(delay_ms / 1000)
            started = time.monotonic()
            response = await app.chat("m")
            took = time.monotonic() - started
            assert response.status_code == 200, response.text
            assert response.json()["object"] == "chat.completion"
            assert await pid_of(app, "m") != victim  # a restarted backend answered
            sent_to_dead = "exited before the request was sent" in caplog.text
            handed_back += sent_to_dead
            how = "it reached the dead port first" if sent_to_dead else "exit seen first"
            print(
                f"sent {delay_ms} ms after the backend died: 200 in {1000 * took:.0f} ms "
                f"from a restarted backend ({how})"
            )
            assert took < 5
        slot = app.services.scheduler.slots["m"]
        assert slot.in_flight == 0 and slot.pending == 0
        print(f"{delay_ms} ms: {handed_back}/5 requests reached the dead backend and were re-sent")
        if delay_ms == 0:
            assert handed_back == 5  # the scheduler had not seen the exit: the race itself


async def test_a_request_in_flight_at_the_crash_gets_a_502_and_is_never_sent_again(
    make_config: ConfigFactory,
) -> None:
    async with serve(config_for(make_config, [fake_model("m")])) as app:
        assert (await app.chat("m")).status_code == 200
        dead, port = await pid_of(app, "m"), (await app.admin_models())["m"]["port"]
        slow = asyncio.create_task(app.chat("m", fake_delay=30))

        async def reading() -> bool:
            return bool((await backend_stats(app, "m"))["active"] == 1)

        deadline = time.monotonic() + 5
        while not await reading():  # the backend has read the request
            assert time.monotonic() < deadline, "the request never reached the backend"
            await asyncio.sleep(0.01)
        os.kill(dead, signal.SIGKILL)
        started = time.monotonic()
        response = await asyncio.wait_for(slow, timeout=10)
        took = time.monotonic() - started
        print(f"in flight at SIGKILL: {response.status_code} after {1000 * took:.0f} ms")
        assert response.status_code == 502
        message = response.json()["error"]["message"]
        assert "not sent again because the backend may have read it" in message, message
        # The 502 can come back while the killed process is still dying; a
        # request that lands in its socket then may be read by it (never
        # re-sent).  Once it is gone, the next request restarts it.
        await asyncio.to_thread(poll, partial(gone, dead, port), 5, 0.0005)
        assert (await app.chat("m")).status_code == 200  # the next one restarts it
        assert await pid_of(app, "m") != dead
        stats = await backend_stats(app, "m")
        assert stats["requests"] == 1  # only the new request: the one in flight was not re-sent
        assert app.services.scheduler.slots["m"].in_flight == 0


# ---- cooldown after failed loads ---------------------------------------------------------------


def flaky_model(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A command backend that exits 1 ("cannot load") until ``fixed`` exists."""
    fixed = tmp_path / "fixed"
    script = tmp_path / "flaky.py"
    script.write_text(
        "import os, sys\n"
        f"open({str(tmp_path / 'starts.log')!r}, 'a').write('start\\n')\n"
        f"if not os.path.exists({str(fixed)!r}):\n"
        "    print('error: cannot load model: bad magic', file=sys.stderr)\n"
        "    sys.exit(1)\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    model = fake_model("flaky")
    model["command"] = [sys.executable, str(script), *model["command"][1:]]
    return model, fixed


def starts_of_flaky(tmp_path: Path) -> int:
    return len((tmp_path / "starts.log").read_text().splitlines())


async def until_not_cooling(app: RunningApp, model: str, timeout: float) -> httpx.Response:
    """Requests until one is not a cooldown 503 (each of those is a fast refusal)."""
    deadline = time.monotonic() + timeout
    while True:
        response = await app.chat(model)
        if response.status_code != 503:
            return response
        assert response.json()["error"]["code"] == "load_cooldown"
        assert time.monotonic() < deadline, "the cooldown never ended"
        await asyncio.sleep(0.02)


async def test_failed_loads_cool_down_doubling_and_a_success_resets(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    """Cooldown 0.25 s, doubling, capped at 0.6 s: 0.25, 0.5, 0.6."""
    model, fixed = flaky_model(tmp_path)
    config = config_for(
        make_config,
        [model],
        load_failure_cooldown_seconds=0.25,
        load_failure_cooldown_max_seconds=0.6,
    )
    async with serve(config) as app:
        first = await app.chat("flaky")
        assert first.status_code == 502
        assert "cannot load model: bad magic" in first.json()["error"]["message"]
        view = (await app.admin_models())["flaky"]
        assert view["consecutive_failures"] == 1 and "bad magic" in view["last_error"]
        assert view["cooldown_until"] - time.time() == pytest.approx(0.25, abs=0.1)

        refused = await app.chat("flaky")  # inside the window: not tried again
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"  # rounded up to the header's whole second
        error = refused.json()["error"]
        assert error["code"] == "load_cooldown" and error["type"] == "unavailable_error"
        assert "failed 1 time(s) in a row" in error["message"] and "bad magic" in error["message"]

        measured = []
        for failures, waited, window in ((2, 0.25, 0.5), (3, 0.5, 0.6)):  # doubled, capped
            started = time.monotonic()
            again = await until_not_cooling(app, "flaky", timeout=5)  # a new try after it
            measured.append(f"{time.monotonic() - started:.2f} s of a {waited} s cooldown")
            assert time.monotonic() - started > waited - 0.1  # no try inside the window
            assert again.status_code == 502
            view = (await app.admin_models())["flaky"]
            assert view["consecutive_failures"] == failures
            assert view["cooldown_until"] - time.time() == pytest.approx(window, abs=0.1)
        print(f"503s until the next try: {', '.join(measured)}; then 0.6 s (the cap)")
        assert starts_of_flaky(tmp_path) == 3

        fixed.write_text("")  # the cause is fixed: the next try after the window loads
        ok = await until_not_cooling(app, "flaky", timeout=5)
        assert ok.status_code == 200, ok.text
        view = (await app.admin_models())["flaky"]
        assert view["status"] == "loaded"
        assert view["consecutive_failures"] == 0 and view["cooldown_until"] is None
        assert view["last_error"] is None


async def test_an_admin_load_respects_the_cooldown_unless_forced(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    model, fixed = flaky_model(tmp_path)
    config = config_for(make_config, [model], load_failure_cooldown_seconds=60)
    async with serve(config) as app:
        assert (await app.chat("flaky")).status_code == 502
        refused = await app.client.post("/admin/models/load", json={"model": "flaky"})
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) in (59, 60)
        fixed.write_text("")
        forced = await app.client.post("/admin/models/load", json={"model": "flaky", "force": True})
        assert forced.status_code == 200, forced.text
        assert forced.json()["status"] == "loaded" and forced.json()["consecutive_failures"] == 0


# ---- out of memory --------------------------------------------------------------------------


def gpu_model(name: str, gpu: Path, mode: str, **extra: Any) -> dict[str, Any]:
    """A stand-in server that holds the fake GPU while it lives (``hold``), or
    runs out of memory while anything holds it (``need``)."""
    model = fake_model(name, **extra)
    hold = [name] if mode == "hold" else []
    model["command"] = [sys.executable, str(OOM_BACKEND), str(gpu), mode, *hold, "--", *SERVER_ARGV]
    return model


def starts(gpu: Path) -> list[str]:
    return [line.split()[0] for line in (gpu / "starts.log").read_text().splitlines()]


async def test_an_oom_load_evicts_the_idle_models_and_retries_once(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    models = [gpu_model("idle", gpu, "hold"), gpu_model("big", gpu, "need")]
    async with serve(config_for(make_config, models)) as app:
        assert (await app.chat("idle")).status_code == 200  # loaded, then idle
        started = time.monotonic()
        response = await app.chat("big")  # the books say both fit; the GPU says no
        took = time.monotonic() - started
        assert response.status_code == 200, response.text
        view = await app.admin_models()
        assert view["idle"]["status"] == "unloaded" and view["big"]["status"] == "loaded"
        assert starts(gpu) == ["hold", "need", "need"]  # one retry
        assert view["big"]["consecutive_failures"] == 0
        print(
            f"out of memory with an idle model loaded: evicted, retried once, 200 in {took:.2f} s"
        )


async def test_a_second_oom_is_a_plain_failure_never_a_loop(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    models = [
        gpu_model("idle", gpu, "hold"),
        gpu_model("busy", gpu, "hold"),
        gpu_model("big", gpu, "need"),
    ]
    async with serve(config_for(make_config, models)) as app:
        assert (await app.chat("idle")).status_code == 200
        assert (await app.chat("busy")).status_code == 200
        holding = asyncio.create_task(app.chat("busy", fake_delay=30))  # busy: never evicted
        slot = app.services.scheduler.slots["busy"]
        await apoll(lambda: slot.in_flight == 1, timeout=5)
        response = await app.chat("big")
        assert response.status_code == 502
        assert "cudaMalloc failed: out of memory" in response.json()["error"]["message"]
        view = await app.admin_models()
        assert view["idle"]["status"] == "unloaded"  # evicted for the one retry
        assert view["busy"]["status"] == "loaded"
        assert starts(gpu) == ["hold", "hold", "need", "need"]  # two tries, no more
        assert view["big"]["consecutive_failures"] == 1 and view["big"]["cooldown_until"]
        cooling = await app.chat("big")
        assert cooling.status_code == 503 and "retry-after" in cooling.headers
        assert starts(gpu) == ["hold", "hold", "need", "need"]
        holding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holding
