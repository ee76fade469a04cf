"""Logging setup: the JSON formatter's fields, levels and quiet libraries, and
a real dynllm with ``log_format: json`` whose every stderr line is one JSON
object, the per-request line included."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynllm.logsetup import JsonFormatter, _DynllmHandler, configure_logging
from dynllm.requestlog import RequestRecord
from tests.conftest import ConfigFactory, poll
from tests.support.net import http_ok

# Every field of the request record but the token counts (absent without usage).
REQUEST_FIELDS = {f.name for f in fields(RequestRecord)} - {"prompt_tokens", "completion_tokens"}


def record(msg: str, *args: Any, extra: dict[str, Any] | None = None, exc_info: Any = None) -> str:
    logger = logging.getLogger("dynllm.test")
    rec = logger.makeRecord(
        "dynllm.test", logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra
    )
    return JsonFormatter().format(rec)


def test_json_line_has_the_standard_fields_and_the_extras() -> None:
    line = record(
        "loaded %s in %.1f s",
        "chat",
        1.25,
        extra={"model": "chat", "status": 200, "cold": True, "ttfb_ms": None},
    )
    print(line)
    entry = json.loads(line)
    assert entry == {
        "time": entry["time"],
        "level": "WARNING",
        "logger": "dynllm.test",
        "message": "loaded chat in 1.2 s",
        "model": "chat",
        "status": 200,
        "cold": True,
        "ttfb_ms": None,
    }
    when = datetime.fromisoformat(entry["time"])  # ISO-8601
    assert when.utcoffset() is not None and when.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs((datetime.now(UTC) - when).total_seconds()) < 60
    assert entry["time"].endswith("+00:00") and "." in entry["time"]  # milliseconds


def test_json_line_is_one_line_whatever_the_message() -> None:
    line = record("line one\nline two\x1b[31m", extra={"path": Path("/x"), "color_message": "c"})
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "line one\nline two\x1b[31m"
    assert entry["path"] == "/x"  # not JSON by itself: written as its text
    assert "color_message" not in entry  # uvicorn's coloured duplicate


def test_an_extra_named_like_a_standard_field_does_not_replace_it() -> None:
    entry = json.loads(record("m", extra={"level": "fake", "time": 1, "logger": "x"}))
    assert entry["level"] == "WARNING" and entry["logger"] == "dynllm.test"
    assert entry["extra.level"] == "fake" and entry["extra.time"] == 1


def test_exceptions_go_in_one_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        line = record("failed", exc_info=sys.exc_info())
    entry = json.loads(line)
    assert entry["message"] == "failed"
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert entry["exception"].endswith("ValueError: boom")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    levels = {n: logging.getLogger(n).level for n in ("httpx", "httpcore", "aiosqlite")}
    yield
    for handler in root.handlers:
        if isinstance(handler, _DynllmHandler):
            root.removeHandler(handler)
    root.setLevel(saved[0])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(False)


def test_configure_logging_levels_and_quiet_libraries(restore_logging: None) -> None:
    configure_logging("INFO", "json")
    configure_logging("warning", "json")  # a second call replaces the handler
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _DynllmHandler)]
    assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
    assert root.level == logging.WARNING
    assert logging.getLogger("httpx").level == logging.WARNING

    configure_logging("debug", "text")
    ours = [h for h in root.handlers if isinstance(h, _DynllmHandler)]
    assert len(ours) == 1 and not isinstance(ours[0].formatter, JsonFormatter)
    assert root.level == logging.DEBUG
    assert logging.getLogger("aiosqlite").level == logging.WARNING


# ---- a real dynllm with log_format: json -------------------------------------------------


def test_a_json_log_is_one_object_per_line_with_the_request_line(
    make_config: ConfigFactory, dynllm_process: Any, tmp_path: Path
) -> None:
    path, config = make_config.write_and_load([{"name": "chat"}], log_format="json")
    log_file = tmp_path / "stderr.log"
    proc = dynllm_process(path, log_file)
    base = f"http://127.0.0.1:{config.server.port}"
    with httpx.Client(base_url=base, trust_env=False, timeout=30) as http:
        poll(lambda: http_ok(http) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, log_file.read_text()
        chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
        assert http.post("/v1/chat/completions", json={"model": "nope"}).status_code == 404
    proc.terminate()
    proc.wait(timeout=30)  # (uvicorn re-raises SIGTERM after its graceful shutdown)
    lines = log_file.read_text().splitlines()
    print("\n".join(lines))
    entries = [json.loads(line) for line in lines]  # every line parses
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    loggers = {e["logger"] for e in entries}
    assert "uvicorn.error" in loggers  # uvicorn's lines are JSON too
    requests = [e for e in entries if e["logger"] == "dynllm.requests"]
    assert [(r["model"], r["status"], r["cold"]) for r in requests] == [
        ("chat", 200, True),
        ("nope", 404, False),
    ]
    for entry in requests:
        assert set(entry) >= REQUEST_FIELDS
        assert entry["level"] == "INFO" and entry["route"] == "/v1/chat/completions"
    assert requests[0]["load_ms"] > 0 and requests[0]["bytes_out"] > 0
