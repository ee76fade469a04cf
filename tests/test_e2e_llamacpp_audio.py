"""Audio transcription on the real llama-server: a tiny text model plus a tiny
audio projector (``--mmproj``), first directly, then through dynllm with the
official ``openai`` client.

The weights are random, so the "transcript" is plain words from the tiny
vocabulary; what is checked is the route, the multipart body, the JSON answer
and that generation stops at the token limit (a random model never ends on its
own, so every request passes ``max_tokens``).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import ConfigFactory, serve
from tests.support.binaries import llama_server_binary
from tests.support.llama_run import running_llama_server
from tests.support.tiny_mmproj import write_tiny_audio_mmproj

# A 1 s clip still becomes ~750 audio tokens (Whisper pads to its 30 s window,
# the projector halves it), so the context must hold them plus the prompt.
CONTEXT = 2048
MAX_TOKENS = 8


def tone_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return out.getvalue()


@pytest.fixture
def projector(tmp_path: Path) -> Path:
    # projection_dim 64 = tiny.gguf's width
    return write_tiny_audio_mmproj(tmp_path / "tiny-audio-mmproj.gguf", projection_dim=64)


@pytest.fixture
def llama_server(models_dir: Path, tmp_path: Path) -> Iterator[Callable[..., httpx.Client]]:
    """Starts real llama-servers on free ports; stops and reaps every one."""
    numbers = itertools.count()
    with contextlib.ExitStack() as stack:

        def start(*extra: str) -> httpx.Client:
            log = tmp_path / f"llama-server-{next(numbers)}.log"
            return stack.enter_context(
                running_llama_server(models_dir / "tiny.gguf", log, *extra, context=CONTEXT)
            )

        yield start


def test_llama_server_transcribes_with_the_tiny_projector(
    llama_server: Callable[..., httpx.Client], projector: Path
) -> None:
    start = llama_server
    http = start("--mmproj", str(projector))
    form = {"model": "anything", "response_format": "json", "max_tokens": str(MAX_TOKENS)}
    files = {"file": ("tone.wav", tone_wav(), "audio/wav")}

    began = time.monotonic()
    r = http.post("/v1/audio/transcriptions", data=form, files=files)
    took = time.monotonic() - began
    assert r.status_code == 200, r.text
    body = r.json()
    print(f"llama-server transcription in {took * 1000:.0f} ms: {body}")
    assert len(body["text"].split()) == MAX_TOKENS  # every tiny-model token is one word
    assert body["usage"]["output_tokens"] == MAX_TOKENS
    assert body["usage"]["input_tokens"] > 500  # the audio really went in as tokens

    # The facts the adapter's routing rests on:
    assert http.post("/v1/audio/translations", data=form, files=files).status_code == 404
    text = http.post(
        "/v1/audio/transcriptions", data={**form, "response_format": "text"}, files=files
    )
    assert text.status_code == 400  # json only
    bare = start()  # no --mmproj
    refused = bare.post("/v1/audio/transcriptions", data=form, files=files)
    assert refused.status_code == 501, refused.text


async def test_openai_client_transcription_through_dynllm(
    make_config: ConfigFactory, projector: Path
) -> None:
    config = make_config(
        [
            {
                "name": "tiny-asr",
                "path": "tiny.gguf",
                "model_type": "transcription",
                "mmproj": str(projector),
                "vram_mb": 300,
                "context_size": CONTEXT,
                "n_gpu_layers": 0,
                "extra_args": ["-t", "1", "--no-webui"],
                "aliases": ["asr"],
            }
        ],
        backend={"llamacpp_binary": llama_server_binary()},
    )
    async with serve(config) as app:
        client = openai.AsyncOpenAI(base_url=app.base_url + "/v1", api_key="unused", max_retries=0)
        try:
            began = time.monotonic()
            transcript = await client.audio.transcriptions.create(
                model="asr",
                file=("tone.wav", tone_wav(), "audio/wav"),
                response_format="json",
                extra_body={"max_tokens": MAX_TOKENS},
            )
            print(f"cold transcription through dynllm in {time.monotonic() - began:.2f} s")
            assert len(transcript.text.split()) == MAX_TOKENS
        finally:
            await client.close()
        admin = await app.admin_models()
        assert admin["tiny-asr"]["status"] == "loaded"
        assert admin["tiny-asr"]["in_flight"] == 0
