"""End to end through dynllm with the ``ovms`` stand-in (real openvino-genai
inference on tiny IR models) as the OpenVINO backend.

Every OpenAI route is driven with the official ``openai`` client where it has
a method; rerank and KServe with plain httpx.  The KServe binary extension
must pass through dynllm byte for byte (hashes compared with the backend's
own answer).  Then the scheduler's promises with OVMS backends: a VRAM budget
makes B evict A, a model with a stream in flight is never evicted (B waits),
and idle models unload on time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import struct
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.conftest import ConfigFactory, apoll, serve
from tests.support import env_ovms
from tests.test_ovms_standin import wav_bytes

TYPES = {
    "llm": "llm",
    "embedding": "embedding",
    "rerank": "rerank",
    "whisper": "transcription",
    "speecht5": "speech",
    "image": "image_generation",
    "classifier": "classification",
}


def ov_model(name: str, kind: str, vram_mb: int = 100, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "path": str(env_ovms.ir_model(kind)),
        "backend": "openvino",
        "model_type": TYPES[kind],
        "vram_mb": vram_mb,
        **extra,
    }


def ov_top(tmp_path: Path, **top: Any) -> dict[str, Any]:
    return {
        "enabled_backends": ["llamacpp", "openvino"],
        "backend": {"ovms_binary": str(env_ovms.ovms_binary(tmp_path / "bin"))},
        **top,
    }


def client_for(app: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=app.base_url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.AsyncClient(trust_env=False, timeout=120),
    )


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_chat_completions_embeddings_rerank(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = make_config(
        [
            ov_model("ov-chat", "llm", aliases=["ov-chat-alias"]),
            ov_model("ov-embed", "embedding"),
            ov_model("ov-rerank", "rerank"),
        ],
        **ov_top(tmp_path),
    )
    async with serve(config) as app:
        client = client_for(app)
        try:
            chat = await client.chat.completions.create(
                model="ov-chat-alias",
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=10,
            )
            assert chat.model == "ov-chat"
            assert chat.choices[0].finish_reason == "length"
            assert len((chat.choices[0].message.content or "").split()) == 10
            assert chat.usage is not None and chat.usage.completion_tokens == 10

            stream = await client.chat.completions.create(
                model="ov-chat",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=14,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert len(text.split()) == 14
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 14

            completion = await client.completions.create(
                model="ov-chat", prompt="Once upon", max_tokens=6
            )
            assert len(completion.choices[0].text.split()) == 6
            stream2 = await client.completions.create(
                model="ov-chat", prompt="Once upon", max_tokens=6, stream=True
            )
            texts = [c.choices[0].text async for c in stream2 if c.choices]
            assert len("".join(texts).split()) == 6

            embedding = await client.embeddings.create(model="ov-embed", input=["hello", "tree"])
            vectors = [d.embedding for d in embedding.data]
            assert len(vectors) == 2 and len(vectors[0]) == 32 and vectors[0] != vectors[1]
            assert abs(sum(v * v for v in vectors[0]) - 1) < 1e-3
        finally:
            await client.close()

        rerank = await app.client.post(
            "/v1/rerank",
            json={
                "model": "ov-rerank",
                "query": "house",
                "top_n": 2,
                "documents": ["a big house", "water", "the tree"],
            },
        )
        assert rerank.status_code == 200, rerank.text
        results = rerank.json()["results"]
        assert len(results) == 2
        assert results[0]["relevance_score"] >= results[1]["relevance_score"]
        admin = await app.admin_models()
        assert {admin[m]["status"] for m in ("ov-chat", "ov-embed", "ov-rerank")} == {"loaded"}


async def test_ovms_errors_keep_their_status_in_openai_shape(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = make_config([ov_model("ov-chat", "llm")], **ov_top(tmp_path))
    async with serve(config) as app:
        bad = await app.client.post(
            "/v1/chat/completions", json={"model": "ov-chat", "messages": [], "max_tokens": 2}
        )
        assert bad.status_code == 400  # OVMS: "Mediapipe execution failed - Messages array ..."
        error = bad.json()["error"]
        assert isinstance(error, dict) and "Messages array cannot be empty" in error["message"]
        ok = await app.chat("ov-chat", max_tokens=2)
        assert ok.status_code == 200


# The openai client marks its translations method deprecated; the route is still OpenAI's.
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
async def test_audio_transcription_translation_speech(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = make_config(
        [ov_model("ov-whisper", "whisper"), ov_model("ov-speech", "speecht5")], **ov_top(tmp_path)
    )
    async with serve(config) as app:
        client = client_for(app)
        try:
            audio = ("a.wav", wav_bytes(), "audio/wav")
            transcript = await client.audio.transcriptions.create(model="ov-whisper", file=audio)
            assert len(transcript.text.split()) >= 3
            translation = await client.audio.translations.create(model="ov-whisper", file=audio)
            assert len(translation.text.split()) >= 3
            speech = await client.audio.speech.create(
                model="ov-speech", voice="alloy", input="hello world", response_format="wav"
            )
            with wave.open(io.BytesIO(speech.content)) as w:
                assert w.getframerate() == 16000 and w.getnframes() > 1000
        finally:
            await client.close()


async def test_image_generation(make_config: ConfigFactory, tmp_path: Path) -> None:
    config = make_config([ov_model("ov-image", "image")], **ov_top(tmp_path))
    async with serve(config) as app:
        client = client_for(app)
        try:
            result = await client.images.generate(
                model="ov-image",
                prompt="a red house",
                size="32x32",  # type: ignore[arg-type]
                n=1,
                extra_body={"num_inference_steps": 2},
            )
        finally:
            await client.close()
        assert result.data is not None
        png = base64.b64decode(result.data[0].b64_json or "")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", png[16:24]) == (32, 32)


def binary_infer_request() -> tuple[bytes, dict[str, str]]:
    header = env_ovms.classifier_binary_header()
    return header + env_ovms.CLASSIFIER_VALUES, env_ovms.binary_headers(header)


async def test_kserve_json_and_binary_pass_through_byte_identical(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = make_config([ov_model("ov-cls", "classifier")], **ov_top(tmp_path))
    async with serve(config) as app:
        # Readiness of an unloaded model is answered by dynllm: no backend is spawned.
        not_ready = await app.client.get("/v2/models/ov-cls/ready")
        assert not_ready.status_code == 400
        admin = (await app.admin_models())["ov-cls"]
        assert admin["status"] == "unloaded" and admin["pid"] is None

        body = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "data": [0.5, -1.0, 2.0, 0.25],
                }
            ]
        }
        reply = await app.client.post("/v2/models/ov-cls/infer", json=body)
        assert reply.status_code == 200, reply.text
        (out,) = reply.json()["outputs"]
        assert out["shape"] == [1, 3] and abs(sum(out["data"]) - 1) < 1e-5
        assert (await app.client.get("/v2/models/ov-cls/ready")).status_code == 200
        meta = await app.client.get("/v2/models/ov-cls")
        assert meta.json()["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [1, 4]}]

        content, headers = binary_infer_request()
        via = await app.client.post("/v2/models/ov-cls/infer", content=content, headers=headers)
        assert via.status_code == 200, via.text
        port = (await app.admin_models())["ov-cls"]["port"]
        async with httpx.AsyncClient(trust_env=False) as direct_client:
            direct = await direct_client.post(
                f"http://127.0.0.1:{port}/v2/models/ov-cls/infer", content=content, headers=headers
            )
        assert direct.status_code == 200
        assert hashlib.sha256(via.content).hexdigest() == hashlib.sha256(direct.content).hexdigest()
        length = int(via.headers["Inference-Header-Content-Length"])
        assert length == int(direct.headers["Inference-Header-Content-Length"])
        assert via.content[length:] == struct.pack("<3f", *out["data"])


async def test_budget_eviction_busy_model_kept_and_idle_unload(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    """A and B do not fit together.  A streams slowly (the stand-in's token
    delay); B's request waits while A is busy, then B's load evicts A (its
    process gone).  B unloads on time once idle."""
    unload_time, check_every = 1.0, 0.25
    slow = {"OVMS_STANDIN_TOKEN_DELAY_MS": "15"}
    config = make_config(
        [
            ov_model("A", "llm", vram_mb=6000, env=slow),
            ov_model("B", "embedding", vram_mb=6000, unload_time=unload_time),
        ],
        **ov_top(tmp_path, total_vram_mb=8000, idle_check_interval_seconds=check_every),
    )
    tokens = 120  # ~2 s at 15 ms a token
    body = {
        "model": "A",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": tokens,
        "stream": True,
    }
    async with serve(config) as app:
        slots = app.services.scheduler.slots
        async with app.client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            first = await anext(lines)
            while first.startswith(":") or not first:  # loading-progress comments
                first = await anext(lines)
            assert first.startswith("data: ")
            pid_a = (await app.admin_models())["A"]["pid"]
            b_task = asyncio.create_task(
                app.client.post("/v1/embeddings", json={"model": "B", "input": "x"})
            )
            await apoll(lambda: app.services.scheduler.waiting(slots["B"]) == 1, 30)
            assert slots["A"].in_flight == 1 and alive(pid_a)
            rest = [line async for line in lines]
            a_end = time.monotonic()
        data = [x[len("data: ") :] for x in [first, *rest] if x.startswith("data: ")]
        assert data[-1] == "[DONE]"  # A's stream ended whole, not cut by B's load
        events = [json.loads(x) for x in data[:-1]]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert len(text.split()) == tokens

        b = await b_task
        assert b.status_code == 200, b.text
        assert not alive(pid_a), "B's load did not evict A"
        admin = await app.admin_models()
        assert admin["A"]["status"] == "unloaded" and admin["B"]["status"] == "loaded"
        pid_b = admin["B"]["pid"]
        b_done = time.monotonic()
        assert b_done >= a_end

        await apoll(lambda: slots["B"].state.value == "unloaded", timeout=10, interval=0.05)
        unloaded_after = time.monotonic() - b_done
        print(f"B unloaded {unloaded_after:.2f} s after its last request (unload_time 1 s)")
        assert unloaded_after <= unload_time + check_every + 1.5
        await apoll(lambda: not alive(pid_b), timeout=5)
