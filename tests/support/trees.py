"""Helpers for the process-tree and port-identity tests: the tree backend's
argv, the processes it reports, and whether they are gone.

Processes are identified by the pids the stand-ins write to a file (with
psutil's start-time check against pid reuse), never by scanning for names.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

SUPPORT = Path(__file__).parent
TREE_BACKEND = SUPPORT / "tree_backend.py"
SQUATTER = SUPPORT / "squatter.py"
ROLES = ("main", "ignorer", "daemon")


def tree_command(pids: Path, *extra: str, port: str = "{port}", children: bool = True) -> list[str]:
    """The tree backend; with ``children``, with a SIGTERM-ignoring child and
    a setsid'ed daemon."""
    kids = ["--ignorer", "--daemon"] if children else []
    return [sys.executable, str(TREE_BACKEND), "--port", port, "--pids", str(pids), *kids, *extra]


def read_tree(
    pids: Path, roles: tuple[str, ...] = ROLES, timeout: float = 15
) -> dict[str, psutil.Process]:
    """The processes the tree backend reported (the latest of each role)."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, int] = {}
        if pids.exists():
            for line in pids.read_text().splitlines():
                role, pid = line.split()
                found[role] = int(pid)
        if all(role in found for role in roles):
            return {role: psutil.Process(found[role]) for role in roles}
        if time.monotonic() > deadline:
            raise AssertionError(f"the tree backend reported only {found} in {timeout} s")
        time.sleep(0.01)


def gone(proc: psutil.Process) -> bool:
    """Dead (a zombie waiting for its parent counts: it holds nothing)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def reaped(proc: psutil.Process) -> bool:
    """Dead and collected by its parent: not even a zombie left."""
    return not proc.is_running()


def reap_ours(procs: list[psutil.Process]) -> None:
    """Collect those of ``procs`` that died as this process's children (this
    process may be their subreaper: dynllm in-process made it one)."""
    for proc in procs:
        with contextlib.suppress(ChildProcessError, psutil.NoSuchProcess):
            zombie = proc.is_running() and proc.status() == psutil.STATUS_ZOMBIE
            if zombie and proc.ppid() == os.getpid():
                os.waitpid(proc.pid, 0)


def kill_all(procs: list[psutil.Process]) -> None:
    """Cleanup after a failed test: kill whatever of ``procs`` is left, reap ours."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running():
                proc.kill()
    reap_ours(procs)


def start_squatter(port: int, log: Path, timeout: float = 10) -> subprocess.Popen[bytes]:
    """A squatter listening on ``port``; returns once it listens.  ``log``
    gets one line per request it receives."""
    proc = subprocess.Popen(
        [sys.executable, str(SQUATTER), "--port", str(port), "--log", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout
    while not log.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"the squatter could not listen on {port}: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the squatter did not listen on {port} in {timeout} s")
        time.sleep(0.005)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def requests_seen(log: Path) -> list[str]:
    return log.read_text().splitlines()
