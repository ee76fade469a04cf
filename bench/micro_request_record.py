"""What the per-request record and loading-progress checks add to the hot path.

`uv run python -m bench.micro_request_record` times, on this machine, the
work issue 9 (items 2, 7, 8) added to each forwarded request, piece by piece
(best of several repeats of many iterations: steady on a busy machine, where
an end-to-end latency comparison drowns in noise):

- the request's ``Exchange`` (it replaced the two-flag ``Finish``),
- the checks on the way (slot state, ``max_concurrent_requests``, the clock),
- reading ``usage`` from the end of a typical chat answer,
- building the ``RequestRecord`` and calling the sinks: the log line below
  ``info`` (only a level check) and at ``info`` (formatted and written, here
  to /dev/null with the text format dynllm uses).
"""

from __future__ import annotations

import json
import logging
import os
import time
import timeit
from collections.abc import Callable
from typing import Any

from dynllm.proxy import Exchange, note_usage
from dynllm.requestlog import RequestRecord, log_request

ANSWER = json.dumps(
    {
        "id": "chatcmpl-1234567890",
        "object": "chat.completion",
        "created": 1767225600,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "word " * 40},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 21, "completion_tokens": 40, "total_tokens": 61},
        "timings": {"prompt_n": 21, "prompt_ms": 10.5, "predicted_n": 40, "predicted_ms": 400.1},
    }
).encode()


def best_us(fn: Callable[[], Any], number: int = 20_000, repeat: int = 7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


class _Finish:  # what a request carried before
    __slots__ = ("done", "started")

    def __init__(self) -> None:
        self.started = False
        self.done = False


class _Slot:
    state = "loaded"


class _Spec:
    name = "m"
    max_concurrent_requests = None


def main() -> None:
    slots = {"m": _Slot()}
    spec = _Spec()
    ready = "loaded"

    def checks() -> None:
        arrived = time.monotonic()
        slot = slots[spec.name]
        if slot.state is not ready:
            raise AssertionError
        if spec.max_concurrent_requests is not None:
            raise AssertionError
        first = time.monotonic()
        _ = (first - arrived, time.monotonic() - arrived)

    def usage() -> None:
        note_usage(Exchange(), ANSWER[-4096:])

    def record() -> None:
        r = RequestRecord("m", "/v1/chat/completions", 200, 0.0, 0.0, False, 1.5, 2.5, 512, 2, 3)
        for sink in sinks:
            sink(r)

    sinks = [log_request]
    requests_log = logging.getLogger("dynllm.requests")
    requests_log.propagate = False
    devnull = open(os.devnull, "w")  # noqa: SIM115 (lives for the run)
    handler = logging.StreamHandler(devnull)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    requests_log.addHandler(handler)

    rows: list[tuple[str, float]] = [
        ("Finish() before", best_us(_Finish)),
        ("Exchange() now", best_us(Exchange)),
        ("checks on the way (3 clock reads, slot state, limits)", best_us(checks)),
        (f"usage from a {len(ANSWER)}-byte chat answer", best_us(usage)),
    ]
    requests_log.setLevel(logging.WARNING)
    rows.append(("record + sinks, log level warning", best_us(record)))
    requests_log.setLevel(logging.INFO)
    rows.append(("record + sinks, log level info (line written)", best_us(record, number=5000)))
    for name, us in rows:
        print(f"{name:58s} {us:7.2f} us")
    base = rows[1][1] - rows[0][1] + rows[2][1] + rows[3][1]
    print(f"{'added per request, log level warning':58s} {base + rows[4][1]:7.2f} us")
    print(f"{'added per request, log level info':58s} {base + rows[5][1]:7.2f} us")


if __name__ == "__main__":
    main()
