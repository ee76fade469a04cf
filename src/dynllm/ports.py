"""Port pool for backends, with a bind check when a port is leased.

A port found free is still only a guess until the backend binds it, so the
supervisor reports bind failures back (``quarantine``) and asks for another.
"""

from __future__ import annotations

import socket
import time

from dynllm.errors import Unavailable

BACKEND_HOST = "127.0.0.1"
"""Where backends listen: loopback only, dynllm is their one client."""


def port_is_free(port: int, host: str = BACKEND_HOST) -> bool:
    """Whether a server could bind ``port`` now.  SO_REUSEADDR, as llama-server,
    uvicorn and aiohttp set it: connections of an earlier backend lingering in
    TIME_WAIT do not block a new listener, and must not make the pool think the
    port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class PortPool:
    def __init__(self, start: int, end: int, *, quarantine_seconds: float = 30.0) -> None:
        if end < start:
            raise ValueError("port range is inverted")
        self._ports = range(start, end + 1)
        self._leased: set[int] = set()
        self._quarantined: dict[int, float] = {}
        self._quarantine_seconds = quarantine_seconds
        self._next = 0

    @property
    def leased(self) -> frozenset[int]:
        return frozenset(self._leased)

    def lease(self) -> int:
        """A port in the range that is not leased and binds right now.

        Rotates through the range so a port just released (maybe still in
        TIME_WAIT or held by a dying child) is the last to be tried again.
        """
        now = time.monotonic()
        size = len(self._ports)
        for step in range(size):
            port = self._ports[(self._next + step) % size]
            if port in self._leased or self._quarantined.get(port, 0.0) > now:
                continue
            if port_is_free(port):
                self._leased.add(port)
                self._next = (self._next + step + 1) % size
                return port
        raise Unavailable(
            f"no free backend port in {self._ports.start}-{self._ports.stop - 1}; "
            "widen backend.port_range_start/port_range_end"
        )

    def release(self, port: int) -> None:
        self._leased.discard(port)

    def quarantine(self, port: int) -> None:
        """The backend could not bind ``port``: skip it for a while and release it."""
        self._quarantined[port] = time.monotonic() + self._quarantine_seconds
        self._leased.discard(port)
