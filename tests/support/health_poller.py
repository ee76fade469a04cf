#!/usr/bin/env python3
"""Polls ``GET /health`` every ~5 ms on one keep-alive connection until its
stdin closes, then prints the latencies (seconds, JSON list) on stdout.

Its own process, so what it measures is the server's responsiveness, not the
GIL of a test that is busy uploading 60 MB at the same time.  Prints
``ready`` once its first poll succeeded.  Standard library only.

    health_poller.py HOST PORT
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time

INTERVAL = 0.005


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    stop = threading.Event()

    def wait_for_stdin_to_close() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_stdin_to_close, daemon=True).start()
    connection = http.client.HTTPConnection(host, port, timeout=10)
    latencies: list[float] = []
    failures = 0
    while not stop.is_set():
        start = time.perf_counter()
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        took = time.perf_counter() - start
        if response.status != 200:
            failures += 1
        if not latencies:
            print("ready", flush=True)
        latencies.append(took)
        stop.wait(max(0.0, INTERVAL - took))
    print(json.dumps({"latencies": latencies, "failures": failures}), flush=True)


if __name__ == "__main__":
    main()
