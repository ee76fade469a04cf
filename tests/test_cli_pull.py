"""``dynllm pull`` as a process against a real dynllm process and the stand-in Hub."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dynllm import pull
from tests.conftest import poll
from tests.support.fake_hub import GATED_REPO, GGUF_REPO, FakeHub, HubRepo, standard_repos
from tests.support.hub_helpers import Dynllm, hub_env, repo_of, start, stop, write_config
from tests.support.net import free_port

BIG = "tiny-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> list[HubRepo]:
    return standard_repos(tmp_path_factory.mktemp("hub"), pad_mb=2)


@pytest.fixture(scope="module")
def hub(repos: list[HubRepo]) -> Iterator[FakeHub]:
    with FakeHub(repos) as running:
        yield running


@pytest.fixture(scope="module")
def dynllm(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> Iterator[Dynllm]:
    tmp = tmp_path_factory.mktemp("dynllm")
    with FakeHub([]) as decoy:
        running = start(write_config(tmp, hub), hub_env(tmp, decoy))
        yield running
        stop(running)


def pull_argv(dynllm: Dynllm, *args: str) -> list[str]:
    return [sys.executable, "-m", "dynllm", "pull", *args, "--url", str(dynllm.http.base_url)]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("DYNLLM_", "HF_"))}


def run_pull(dynllm: Dynllm, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pull_argv(dynllm, *args), cwd=tmp_path, env=clean_env(), capture_output=True,
        text=True, timeout=90, check=False,
    )  # fmt: skip


def test_pull_shows_progress_and_exits_0(
    dynllm: Dynllm, hub: FakeHub, repos: list[HubRepo], tmp_path: Path
) -> None:
    hub.throttle = 1_500_000  # ~1.6 s for the big file: progress lines before the last
    try:
        result = run_pull(dynllm, tmp_path, f"{GGUF_REPO}:Q4_K_M", "-d", "pulled")
    finally:
        hub.throttle = None
    assert result.returncode == 0, result.stderr
    destination = dynllm.models_dir.resolve() / "pulled"
    assert result.stdout == f"{destination}\n"
    lines = result.stderr.splitlines()
    assert re.fullmatch(rf"dynllm: download download_\d+_\w+ into {destination}", lines[0])
    progress = [line for line in lines if line.startswith(f"{GGUF_REPO}: ")]
    shares = [float(re.search(r"(\d+\.\d)%", line)[1]) for line in progress]  # type: ignore[index]
    assert len(shares) >= 2 and shares == sorted(shares) and shares[-1] == 100.0, lines
    assert re.fullmatch(r"dynllm: Downloaded 2 file\(s\), 2\.7 MB, in [\d.]+ s", lines[-1])
    assert (destination / BIG).read_bytes() == repo_of(repos, GGUF_REPO).files[BIG]
    print("\n" + result.stderr)


def test_ctrl_c_cancels_the_download_and_exits_130(
    dynllm: Dynllm, hub: FakeHub, tmp_path: Path
) -> None:
    hub.throttle = 200_000
    proc = subprocess.Popen(
        pull_argv(dynllm, f"https://huggingface.co/{GGUF_REPO}:Q4_K_M", "-d", "interrupted"),
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def running_job() -> dict[str, Any] | None:
            jobs = dynllm.http.get("/v1/models/download").json()["downloads"]
            mine = [j for j in jobs if j["destination"].endswith("/interrupted")]
            return mine[0] if mine and mine[0]["bytes_done"] > 0 else None

        job = poll(running_job, timeout=30, interval=0.1)
        proc.send_signal(signal.SIGINT)
        interrupted = time.time()
        code = proc.wait(timeout=30)
    finally:
        hub.throttle = None
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None and proc.stdout is not None
    err = proc.stderr.read()
    assert code == 130, err
    assert f"dynllm: interrupted; cancelling download {job['job_id']}" in err
    assert f"dynllm: download {job['job_id']} cancelled" in err
    assert "Traceback" not in err and proc.stdout.read() == ""
    assert dynllm.job(job["job_id"])["status"] == "cancelled"
    transfer = hub.transfers_of(BIG)[-1]
    assert transfer.ended == "client_gone" and transfer.ended_at is not None
    assert not Path(job["destination"]).exists()
    print(
        f"\nCtrl-C: the stand-in saw the transfer end {transfer.ended_at - interrupted:.2f} s later"
    )


def test_refusals_exit_1_with_the_services_message(dynllm: Dynllm, tmp_path: Path) -> None:
    missing = run_pull(dynllm, tmp_path, "nobody/nothing:Q4_K_M")
    assert missing.returncode == 1
    assert "answered 404: No repository nobody/nothing" in missing.stderr
    gated = run_pull(dynllm, tmp_path, GATED_REPO)
    assert gated.returncode == 1 and "answered 403: The repository" in gated.stderr
    assert "hf_token" in gated.stderr and "Traceback" not in missing.stderr + gated.stderr
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    unreachable = subprocess.run(
        [sys.executable, "-m", "dynllm", "pull", "a/b", "--server", closed],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert unreachable.returncode == 1 and "cannot reach the service" in unreachable.stderr


def test_detach_prints_the_job_and_returns(dynllm: Dynllm, tmp_path: Path) -> None:
    result = run_pull(dynllm, tmp_path, f"{GGUF_REPO}:Q8_0", "-d", "detached", "--detach", "--json")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["status"] in ("queued", "downloading")
    assert dynllm.finished(job["job_id"])["status"] == "completed"


# ---- the display (pure) ----------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def job_at(done: int, status: str = "downloading") -> dict[str, Any]:
    return {
        "repo_id": "org/m", "status": status, "bytes_done": done, "bytes_total": 2_000_000,
        "speed_bytes_per_s": 500_000.0, "eta_seconds": (2_000_000 - done) / 500_000,
        "message": "Waiting for a download slot (0 queued ahead)",
    }  # fmt: skip


def test_a_terminal_gets_one_line_redrawn() -> None:
    out = Terminal()
    bar = pull.Bar(out)
    for done in (0, 1_000_000, 2_000_000):
        bar.show(job_at(done))
    bar.end()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1
    assert "org/m:  50.0%  1.0 MB of 2.0 MB  500.0 kB/s  ETA 2s" in text


def test_a_log_gets_a_line_every_few_seconds() -> None:
    out = io.StringIO()
    now = [1000.0]
    bar = pull.Bar(out, clock=lambda: now[0])
    for step in range(12):  # 12 polls half a second apart: lines at 0 s and 5 s
        bar.show(job_at(step * 100_000))
        now[0] += 0.5
    assert out.getvalue().splitlines() == [
        "org/m:   0.0%  0 B of 2.0 MB  500.0 kB/s  ETA 4s",
        "org/m:  50.0%  1.0 MB of 2.0 MB  500.0 kB/s  ETA 2s",
    ]
    assert pull.progress_line(job_at(0, "queued")) == (
        "org/m: Waiting for a download slot (0 queued ahead)"
    )
