"""SQLite state: schema, queued writes, and reconciliation with the OS at startup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from dynllm.backends.base import MARKER_ENV, MODEL_ENV
from dynllm.errors import BackendExited
from dynllm.events import EventHub
from dynllm.scheduler import Scheduler
from dynllm.store import MIGRATIONS, StateError, StateLocked, Store
from tests.conftest import FAKE_SERVER, apoll, poll
from tests.support.net import free_port
from tests.support.trees import gone, kill_all, read_tree, tree_command
from tests.test_scheduler import AB, Clock, FakeEffects, make_config, spec


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


async def test_lifecycle_events_and_usage_reach_the_file(tmp_path: Path) -> None:
    """The store as the scheduler's first event subscriber: a load, a crash
    and a failed load, and the periodic last_used flush, as rows on disk."""
    store = Store(tmp_path / "state.db", "m1")
    await store.open()
    try:
        hub = EventHub()
        hub.subscribe(store.on_event)
        clock = Clock()
        fx = FakeEffects()
        s = Scheduler(
            make_config(AB), fx, hub.publish, usage=store.record_usage, clock=clock, wall=clock
        )
        (await s.acquire(spec(s, "A"))).release()
        assert await store.flush()
        row = (await store.rows())["A"]
        handle = fx.handles["A"]
        assert (row["status"], row["pid"], row["pgid"], row["port"]) == (
            "loaded", handle.pid, handle.pgid, s.slots["A"].port
        )  # fmt: skip
        assert row["load_count"] == 1 and row["vram_mb"] == 6000 and row["last_error"] is None
        clock.now += 10
        (await s.acquire(spec(s, "A"))).release()
        s.flush_usage()  # what the idle job does
        assert await store.flush()
        assert (await store.rows())["A"]["last_used"] == s.slots["A"].last_used_wall
        handle.crash(code=9)
        fx.fail_next["B"] = BackendExited("no", exit_code=1, stderr_tail=[])
        with pytest.raises(BackendExited):
            await s.acquire(spec(s, "B"))
        assert await store.flush()
        rows = await store.rows()
        assert rows["A"]["status"] == "unloaded" and rows["A"]["pid"] is None
        assert rows["A"]["last_error"] == "backend exited unexpectedly with code 9: boom"
        assert rows["B"]["status"] == "unloaded" and rows["B"]["last_error"] == "no"
    finally:
        await store.close()


async def test_unknown_column_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db", "m1")
    await store.open()
    try:
        with pytest.raises(ValueError, match="colour"):
            store.record("A", colour="blue")
    finally:
        await store.close()


async def test_download_jobs_are_kept_updated_and_forgotten(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db", "m1")
    await store.open()
    try:
        store.record_download("a", {"job_id": "a", "status": "queued"})
        store.record_download("b", {"job_id": "b", "status": "queued"})
        store.record_download("a", {"job_id": "a", "status": "completed"})
        assert await store.flush()
        assert await store.downloads() == [
            {"job_id": "a", "status": "completed"}, {"job_id": "b", "status": "queued"}
        ]  # fmt: skip
        store.forget_download("a")
        assert await store.flush()
        assert await store.downloads() == [{"job_id": "b", "status": "queued"}]
        assert "a" not in store._jobs  # deleted on disk: not kept (nor re-sent) in memory
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


# ---- one dynllm per state file ---------------------------------------------------
async def test_a_second_store_on_the_same_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    first = Store(db, "m1")
    await first.open()
    second = Store(db, "m2")
    try:
        started = time.monotonic()
        with pytest.raises(StateLocked) as err:
            await second.open()
        assert time.monotonic() - started < 1.0  # non-blocking
        message = str(err.value)
        assert str(db) in message and "another dynllm" in message
        assert f"pid {os.getpid()}" in message
        assert isinstance(err.value, StateError)
        # Backends never inherit the lock, so an orphan cannot keep a dead dynllm's lock.
        assert first._lock_fd is not None and not os.get_inheritable(first._lock_fd)
    finally:
        await first.close()
    await second.open()  # released on close
    second.record("A", load_count=1)
    assert await second.flush()
    await second.close()


def hold_lock(lock: Path) -> subprocess.Popen[bytes]:
    """Another process holding ``lock`` as a dynllm would; returns once it holds it."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); "
         "print('locked', flush=True); sys.stdin.read()", str(lock)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"locked\n"
    return holder


def moved_aside(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.corrupt-*"))


async def test_a_lock_held_by_another_process_refuses_until_it_dies(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    holder = hold_lock(Path(f"{db}.lock"))
    try:
        with pytest.raises(StateLocked, match=f"pid {holder.pid}"):
            await Store(db, "m").open()
    finally:
        holder.kill()  # the OS drops a dead process's lock: no stale lock file
        holder.wait()
    store = Store(db, "m")
    await store.open()
    await store.close()


# ---- corrupt, foreign and unreadable files -------------------------------------------
def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def _garbage(db: Path) -> None:
    db.write_bytes(os.urandom(8192))
    Path(f"{db}-wal").write_bytes(b"stale wal that must not be replayed" * 100)


def _foreign_tables(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
        conn.execute("INSERT INTO users VALUES (1, 'a@b')")
    conn.close()


def _newer_schema(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 7}")
    conn.close()


def _models_without_our_columns(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE models (name TEXT PRIMARY KEY, colour TEXT)")
        conn.execute("PRAGMA user_version=1")
    conn.close()


def _truncated(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute("PRAGMA user_version=1")
        conn.execute("CREATE INDEX by_status ON models (status, last_error)")
        for i in range(300):
            conn.execute(
                "INSERT INTO models (name, last_error, updated_at) VALUES (?, ?, 0)",
                (f"m{i}", "x" * 200),
            )
    conn.close()
    data = db.read_bytes()
    assert len(data) > 8 * 4096
    db.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "spoil",
    [_garbage, _foreign_tables, _newer_schema, _models_without_our_columns, _truncated],
)
async def test_an_unusable_file_is_moved_aside_and_a_fresh_one_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil: Any
) -> None:
    db = tmp_path / "state.db"
    spoil(db)
    spoiled = db.read_bytes()
    store = Store(db, "m")
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="dynllm.store"):
        await store.open()
    took = time.monotonic() - started
    try:
        assert took < 5.0, took
        aside = moved_aside(tmp_path)
        assert [p.name for p in aside if not p.name.endswith(("-wal", "-shm"))] == [aside[0].name]
        assert aside[0].read_bytes() == spoiled  # kept for a post-mortem, not deleted
        # A stale -wal is never replayed into the fresh file.
        assert not _read(Path(f"{db}-wal")).startswith(b"stale wal")
        assert any("moved it to" in r.getMessage() and str(db) in r.getMessage()
                   for r in caplog.records)  # fmt: skip
        assert await store.rows() == {}
        store.record("A", status="loaded", load_count=3)
        assert await store.flush()
        assert (await store.rows())["A"]["load_count"] == 3
    finally:
        await store.close()
    print(f"{spoil.__name__}: moved aside and fresh start in {took:.3f} s")


def test_moving_aside_takes_the_wal_and_shm_along(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").write_text(suffix or "main")
    aside = Store(db, "m")._move_aside("test")
    assert aside.name.startswith("state.db.corrupt-") and aside.name.endswith("Z")
    assert [Path(f"{aside}{s}").read_text() for s in ("", "-wal", "-shm")] == [
        "main",
        "-wal",
        "-shm",
    ]
    assert not list(tmp_path.glob("state.db-*")) and not db.exists()
    db.write_text("again")  # within the same second: a new name, nothing overwritten
    second = Store(db, "m")._move_aside("test")
    assert second != aside and second.read_text() == "again" and aside.read_text() == "main"


async def test_a_file_that_cannot_be_moved_aside_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "state.db"
    db.write_bytes(b"not sqlite" * 1000)

    def refuse(*_: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("dynllm.store.os.rename", refuse)
    store = Store(db, "m")
    started = time.monotonic()
    with pytest.raises(StateError, match="cannot be moved aside") as err:
        await store.open()
    assert time.monotonic() - started < 5.0
    assert str(db) in str(err.value) and not isinstance(err.value, StateLocked)
    assert db.read_bytes() == b"not sqlite" * 1000
    monkeypatch.undo()  # the failed open released its lock: a later start recovers
    other = Store(db, "m2")
    await other.open()
    assert len(moved_aside(tmp_path)) == 1
    await other.close()


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[None]:
    """No renames or new files in ``path``: chmod, or for root (who ignores
    modes) the immutable attribute where the file system allows it."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        undo = ["chmod", "755", str(path)]
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", str(path)]
    else:
        pytest.skip("root, and no chattr +i here: cannot make a directory read-only")
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


async def test_a_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db = state / "state.db"
    db.write_bytes(b"garbage" * 1000)
    (state / "state.db.lock").write_bytes(b"")  # the lock file itself can be opened
    with read_only_dir(state):
        started = time.monotonic()
        with pytest.raises(StateError, match="cannot be moved aside") as err:
            await Store(db, "m").open()
        took = time.monotonic() - started
    assert took < 5.0, took
    assert str(db) in str(err.value)
    print(f"read-only directory: StateError after {took:.3f} s: {err.value}")


async def test_a_file_locked_by_another_program_is_an_error_not_a_hang(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(StateError, match=str(db)):
            await Store(db, "m").open()
        took = time.monotonic() - started
        assert took < 5.0, took
        print(f"locked by another program: StateError after {took:.2f} s")
        assert not moved_aside(tmp_path)  # locked is not corrupt
    finally:
        other.execute("ROLLBACK")
        other.close()


# ---- failures while running ------------------------------------------------------------
async def test_a_deleted_state_directory_is_recreated_on_the_next_write(tmp_path: Path) -> None:
    db = tmp_path / "state" / "state.db"
    store = Store(db, "m")
    await store.open()
    try:
        store.record("A", status="loaded", pid=4242, port=9100)
        assert await store.flush()
        shutil.rmtree(db.parent)
        store.record("B", status="loading")
        assert await store.flush()
        assert db.exists()
        with sqlite3.connect(db) as conn:
            rows = dict(conn.execute("SELECT name, status FROM models").fetchall())
            pid = conn.execute("SELECT pid FROM models WHERE name = 'A'").fetchone()[0]
        conn.close()
        # Every row comes back from the in-memory copy, not only the new one.
        assert rows == {"A": "loaded", "B": "loading"} and pid == 4242
        with pytest.raises(StateLocked):  # and the recreated lock is held
            await Store(db, "m2").open()
    finally:
        await store.close()


async def test_a_failed_batch_is_rolled_back_logged_once_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "state.db", "m")
    monkeypatch.setattr(store, "RETRY_MIN", 0.05)
    await store.open()
    real = store._apply
    calls = {"n": 0, "fail": 0}

    async def flaky(name: str, fields: dict[str, Any], now: float) -> None:
        calls["n"] += 1
        # The first row of a batch lands; the second fails: a half-done batch.
        if calls["fail"] and calls["n"] % 2 == 0:
            calls["fail"] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        await real(name, fields, now)

    monkeypatch.setattr(store, "_apply", flaky)
    try:
        calls["fail"] = 3
        with caplog.at_level(logging.DEBUG, logger="dynllm.store"):
            store.record("A", status="loaded")
            store.record("B", status="loaded")
            assert await store.flush() is False
            assert await store.rows() == {}  # rolled back: none of the batch
            assert await store.flush() is False  # a burst of failures...
            # ...then the background retry writes the whole batch.
            rows = await apoll(lambda: calls["fail"] == 0 and store._failures == 0, 5)
            assert rows
            assert await store.flush()
        rows = await store.rows()
        assert {n: r["status"] for n, r in rows.items()} == {"A": "loaded", "B": "loaded"}
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and str(store.path) in errors[0].getMessage()
        assert any("works again after 3" in r.getMessage() for r in caplog.records)
    finally:
        await store.close()


def orphaned_daemon(tmp_path: Path, marker: str) -> dict[str, psutil.Process]:
    """A backend that double-forked a daemon, then died as by its parent-death
    signal: the daemon runs on in its own session, recorded nowhere."""
    pids = tmp_path / f"pids-{marker}"
    env = {"PATH": "/usr/bin:/bin", MARKER_ENV: marker, MODEL_ENV: "A"}
    argv = [*tree_command(pids, port="0", children=False), "--daemon"]
    main = subprocess.Popen(argv, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    tree = read_tree(pids, roles=("main", "daemon"))
    main.kill()
    main.wait()
    return tree


async def test_reconcile_stops_leftovers_found_by_marker_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a kill -9 of dynllm the backend's main process is gone, but a
    daemon it double-forked still runs: the next start finds it by the
    instance marker and stops it; another instance's daemon is spared."""
    ours = orphaned_daemon(tmp_path, "marker-1")
    theirs = orphaned_daemon(tmp_path, "marker-2")["daemon"]
    try:
        store = Store(tmp_path / "state.db", "marker-1")
        await store.open()
        store.record("A", status="loaded", pid=ours["main"].pid, pgid=None,
                     proc_started_at=1.0, port=9100)  # fmt: skip
        await store.flush()
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="dynllm.store"):
            orphans = await store.reconcile(["A"], grace=2.0)
        print(f"leftover daemon stopped by marker in {time.monotonic() - began:.3f} s")
        assert [(o.name, o.pid) for o in orphans] == [("A", ours["daemon"].pid)]
        assert gone(ours["daemon"]) and not gone(theirs)
        assert f"pid {ours['daemon'].pid} (model 'A')" in caplog.text
        assert "orphaned" in (await store.rows())["A"]["last_error"]
        await store.close()
    finally:
        kill_all([ours["daemon"], theirs])
