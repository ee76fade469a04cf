"""A short smoke run of the benchmark harness, so it keeps working.

Timing targets are judged by ``python -m bench``, never here: this only checks
that the harness starts dynllm with the paced backend, streams through both
targets and reports a row with nothing lost, and that 50 cold requests (to
the stand-in and to the real llama-server) each start their model once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil


def test_bench_quick_stream_and_cold_burst_scenarios_run(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    before = {p.pid for p in psutil.process_iter()}
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "3,8", "--no-litellm",
         "--out", str(out)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-2000:]  # 1: a timing target missed
    report = out.read_text()
    row = next(line for line in report.splitlines() if line.startswith("| 3 |"))
    assert row.count("lost 0") == 2  # direct and dynllm both got every chunk
    bursts = [line for line in report.splitlines() if line.startswith("| 8 |")]
    # the stand-in and the real llama-server: 50 cold requests, one spawn each
    assert len(bursts) == 2 and all("| 1 spawn(s);" in line for line in bursts), bursts
    leftovers = [
        p for p in psutil.process_iter(["pid", "cmdline"])
        if p.pid not in before
        and any(n in " ".join(p.info["cmdline"] or []) for n in ("paced_backend", "llama-server"))
    ]  # fmt: skip
    assert leftovers == []
