"""The ``dynllm`` command as a child process whose output a test reads line
by line (``logs -f``, say), killed when the test is done with it."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.conftest import subprocess_env


class LineReader:
    """Lines from a child's stdout as they come, each waited for with a deadline
    (a plain readline would hang the test if the command stopped printing)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buffer = b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)

    def line(self, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self.selector.select(left):
                raise AssertionError(f"no line within {timeout} s (have {self.buffer!r})")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"stdout closed (have {self.buffer!r})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


@contextmanager
def cli_process(*argv: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m dynllm ARGV`` with stdout and stderr piped, in the
    environment of ``subprocess_env`` plus ``env``; killed on exit if it still
    runs (its pipes stay readable after)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynllm", *argv],
        env={**subprocess_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
