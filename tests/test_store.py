"""SQLite state: schema, queued writes, and reconciliation with the OS at startup."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from dynllm.backends.base import MARKER_ENV
from dynllm.store import MIGRATIONS, Store
from tests.conftest import FAKE_SERVER, free_port, poll


def spawn_backend(marker: str | None, *extra: str) -> subprocess.Popen[bytes]:
    """A fake backend in its own session, as dynllm starts them; returns once it listens."""
    env = {"PATH": "/usr/bin:/bin"}
    if marker is not None:
        env[MARKER_ENV] = marker
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(FAKE_SERVER), "-m", "x", "--port", str(port),
         "--alias", "orphan", "--fake-no-orphan-exit", *extra],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    poll(lambda: _listening(port), 10)  # its signal handlers are installed by then
    return proc


def _listening(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    except httpx.HTTPError:
        return False
    return True


async def test_schema_wal_and_queued_writes(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db", "m1")
    await store.open()
    try:
        store.record("A", status="loading", vram_mb=100)
        store.record("A", status="loaded", pid=123, port=9100, load_count=1)
        store.record("A", load_count=2)
        await store.flush()
        rows = await store.rows()
        assert rows["A"]["status"] == "loaded"
        assert rows["A"]["pid"] == 123 and rows["A"]["port"] == 9100
        assert rows["A"]["load_count"] == 2
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_unknown_column_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db", "m1")
    await store.open()
    try:
        with pytest.raises(ValueError, match="colour"):
            store.record("A", colour="blue")
    finally:
        await store.close()


async def test_reopen_keeps_rows_and_does_not_migrate_again(tmp_path: Path) -> None:
    for _ in range(2):
        store = Store(tmp_path / "state.db", "m1")
        await store.open()
        count = (await store.rows()).get("A", {}).get("load_count", 0)
        store.record("A", load_count=count + 1)  # as the scheduler does after restore()
        await store.flush()
        await store.close()
    store = Store(tmp_path / "state.db", "m1")
    await store.open()
    assert (await store.rows())["A"]["load_count"] == 2
    await store.close()


async def test_reconcile_stops_our_orphan_and_spares_strangers(tmp_path: Path) -> None:
    ours = spawn_backend("marker-1")
    stranger = spawn_backend(None)  # same kind of process, no marker: not ours
    other_instance = spawn_backend("marker-2")  # another dynllm's backend
    procs = [ours, stranger, other_instance]
    try:
        store = Store(tmp_path / "state.db", "marker-1")
        await store.open()
        for name, proc in zip(["A", "B", "C"], procs, strict=True):
            started = psutil.Process(proc.pid).create_time()
            store.record(name, status="loaded", pid=proc.pid, pgid=proc.pid,
                         proc_started_at=started, port=9100)  # fmt: skip
        # A recorded pid whose start time does not match (the pid was reused).
        store.record("D", status="loading", pid=stranger.pid, proc_started_at=1.0)
        await store.flush()
        orphans = await store.reconcile(["A", "B", "C", "D", "E"], grace=2.0)
        assert [o.name for o in orphans] == ["A"]
        assert await asyncio.to_thread(ours.wait, 5) is not None
        assert stranger.poll() is None and other_instance.poll() is None
        rows = await store.rows()
        assert set(rows) == {"A", "B", "C", "D", "E"}
        for row in rows.values():
            assert row["status"] == "unloaded"
            assert row["pid"] is None and row["port"] is None
        assert "orphaned" in rows["A"]["last_error"]
        assert "was loading" in rows["D"]["last_error"]
        await store.close()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def test_reconcile_sigkills_an_orphan_that_ignores_sigterm(tmp_path: Path) -> None:
    proc = spawn_backend("m", "--fake-ignore-sigterm")
    try:
        store = Store(tmp_path / "state.db", "m")
        await store.open()
        store.record("A", status="loaded", pid=proc.pid, pgid=proc.pid,
                     proc_started_at=psutil.Process(proc.pid).create_time())  # fmt: skip
        await store.flush()
        assert [o.name for o in await store.reconcile(["A"], grace=0.5)] == ["A"]
        assert await asyncio.to_thread(proc.wait, 5) == -9
        await store.close()
    finally:
        proc.kill()
        proc.wait()
