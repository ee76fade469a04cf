"""End to end with the ``command`` backend and two real servers it knows nothing about:

- Piper text to speech served by ``local-tts`` (OpenAI ``POST /v1/audio/speech``),
  driven through the official ``openai`` client;
- a KServe v2 ``ModelServer`` with a numpy classifier, driven with plain httpx:
  readiness without loading, metadata loading on demand, JSON inference, and
  the binary tensor extension passed through byte for byte both ways.

Each backend is also started directly from the adapter's own argv, so a
failure there tells a backend problem apart from a dynllm one.  The venvs come
from tests/support/env_tts.py and env_kserve.py; without them these tests are
skipped, loudly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import psutil
import pytest

from dynllm.app import instance_marker
from dynllm.backends import adapter_for, command_line
from dynllm.config import Config, ModelConfig
from tests.conftest import ConfigFactory, backends_with_marker, poll, serve
from tests.support import env_kserve, env_tts
from tests.support.net import free_port, http_ok

TEXT = "Hello from dynllm, speaking through Piper."


def tts_model(data_dir: Path) -> dict[str, Any]:
    return {
        "name": "piper",
        "aliases": ["tts-1"],
        "path": str(data_dir),
        "backend": "command",
        "model_type": "speech",
        "vram_mb": 0,
        "command": [*env_tts.local_tts_argv(), "--host", "{host}", "--port", "{port}"],
        "env": env_tts.write_settings(data_dir),
        "health_path": env_tts.HEALTH_PATH,
    }


def kserve_model(data_dir: Path) -> dict[str, Any]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return {
        "name": "digits",
        "aliases": ["mnist"],
        "path": str(data_dir),
        "backend": "command",
        "model_type": "classification",
        "vram_mb": 0,
        "command": env_kserve.server_argv("{port}", "{name}"),
        # the model-level route: 200 only once the model answers inference
        "health_path": "/v2/models/{name}/ready",
    }


def command_config(make_config: ConfigFactory, model: dict[str, Any]) -> Config:
    return make_config([model], enabled_backends=["command"], total_vram_mb=1000)


def assert_wav(data: bytes, min_seconds: float = 1.0) -> float:
    """A real RIFF/WAVE file with speech-length audio; its duration in seconds."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE", data[:16]
    with wave.open(io.BytesIO(data)) as wav:
        assert wav.getnchannels() == 1 and wav.getsampwidth() == 2
        assert wav.getframerate() == 22050  # en_US-joe-medium
        seconds = wav.getnframes() / wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    assert min_seconds < seconds < 10.0, seconds
    assert int(np.abs(samples).max()) > 1000  # not silence
    return seconds


def binary_infer_request() -> tuple[bytes, dict[str, str]]:
    """A KServe v2 binary-extension request: JSON header, then the raw FP32 tensor."""
    scores = np.array([[0.5, 3.0, -1.0, 0.25], [4.0, 1.0, 2.0, 3.5]], dtype="<f4")
    header = json.dumps(
        {
            "id": "binary-1",
            "inputs": [
                {
                    "name": "scores",
                    "shape": list(scores.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": scores.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    return header + scores.tobytes(), headers


def check_binary_answer(response: httpx.Response) -> None:
    """The binary answer decodes to the right softmax and argmax."""
    assert response.status_code == 200, response.text
    n = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:n])
    assert header["id"] == "binary-1" and header["model_name"] == "digits"
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in header["outputs"]}
    assert sizes == {"probabilities": 32, "label": 16}
    probabilities = np.frombuffer(response.content[n : n + 32], dtype="<f4").reshape(2, 4)
    label = np.frombuffer(response.content[n + 32 :], dtype="<i8")
    assert label.tolist() == [1, 0]
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert len(response.content) == n + 48


# ---- the backends on their own, started from the adapter's argv -------------


@contextmanager
def started_directly(config: Config, model: ModelConfig) -> Iterator[httpx.Client]:
    """Start ``model``'s backend from the command backend's argv; stop its group after."""
    port = free_port()
    adapter = adapter_for(model)
    argv = command_line(config, model, port)
    env = adapter.env(os.environ, model, marker="direct-test")
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as http:
            started = time.monotonic()
            poll(lambda: proc.poll() is not None or http_ok(http, adapter.probe(model)), 30, 0.05)
            assert proc.poll() is None, f"{argv} exited {proc.returncode}"
            print(f"{model.name}: ready {time.monotonic() - started:.2f} s after spawn")
            listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN}  # fmt: skip
            assert listening == {"127.0.0.1"}, listening
            yield http
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_local_tts_directly(make_config: ConfigFactory, tmp_path: Path) -> None:
    config = command_config(make_config, tts_model(tmp_path / "tts"))
    with started_directly(config, config.models[0]) as http:
        # Why health_path is /api/health: the web UI's catch-all answers /health with HTML.
        trap = http.get("/health")
        assert trap.status_code == 200 and trap.headers["content-type"].startswith("text/html")
        assert http.get(env_tts.HEALTH_PATH).json()["ok"] is True
        r = http.post("/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "voice": "x"})
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        assert_wav(r.content)


def test_kserve_model_server_directly(make_config: ConfigFactory, tmp_path: Path) -> None:
    config = command_config(make_config, kserve_model(tmp_path / "ks"))
    with started_directly(config, config.models[0]) as http:
        assert http.get("/v2/models/digits").json()["inputs"][0]["name"] == "scores"
        body, headers = binary_infer_request()
        check_binary_answer(http.post("/v2/models/digits/infer", content=body, headers=headers))
        json_infer = http.post(
            "/v2/models/digits/infer",
            json={"inputs": [{"name": "scores", "shape": [1, 3], "datatype": "FP32",
                              "data": [1.0, 2.0, 3.0]}]},
        )  # fmt: skip
        assert json_infer.status_code == 200
        outputs = {o["name"]: o["data"] for o in json_infer.json()["outputs"]}
        assert outputs["label"] == [2]


# ---- through dynllm ---------------------------------------------------------


async def test_piper_speech_through_dynllm(make_config: ConfigFactory, tmp_path: Path) -> None:
    config = command_config(make_config, tts_model(tmp_path / "tts"))
    async with serve(config) as app:
        assert (await app.admin_models())["piper"]["pid"] is None
        client = openai.AsyncOpenAI(base_url=app.base_url + "/v1", api_key="unused", max_retries=0)
        try:
            started = time.monotonic()
            async with client.audio.speech.with_streaming_response.create(
                model="piper", voice="alloy", input=TEXT, response_format="wav"
            ) as streamed:
                assert streamed.status_code == 200
                assert streamed.headers["content-type"] == "audio/wav"
                chunks = [chunk async for chunk in streamed.iter_bytes()]
            seconds = assert_wav(b"".join(chunks))
            print(f"cold speech request {time.monotonic() - started:.2f} s, {seconds:.2f} s audio")

            spoken = await client.audio.speech.create(model="tts-1", voice="alloy", input="Bye.")
            assert spoken.response.headers["content-type"] == "audio/wav"
            assert_wav(spoken.content, min_seconds=0.2)

            with pytest.raises(openai.BadRequestError):  # a speech model does not chat
                await client.chat.completions.create(model="piper", messages=[])
        finally:
            await client.close()
        admin = (await app.admin_models())["piper"]
        assert admin["status"] == "loaded" and admin["load_count"] == 1
        assert admin["in_flight"] == 0
        backend = psutil.Process(admin["pid"])
        assert "--port" in backend.cmdline() and "{port}" not in backend.cmdline()


async def test_kserve_through_dynllm(make_config: ConfigFactory, tmp_path: Path) -> None:
    config = command_config(make_config, kserve_model(tmp_path / "ks"))
    async with serve(config) as app:
        http = app.client
        # Readiness is answered by dynllm and never loads the model.
        ready = await http.get("/v2/models/digits/ready")
        assert ready.status_code != 200, ready.text
        assert (await http.get("/v2/models/nope/ready")).status_code == 404
        assert (await app.admin_models())["digits"]["pid"] is None
        assert not backends_with_marker({instance_marker(config)})

        # Metadata loads on demand and comes from the real server.
        started = time.monotonic()
        metadata = await http.get("/v2/models/digits")
        assert metadata.status_code == 200, metadata.text
        print(f"cold KServe metadata request {time.monotonic() - started:.2f} s")
        assert metadata.json()["name"] == "digits"
        assert [i["name"] for i in metadata.json()["inputs"]] == ["scores"]
        assert [o["name"] for o in metadata.json()["outputs"]] == ["probabilities", "label"]
        ready = await http.get("/v2/models/digits/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True

        # JSON inference, by name and by alias (the URL's name is rewritten).
        payload = {
            "inputs": [
                {"name": "scores", "shape": [2, 3], "datatype": "FP32",
                 "data": [1.0, 2.0, 3.0, 3.0, 2.0, 1.0]}
            ]
        }  # fmt: skip
        for name in ("digits", "mnist"):
            r = await http.post(f"/v2/models/{name}/infer", json=payload)
            assert r.status_code == 200, r.text
            assert r.json()["model_name"] == "digits"
            outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
            assert outputs["label"] == [2, 0]
            assert outputs["probabilities"][2] == pytest.approx(0.66524094, rel=1e-5)

        # The binary extension: the same bytes as the backend answers directly.
        body, headers = binary_infer_request()
        proxied = await http.post("/v2/models/digits/infer", content=body, headers=headers)
        check_binary_answer(proxied)
        pid = (await app.admin_models())["digits"]["pid"]
        argv = psutil.Process(pid).cmdline()
        port = int(argv[argv.index("--http_port") + 1])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as raw:
            direct = await raw.post("/v2/models/digits/infer", content=body, headers=headers)
            version_direct = await raw.get("/v2/models/digits/versions/1")
        check_binary_answer(direct)
        assert hashlib.sha256(proxied.content).hexdigest() == (
            hashlib.sha256(direct.content).hexdigest()
        )
        assert (
            proxied.headers["inference-header-content-length"]
            == (direct.headers["inference-header-content-length"])
        )

        # A versioned path goes through with its version: kserve refuses versions
        # (501), and that answer comes back (dynllm re-encodes error bodies).
        version = await http.get("/v2/models/digits/versions/1")
        assert version_direct.status_code == 501
        assert (version.status_code, version.json()) == (501, version_direct.json())
        admin = (await app.admin_models())["digits"]
        assert admin["status"] == "loaded" and admin["load_count"] == 1
