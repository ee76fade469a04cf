"""SQLite state (aiosqlite): what each model's backend is doing, across restarts.

The scheduler owns the live state; the store is its durable shadow.  Writes
are queued and applied by one writer task, so the request path never waits
on the disk.  ``flush()`` waits until everything queued so far is written.

On startup ``reconcile()`` compares the rows with the OS: a recorded backend
still running (same pid, same start time, our marker in its environment) is
an orphan of a crashed dynllm and is stopped; every row ends up unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import psutil

from dynllm.backends.base import MARKER_ENV
from dynllm.supervisor import killpg

log = logging.getLogger("dynllm.store")

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
)

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


class Store:
    def __init__(self, path: Path, marker: str) -> None:
        self.path = path
        self.marker = marker
        self._db: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]] | asyncio.Future[None]] = (
            asyncio.Queue()
        )
        self._writer: asyncio.Task[None] | None = None

    # ---- lifecycle ------------------------------------------------------------
    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path)
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._migrate()
        self._writer = asyncio.create_task(self._write_loop(), name="dynllm-store-writer")

    async def close(self) -> None:
        if self._writer is not None:
            await self.flush()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def _migrate(self) -> None:
        row = await (await self.db.execute("PRAGMA user_version")).fetchone()
        version = int(row[0]) if row else 0
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await self.db.executescript(script)
            await self.db.execute(f"PRAGMA user_version={number}")
            log.info("state database %s migrated to schema %d", self.path, number)
        await self.db.commit()

    # ---- writes (queued, one writer) -----------------------------------------
    def record(self, name: str, **fields: Any) -> None:
        _check_columns(fields)
        self._queue.put_nowait((name, fields))

    async def flush(self) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(done)
        await done

    async def _write_loop(self) -> None:
        while True:
            item = await self._queue.get()
            batch = [item]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            waiters = [i for i in batch if isinstance(i, asyncio.Future)]
            try:
                for entry in batch:
                    if not isinstance(entry, asyncio.Future):
                        await self._apply(*entry)
                await self.db.commit()
            except Exception:  # the state file is a shadow: log, keep serving
                log.exception("writing model state to %s failed", self.path)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _apply(self, name: str, fields: dict[str, Any]) -> None:
        await self.db.execute(*_upsert(name, fields, time.time()))

    # ---- reads ------------------------------------------------------------------
    async def rows(self) -> dict[str, dict[str, Any]]:
        cursor = await self.db.execute("SELECT * FROM models ORDER BY name")
        return {row["name"]: dict(row) for row in await cursor.fetchall()}

    # ---- startup reconciliation ----------------------------------------------------
    async def reconcile(self, known: Iterable[str], grace: float) -> list[Orphan]:
        """Stop backends a previous run left behind; mark every row unloaded."""
        rows = await self.rows()
        orphans = [
            Orphan(name, row["pid"], row["pgid"])
            for name, row in rows.items()
            if row["pid"] and self._is_ours(row["pid"], row["proc_started_at"])
        ]
        await asyncio.gather(*(self._stop_orphan(o, grace) for o in orphans))
        now = time.time()
        for name, row in rows.items():
            note = row["last_error"]
            if any(o.name == name for o in orphans):
                note = "orphaned backend from a previous run was stopped at startup"
            elif row["status"] not in ("unloaded", None):
                note = f"was {row['status']} when dynllm stopped; reset at startup"
            reset = {"status": "unloaded", "pid": None, "proc_started_at": None,
                     "pgid": None, "port": None, "last_error": note}  # fmt: skip
            await self.db.execute(*_upsert(name, reset, now))
        for name in known:
            if name not in rows:
                await self.db.execute(*_upsert(name, {}, now))
        await self.db.commit()
        return orphans

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
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and psutil.pid_exists(orphan.pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(orphan.pid).status() == psutil.STATUS_ZOMBIE:
                    break
            await asyncio.sleep(0.05)
        killpg(group, signal.SIGKILL)
