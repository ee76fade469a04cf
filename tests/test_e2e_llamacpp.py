"""End to end with the real llama.cpp ``llama-server`` and tiny generated GGUF models.

Driven through the official ``openai`` client, streaming and not, plus the
crash-safety guarantee: kill -9 dynllm and no backend survives it.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
import openai
import psutil
import pytest

from dynllm.app import instance_marker
from tests.conftest import (
    ConfigFactory,
    backends_with_marker,
    poll,
    serve,
)
from tests.support.binaries import llama_server_binary
from tests.support.net import http_ok

LLAMA = {"context_size": 256, "n_gpu_layers": 0, "extra_args": ["-t", "1", "--no-webui"]}


def real_models(**extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": "tiny",
            "path": "tiny.gguf",
            "vram_mb": 300,
            "aliases": ["tiny-chat"],
            **LLAMA,
            **extra,
        },
        {"name": "tiny2", "path": "tiny2.gguf", "vram_mb": 300, **LLAMA, **extra},
        {"name": "embed", "path": "embed.gguf", "vram_mb": 100, "model_type": "embedding", **LLAMA},
    ]


def real_backend(**top: Any) -> dict[str, Any]:
    return {"backend": {"llamacpp_binary": llama_server_binary()}, **top}


async def test_openai_client_chat_completions_responses_and_embeddings(
    make_config: ConfigFactory,
) -> None:
    config = make_config(real_models(), **real_backend())
    async with serve(config) as app:
        client = openai.AsyncOpenAI(base_url=app.base_url + "/v1", api_key="unused", max_retries=0)
        try:
            chat = await client.chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=12
            )
            assert chat.model == "tiny"
            assert chat.choices[0].finish_reason == "length"
            assert chat.usage is not None and chat.usage.completion_tokens == 12
            text = chat.choices[0].message.content or ""
            assert len(text.split()) >= 6

            stream = await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=20,
                stream=True,
            )
            pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            assert len([p for p in pieces if p]) == 20
            assert len("".join(pieces).split()) >= 10

            completion = await client.completions.create(
                model="tiny", prompt="Once upon", max_tokens=8
            )
            assert completion.choices[0].finish_reason == "length"
            assert completion.choices[0].text.strip()

            stream2 = await client.completions.create(
                model="tiny", prompt="Once upon", max_tokens=8, stream=True
            )
            texts = [c.choices[0].text async for c in stream2 if c.choices]
            assert len([t for t in texts if t]) == 8

            response = await client.responses.create(
                model="tiny-chat", input="Hello", max_output_tokens=6
            )
            assert response.output_text.strip()

            embedding = await client.embeddings.create(model="embed", input=["hello world", "bye"])
            assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 64

            models = await client.models.list()
            # The models, then each alias as its own entry (Open WebUI lists it).
            assert {m.id for m in models.data} == {"tiny", "tiny2", "embed", "tiny-chat"}

            with pytest.raises(openai.NotFoundError) as missing:
                await client.chat.completions.create(model="nope", messages=[], max_tokens=1)
            assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
            with pytest.raises(openai.BadRequestError) as wrong:
                await client.embeddings.create(model="tiny", input="x")
            assert wrong.value.body["code"] == "model_type_mismatch"  # type: ignore[index]
        finally:
            await client.close()
        admin = await app.admin_models()
        assert admin["tiny"]["status"] == "loaded" and admin["embed"]["status"] == "loaded"
        assert admin["tiny"]["in_flight"] == 0


async def test_backend_error_passes_through_and_backend_survives(
    make_config: ConfigFactory,
) -> None:
    config = make_config(real_models(), **real_backend())
    async with serve(config) as app:
        assert (await app.chat("tiny", max_tokens=2)).status_code == 200
        pid = (await app.admin_models())["tiny"]["pid"]
        bad = await app.client.post("/v1/chat/completions", json={"model": "tiny"})  # no messages
        assert bad.status_code == 400
        assert "error" in bad.json()
        garbage = await app.client.post(
            "/v1/chat/completions",
            content=b'{"model": "tiny", "messages": [',
            headers={"content-type": "application/json"},
        )
        assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "invalid_json"
        ok = await app.chat("tiny", max_tokens=2)
        assert ok.status_code == 200
        assert (await app.admin_models())["tiny"]["pid"] == pid


def test_sigkill_leaves_no_backend_and_restart_recovers(
    make_config: ConfigFactory, dynllm_process: Any
) -> None:
    path, config = make_config.write_and_load(real_models(), **real_backend(total_vram_mb=8000))
    base = f"http://127.0.0.1:{config.server.port}"
    with httpx.Client(base_url=base, timeout=60, trust_env=False) as http:
        proc = dynllm_process(path)
        poll(lambda: http_ok(http), 30)
        for model in ("tiny", "tiny2"):
            r = http.post(
                "/v1/chat/completions", json={"model": model, "messages": [], "max_tokens": 2}
            )
            assert r.status_code == 200, r.text
        admin = {m["name"]: m for m in http.get("/admin/models").json()["models"]}
        pids = [admin["tiny"]["pid"], admin["tiny2"]["pid"]]
        assert all(psutil.pid_exists(p) for p in pids)
        marked = {p.pid for p in backends_with_marker({instance_marker(config)})}
        assert marked == set(pids)  # the leak check below really sees these two

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        killed = time.monotonic()
        poll(lambda: not backends_with_marker({instance_marker(config)}), 2.0, 0.02)
        gone_after = time.monotonic() - killed
        print(f"both llama-server backends gone {gone_after * 1000:.0f} ms after kill -9 of dynllm")
        assert gone_after <= 2.0

        dynllm_process(path)
        poll(lambda: http_ok(http), 30)
        admin = {m["name"]: m for m in http.get("/admin/models").json()["models"]}
        assert admin["tiny"]["status"] == "unloaded" and admin["tiny2"]["status"] == "unloaded"
        assert admin["tiny"]["pid"] is None and admin["tiny2"]["pid"] is None
        assert admin["tiny"]["load_count"] == 1  # history survives the restart
        r = http.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": [], "max_tokens": 2}
        )
        assert r.status_code == 200
        admin = {m["name"]: m for m in http.get("/admin/models").json()["models"]}
        assert admin["tiny"]["status"] == "loaded" and admin["tiny"]["pid"] not in pids
