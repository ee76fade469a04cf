"""Large JSON bodies are parsed (and rewritten) in a helper process.

``json.loads`` holds the GIL from start to end: a 50 MB array of ``{}``
takes about 1.5 s and 1.5 GB, during which the event loop serves nobody
(``/health`` included), and a thread would not help.  So a body over
``bodies.INLINE_JSON_BYTES`` goes to one long-lived helper process, which
sends back only what the dispatcher needs: the ``model`` value, or the same
InvalidJSON message ``bodies.parse_json_object`` would give.  When the
backend insists on its own model name or defaults, the helper also re-encodes
the body (a 60 MB ``json.dumps`` blocks as long as the parse), returning the
new bytes.  Small bodies, the common case, never come here.

Why a hand-made pipe protocol rather than ``ProcessPoolExecutor``: the pool
pickles each 60 MB body in its feeder thread while holding the GIL (measured
35-45 ms of loop stall per body), and its "spawn" children re-run the parent's
main script, which a script without a ``__main__`` guard does not survive.
Here one thread writes the body to the helper's stdin and reads the answer
from its stdout; the copies happen in the kernel, outside the GIL.

One helper, one job at a time (a single-thread executor queues the rest), so
concurrent large bodies never multiply the parse memory.  The helper makes
itself the kernel's first choice when memory runs out (``oom_score_adj``), so
the OOM killer takes it rather than a backend holding a model.  If it dies,
the request it was serving (and any sent to it meanwhile) gets a clear 503, and
the next large body starts a new one.  It exits when its stdin closes: on
``close()`` and when dynllm itself dies, even by ``kill -9``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from dynllm.errors import InvalidJSON, PayloadTooLarge, ShuttingDown, Unavailable

log = logging.getLogger("dynllm.api")

# request: op, length of the JSON arguments, length of the body; then both
_REQUEST = struct.Struct("!BIQ")
# answer: status, length of the payload; then the payload
_ANSWER = struct.Struct("!BQ")

PARSE, REWRITE = 1, 2
OK, UNCHANGED, INVALID, TOO_LARGE = 0, 1, 2, 3

PIPE_BYTES = 1 << 20
"""Pipe buffer asked of the kernel (its default 64 KiB means 1000 writes per 60 MB)."""
STOP_SECONDS = 5.0


class WorkerDied(Exception):
    """The helper process exited before answering."""


class JsonWorker:
    """The dynllm side: ``model_and_settings`` and ``rewrite`` run in the helper.

    Nothing is started until the first call; ``close`` stops the helper and
    its thread (later calls get ShuttingDown)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The helper's pid while it runs (for tests and logs)."""
        return self._proc.pid if self._proc is not None else None

    async def model_and_settings(self, body: Sequence[bytes]) -> tuple[str | None, dict[str, Any]]:
        """The top-level ``model`` value of the body (given as its pieces) if
        it is a string, else None, and the request settings the body carries
        (``bodies.REQUEST_FIELDS``: backend, n_ctx, ttl, ...) as they are;
        raises InvalidJSON exactly where ``bodies.parse_json_object`` would."""
        _, payload = await self._call(PARSE, b"", body)
        answer = json.loads(payload)
        model = answer["model"]
        return (model if isinstance(model, str) else None), answer["settings"]

    async def rewrite(
        self,
        body: Sequence[bytes],
        value: str | None,
        defaults: Mapping[str, Any] | None,
        drop: frozenset[str] = frozenset(),
    ) -> bytes | None:
        """``backends.base.rewrite_json_model`` applied to the body (given as
        its pieces) in the helper: the new body, or None if nothing changes."""
        wanted = {"model": value, "defaults": dict(defaults or {}), "drop": sorted(drop)}
        args = json.dumps(wanted).encode()
        status, payload = await self._call(REWRITE, args, body)
        return None if status == UNCHANGED else payload

    async def _call(self, op: int, args: bytes, body: Sequence[bytes]) -> tuple[int, bytes]:
        if self._closed:
            raise ShuttingDown("dynllm is shutting down")
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="dynllm-json")
        loop = asyncio.get_running_loop()
        try:
            status, payload = await loop.run_in_executor(
                self._thread, self._exchange, op, args, body
            )
        except WorkerDied:
            raise Unavailable(
                "dynllm's JSON parser stopped while reading this request body "
                "(out of memory?); try again, or send a smaller body"
            ) from None
        if status == INVALID:
            raise InvalidJSON(payload.decode())
        if status == TOO_LARGE:
            raise PayloadTooLarge("The request body is too large for dynllm to parse in memory")
        return status, payload

    def _exchange(self, op: int, args: bytes, body: Sequence[bytes]) -> tuple[int, bytes]:
        """One request and its answer (in the worker thread, one at a time)."""
        size = sum(len(piece) for piece in body)
        proc = self._proc
        if proc is None or proc.poll() is not None:
            if proc is not None:
                self._reap(proc, "while idle")
            proc = self._proc = _start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(_REQUEST.pack(op, len(args), size) + args)
            for piece in body:  # pieces over the buffer's size go straight to the pipe
                proc.stdin.write(piece)
            proc.stdin.flush()
            head = proc.stdout.read(_ANSWER.size)
            if len(head) == _ANSWER.size:
                status, size = _ANSWER.unpack(head)
                payload = proc.stdout.read(size)  # one allocation, filled in place
                if len(payload) == size:
                    return status, payload
        except OSError:  # a broken pipe: it died
            pass
        self._reap(proc, f"while parsing a {size / (1 << 20):.1f} MB body")
        raise WorkerDied

    def _reap(self, proc: subprocess.Popen[bytes], when: str) -> None:
        if proc.poll() is None:
            proc.kill()  # answered nonsense: never trust it again
        code = proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        if self._proc is proc:
            self._proc = None
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        log.warning(
            "the JSON parser process (pid %d) stopped %s (%s); a new one starts "
            "with the next large body",
            proc.pid,
            when,
            how,
        )

    async def close(self) -> None:
        self._closed = True
        if self._thread is None:
            return
        await asyncio.get_running_loop().run_in_executor(self._thread, self._stop)
        self._thread.shutdown(wait=True)

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()  # its read sees the end and it exits
        try:
            proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _start() -> subprocess.Popen[bytes]:
    # The helper imports this very copy of dynllm, whatever the caller's sys.path.
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynllm.api.jsonwork"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None
    with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
        fcntl.fcntl(proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    log.debug("started the JSON parser process (pid %d)", proc.pid)
    return proc


# --- the helper process -----------------------------------------------------


def _answer(op: int, args: bytes, body: bytes) -> tuple[int, bytes]:
    from dynllm.api.bodies import REQUEST_FIELDS, parse_json_object

    try:
        data = parse_json_object(body)
        if op == PARSE:
            model = data.get("model")
            settings = {k: data[k] for k in REQUEST_FIELDS.intersection(data)}
            answer = {"model": model if isinstance(model, str) else None, "settings": settings}
            return OK, json.dumps(answer).encode()
        # Imported on first use: it pulls in the config models (0.4 s), which
        # a helper that only parses never needs.
        from dynllm.backends.base import rewrite_json_model

        wanted = json.loads(args)
        drop = frozenset(wanted["drop"])
        new = rewrite_json_model(body, data, wanted["model"], wanted["defaults"], drop)
        return (UNCHANGED, b"") if new is body else (OK, new)
    except InvalidJSON as exc:
        return INVALID, exc.message.encode()
    except MemoryError:
        return TOO_LARGE, b""


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """Answer requests until ``requests`` ends (dynllm closed it, or died)."""
    while True:
        head = requests.read(_REQUEST.size)
        if len(head) < _REQUEST.size:
            return
        op, args_size, body_size = _REQUEST.unpack(head)
        args = requests.read(args_size)
        body = requests.read(body_size)
        if len(body) < body_size:
            return
        status, payload = _answer(op, args, body)
        del body  # free the request before the answer is written
        answers.write(_ANSWER.pack(status, len(payload)))
        answers.write(payload)
        answers.flush()


def _prefer_me_when_memory_runs_out() -> None:
    # Raising one's own score needs no privilege; it makes the kernel kill
    # this helper, not a backend holding a model, if a huge body exhausts memory.
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")


if __name__ == "__main__":
    # A Ctrl-C in dynllm's terminal reaches its whole process group; dynllm
    # stops the helper itself (by closing its stdin).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _prefer_me_when_memory_runs_out()
    serve(sys.stdin.buffer, sys.stdout.buffer)
