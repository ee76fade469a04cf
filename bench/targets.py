"""Start and stop what the bench talks to: dynllm, LiteLLM's proxy, llama-server by hand."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml
from tests.support.net import free_port, free_port_range

from bench.loadgen import MASTER_KEY

ROOT = Path(__file__).resolve().parent.parent
LITELLM_VERSION = "1.106.2"
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"


def wait_http(url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def paced_wrapper(work: Path) -> Path:
    """An executable dynllm can use as ``llamacpp_binary`` for the paced backend."""
    path = work / "paced-backend"
    path.write_text(
        f'#!/bin/sh\nexec {sys.executable} {ROOT / "bench" / "paced_backend.py"} "$@"\n'
    )
    path.chmod(0o755)
    return path


class Service:
    """A server the bench started; stopped with SIGTERM (SIGKILL after 30 s)."""

    proc: subprocess.Popen[bytes] | None = None

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def process(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)


class Dynllm(Service):
    def __init__(self, work: Path, models: list[dict[str, Any]], **top: Any) -> None:
        start, end = free_port_range(20)
        self.port = free_port()
        self.work = work
        config = {
            "server": {"host": "127.0.0.1", "port": self.port},
            "total_vram_mb": 100000,
            "enabled_backends": ["llamacpp"],
            "backend": {"port_range_start": start, "port_range_end": end},
            "db_path": str(work / f"state-{self.port}.db"),
            "log_level": "warning",
            "health_poll_interval_ms": 50,
            "models": models,
        }
        for key, value in top.items():
            if isinstance(value, dict):
                config[key] = {**config.get(key, {}), **value}
            else:
                config[key] = value
        self.config_path = work / f"dynllm-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Dynllm:
        log = (self.work / f"dynllm-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynllm", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.work,
        )  # fmt: skip
        wait_http(self.url + "/health", 60)
        return self

    def models(self) -> dict[str, dict[str, Any]]:
        data = httpx.get(self.url + "/admin/models", timeout=10).json()
        return {m["name"]: m for m in data["models"]}

    def backend_port(self, name: str) -> int:
        return int(self.models()[name]["port"])

    def unload(self, name: str) -> None:
        httpx.post(
            self.url + "/admin/models/unload", json={"model": name, "force": True}, timeout=60
        )

    def unload_all(self) -> None:
        httpx.post(self.url + "/admin/models/unload-all", json={"force": True}, timeout=60)


def ensure_litellm() -> Path | None:
    """LiteLLM's proxy in its own venv (never a dependency of dynllm)."""
    binary = LITELLM_VENV / "bin" / "litellm"
    if binary.exists():
        return binary
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run(
            [
                str(LITELLM_VENV / "bin" / "pip"),
                "install",
                "-q",
                f"litellm[proxy]=={LITELLM_VERSION}",
            ],
            check=True,
        )
    except subprocess.CalledProcessError as exc:
        print(f"LiteLLM could not be installed ({exc}); its columns stay empty", flush=True)
        return None
    return binary


class LiteLLM(Service):
    def __init__(self, work: Path, binary: Path, upstreams: dict[str, int]) -> None:
        self.port = free_port()
        self.work = work
        self.binary = binary
        config = {
            "model_list": [
                {"model_name": name, "litellm_params": {
                    "model": f"openai/{name}", "api_base": f"http://127.0.0.1:{port}/v1",
                    "api_key": "unused"}}
                for name, port in upstreams.items()
            ],
            "litellm_settings": {"telemetry": False, "drop_params": True},
        }  # fmt: skip
        self.config_path = work / "litellm.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LiteLLM:
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": MASTER_KEY,
               "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}  # fmt: skip
        log = (self.work / "litellm.log").open("wb")
        self.proc = subprocess.Popen(
            [str(self.binary), "--config", str(self.config_path), "--host", "127.0.0.1",
             "--port", str(self.port), "--num_workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.work,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{self.port}/health/liveliness", 120)
        return self


def cpu_seconds(process: psutil.Process, tree: bool = False) -> float:
    """CPU time of a process, and of its children with ``tree`` (LiteLLM's
    workers; never dynllm's, whose children are the backends)."""
    total = 0.0
    for proc in [process, *(process.children(recursive=True) if tree else [])]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total
