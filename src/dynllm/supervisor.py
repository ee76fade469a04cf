"""One backend process: spawn, readiness, log capture, exit watch, stop.

State machine (``ProcState``), each edge taken in exactly one place::

    STARTING -> READY      wait_ready() saw the probe answer 200 from the backend's own listener
    STARTING -> STOPPING   stop() during a load (timeout, cancel, shutdown)
    READY    -> STOPPING   stop()
    *        -> EXITED     the main process and every other process of its tree are gone

The process gets its own session (so its whole group can be signalled) and a
parent-death signal (so it dies with dynllm even after ``kill -9``).  What it
starts in turn -- workers, a daemonized helper that left the group -- is its
tree (``dynllm.proctree``): a stop signals all of it, and EXITED (with the
port and VRAM it frees) waits until none of it is left.  stdout and stderr
are drained continuously into a ring buffer: an unread pipe would block the
child once the pipe fills.  Each line is also logged, tagged by model
(logger ``dynllm.backend.<model>``, at the config's ``backend_log_level``),
and handed to ``on_line`` (the followers of ``GET /admin/models/{m}/logs?follow=true``).

Readiness only trusts a listener the tree owns: before each probe (and again
before READY) the port's listening sockets are matched against the tree's
open sockets.  Nothing listening yet: no probe.  Someone else listening (a
squatter that bound the port first): ``PortHeldElsewhere``, and not even
the probe reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum

import httpx

from dynllm.errors import BackendExited, BackendStartFailed, LoadTimeout
from dynllm.proctree import (
    KILL_WAIT_SECONDS,
    SPAWN_ENV,
    PortOwner,
    ProcessTree,
    alive,
    become_subreaper,
    die_with_parent,
)

LOG_LINES = 500
_STREAM_LIMIT = 1 << 16  # asyncio's default line limit for the pipes
TREE_POLL_SECONDS = 0.02
"""How often a stop looks again for members of the tree that are left."""


class ProcState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    EXITED = "exited"


_EDGES: dict[ProcState, frozenset[ProcState]] = {
    ProcState.STARTING: frozenset({ProcState.READY, ProcState.STOPPING, ProcState.EXITED}),
    ProcState.READY: frozenset({ProcState.STOPPING, ProcState.EXITED}),
    ProcState.STOPPING: frozenset({ProcState.EXITED}),
    ProcState.EXITED: frozenset(),
}


class PortHeldElsewhere(Exception):
    """A process outside the backend's tree listens on the backend's port."""

    def __init__(self, port: int) -> None:
        super().__init__(f"port {port} is held by a process outside the backend")
        self.port = port


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's own protocol, plus an event when the main process exits.

    ``Process.wait()`` returns only once the process has exited *and* its
    stdout and stderr are closed -- and a child the backend left behind holds
    them open, so waiting for it would wait for the very processes this
    module must stop."""

    def __init__(self, main_exited: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=_STREAM_LIMIT, loop=loop)
        self._main_exited = main_exited

    def process_exited(self) -> None:
        super().process_exited()
        self._main_exited.set()


def as_log_level(level: int | str) -> int:
    """A level as ``logging`` numbers it, from a number or a name ("info")."""
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")
    return number


class BackendProcess:
    """A spawned backend.  Create with ``await BackendProcess.spawn(...)``."""

    def __init__(
        self,
        name: str,
        proc: asyncio.subprocess.Process,
        main_exited: asyncio.Event,
        *,
        tag: str = "",
        on_exit: Callable[[BackendProcess], None] | None = None,
        log_level: int | str = logging.INFO,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self._proc = proc
        self._main_exited = main_exited
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the child leads its own group
        self.tree = ProcessTree(proc.pid, tag)
        self.started_at = time.time()
        self.state = ProcState.STARTING
        self.lines: deque[str] = deque(maxlen=LOG_LINES)
        self._stderr: deque[str] = deque(maxlen=LOG_LINES)
        self._log = logging.getLogger(f"dynllm.backend.{name}")
        self._log_level = as_log_level(log_level)
        self._log_extra = {"model": name}
        self._on_line = on_line
        self._on_exit = on_exit
        self.exited = asyncio.Event()
        """Set once the main process and the rest of its tree are gone."""
        self._kill_at: float | None = None  # when a stop escalates to SIGKILL (monotonic)
        self._drains = [
            asyncio.create_task(self._drain(proc.stdout, "out")),
            asyncio.create_task(self._drain(proc.stderr, "err")),
        ]
        self._watcher = asyncio.create_task(self._watch())
        self._stop_task: asyncio.Task[None] | None = None

    @classmethod
    async def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        on_exit: Callable[[BackendProcess], None] | None = None,
        log_level: int | str = logging.INFO,
        on_line: Callable[[str], None] | None = None,
    ) -> BackendProcess:
        """Start ``argv``.  Its output lines are logged at ``log_level`` (a
        number or a name such as the config's ``backend_log_level``) and
        passed to ``on_line``."""
        # Orphans of the backend (a daemonized helper, the workers of a main
        # process that crashed) come back to dynllm instead of init, where
        # stop() finds them.  Idempotent; a process-wide setting.
        become_subreaper()
        tag = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        main_exited = asyncio.Event()
        try:
            # asyncio.create_subprocess_exec, with the protocol that tells
            # when the main process exits.
            transport, protocol = await loop.subprocess_exec(
                lambda: _Protocol(main_exited, loop),
                *argv,
                env={**env, SPAWN_ENV: tag},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        except OSError as exc:
            raise BackendStartFailed(
                f"cannot start backend for '{name}': {argv[0]}: {exc.strerror or exc}"
            ) from None
        proc = asyncio.subprocess.Process(transport, protocol, loop)
        return cls(
            name,
            proc,
            main_exited,
            tag=tag,
            on_exit=on_exit,
            log_level=log_level,
            on_line=on_line,
        )

    # ---- state --------------------------------------------------------------
    def _move(self, new: ProcState) -> None:
        if new not in _EDGES[self.state]:
            raise RuntimeError(f"{self.name}: illegal transition {self.state} -> {new}")
        self.state = new

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def stderr_tail(self, n: int = 20) -> list[str]:
        return list(self._stderr)[-n:]

    def tail(self, n: int = LOG_LINES) -> list[str]:
        return list(self.lines)[-n:]

    # ---- background tasks ---------------------------------------------------
    async def _drain(self, stream: asyncio.StreamReader | None, label: str) -> None:
        if stream is None:
            return
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the reader's limit
                raw = await stream.read(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.lines.append(line)
            if label == "err":
                self._stderr.append(line)
            self._log.log(self._log_level, "%s", line, extra=self._log_extra)
            if self._on_line is not None:
                try:
                    self._on_line(line)
                except Exception:
                    # Draining must go on whatever a follower does: an unread
                    # pipe would block the backend once it fills.  A broken
                    # follower is dropped (and logged once, not per line).
                    self._on_line = None
                    self._log.exception("passing a line to its followers failed; no longer passed")

    async def _watch(self) -> None:
        await self._main_exited.wait()
        await self._end_tree()
        # Collect the last output so a failure report has the final lines
        # (the pipes close once the last process holding them is gone).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._drains), timeout=1.0)
        self._move(ProcState.EXITED)
        self.exited.set()
        if self._on_exit is not None:
            self._on_exit(self)

    async def _end_tree(self) -> None:
        """The main process is gone: the rest of its tree goes too.  During a
        stop they keep the stop's grace (they had SIGTERM with the main
        process); after a crash they are killed at once.  Returns when none
        is left.

        Between polls only the members already found are looked at (one
        small read each); the whole machine is scanned again only when they
        are all gone, to catch a process forked meanwhile and to reap."""
        kill_at = self._kill_at if self._kill_at is not None else time.monotonic()
        give_up: float | None = None
        members = await asyncio.to_thread(self.tree.members)
        while members:
            now = time.monotonic()
            if now >= kill_at:
                if give_up is None:
                    give_up = now + KILL_WAIT_SECONDS
                    self._log.warning(
                        "main process is gone (code %s); killing what it left running: %s",
                        self.returncode,
                        ", ".join(str(p.pid) for p in members),
                    )
                elif now >= give_up:
                    self._log.error(
                        "processes %s survived SIGKILL for %g s (stuck in the kernel?); "
                        "no longer waiting for them",
                        ", ".join(str(p.pid) for p in members),
                        KILL_WAIT_SECONDS,
                    )
                    return
                self.tree.signal(signal.SIGKILL, members)
            await asyncio.sleep(TREE_POLL_SECONDS)
            members = alive(members) or await asyncio.to_thread(self.tree.members)

    # ---- readiness ----------------------------------------------------------
    def _exit_error(self, during: str) -> BackendExited:
        code = self.returncode
        tail = self.stderr_tail()
        detail = "\n".join(tail[-10:]) or "(no output)"
        return BackendExited(
            f"backend for '{self.name}' exited with code {code} {during}; last output:\n{detail}",
            exit_code=code,
            stderr_tail=tail,
        )

    async def wait_ready(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        interval: float,
        timeout: float,
        port: int | None = None,
    ) -> None:
        """Poll ``url`` until 200.  Raises BackendExited at once if the process
        dies first, LoadTimeout after ``timeout`` seconds (the caller stops it).

        With ``port``, only a listener owned by this backend's tree is probed;
        PortHeldElsewhere when another process listens on it (the caller stops
        the backend and moves to another port)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.exited.is_set() or self.returncode is not None:
                await self.exited.wait()  # the rest of the tree is being stopped
                raise self._exit_error("while loading")
            if self.state is not ProcState.STARTING:
                raise BackendStartFailed(f"backend for '{self.name}' was stopped while loading")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoadTimeout(
                    f"backend for '{self.name}' was not ready within {timeout:g} s "
                    "(load_timeout_seconds)"
                )
            if await self._ready_once(client, url, port, min(5.0, max(remaining, 0.05))):
                self._move(ProcState.READY)
                return
            # Sleep one interval, but wake at once if the process exits.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.exited.wait(), timeout=min(interval, max(deadline - time.monotonic(), 0))
                )

    async def _ready_once(
        self, client: httpx.AsyncClient, url: str, port: int | None, timeout: float
    ) -> bool:
        """One readiness check: the listener is ours, it answers 200, and it
        is still ours (a second listener may share a port via SO_REUSEPORT)."""
        if port is not None and not await self._listener_is_ours(port):
            return False
        if not await self._probe(client, url, timeout=timeout):
            return False
        return port is None or await self._listener_is_ours(port)

    async def _listener_is_ours(self, port: int) -> bool:
        """True when the tree listens on ``port`` (or nobody can tell: no
        /proc/net/tcp); False while nothing listens; PortHeldElsewhere when
        another process does."""
        owner = await asyncio.to_thread(self.tree.port_owner, port)
        if owner is PortOwner.OTHER:
            raise PortHeldElsewhere(port)
        return owner is not PortOwner.NOBODY

    async def _probe(self, client: httpx.AsyncClient, url: str, timeout: float) -> bool:
        """One readiness request, abandoned at once if the process exits meanwhile."""
        request = asyncio.ensure_future(client.get(url, timeout=timeout))
        exit_wait = asyncio.ensure_future(self.exited.wait())
        try:
            await asyncio.wait({request, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exit_wait.cancel()
            if not request.done():
                request.cancel()
        if self.exited.is_set():
            raise self._exit_error("while loading")
        try:
            return request.result().status_code == 200
        except (httpx.HTTPError, asyncio.CancelledError):
            return False

    # ---- stop ---------------------------------------------------------------
    async def stop(self, grace: float) -> None:
        """SIGTERM the tree, SIGKILL what is left after ``grace`` s, return
        when none of it is left.  Idempotent; concurrent callers wait for the
        same stop."""
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(grace))
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float) -> None:
        if not self.exited.is_set():
            self._move(ProcState.STOPPING)
            self._kill_at = time.monotonic() + grace
            self.tree.signal(signal.SIGTERM, await asyncio.to_thread(self.tree.members))
            try:
                await asyncio.wait_for(self.exited.wait(), timeout=grace)
            except TimeoutError:
                self._log.warning("did not exit %.1f s after SIGTERM; sending SIGKILL", grace)
                self.tree.signal(signal.SIGKILL, await asyncio.to_thread(self.tree.members))
                await self.exited.wait()
        await self._watcher
