"""Shared fixtures: real processes, real ports, generated models, leak checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import uvicorn
import yaml

from dynllm.app import create_app, instance_marker
from dynllm.backends.base import MARKER_ENV
from dynllm.config import Config, load_config
from dynllm.server import uvicorn_config
from tests.support import envs
from tests.support.net import free_port, free_port_range
from tests.support.tiny_gguf import write_tiny_embedding, write_tiny_llama

FAKE_SERVER = Path(__file__).parent / "support" / "fake_llama_server.py"
_markers: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the backend environments and model fixtures that are not cached
    yet (the first run pays minutes; later runs nothing).  DYNLLM_TEST_BUILD_ENVS=0
    skips building: their tests are then skipped, loudly."""
    if os.environ.get("DYNLLM_TEST_BUILD_ENVS", "1") == "0":
        return
    writer = session.config.get_terminal_writer()
    failures = envs.build_all(envs.registered(), log=lambda line: writer.line(f"[envs] {line}"))
    for name, reason in failures.items():
        writer.line(f"[envs] {name} could not be built; its tests will be skipped:\n{reason}",
                    red=True)  # fmt: skip


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if envs.SKIPPED:
        terminalreporter.section("BACKEND ENVIRONMENTS UNAVAILABLE (tests skipped)", red=True)
        for reason in sorted(set(envs.SKIPPED)):
            terminalreporter.line(reason, red=True)


def _deadline(timeout: float) -> Iterator[None]:
    """Yields until ``timeout`` seconds have passed, then fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() <= deadline:
        yield
    raise AssertionError(f"condition not met within {timeout} s")


def poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll until ``predicate()`` is truthy; its value, or AssertionError at the deadline."""
    for _ in _deadline(timeout):
        if value := predicate():
            return value
        time.sleep(interval)


async def apoll(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """``poll`` for async tests: sleeps without blocking the event loop."""
    for _ in _deadline(timeout):
        if value := predicate():
            return value
        await asyncio.sleep(interval)


def backends_with_marker(markers: set[str]) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER_ENV) in markers:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture(autouse=True)
def no_leaked_backends() -> Iterator[None]:
    """A backend left running after a test is a failed test (and is killed)."""
    before = set(_markers)
    yield
    markers = _markers - before
    if not markers:
        return
    try:
        poll(lambda: not backends_with_marker(markers), timeout=3)
    except AssertionError:
        leaked = backends_with_marker(markers)
        for proc in leaked:
            proc.kill()
        pytest.fail(f"backend processes leaked: {[p.cmdline() for p in leaked]}")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny GGUF models generated once per run (never committed)."""
    root = tmp_path_factory.mktemp("models")
    write_tiny_llama(root / "tiny.gguf")
    write_tiny_llama(root / "tiny2.gguf", seed=7)
    write_tiny_embedding(root / "embed.gguf")
    (root / "fake.gguf").write_bytes(b"not a real model; the fake backend never reads it")
    return root


class ConfigFactory:
    def __init__(self, tmp_path: Path, models_dir: Path) -> None:
        self.tmp_path = tmp_path
        self.models_dir = models_dir

    def write(self, models: list[dict[str, Any]], **top: Any) -> Path:
        start, end = free_port_range(20)
        data: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": free_port()},
            "total_vram_mb": 8000,
            "enabled_backends": ["llamacpp"],
            "backend": {
                "llamacpp_binary": str(FAKE_SERVER),
                "port_range_start": start,
                "port_range_end": end,
            },
            "models_dir": str(self.models_dir),
            "db_path": str(self.tmp_path / "state.db"),
            "health_poll_interval_ms": 20,
            "stop_timeout_seconds": 3,
            "idle_check_interval_seconds": 0.5,
            # The shared models folder holds fixtures of other tests; a test
            # of discovery turns it on with a folder of its own.
            "discovery": False,
            # Never the real Hub: a loopback port nothing listens on (refused at once).
            "hf_endpoint": f"http://127.0.0.1:{free_port()}",
            "models": [
                {"path": "fake.gguf", "backend": "llamacpp", "vram_mb": 1000, **m} for m in models
            ],
        }
        for key, value in top.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        path = self.tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def write_and_load(self, models: list[dict[str, Any]], **top: Any) -> tuple[Path, Config]:
        """Write the config file and load it; its backends count for the leak check."""
        path = self.write(models, **top)
        config = load_config(path)
        register_marker(config)
        return path, config

    def __call__(self, models: list[dict[str, Any]], **top: Any) -> Config:
        return self.write_and_load(models, **top)[1]


@pytest.fixture
def make_config(tmp_path: Path, models_dir: Path) -> ConfigFactory:
    return ConfigFactory(tmp_path, models_dir)


def register_marker(config: Config) -> None:
    _markers.add(instance_marker(config))


class RunningApp:
    def __init__(self, config: Config, base_url: str, app: Any, server: uvicorn.Server) -> None:
        self.config = config
        self.base_url = base_url
        self.app = app
        self.server = server
        self.client = httpx.AsyncClient(base_url=base_url, timeout=60, trust_env=False)

    @property
    def port(self) -> int:
        return self.config.server.port

    @property
    def limits(self) -> Any:
        """The connection limits of dynllm.server's protocol (its counters)."""
        return self.server.config.http_protocol_class.limits  # type: ignore[attr-defined]

    @property
    def services(self) -> Any:
        return self.app.state.services

    async def chat(self, model: str, **body: Any) -> httpx.Response:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
        return await self.client.post("/v1/chat/completions", json=payload)

    async def admin_models(self) -> dict[str, dict[str, Any]]:
        response = await self.client.get("/admin/models")
        response.raise_for_status()
        return {m["name"]: m for m in response.json()["models"]}

    async def spawned_pids(self) -> list[int]:
        return [m["pid"] for m in (await self.admin_models()).values() if m["pid"]]


@asynccontextmanager
async def serve(config: Config, config_path: Path | None = None) -> AsyncIterator[RunningApp]:
    """Run dynllm in this event loop on a real socket, with its lifespan
    (``config_path``: the file /admin/reload re-reads)."""
    register_marker(config)
    # The app learns when the server is asked to stop, as under the CLI (open
    # event streams then end at once instead of holding up the shutdown).
    app = create_app(config, stopping=lambda: server.should_exit, config_path=config_path)
    # The production server config (dynllm.server's protocol and its limits).
    server = uvicorn.Server(
        uvicorn_config(app, config, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    )
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve())
    try:
        await apoll(lambda: server.started or task.done(), timeout=30)
        if task.done():
            task.result()
            raise RuntimeError("dynllm did not start")
        running = RunningApp(config, f"http://127.0.0.1:{config.server.port}", app, server)
        try:
            yield running
        finally:
            await running.client.aclose()
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)


def subprocess_env() -> dict[str, str]:
    """This environment without any DYNLLM_* variable: a DYNLLM_CONFIG,
    DYNLLM_PORT or DYNLLM_ADMIN_API_KEY from the caller's shell would change
    what a dynllm child process serves or sends."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DYNLLM_")}


@pytest.fixture
def dynllm_process() -> Iterator[Any]:
    """Starts dynllm as its own process (``start(config_path, log_file=None)``:
    stderr to a pipe, or into ``log_file``); stopped after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(config_path: Path, log_file: Path | None = None) -> subprocess.Popen[bytes]:
        with contextlib.ExitStack() as stack:
            sink = subprocess.PIPE if log_file is None else stack.enter_context(log_file.open("wb"))
            proc = subprocess.Popen(
                [sys.executable, "-m", "dynllm", "--config", str(config_path)],
                env=subprocess_env(),
                stdout=subprocess.DEVNULL,
                stderr=sink,
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
