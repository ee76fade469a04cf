"""A short smoke run of the benchmark harness, so it keeps working.

Timing targets are judged by ``python -m bench``, never here: this only checks
that the harness starts dynllm with the paced backend, streams through both
targets and reports a row with nothing lost, and that 50 cold requests (to
the stand-in and to the real llama-server) each start their model once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil

RUN_ENV = "DYNLLM_TEST_RUN"


def test_bench_quick_stream_and_cold_burst_scenarios_run(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    # Everything the bench starts (dynllm, stand-ins, llama-server) inherits this
    # variable, so the leftover check sees only this run's processes, never
    # another llama-server that happens to run on the machine.
    run_id = uuid.uuid4().hex
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "3,8", "--no-litellm",
         "--out", str(out)],
        capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, RUN_ENV: run_id},
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-2000:]  # 1: a timing target missed
    assert out.exists(), result.stderr[-2000:]  # exit 1 is also what a crash gives
    report = out.read_text()
    row = next(line for line in report.splitlines() if line.startswith("| 3 |"))
    assert row.count("lost 0") == 2  # direct and dynllm both got every chunk
    bursts = [line for line in report.splitlines() if line.startswith("| 8 |")]
    # the stand-in and the real llama-server: 50 cold requests, one spawn each
    assert len(bursts) == 2 and all("| 1 spawn(s);" in line for line in bursts), bursts
    assert started_by(run_id) == []


def started_by(run_id: str) -> list[list[str]]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(RUN_ENV) == run_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
