"""What happened to each request, once it is over: one record, handed to sinks.

The dispatcher builds one ``RequestRecord`` per forwarded request when its
response has ended (or failed, or its client left) and calls every sink in
``Services.request_sinks`` with it.  Sinks run on the event loop right after
the response, so they must be quick and must not block: count, observe,
write one log line.  ``log_request`` is the sink that writes the info line;
the metrics module adds its own.

Field meanings (all times in milliseconds, from the moment dynllm had the
request's headers):

- ``model``: the model's canonical name; the name the client sent when it
  names no model (404), empty when the request ended before a model was read.
- ``route``: the route's path as in the route table (KServe ones as the
  template ``/v2/models/{name}/infer``), never the client's URL.
- ``status``: the HTTP status sent; 499 when the client left before the
  response was complete (nobody got a status then); for an event stream
  that ended with an error event (a failed load after loading progress
  began, a backend that failed mid-stream) the status of that error.
- ``queued_ms``: waiting for admission (``max_concurrent_requests``) and for
  VRAM held by busy models (the scheduler's queue, evictions, a model still
  unloading).
- ``load_ms``: waiting for this model's backend to start; 0 when it was ready.
- ``cold``: whether the request waited for a load (its own or one already
  in flight).
- ``ttfb_ms``: until the first byte of the answer (the backend's, or
  dynllm's own error) went to the client; loading-progress comments do not
  count.  None when no answer began.
- ``duration_ms``: until the response ended.
- ``bytes_out``: body bytes sent to the client (progress comments included).
- ``prompt_tokens`` / ``completion_tokens``: from the backend's ``usage``
  where it reported one (a non-streamed JSON body, or the final usage chunk
  of a stream); None otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dynllm.requests")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    model: str
    route: str
    status: int
    queued_ms: float
    load_ms: float
    cold: bool
    ttfb_ms: float | None
    duration_ms: float
    bytes_out: int
    prompt_tokens: int | None
    completion_tokens: int | None


RequestSink = Callable[[RequestRecord], None]


def _text(name: str) -> str:
    """A client-chosen name as one log token: no line breaks or control
    characters that could forge a log line, no spaces that split a field."""
    if name and name.isprintable() and " " not in name and '"' not in name and "=" not in name:
        return name
    return json.dumps(name[:200])


def log_request(record: RequestRecord) -> None:
    """The info line: ``key=value`` text for people, every field again as an
    ``extra`` for the JSON formatter."""
    if not log.isEnabledFor(logging.INFO):
        return
    ttfb = "-" if record.ttfb_ms is None else f"{record.ttfb_ms:.1f}"
    tokens = ""
    if record.prompt_tokens is not None or record.completion_tokens is not None:
        tokens = (
            f" prompt_tokens={record.prompt_tokens} completion_tokens={record.completion_tokens}"
        )
    extra: dict[str, Any] = {
        "model": record.model,
        "route": record.route,
        "status": record.status,
        "queued_ms": round(record.queued_ms, 1),
        "load_ms": round(record.load_ms, 1),
        "cold": record.cold,
        "ttfb_ms": None if record.ttfb_ms is None else round(record.ttfb_ms, 1),
        "duration_ms": round(record.duration_ms, 1),
        "bytes_out": record.bytes_out,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
    }
    log.info(
        "model=%s route=%s status=%d queued_ms=%.1f load_ms=%.1f cold=%s ttfb_ms=%s "
        "duration_ms=%.1f bytes=%d%s",
        _text(record.model),
        record.route,
        record.status,
        record.queued_ms,
        record.load_ms,
        "yes" if record.cold else "no",
        ttfb,
        record.duration_ms,
        record.bytes_out,
        tokens,
        extra=extra,
    )


def default_sinks() -> list[RequestSink]:
    """The sinks every service starts with (others are appended at startup)."""
    return [log_request]
