"""A pause that ends early when the peer hangs up, for the stand-in servers
(imported by the scripts next to it; standard library only)."""

from __future__ import annotations

import select
import socket
import time


def pause_unless_gone(connection: socket.socket, seconds: float) -> bool:
    """Sleep ``seconds``; False as soon as the client closed the connection."""
    deadline = time.monotonic() + seconds
    poller = select.poll()
    poller.register(connection, select.POLLIN | select.POLLHUP | select.POLLERR)
    while (remaining := deadline - time.monotonic()) > 0:
        if not poller.poll(remaining * 1000):
            return True
        try:
            peek = connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            return False
        if not peek:
            return False
        # The client sent more data (a pipelined request): EOF cannot be seen now.
        time.sleep(max(0.0, deadline - time.monotonic()))
        return True
    return True
