"""Port pool for backends, with a bind check when a port is leased.

A port found free is still only a guess until the backend binds it, so the
supervisor reports bind failures back (``quarantine``) and asks for another.
A squatter that binds the port first is told apart by who holds the listening
socket (``listening_inodes``, matched against the backend's processes by
``dynllm.proctree``): dynllm sends nothing to a listener it did not start.
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


_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def listening_inodes(port: int) -> set[int] | None:
    """Inodes of the sockets listening on TCP ``port`` (any address, IPv4 or
    IPv6) in this network namespace; None where ``/proc/net/tcp`` cannot be
    read (not Linux), so callers can tell "nobody" from "cannot tell".

    Every address counts, not only loopback: a listener on the wildcard
    address, or a second one sharing the port through SO_REUSEPORT, would
    receive connections meant for the backend.  A listener on another
    address only makes the caller move to another port, which is harmless.
    """
    suffix = f":{port:04X}"
    key = suffix + " "  # the local address column ends with ":PORT" in hex
    found: set[int] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                readable = True
                next(f, None)  # the header
                for line in f:
                    if key not in line:  # cheap filter before splitting
                        continue
                    fields = line.split()
                    # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                    if fields[3] == _LISTEN and fields[1].endswith(suffix):
                        found.add(int(fields[9]))
        except OSError:  # no IPv6 table, or no /proc
            continue
    return found if readable else None


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
