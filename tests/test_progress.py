"""Loading progress: a streaming request for a cold model gets SSE comments
while it waits, through a running dynllm with the fake llama-server taking
seconds to load (a real process answering 503 until its load is over)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest

from dynllm.requestlog import RequestRecord
from tests.conftest import ConfigFactory, RunningApp, apoll, serve

LOAD_SECONDS = 3.0
ANSWER = "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"  # the fake's 8 tokens


def slow(name: str, seconds: float = LOAD_SECONDS, **extra: Any) -> dict[str, Any]:
    return {"name": name, "extra_args": ["--fake-load-seconds", str(seconds)], **extra}


def records(app: RunningApp) -> list[RequestRecord]:
    got: list[RequestRecord] = []
    app.services.request_sinks.append(got.append)
    return got


async def raw_stream(app: RunningApp, model: str) -> tuple[int, float, float, bytes]:
    """Status, seconds to the first body bytes and to the end, and the body as sent."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    began = time.monotonic()
    first = None
    parts = []
    async with app.client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for chunk in response.aiter_raw():
            if first is None:
                first = time.monotonic() - began
            parts.append(chunk)
        assert first is not None
        return response.status_code, first, time.monotonic() - began, b"".join(parts)


def data_events(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]


async def test_first_bytes_within_1_1_s_of_a_3_s_load(make_config: ConfigFactory) -> None:
    async with serve(make_config([slow("m")])) as app:
        seen = records(app)
        status, first, total, body = await raw_stream(app, "m")
        print(
            f"load {LOAD_SECONDS:g} s: first bytes after {first:.3f} s, stream ended {total:.2f} s"
        )
        assert status == 200
        assert first <= 1.1
        assert total >= LOAD_SECONDS  # the bytes before the load were progress, not the answer
        text = body.decode()
        comments = [line for line in text.split("\n") if line.startswith(":")]
        assert comments[0].startswith(": loading m 0.") and comments[0].endswith("s")
        assert len(comments) >= 3  # ~0.5 s, 1 s, 2 s, 3 s
        assert text.index(comments[-1]) < text.index("data: ")  # all before the answer
        assert data_events(body)[-1] == "[DONE]"
        (record,) = seen
        assert record.status == 200 and record.cold
        assert record.load_ms >= (LOAD_SECONDS - 0.5) * 1000
        assert record.ttfb_ms is not None and record.ttfb_ms >= record.load_ms  # the answer's
        assert record.bytes_out == len(body)


async def test_the_openai_client_reads_the_whole_answer(make_config: ConfigFactory) -> None:
    async with serve(make_config([slow("m")])) as app:
        seen = records(app)
        client = openai.AsyncOpenAI(base_url=f"{app.base_url}/v1", api_key="unused", max_retries=0)

        async def ask() -> str:
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            text = ""
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
            return text

        began = time.monotonic()
        cold = await ask()
        print(f"openai client: {cold!r} after {time.monotonic() - began:.2f} s (cold model)")
        assert cold == ANSWER
        assert await ask() == ANSWER  # warm: no progress
        await client.close()
        # The cold stream carried the progress comments the client skipped:
        # the same answer, more bytes.
        comments = seen[0].bytes_out - seen[1].bytes_out
        print(f"progress comments in the cold stream: {comments} bytes")
        assert seen[0].cold and not seen[1].cold
        assert comments >= 3 * len(": loading m 0.5s\n\n")


async def test_a_load_that_fails_after_progress_began_ends_the_stream_with_an_error(
    make_config: ConfigFactory,
) -> None:
    model = {"name": "m", "extra_args": ["--fake-never-ready"], "load_timeout_seconds": 1.5}
    async with serve(make_config([model], load_failure_cooldown_seconds=0)) as app:
        seen = records(app)
        status, first, _, body = await raw_stream(app, "m")
        assert status == 200 and first <= 1.1  # progress had begun
        assert body.startswith(b": loading m")
        (event,) = data_events(body)
        assert '"code": "load_timeout"' in event and '"error"' in event
        assert seen[0].status == 504 and seen[0].cold
        # the openai client raises it
        client = openai.AsyncOpenAI(base_url=f"{app.base_url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError) as raised:
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            async for _ in stream:
                pass
        print(f"openai client raised: {raised.value.message}")
        assert "was not ready within 1.5 s" in raised.value.message
        await client.close()


async def test_loading_progress_off_keeps_the_stream_silent(make_config: ConfigFactory) -> None:
    async with serve(make_config([slow("m", 1.5)], loading_progress=False)) as app:
        status, first, _, body = await raw_stream(app, "m")
        print(f"loading_progress off: first bytes after {first:.2f} s")
        assert status == 200 and first >= 1.4
        assert not body.startswith(b":")
        assert data_events(body)[-1] == "[DONE]"


async def test_only_streaming_requests_get_progress(make_config: ConfigFactory) -> None:
    async with serve(make_config([slow("m", 1.0)])) as app:
        response = await app.chat("m")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["choices"][0]["message"]["content"] == ANSWER


async def test_a_ready_model_answers_with_its_own_headers(make_config: ConfigFactory) -> None:
    async with serve(make_config([slow("m", 0.05)])) as app:
        status, _, _, body = await raw_stream(app, "m")  # cold, but ready within the grace
        assert status == 200 and body.startswith(b"data: ")
        body = {"model": "m", "messages": [], "stream": True}
        async with app.client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.headers["x-fake-pid"]  # the backend's own header went through
            assert (await response.aread()).startswith(b"data: ")


async def test_a_client_leaving_during_progress(make_config: ConfigFactory) -> None:
    async with serve(make_config([slow("m", 2.0)])) as app:
        seen = records(app)
        slot = app.services.scheduler.slots["m"]
        got_comment = asyncio.Event()

        async def read() -> None:
            body = {"model": "m", "messages": [], "stream": True}
            async with app.client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for chunk in response.aiter_raw():
                    assert chunk.startswith(b": loading m")
                    got_comment.set()

        task = asyncio.create_task(read())
        await asyncio.wait_for(got_comment.wait(), timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await apoll(lambda: len(seen) == 1, timeout=2)
        assert seen[0].status == 499 and seen[0].ttfb_ms is None
        assert slot.in_flight == 0 and slot.pending == 0
        # the load goes on for nobody, and the model then serves as usual
        await apoll(lambda: slot.state.value == "loaded", timeout=10)
        status, _, _, body = await raw_stream(app, "m")
        assert status == 200 and body.startswith(b"data: ")
