"""End to end with the real vLLM (CPU build) and a tiny random Qwen2, through dynllm.

Opt-in, because vLLM is a 3.5 GB install and an engine takes 25-45 s to start on
two cores: set ``DYNLLM_TEST_VLLM=1`` (the session then builds the venv, see
``tests/support/env_vllm.py``), or point ``DYNLLM_VLLM_BINARY`` at the ``vllm``
script of an existing install (the tiny model is then built with the python
next to it).  Otherwise the test is skipped, saying why.

Checked with the official ``openai`` client: chat (through an alias, so the
served-name rewrite is exercised), streamed chat, the Responses API, and
embeddings from the same checkpoint on the pooling runner.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from tests.conftest import ConfigFactory, serve
from tests.support import envs
from tests.support.env_vllm import BUILDER, TINY_QWEN2, VLLM_VENV

pytestmark = pytest.mark.timeout(900)

BINARY_ENV = "DYNLLM_VLLM_BINARY"
OPT_IN = "DYNLLM_TEST_VLLM"
HIDDEN_SIZE = 128  # the tiny Qwen2's width, so its embeddings' length


@pytest.fixture(scope="module")
def vllm_install(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The ``vllm`` script and the tiny model's folder, or a loud skip."""
    binary = os.environ.get(BINARY_ENV)
    if binary:
        python = Path(binary).with_name("python")
        out = tmp_path_factory.mktemp("vllm-tiny-qwen2")
        subprocess.run([python, BUILDER, "vllm-chat", out], check=True, timeout=600)
        return binary, out
    if os.environ.get(OPT_IN) != "1":
        # Even when the venv is cached: each run starts two engines (1-2 minutes).
        reason = f"vllm: opt-in; set {OPT_IN}=1 (or {BINARY_ENV}) to run the vLLM tests"
        envs.SKIPPED.append(reason)
        pytest.skip(f"BACKEND ENVIRONMENT UNAVAILABLE: {reason}")
    envs.require(VLLM_VENV)
    try:
        model = envs.ensure(TINY_QWEN2)
    except envs.Unavailable as exc:
        pytest.fail(f"the vLLM venv is built but the tiny model could not be: {exc}")
    return str(VLLM_VENV.bin("vllm")), model


def vllm_model(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "path": str(path),
        "backend": "vllm",
        "vram_mb": 1000,
        "context_size": 512,
        "dtype": "float32",
        "gpu_memory_utilization": 0.5,
        "load_timeout_seconds": 300,
        # No torch.compile warm-up: on two busy cores it took minutes (203 s to a
        # first answer, against ~60 s eager, measured on the same machine).
        "extra_args": ["--enforce-eager"],
        "env": {
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default wants far more than a test needs
            "VLLM_NO_USAGE_STATS": "1",
            "HF_HUB_OFFLINE": "1",
        },
        **extra,
    }


async def test_openai_client_chat_stream_and_embeddings(
    make_config: ConfigFactory, vllm_install: tuple[str, Path]
) -> None:
    binary, model_dir = vllm_install
    config = make_config(
        [
            vllm_model("tiny-vllm", model_dir, aliases=["vllm-chat"]),
            vllm_model("tiny-vllm-embed", model_dir, model_type="embedding"),
        ],
        enabled_backends=["vllm"],
        backend={"vllm_binary": binary},
        stop_timeout_seconds=20,
    )
    async with serve(config) as app:
        client = openai.AsyncOpenAI(base_url=app.base_url + "/v1", api_key="unused", max_retries=0)
        try:
            began = time.monotonic()
            chat = await client.chat.completions.create(
                model="vllm-chat",
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=12,
                extra_body={"ignore_eos": True},  # random weights: EOS may come at any step
            )
            cold = time.monotonic() - began
            assert chat.model == "tiny-vllm"  # the alias was rewritten to the served name
            assert chat.choices[0].finish_reason == "length"
            assert chat.usage is not None and chat.usage.completion_tokens == 12
            assert chat.choices[0].message.content

            began = time.monotonic()
            warm = await client.chat.completions.create(
                model="tiny-vllm",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=12,
                extra_body={"ignore_eos": True},
            )
            warm_s = time.monotonic() - began
            assert warm.usage is not None and warm.usage.completion_tokens == 12

            stream = await client.chat.completions.create(
                model="tiny-vllm",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=16,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            chunks = [c async for c in stream]
            finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
            usage = [c.usage for c in chunks if c.usage is not None]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert finishes[-1] == "length" and finishes.count("length") == 1
            assert len(finishes) >= 8  # tokens arrived as a stream, not as one piece
            assert len(usage) == 1 and usage[0].completion_tokens == 16
            assert text

            response = await client.responses.create(
                model="vllm-chat", input="Hi", max_output_tokens=8
            )
            assert response.model == "tiny-vllm"
            assert response.status == "incomplete" and response.incomplete_details is not None
            assert response.incomplete_details.reason == "max_output_tokens"
            assert response.usage is not None and response.usage.output_tokens <= 8

            began = time.monotonic()
            embedding = await client.embeddings.create(
                model="tiny-vllm-embed", input=["hello world", "bye"]
            )
            embed_cold = time.monotonic() - began
            assert [len(d.embedding) for d in embedding.data] == [HIDDEN_SIZE, HIDDEN_SIZE]
            assert embedding.data[0].embedding != embedding.data[1].embedding

            with pytest.raises(openai.BadRequestError):
                await client.embeddings.create(model="tiny-vllm", input="x")  # wrong type
        finally:
            await client.close()

        admin = await app.admin_models()
        assert admin["tiny-vllm"]["status"] == "loaded"
        assert admin["tiny-vllm-embed"]["status"] == "loaded"
        embed_argv = psutil.Process(admin["tiny-vllm-embed"]["pid"]).cmdline()
        chat_argv = psutil.Process(admin["tiny-vllm"]["pid"]).cmdline()
        assert embed_argv[-3:] == ["--runner", "pooling", "--enforce-eager"]
        assert "--runner" not in chat_argv
        print(
            f"\nvLLM via dynllm: cold chat (engine start + 12 tokens) {cold:.1f} s, "
            f"warm chat {warm_s:.2f} s, stream of {len(chunks)} chunks {text!r}, "
            f"cold embeddings {embed_cold:.1f} s"
        )
