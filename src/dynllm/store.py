"""SQLite state (aiosqlite): what each model's backend is doing, across restarts.

The scheduler owns the live state; the store is its durable shadow, fed by
the scheduler's lifecycle events (``on_event``, the first subscriber of the
app's ``EventHub``) and by its periodic ``last_used`` flush (``record_usage``).
``record()`` updates an in-memory copy of every row and marks the row dirty;
one writer task writes the dirty rows, so the request path never waits on the
disk.
``flush()`` waits until everything recorded so far is written (or a write
attempt failed: the rows stay dirty and are retried in the background).

Failure rules, because a state file must never stop dynllm from serving:

* One dynllm per state file: ``open()`` takes an exclusive, non-blocking
  ``flock`` on ``<db>.lock`` for the store's life and raises ``StateLocked``
  when another process holds it.  The OS drops the lock when the process dies,
  so a crashed dynllm never leaves a stale lock behind.
* A corrupt, foreign or unreadable file is moved aside to
  ``<db>.corrupt-<UTC time>`` (with its -wal/-shm) and a fresh one is created.
  Where that is impossible, or the file stays locked by another program,
  ``open()`` raises ``StateError`` naming the path within OPEN_TIMEOUT.
* A write batch is one transaction: on failure it is rolled back, its rows stay
  dirty and are retried with backoff; the failure is logged once per burst.
  A file (or directory) deleted while running is recreated on the next write
  with every row from the in-memory copy.

On startup ``reconcile()`` compares the rows with the OS: a recorded backend
still running (same pid, same start time, our marker in its environment) is
an orphan of a crashed dynllm and is stopped; every row ends up unloaded.
Then every other process carrying this instance's marker is stopped too:
after a ``kill -9`` of dynllm its backends' main processes die with it, but
what they daemonized or left behind outside their group survives, and only
the marker in its environment tells it belongs to this state file (see
``dynllm.proctree``).  Each process stopped is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import psutil

from dynllm.backends.base import MARKER_ENV
from dynllm.events import LifecycleEvent, ModelState, Reason
from dynllm.proctree import KILL_WAIT_SECONDS, alive, find_marked, killpg, terminate

log = logging.getLogger("dynllm.store")

# Opening never takes longer than this: a hung file system or a state file
# locked by another program becomes a StateError instead of a hung startup.
OPEN_TIMEOUT = 5.0
# How long one SQLite statement waits for a lock held by another program.
BUSY_TIMEOUT = 2.0
# Not the file's fault: raise instead of moving the file aside.
_TRANSIENT = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_NOMEM,
}

COLUMNS = (
    "status",
    "pid",
    "proc_started_at",
    "pgid",
    "port",
    "vram_mb",
    "loaded_at",
    "last_used",
    "load_count",
    "last_error",
    "requests",
    "hits",
    "misses",
)
V1_COLUMNS = COLUMNS[:10]
"""The columns of schema 1 (a file of that version is checked against these)."""

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE models (
        name TEXT PRIMARY KEY,
        status TEXT NOT NULL DEFAULT 'unloaded',
        pid INTEGER,
        proc_started_at REAL,
        pgid INTEGER,
        port INTEGER,
        vram_mb INTEGER NOT NULL DEFAULT 0,
        loaded_at REAL,
        last_used REAL,
        load_count INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        updated_at REAL NOT NULL
    );
    """,
    # 2: cache statistics per model; download jobs (one JSON document each)
    """
    ALTER TABLE models ADD COLUMN requests INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE models ADD COLUMN hits INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE models ADD COLUMN misses INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE downloads (
        job_id TEXT PRIMARY KEY,
        data TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
]


@dataclass(frozen=True, slots=True)
class Orphan:
    name: str
    pid: int
    pgid: int | None


def _check_columns(fields: Iterable[str]) -> None:
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown state columns: {sorted(unknown)}")


def columns(event: LifecycleEvent) -> dict[str, Any]:
    """The row fields a lifecycle event changes (none for a note such as a
    cooldown): the facts of the new state, and ``last_error`` where the
    change sets or clears it."""
    old, new = event.from_state, event.to_state
    if old is new:
        return {}
    fields: dict[str, Any] = {"status": new.value}
    if new is ModelState.LOADING:
        fields["vram_mb"] = event.vram_mb
    elif new is ModelState.READY:
        fields.update(
            pid=event.pid,
            pgid=event.pgid,
            proc_started_at=event.proc_started_at,
            port=event.port,
            loaded_at=event.at,
            last_used=event.at,
            load_count=event.load_count,
            last_error=None,
        )
    elif new is ModelState.UNLOADED:
        if old is ModelState.LOADING:  # a failed or cancelled load
            fields.update(pid=None, port=None, last_error=event.last_error)
        else:
            fields.update(pid=None, pgid=None, port=None)
            if event.reason is Reason.CRASHED:
                fields["last_error"] = event.last_error
    return fields


def _upsert(name: str, fields: dict[str, Any], now: float) -> tuple[str, tuple[Any, ...]]:
    """One statement that creates the row or sets ``fields`` on it.  Column
    names go into the SQL text, so only those in COLUMNS are accepted."""
    _check_columns(fields)
    cols = [*fields, "updated_at"]
    sql = (
        f"INSERT INTO models (name, {', '.join(cols)}) "
        f"VALUES (?{', ?' * len(cols)}) "
        f"ON CONFLICT(name) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in cols)}"
    )
    return sql, (name, *fields.values(), now)


class StateError(Exception):
    """The state file cannot be used; ``str()`` says which file and why."""


class StateLocked(StateError):
    """Another dynllm (another Store) holds the state file's lock."""


class _Unusable(Exception):
    """The file is corrupt, foreign or unreadable: move it aside."""


class Store:
    # Backoff between retries of a failed write (seconds).
    RETRY_MIN = 0.25
    RETRY_MAX = 5.0

    def __init__(self, path: Path, marker: str) -> None:
        self.path = path
        self.marker = marker
        self.lock_path = path.with_name(path.name + ".lock")
        self._db: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None
        self._file_id: tuple[int, int] | None = None
        # The in-memory copy of every row (COLUMNS only) and the rows not yet written.
        self._rows: dict[str, dict[str, Any]] = {}
        self._dirty: set[str] = set()
        # Download jobs the same way: job_id -> its JSON document (None: delete it).
        self._jobs: dict[str, str | None] = {}
        self._dirty_jobs: set[str] = set()
        self._wake = asyncio.Event()  # something to write, or a flush
        self._kick = asyncio.Event()  # a flush: retry now even while backing off
        self._waiters: list[asyncio.Future[bool]] = []
        self._failures = 0  # failed attempts in the current burst
        self._writer: asyncio.Task[None] | None = None

    # ---- lifecycle ------------------------------------------------------------
    async def open(self) -> None:
        """Lock, check and migrate the state file.  Raises StateLocked when
        another dynllm uses it, StateError when it cannot be used at all."""
        self._lock()
        try:
            await self._open_db()
            rows = await self.rows()
        except BaseException:
            await self._close_db()
            self._unlock()
            raise
        self._rows = {name: {c: row[c] for c in COLUMNS} for name, row in rows.items()}
        self._writer = asyncio.create_task(self._write_loop(), name="dynllm-store-writer")

    async def close(self) -> None:
        if self._writer is not None:
            if not await self.flush():
                log.error(
                    "%d model state row(s) could not be written to %s before shutdown",
                    len(self._dirty),
                    self.path,
                )
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        await self._close_db()
        self._unlock()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    # ---- the lock: one dynllm per state file -------------------------------------
    def _lock(self) -> None:
        """Take ``<db>.lock`` (exclusive, non-blocking).  The descriptor is not
        inherited by backends (Python opens it close-on-exec), so an orphaned
        backend never keeps the lock of a dead dynllm."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateError(
                f"cannot create the lock file {self.lock_path} for the state file "
                f"{self.path}: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                pid = int(os.pread(fd, 32, 0).decode().strip() or "x")
                holder = f" (pid {pid})"
            os.close(fd)
            raise StateLocked(
                f"the state file {self.path} is in use by another dynllm{holder}: "
                f"{self.lock_path} is locked; stop that dynllm or give this one "
                f"another db_path"
            ) from exc
        with contextlib.suppress(OSError):  # the holder's pid, for the message above
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        old, self._lock_fd = self._lock_fd, fd
        if old is not None:
            os.close(old)

    def ensure_free(self) -> None:
        """StateLocked if another dynllm holds this state file: the lock is
        taken and given back at once (``open`` takes it for good)."""
        self._lock()
        self._unlock()

    def _unlock(self) -> None:
        # The lock file stays: unlinking it would let a second dynllm lock a new
        # file while a third still waits on the old inode.
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock_is_current(self) -> bool:
        if self._lock_fd is None:
            return False
        try:
            st = os.stat(self.lock_path)
        except OSError:
            return False
        held = os.fstat(self._lock_fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

    # ---- opening, checking, moving aside -------------------------------------------
    async def _open_db(self) -> None:
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                try:
                    self._db = await self._connect_checked()
                except _Unusable as exc:
                    aside = self._move_aside(str(exc))
                    log.error(
                        "state file %s is unusable (%s); moved it to %s and starting "
                        "with a fresh one",
                        self.path,
                        exc,
                        aside,
                    )
                    try:
                        self._db = await self._connect_checked()
                    except _Unusable as again:
                        raise StateError(
                            f"cannot create a fresh state file {self.path}: {again}"
                        ) from again
        except TimeoutError:
            raise StateError(
                f"opening the state file {self.path} took more than {OPEN_TIMEOUT:g} s "
                "(a hung file system?)"
            ) from None
        st = os.stat(self.path)
        self._file_id = (st.st_dev, st.st_ino)

    async def _connect_checked(self) -> aiosqlite.Connection:
        """Connect, check integrity and schema, migrate.  _Unusable for a file
        that is not (or no longer) ours; StateError for a locked one.  Nothing
        is written before the checks pass: a file moved aside is kept as found."""
        db: aiosqlite.Connection | None = None
        try:
            db = await aiosqlite.connect(self.path, timeout=BUSY_TIMEOUT)
            db.row_factory = aiosqlite.Row
            await db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            check = [r[0] for r in await (await db.execute("PRAGMA quick_check")).fetchall()]
            if check != ["ok"]:
                raise _Unusable(f"integrity check failed: {'; '.join(map(str, check[:3]))}")
            version = await self._check_schema(db)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await self._migrate(db, version)
            return db
        except BaseException as exc:
            if db is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(db.close(), 1.0)
            if isinstance(exc, sqlite3.Error):
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                if code in _TRANSIENT:
                    raise StateError(
                        f"cannot use the state file {self.path}: {exc} "
                        "(is another program holding it?)"
                    ) from exc
                raise _Unusable(str(exc)) from exc
            raise

    async def _check_schema(self, db: aiosqlite.Connection) -> int:
        """The file's schema version, or _Unusable when the file is not ours."""
        row = await (await db.execute("PRAGMA user_version")).fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise _Unusable(
                f"schema version {version} is newer than this dynllm knows ({len(MIGRATIONS)})"
            )
        cursor = await db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
        tables = [r[0] for r in await cursor.fetchall()]
        if version == 0 and tables:
            raise _Unusable(f"not a dynllm state file (tables: {', '.join(tables)})")
        if version > 0:
            cursor = await db.execute("PRAGMA table_info(models)")
            have = {r[1] for r in await cursor.fetchall()}
            expected = V1_COLUMNS if version == 1 else COLUMNS
            missing = {"name", "updated_at", *expected} - have
            if missing:
                raise _Unusable(
                    f"not a dynllm state file (models lacks {', '.join(sorted(missing))})"
                )
        return version

    async def _migrate(self, db: aiosqlite.Connection, version: int) -> None:
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await db.executescript(script)
            await db.execute(f"PRAGMA user_version={number}")
            log.info("state database %s migrated to schema %d", self.path, number)
        await db.commit()

    def _move_aside(self, reason: str) -> Path:
        """Rename the file (and its -wal/-shm) to ``<name>.corrupt-<UTC time>``.
        A -wal left behind would be replayed into the fresh file, so it must go."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            if not self.path.exists() and not self.path.is_symlink():
                raise FileNotFoundError(self.path)
            os.rename(self.path, aside)
            for suffix in ("-wal", "-shm"):
                side = Path(f"{self.path}{suffix}")
                if side.exists():
                    try:
                        os.rename(side, f"{aside}{suffix}")
                    except OSError:
                        side.unlink()
        except OSError as exc:
            raise StateError(
                f"the state file {self.path} is unusable ({reason}) and cannot be moved "
                f"aside: {exc.strerror or exc}"
            ) from exc
        return aside

    async def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(db.close(), OPEN_TIMEOUT)

    def _file_is_current(self) -> bool:
        """False when the file was deleted or replaced under us: SQLite would
        go on writing into the unlinked inode and every write would be lost."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._file_id

    async def _reopen(self) -> None:
        log.warning("state file %s is gone (deleted while running?); recreating it", self.path)
        await self._close_db()
        if not self._lock_is_current():
            self._lock()
        await self._open_db()
        self._dirty.update(self._rows)  # a fresh file gets every row
        self._dirty_jobs.update(self._jobs)

    # ---- writes (one writer) ---------------------------------------------------
    def on_event(self, event: LifecycleEvent) -> None:
        """The store's subscriber to lifecycle events."""
        fields = columns(event)
        if fields:
            self.record(event.model, **fields)

    def record_usage(self, name: str, last_used: float | None) -> None:
        """When the model last finished a request (written in batches)."""
        self.record(name, last_used=last_used)

    def record(self, name: str, **fields: Any) -> None:
        _check_columns(fields)
        self._rows.setdefault(name, {}).update(fields)
        self._dirty.add(name)
        self._wake.set()

    def record_download(self, job_id: str, data: dict[str, Any]) -> None:
        """A download job's whole state (written in batches, like the rows)."""
        self._jobs[job_id] = json.dumps(data)
        self._dirty_jobs.add(job_id)
        self._wake.set()

    def forget_download(self, job_id: str) -> None:
        self._jobs[job_id] = None
        self._dirty_jobs.add(job_id)
        self._wake.set()

    async def downloads(self) -> list[dict[str, Any]]:
        """The download jobs a previous run (or this one) recorded, oldest first."""
        cursor = await self.db.execute("SELECT data FROM downloads ORDER BY updated_at, job_id")
        return [json.loads(row[0]) for row in await cursor.fetchall()]

    async def flush(self) -> bool:
        """Wait for a write of everything recorded so far.  True when it is on
        disk; False when the attempt failed (the rows are retried later)."""
        if self._writer is None or self._writer.done():
            return not self._dirty
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        self._kick.set()
        self._wake.set()
        return await done

    async def _write_loop(self) -> None:
        delay = 0.0
        while True:
            if not self._failures:
                await self._wake.wait()
            else:  # back off: only a flush or the timer retries, not every record()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), delay)
            self._wake.clear()
            self._kick.clear()
            waiters, self._waiters = self._waiters, []
            ok = await self._write_dirty()
            delay = 0.0 if ok else min(self.RETRY_MAX, max(self.RETRY_MIN, delay * 2))
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(ok)

    async def _write_dirty(self) -> bool:
        """Write the dirty rows in one transaction; roll back on failure."""
        if not self._dirty and not self._dirty_jobs:
            return True
        names, jobs = set(self._dirty), set(self._dirty_jobs)
        self._dirty.clear()
        self._dirty_jobs.clear()
        try:
            if self._db is None or not self._file_is_current():
                await self._reopen()
                names |= self._dirty
                jobs |= self._dirty_jobs
                self._dirty.clear()
                self._dirty_jobs.clear()
            now = time.time()
            for name in sorted(names):
                await self._apply(name, self._rows[name], now)
            for job_id in sorted(jobs):
                await self._apply_job(job_id, self._jobs[job_id], now)
            await self.db.commit()
            for job_id in jobs:  # a forgotten job, deleted on disk: nothing left to keep
                if self._jobs.get(job_id, "") is None and job_id not in self._dirty_jobs:
                    del self._jobs[job_id]
        except Exception as exc:  # the state file is a shadow: log, keep serving, retry
            self._dirty |= names
            self._dirty_jobs |= jobs
            await self._rollback()
            self._failures += 1
            if self._failures == 1:
                log.error(
                    "writing model state to %s failed: %s; retrying in the background "
                    "(further failures are not logged until a write succeeds)",
                    self.path,
                    exc,
                    exc_info=not isinstance(exc, (sqlite3.Error, OSError, StateError)),
                )
            else:
                log.debug("writing model state to %s failed again: %s", self.path, exc)
            return False
        if self._failures:
            log.warning(
                "writing model state to %s works again after %d failed attempt(s)",
                self.path,
                self._failures,
            )
            self._failures = 0
        return True

    async def _rollback(self) -> None:
        if self._db is None:
            return
        try:
            await asyncio.wait_for(self._db.rollback(), OPEN_TIMEOUT)
        except Exception:  # a connection that cannot roll back is reopened next time
            await self._close_db()

    async def _apply(self, name: str, fields: dict[str, Any], now: float) -> None:
        await self.db.execute(*_upsert(name, fields, now))

    async def _apply_job(self, job_id: str, data: str | None, now: float) -> None:
        if data is None:
            await self.db.execute("DELETE FROM downloads WHERE job_id = ?", (job_id,))
            return
        await self.db.execute(
            "INSERT INTO downloads (job_id, data, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(job_id) DO UPDATE SET "
            "data = excluded.data, updated_at = excluded.updated_at",
            (job_id, data, now),
        )

    # ---- reads ------------------------------------------------------------------
    async def rows(self) -> dict[str, dict[str, Any]]:
        cursor = await self.db.execute("SELECT * FROM models ORDER BY name")
        return {row["name"]: dict(row) for row in await cursor.fetchall()}

    # ---- startup reconciliation ----------------------------------------------------
    async def reconcile(self, known: Iterable[str], grace: float) -> list[Orphan]:
        """Stop backends a previous run left behind; mark every row unloaded.
        Returns what was stopped: the recorded backends, then every other
        process found by this instance's marker."""
        rows = await self.rows()
        orphans = [
            Orphan(name, row["pid"], row["pgid"])
            for name, row in rows.items()
            if row["pid"] and self._is_ours(row["pid"], row["proc_started_at"])
        ]
        await asyncio.gather(*(self._stop_orphan(o, grace) for o in orphans))
        leftovers = await self._stop_marked(grace, {o.pid for o in orphans})
        for name, row in rows.items():
            note = row["last_error"]
            if any(o.name == name for o in orphans + leftovers):
                note = "orphaned backend from a previous run was stopped at startup"
            elif row["status"] not in ("unloaded", None):
                note = f"was {row['status']} when dynllm stopped; reset at startup"
            self.record(name, status="unloaded", pid=None, proc_started_at=None,
                        pgid=None, port=None, last_error=note)  # fmt: skip
        for name in known:
            if name not in rows:
                self.record(name)
        if not await self.flush():
            log.error("the reconciled state could not be written to %s yet", self.path)
        return orphans + leftovers

    def _is_ours(self, pid: int, started_at: float | None) -> bool:
        """Same pid, same start time and our marker: never signal a reused pid."""
        try:
            proc = psutil.Process(pid)
            if started_at is None or abs(proc.create_time() - started_at) > 1.0:
                return False
            return proc.environ().get(MARKER_ENV) == self.marker
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    async def _stop_orphan(self, orphan: Orphan, grace: float) -> None:
        log.warning("stopping orphaned backend of '%s' (pid %d)", orphan.name, orphan.pid)
        group = orphan.pgid or orphan.pid
        killpg(group, signal.SIGTERM)
        await _wait_gone(orphan.pid, grace)
        killpg(group, signal.SIGKILL)
        # Until it is gone: the marker scan that follows must not count it again.
        await _wait_gone(orphan.pid, KILL_WAIT_SECONDS)

    async def _stop_marked(self, grace: float, stopped: set[int]) -> list[Orphan]:
        """Stop every process carrying this instance's marker (but those in
        ``stopped``): SIGTERM, SIGKILL after ``grace``; returns when they are
        gone (or KILL_WAIT_SECONDS after the SIGKILL)."""
        found = await asyncio.to_thread(find_marked, MARKER_ENV, self.marker)
        marked = [m for m in found if m.proc.pid not in stopped]
        if not marked:
            return []
        for m in marked:
            log.warning(
                "stopping a process left by a previous run: pid %d (model '%s'): %s",
                m.proc.pid,
                m.model or "?",
                m.cmdline[:200] or "?",
            )
        procs = [m.proc for m in marked]
        await terminate(procs, grace)
        survivors = alive(procs)
        if survivors:
            log.error(
                "processes left by a previous run survived SIGKILL: %s",
                ", ".join(str(p.pid) for p in survivors),
            )
        return [Orphan(m.model or "?", m.proc.pid, None) for m in marked]


async def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return
        await asyncio.sleep(0.02)


def _gone(pid: int) -> bool:
    """No such process, or a zombie (it holds nothing; its parent reaps it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
