"""A short smoke run of the benchmark harness, so it keeps working.

Timing targets are judged by ``python -m bench``, never here: this only checks
that the harness starts dynllm with the paced backend, streams through both
targets and reports a row with nothing lost.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil


def test_bench_quick_stream_scenario_runs(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    before = {p.pid for p in psutil.process_iter()}
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "3", "--no-litellm",
         "--out", str(out)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-2000:]  # 1: a timing target missed
    report = out.read_text()
    row = next(line for line in report.splitlines() if line.startswith("| 3 |"))
    assert row.count("lost 0") == 2  # direct and dynllm both got every chunk
    leftovers = [
        p for p in psutil.process_iter(["pid", "cmdline"])
        if p.pid not in before and "paced_backend.py" in " ".join(p.info["cmdline"] or [])
    ]  # fmt: skip
    assert leftovers == []
