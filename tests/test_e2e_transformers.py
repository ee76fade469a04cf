"""End to end with the real Hugging Face ``transformers serve`` (5.23) and tiny models.

Through dynllm with the official ``openai`` client: chat (plain and streamed),
completions, responses and Whisper transcription (multipart, whose ``model``
field dynllm rewrites to the path the server is pinned to).  Then the
scheduling guarantees with this backend: a model busy with a stream is never
evicted (the other request queues until the stream ends, then evicts it), the
idle unload comes on time and never cuts a stream.

The venv and the models are built once and cached (tests/support/env_transformers.py);
if they could not be built these tests are skipped, loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.conftest import ConfigFactory, RunningApp, apoll, serve
from tests.support import env_transformers as hf

# A real model load imports torch and transformers: seconds on 2 idle cores,
# much longer when other test runs share them.
pytestmark = pytest.mark.timeout(400)
LOAD_TIMEOUT = 180


def hf_model(name: str, path: Path, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    env = hf.hf_env(tmp_path / "hf-cache")
    env["OMP_NUM_THREADS"] = "1"  # two shared cores: torch's thread pool only contends
    return {
        "name": name,
        "path": str(path),
        "backend": "transformers",
        "device": "cpu",
        "env": env,
        **extra,
    }


def hf_top(**top: Any) -> dict[str, Any]:
    return {
        "enabled_backends": ["llamacpp", "transformers"],
        "backend": {"transformers_binary": hf.transformers_binary()},
        "load_timeout_seconds": LOAD_TIMEOUT,
        **top,
    }


def words(text: str) -> list[str]:
    """The answer's words; the tiny models may emit nothing else."""
    found = text.split()
    assert all(w.isascii() and w.isalpha() and w.islower() for w in found), text
    return found


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_openai_client_chat_completions_responses_and_transcription(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    chat_dir, whisper_dir = hf.chat_model_dir(), hf.whisper_model_dir()
    config = make_config(
        [
            hf_model("chat", chat_dir, tmp_path, vram_mb=500, aliases=["tiny-hf"]),
            hf_model("whisper", whisper_dir, tmp_path, vram_mb=200, model_type="transcription"),
        ],
        **hf_top(preload_models=["chat", "whisper"]),  # both load at once
    )
    async with serve(config) as app:
        client = openai.AsyncOpenAI(base_url=app.base_url + "/v1", api_key="unused", max_retries=0)
        try:
            chat = await client.chat.completions.create(
                model="tiny-hf", messages=[{"role": "user", "content": "Hello"}], max_tokens=12
            )
            # The server names its pinned model DIR@main in replies; dynllm passes it on.
            assert chat.model == f"{chat_dir}@main"
            assert chat.choices[0].finish_reason == "length"
            assert chat.usage is not None and chat.usage.completion_tokens == 12
            assert len(words(chat.choices[0].message.content or "")) == 12

            stream = await client.chat.completions.create(
                model="chat",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=20,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
            pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
            assert len([p for p in pieces if p]) == 20
            assert len(words("".join(pieces))) == 20
            assert chunks[-1].choices[-1].finish_reason == "length"

            completion = await client.completions.create(
                model="chat", prompt="Once upon", max_tokens=8
            )
            assert completion.choices[0].finish_reason == "length"
            assert len(words(completion.choices[0].text)) == 8
            stream2 = await client.completions.create(
                model="chat", prompt="Once upon", max_tokens=8, stream=True
            )
            texts = [c.choices[0].text async for c in stream2 if c.choices]
            assert len(words("".join(texts))) == 8

            # transformers serve streams /v1/responses unless the body says
            # "stream": false (OpenAI's default is false): dynllm fills it in.
            response = await client.responses.create(
                model="chat", input="Hi there", max_output_tokens=6
            )
            assert response.status == "completed"
            assert len(words(response.output_text)) == 6
            events = await client.responses.create(
                model="chat", input="Hi there", max_output_tokens=6, stream=True
            )
            deltas = [e.delta async for e in events if e.type == "response.output_text.delta"]
            assert len(deltas) == 6

            with pytest.raises(openai.UnprocessableEntityError):  # the backend's own 422
                await client.chat.completions.create(
                    model="chat", messages=[], max_tokens=1, extra_body={"no_such_field": 1}
                )

            transcript = await client.audio.transcriptions.create(
                model="whisper", file=("tone.wav", hf.tiny_wav(), "audio/wav")
            )
            assert words(transcript.text), transcript
        finally:
            await client.close()

        admin = await app.admin_models()
        assert {admin[m]["status"] for m in ("chat", "whisper")} == {"loaded"}
        assert admin["chat"]["load_count"] == 1 and admin["whisper"]["load_count"] == 1
        assert admin["chat"]["in_flight"] == 0


async def sse(response: httpx.Response) -> AsyncIterator[Any]:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def content(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )


def stream_body(model: str, tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        "stream": True,
    }


async def stream_all(app: RunningApp, model: str, tokens: int) -> tuple[list[Any], float, float]:
    """A whole streamed chat: its events, when its first and last bytes came."""
    async with app.client.stream(
        "POST", "/v1/chat/completions", json=stream_body(model, tokens)
    ) as r:
        assert r.status_code == 200, await r.aread()
        events, first = [], 0.0
        async for event in sse(r):
            first = first or time.monotonic()
            events.append(event)
    return events, first, time.monotonic()


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
        await task


def assert_whole(events: list[Any], tokens: int) -> None:
    """Every token came and the last chunk says "length".  transformers serve
    ends its streams without the ``data: [DONE]`` line OpenAI sends."""
    chunks = [e for e in events if e != "[DONE]"]
    assert len(words(content(chunks))) == tokens
    assert chunks[-1]["choices"][0].get("finish_reason") == "length", chunks[-1]


async def test_busy_model_is_not_evicted_then_evicted_then_idle_unloaded(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    """Two models that do not fit together.  While A streams, B's request
    queues (A is busy); when A's stream has ended whole, B's load evicts A.
    B's own long stream outlasts its unload_time and is not cut; B unloads on
    time after it."""
    chat_dir = hf.chat_model_dir()
    unload_time, check_every = 0.5, 0.25
    config = make_config(
        [
            hf_model("A", chat_dir, tmp_path, vram_mb=6000),
            hf_model("B", chat_dir, tmp_path, vram_mb=6000, unload_time=unload_time),
        ],
        **hf_top(total_vram_mb=8000, idle_check_interval_seconds=check_every),
    )
    tokens = 600  # a few hundred tokens/s on one thread: seconds of streaming
    async with serve(config) as app, contextlib.AsyncExitStack() as stack:
        slots = app.services.scheduler.slots
        async with app.client.stream(
            "POST", "/v1/chat/completions", json=stream_body("A", tokens)
        ) as response:
            assert response.status_code == 200
            a_events = sse(response)
            a_seen = [await anext(a_events)]
            pid_a = (await app.admin_models())["A"]["pid"]
            assert slots["A"].in_flight == 1

            b_task = asyncio.create_task(stream_all(app, "B", tokens))
            stack.push_async_callback(cancel, b_task)  # whatever fails below, B's goes
            await apoll(lambda: app.services.scheduler.waiting(slots["B"]) == 1, 30)
            # B waits for VRAM: nothing is loading and A still runs its stream.
            assert slots["B"].state.value == "unloaded" and slots["A"].in_flight == 1
            assert alive(pid_a)
            a_seen += [e async for e in a_events]
            a_end = time.monotonic()

        assert_whole(a_seen, tokens)
        b_events, b_first, b_end = await b_task
        assert b_first > a_end, "B was served before A's stream had ended"
        assert not alive(pid_a), "B's load did not evict A"
        assert_whole(b_events, tokens)

        # B's stream lasted longer than its unload_time, yet B stayed loaded.
        b_streamed = b_end - b_first
        assert b_streamed > unload_time, f"B's stream took only {b_streamed:.2f} s"
        admin = await app.admin_models()
        assert admin["A"]["status"] == "unloaded" and admin["A"]["pid"] is None
        assert admin["B"]["status"] == "loaded" and alive(admin["B"]["pid"])
        pid_b = admin["B"]["pid"]

        await apoll(lambda: slots["B"].state.value == "unloaded", timeout=10, interval=0.05)
        unloaded_after = time.monotonic() - b_end
        print(
            f"A streamed {tokens} tokens whole while B queued; B streamed for {b_streamed:.1f} s "
            f"(unload_time {unload_time} s) and unloaded {unloaded_after:.2f} s after its end"
        )
        assert unload_time <= unloaded_after <= unload_time + check_every + 1.5, unloaded_after
        await apoll(lambda: not alive(pid_b), timeout=5)
