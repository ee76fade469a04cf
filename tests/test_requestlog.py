"""One record and one info log line per request, through a running dynllm
with real backend processes: the fields, cold and warm starts, queued time,
token counts, errors and clients that leave."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any

import pytest

from dynllm import requestlog
from dynllm.requestlog import RequestRecord, log_request
from tests.conftest import ConfigFactory, RunningApp, apoll, serve
from tests.test_dispatch import config_for, fake_model

FIELDS = tuple(f.name for f in dataclasses.fields(RequestRecord))


def records(app: RunningApp) -> list[RequestRecord]:
    got: list[RequestRecord] = []
    app.services.request_sinks.append(got.append)
    return got


def request_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "dynllm.requests"]


async def test_one_info_line_per_request_with_every_field(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dynllm.requests")
    model = {"name": "m", "aliases": ["m-alias"], "extra_args": ["--fake-load-seconds", "1"]}
    async with serve(make_config([model])) as app:
        seen = records(app)
        cold = await app.chat("m-alias", max_tokens=5)
        warm = await app.chat("m", max_tokens=3)
        assert cold.status_code == warm.status_code == 200
        lines = request_lines(caplog)
        assert len(lines) == 2  # one per request, no more
        for line, response in zip(lines, (cold, warm), strict=True):
            assert line.levelno == logging.INFO
            for field in FIELDS:  # every field for the JSON formatter
                assert hasattr(line, field), field
            assert line.model == "m" and line.route == "/v1/chat/completions"  # type: ignore[attr-defined]
            assert line.status == 200  # type: ignore[attr-defined]
            assert line.bytes_out == len(response.content)  # type: ignore[attr-defined]
            print(line.getMessage())
        first, second = seen
        assert first.cold and first.load_ms >= 900  # the fake takes 1 s to load
        assert first.queued_ms < 200  # nothing stood in its way
        assert not second.cold and second.load_ms == 0 and second.queued_ms == 0
        for record in seen:
            assert record.ttfb_ms is not None
            assert 0 < record.ttfb_ms <= record.duration_ms
        assert (first.prompt_tokens, first.completion_tokens) == (1, 5)  # "hi"; max_tokens
        assert (second.prompt_tokens, second.completion_tokens) == (1, 3)
        message = lines[0].getMessage()
        assert message.startswith("model=m route=/v1/chat/completions status=200 queued_ms=")
        assert " cold=yes " in message and " cold=no " in lines[1].getMessage()
        assert message.endswith(f"bytes={len(cold.content)} prompt_tokens=1 completion_tokens=5")


async def test_a_stream_is_counted_whole_with_its_final_usage(make_config: ConfigFactory) -> None:
    async with serve(make_config([{"name": "m"}])) as app:
        seen = records(app)
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "one two three"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 40,
        }
        response = await app.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
        without = await app.chat("m", stream=True, max_tokens=40)  # no usage asked for
        assert without.status_code == 200
        with_usage, no_usage = seen
        assert with_usage.bytes_out == len(response.content)
        assert (with_usage.prompt_tokens, with_usage.completion_tokens) == (3, 40)
        assert (no_usage.prompt_tokens, no_usage.completion_tokens) == (None, None)
        assert no_usage.bytes_out == len(without.content)


async def test_queued_time_is_the_wait_for_vram(make_config: ConfigFactory) -> None:
    models = [fake_model("a", vram_mb=600), fake_model("b", vram_mb=600)]
    async with serve(config_for(make_config, models, total_vram_mb=1000)) as app:
        scheduler = app.services.scheduler
        seen = records(app)
        busy = asyncio.create_task(app.chat("a", fake_delay=1.0))  # holds A's VRAM ~1 s
        await apoll(lambda: scheduler.slots["a"].in_flight == 1, timeout=10)
        assert (await app.chat("b")).status_code == 200  # queued, then A evicted, B loaded
        assert (await busy).status_code == 200
        record_b = next(r for r in seen if r.model == "b")
        print(f"b: queued {record_b.queued_ms:.0f} ms, load {record_b.load_ms:.0f} ms")
        assert record_b.cold
        assert record_b.queued_ms >= 500  # most of A's second
        assert record_b.load_ms < record_b.queued_ms


async def test_errors_and_clients_that_leave_are_recorded(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dynllm.requests")
    async with serve(config_for(make_config, [fake_model("m")])) as app:
        seen = records(app)
        unknown = await app.chat("ghost\nstatus=200")
        assert unknown.status_code == 404
        assert (await app.client.get("/v1/chat/completions")).status_code == 405
        assert (await app.chat("m")).status_code == 200
        leaving = asyncio.create_task(app.chat("m", fake_delay=30))
        slot = app.services.scheduler.slots["m"]
        await apoll(lambda: slot.in_flight == 1, timeout=5)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await apoll(lambda: len(seen) == 4, timeout=5)
        ghost, wrong_method, _, left = seen
        assert (ghost.model, ghost.status, ghost.bytes_out) == (
            "ghost\nstatus=200",
            404,
            len(unknown.content),
        )
        assert ghost.ttfb_ms is not None and not ghost.cold
        assert (wrong_method.model, wrong_method.status) == ("", 405)
        assert left.status == 499 and left.ttfb_ms is None and left.bytes_out == 0
        # a name with a line break cannot forge a line of its own
        message = request_lines(caplog)[0].getMessage()
        assert "\n" not in message and message.startswith('model="ghost\\nstatus=200" ')


async def test_a_failing_sink_fails_nothing(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(config_for(make_config, [fake_model("m")])) as app:
        seen = records(app)

        def broken(record: RequestRecord) -> None:
            raise RuntimeError("sink bug")

        app.services.request_sinks.insert(0, broken)
        assert (await app.chat("m")).status_code == 200
        assert len(seen) == 1  # the sinks after it still ran
        assert "a request sink failed" in caplog.text


def test_the_line_and_its_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dynllm.requests")
    record = RequestRecord("m", "/v1/embeddings", 200, 0.0, 0.0, False, 1.25, 2.5, 10, 4, None)
    log_request(record)
    (line,) = request_lines(caplog)
    assert line.getMessage() == (
        "model=m route=/v1/embeddings status=200 queued_ms=0.0 load_ms=0.0 cold=no "
        "ttfb_ms=1.2 duration_ms=2.5 bytes=10 prompt_tokens=4 completion_tokens=None"
    )
    fields: dict[str, Any] = {f: getattr(line, f) for f in FIELDS}
    assert json.loads(json.dumps(fields)) == {
        "model": "m",
        "route": "/v1/embeddings",
        "status": 200,
        "queued_ms": 0.0,
        "load_ms": 0.0,
        "cold": False,
        "ttfb_ms": 1.2,
        "duration_ms": 2.5,
        "bytes_out": 10,
        "prompt_tokens": 4,
        "completion_tokens": None,
    }


def test_below_info_nothing_is_formatted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below info, log_request returns before building the line (Logger.info
    would drop the record anyway, but only after the formatting was paid for)."""
    caplog.set_level(logging.WARNING, logger="dynllm.requests")

    def formatted(name: str) -> str:
        raise AssertionError(f"the line for {name!r} was formatted below info")

    monkeypatch.setattr(requestlog, "_text", formatted)
    record = RequestRecord("m", "/v1/embeddings", 200, 0.0, 0.0, False, None, 2.5, 10, None, None)
    began = time.perf_counter()
    for _ in range(1000):
        log_request(record)
    per_call_us = (time.perf_counter() - began) * 1000
    print(f"log_request below info: {per_call_us:.2f} us per call")
    assert request_lines(caplog) == []
