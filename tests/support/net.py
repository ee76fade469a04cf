"""Loopback helpers for tests and the bench: free ports (bind 127.0.0.1:0 and let the
OS choose) and a health probe."""

from __future__ import annotations

import socket

import httpx

from dynllm.ports import port_is_free


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_range(size: int) -> tuple[int, int]:
    """A window of ``size`` ports that all bind right now."""
    for _ in range(200):
        start = free_port()
        if start + size > 65535:
            continue
        if all(port_is_free(p) for p in range(start, start + size)):
            return start, start + size - 1
    raise RuntimeError("no free port window")


def http_ok(http: httpx.Client, path: str = "/health") -> bool:
    """Whether ``GET path`` on ``http``'s base URL answers 200 (False if nothing answers)."""
    try:
        return http.get(path).status_code == 200
    except httpx.HTTPError:
        return False
