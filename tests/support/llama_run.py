"""Run the real llama-server on one model file for a test: a free loopback port,
its output in a log file, stopped and reaped on exit."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import poll
from tests.support.binaries import llama_server_binary
from tests.support.net import free_port, http_ok


@contextmanager
def running_llama_server(
    model: Path, log: Path, *extra: str, context: int = 2048
) -> Iterator[httpx.Client]:
    """A client of a llama-server serving ``model`` on the CPU (one thread), once it
    answers /health. Its stdout and stderr go to ``log``."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [llama_server_binary(), "-m", str(model), "--host", "127.0.0.1",
             "--port", str(port), "-c", str(context), "-ngl", "0", "-t", "1",
             "--no-webui", *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False)
    try:
        poll(lambda: proc.poll() is not None or http_ok(http), timeout=60)
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise AssertionError(f"llama-server exited with {proc.returncode}:\n{tail}")
        yield http
    finally:
        http.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
