"""What the download tests share: a real dynllm process pointed at the
stand-in Hub (``start``/``stop``, its config and environment), and small
helpers to look at repos and downloaded folders."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from tests.conftest import poll, subprocess_env
from tests.support.fake_hub import FakeHub, HubRepo
from tests.support.net import free_port, http_ok


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def repo_of(repos: list[HubRepo], repo_id: str) -> HubRepo:
    return next(r for r in repos if r.repo_id == repo_id)


def files_under(folder: Path) -> list[str]:
    """Every file under ``folder`` (hidden ones too), as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


# ---- a dynllm process -------------------------------------------------------------------


@dataclass
class Dynllm:
    proc: subprocess.Popen[bytes]
    http: httpx.Client
    config_path: Path
    models_dir: Path
    log: Path

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/models/download/{job_id}")
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    def finished(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        return poll(  # type: ignore[no-any-return]
            lambda: (j := self.job(job_id))["status"] not in ("queued", "downloading") and j,
            timeout=timeout,
        )


def hub_env(tmp: Path, decoy: FakeHub) -> dict[str, str]:
    """The environment without the user's DYNLLM_/HF_ settings; HF_ENDPOINT
    names ``decoy``, which no request may reach (the config names the hub)."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp / "hf-home"), HF_ENDPOINT=decoy.url)
    return env


def write_config(tmp: Path, hub: FakeHub, **extra: Any) -> Path:
    data = {
        "server": {"host": "127.0.0.1", "port": free_port()},
        "models_dir": str(tmp / "models"),
        "db_path": str(tmp / "state.db"),
        "hf_endpoint": hub.url,
        "enabled_backends": ["llamacpp"],
        "rescan_interval_seconds": 0,  # only the rescan a finished download asks for
        "models": [],
        **extra,
    }
    (tmp / "models").mkdir(exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start(config_path: Path, env: dict[str, str]) -> Dynllm:
    config = yaml.safe_load(config_path.read_text())
    log = config_path.with_suffix(".log")
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dynllm", "--config", str(config_path)],
            env=env, stdout=subprocess.DEVNULL, stderr=sink,
        )  # fmt: skip
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{config['server']['port']}", trust_env=False, timeout=30
    )
    running = Dynllm(proc, http, config_path, Path(config["models_dir"]), log)
    try:
        poll(lambda: http_ok(http) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, log.read_text()
    except BaseException:
        stop(running)
        raise
    return running


def stop(running: Dynllm) -> list[psutil.Process]:
    """SIGTERM (what systemd sends), wait; returns the children it had."""
    try:
        children = psutil.Process(running.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if running.proc.poll() is None:
        running.proc.send_signal(signal.SIGTERM)
        try:
            running.proc.wait(30)
        except subprocess.TimeoutExpired:
            running.proc.kill()
            running.proc.wait()
    running.http.close()
    return children
