"""One backend process: spawn, readiness, log capture, exit watch, stop.

State machine (``ProcState``), each edge taken in exactly one place::

    STARTING -> READY      wait_ready() saw the probe answer 200
    STARTING -> STOPPING   stop() during a load (timeout, cancel, shutdown)
    READY    -> STOPPING   stop()
    *        -> EXITED     the process is gone (reaped by _watch)

The process gets its own session (so its whole group can be signalled) and a
parent-death signal (so it dies with dynllm even after ``kill -9``).  stdout
and stderr are drained continuously into a ring buffer: an unread pipe would
block the child once the pipe fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum

import httpx

from dynllm.errors import BackendExited, BackendStartFailed, LoadTimeout

LOG_LINES = 500
_PR_SET_PDEATHSIG = 1


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


def _die_with_parent() -> None:
    """Runs in the child between fork and exec."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: reconciliation at startup still applies
        pass


def killpg(pgid: int, sig: signal.Signals) -> None:
    """Signal a process group; one already gone (or not ours) is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class BackendProcess:
    """A spawned backend.  Create with ``await BackendProcess.spawn(...)``."""

    def __init__(
        self,
        name: str,
        proc: asyncio.subprocess.Process,
        *,
        on_exit: Callable[[BackendProcess], None] | None = None,
    ) -> None:
        self.name = name
        self._proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the child leads its own group
        self.started_at = time.time()
        self.state = ProcState.STARTING
        self.lines: deque[str] = deque(maxlen=LOG_LINES)
        self._stderr: deque[str] = deque(maxlen=LOG_LINES)
        self._log = logging.getLogger(f"dynllm.backend.{name}")
        self._on_exit = on_exit
        self.exited = asyncio.Event()
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
    ) -> BackendProcess:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=dict(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise BackendStartFailed(
                f"cannot start backend for '{name}': {argv[0]}: {exc.strerror or exc}"
            ) from None
        return cls(name, proc, on_exit=on_exit)

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
            self._log.debug("%s", line)

    async def _watch(self) -> None:
        await self._proc.wait()
        # Collect the last output so a failure report has the final lines.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._drains), timeout=1.0)
        # Anything the backend forked into its group goes with it.
        killpg(self.pgid, signal.SIGKILL)
        self._move(ProcState.EXITED)
        self.exited.set()
        if self._on_exit is not None:
            self._on_exit(self)

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
    ) -> None:
        """Poll ``url`` until 200.  Raises BackendExited at once if the process
        dies first, LoadTimeout after ``timeout`` seconds (the caller stops it)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.exited.is_set():
                raise self._exit_error("while loading")
            if self.state is not ProcState.STARTING:
                raise BackendStartFailed(f"backend for '{self.name}' was stopped while loading")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoadTimeout(
                    f"backend for '{self.name}' was not ready within {timeout:g} s "
                    "(load_timeout_seconds)"
                )
            if await self._probe(client, url, timeout=min(5.0, max(remaining, 0.05))):
                self._move(ProcState.READY)
                return
            # Sleep one interval, but wake at once if the process exits.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.exited.wait(), timeout=min(interval, max(deadline - time.monotonic(), 0))
                )

    async def _probe(self, client: httpx.AsyncClient, url: str, timeout: float) -> bool:
        """One readiness request, abandoned at once if the process exits meanwhile
        (a squatter on the port might never answer)."""
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
        """SIGTERM the group, SIGKILL it after ``grace`` s, reap.  Idempotent;
        concurrent callers wait for the same stop."""
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(grace))
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float) -> None:
        if not self.exited.is_set():
            self._move(ProcState.STOPPING)
            killpg(self.pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.exited.wait(), timeout=grace)
            except TimeoutError:
                self._log.warning("did not exit %.1f s after SIGTERM; sending SIGKILL", grace)
                killpg(self.pgid, signal.SIGKILL)
                await self.exited.wait()
        await self._watcher
