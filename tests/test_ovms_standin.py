"""The ``ovms`` stand-in on its own: real inference for every task, OVMS's
readiness sequence, its CLI checks, its routing and error rules, and the
KServe binary extension both ways.

One stand-in per model kind is started per module (a load costs one to three
seconds on two cores) and killed at the end; each test polls with a deadline.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import struct
import subprocess
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import poll
from tests.support import env_ovms
from tests.support.net import free_port

LOAD_TIMEOUT = 60  # seconds; a cold load of the image pipeline on a busy 2-core box


class StandIn:
    """One running stand-in: its process, base URL and served name."""

    def __init__(
        self,
        binary: Path,
        tmp: Path,
        name: str,
        model: Path,
        task: str | None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.log = tmp / f"{name}-{self.port}.log"
        argv = [
            str(binary),
            "--rest_port",
            str(self.port),
            "--rest_bind_address",
            "127.0.0.1",
            "--port",
            "0",
            "--model_path",
            str(model),
            "--model_name",
            name,
            "--target_device",
            "CPU",
        ]
        if task:
            argv += ["--task", task]
        with open(self.log, "wb") as log:  # a file, not a pipe: nobody has to drain it
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env_ovms.standin_env(), **(env or {})},
            )
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}", timeout=30, trust_env=False
        )
        if wait:
            self.wait_available()

    def status(self, path: str) -> int | None:
        try:
            return self.http.get(path).status_code
        except httpx.TransportError:
            return None

    def wait_available(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"stand-in exited {self.proc.returncode}: {self.output()}")
            return self.status(f"/v2/models/{self.name}/ready") == 200

        poll(ready, timeout=LOAD_TIMEOUT, interval=0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def post(self, path: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
        return self.http.post(path, json=body, **kwargs)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ovms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return env_ovms.ovms_binary(tmp_path_factory.mktemp("ovms-bin"))


@pytest.fixture(scope="module")
def start(ovms: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """start(kind, task, name=kind, **kw) -> StandIn; every one is killed at the end."""
    started: list[StandIn] = []
    tmp = tmp_path_factory.mktemp("ovms-logs")

    def run(kind: str, task: str | None, name: str | None = None, **kw: Any) -> StandIn:
        standin = StandIn(ovms, tmp, name or kind, env_ovms.ir_model(kind), task, **kw)
        started.append(standin)
        return standin

    try:
        yield run
    finally:
        for standin in started:
            standin.stop()


def _shared(start: Any, kind: str, task: str | None, cache: dict[str, StandIn]) -> StandIn:
    if kind not in cache:
        cache[kind] = start(kind, task)
    return cache[kind]


@pytest.fixture(scope="module")
def servers(start: Any) -> Any:
    cache: dict[str, StandIn] = {}
    return lambda kind, task: _shared(start, kind, task, cache)


@pytest.fixture(scope="module")
def llm(servers: Any) -> StandIn:
    return servers("llm", "text_generation")


# ---------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rest_port", "0", "--port", "0"], "port and rest_port cannot have the same values"),
        (
            ["--rest_port", "9000", "--port", "9000"],
            "port and rest_port cannot have the same values",
        ),
        (
            ["--rest_port", "9000", "--task", "dance"],
            "error parsing options - --task parameter unsupported value: dance",
        ),
        (
            ["--rest_port", "9000", "--rest_bind_address", "::nope"],
            "rest_bind_address has invalid format",
        ),
        (["--rest_port", "9000", "--frobnicate", "1"], "error parsing options"),
    ],
)
def test_cli_rejects_bad_flags_with_ovms_exit_code(
    ovms: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    argv = [str(ovms), "--model_path", str(tmp_path), "--model_name", "m", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 64  # EX_USAGE
    assert message in done.stderr


def test_missing_model_dir_exits_1(ovms: Path, tmp_path: Path) -> None:
    port = free_port()
    argv = [
        str(ovms),
        "--rest_port",
        str(port),
        "--rest_bind_address",
        "127.0.0.1",
        "--port",
        "0",
        "--model_path",
        str(tmp_path / "absent"),
        "--model_name",
        "m",
        "--task",
        "embeddings",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "The provided base path is invalid" in done.stderr


# ----------------------------------------------------------------------- readiness
def test_readiness_sequence_and_bind_address(start: Any, tmp_path: Path) -> None:
    config_gate, load_gate = tmp_path / "config", tmp_path / "load"
    env = {"OVMS_STANDIN_CONFIG_GATE": str(config_gate), "OVMS_STANDIN_LOAD_GATE": str(load_gate)}
    s = start("embedding", "embeddings", name="gated", env=env, wait=False)
    body = {"model": "gated", "input": "hello"}

    # The REST port opens before the configuration is loaded.
    poll(lambda: s.status("/v2/health/ready") is not None, timeout=LOAD_TIMEOUT)
    not_ready = s.http.get("/v2/health/ready")
    assert not_ready.status_code == 503
    assert not_ready.json() == {"error": "Server is not ready"}
    assert s.http.get("/v2/health/live").status_code == 200

    config_gate.touch()
    poll(lambda: s.status("/v2/health/ready") == 200, timeout=10)
    loading = s.http.get("/v2/models/gated/ready")
    assert loading.status_code == 404
    assert loading.json() == {"error": "Model with requested name is not found"}
    early = s.post("/v3/embeddings", body)
    assert early.status_code == 404
    assert early.json() == {"error": "Mediapipe graph definition with requested name is not found"}
    assert s.http.get("/v1/config").json()["gated"]["model_version_status"][0]["state"] == "LOADING"

    load_gate.touch()
    s.wait_available()
    assert s.post("/v3/embeddings", body).status_code == 200
    assert s.http.get("/v1/config").json()["gated"]["model_version_status"][0]["state"] == (
        "AVAILABLE"
    )
    listening = [
        c.laddr
        for c in psutil.Process(s.proc.pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", s.port)]

    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=10) == 0


# ------------------------------------------------------------------ text generation
def test_chat_completions_real_generation(llm: StandIn) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    for path in ("/v3/chat/completions", "/v1/chat/completions"):
        reply = llm.post(path, {"model": "llm", "messages": messages, "max_tokens": 12})
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert data["object"] == "chat.completion" and data["model"] == "llm"
        choice = data["choices"][0]
        assert choice["finish_reason"] == "length"
        assert choice["message"]["role"] == "assistant"
        assert len(choice["message"]["content"].split()) == 12  # one word per token
        assert data["usage"]["completion_tokens"] == 12
        assert data["usage"]["prompt_tokens"] > 3


def test_chat_stream_is_sse_with_done(llm: StandIn) -> None:
    body = {
        "model": "llm",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with llm.http.stream("POST", "/v3/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text.split()) == 16
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_completions_stream_and_not(llm: StandIn) -> None:
    done = llm.post("/v3/completions", {"model": "llm", "prompt": "once upon", "max_tokens": 5})
    assert done.status_code == 200
    assert done.json()["object"] == "text_completion"
    assert len(done.json()["choices"][0]["text"].split()) == 5
    body = {"model": "llm", "prompt": "once upon", "max_tokens": 5, "stream": True}
    with llm.http.stream("POST", "/v1/completions", json=body) as reply:
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert events[-1] == "[DONE]" and len("".join(texts).split()) == 5


# ---------------------------------------------------------------------- error rules
def test_ovms_error_rules(llm: StandIn) -> None:
    def error(reply: httpx.Response) -> tuple[int, str]:
        return reply.status_code, reply.json()["error"]

    chat = "/v3/chat/completions"
    messages = [{"role": "user", "content": "x"}]
    not_valid = "The file is not valid json - "
    assert error(llm.post(chat, {"messages": messages})) == (
        412,
        not_valid + "model field is missing in JSON body",
    )
    assert error(llm.post(chat, {"model": 7, "messages": messages})) == (
        412,
        not_valid + "model field is not a string",
    )
    assert error(llm.post(chat, {"model": "llm", "messages": messages, "stream": "yes"})) == (
        412,
        not_valid + "stream field is not a boolean",
    )
    garbage = llm.http.post(
        chat, content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert error(garbage) == (412, not_valid + "Cannot parse JSON body")
    assert error(llm.post(chat, ["a list"])) == (412, not_valid + "JSON body must be an object")  # type: ignore[arg-type]
    graph_missing = (404, "Mediapipe graph definition with requested name is not found")
    assert error(llm.post(chat, {"model": "other", "messages": messages})) == graph_missing
    # Without a JSON content type OVMS routes by URI: the name would be "chat/completions".
    untyped = llm.http.post(chat, content=json.dumps({"model": "llm", "messages": messages}))
    assert error(untyped) == graph_missing
    wrong_task = error(llm.post("/v3/embeddings", {"model": "llm", "input": "x"}))
    assert wrong_task[0] == 400 and wrong_task[1].startswith("Mediapipe execution failed")

    assert error(llm.http.get(chat)) == (400, "Invalid request URL")
    assert error(llm.http.get("/v3/nothing/here")) == (400, "Invalid request URL")
    assert error(llm.http.post("/nowhere", json={})) == (400, "Invalid request URL")
    assert error(llm.http.delete(chat)) == (406, "Unsupported method")
    assert error(llm.http.post("/v2/health/ready")) == (406, "Unsupported method")
    assert error(llm.http.get("/v2/models/llm/infer")) == (406, "Unsupported method")
    assert error(llm.http.get("/v2/models/other/ready")) == (
        404,
        "Model with requested name is not found",
    )
    models = llm.http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["llm"]


# ------------------------------------------------------------ embeddings and rerank
def test_embeddings_float_and_base64(servers: Any) -> None:
    s = servers("embedding", "embeddings")
    reply = s.post("/v3/embeddings", {"model": "embedding", "input": ["hello world", "a tree"]})
    assert reply.status_code == 200, reply.text
    data = reply.json()
    vectors = [d["embedding"] for d in data["data"]]
    assert len(vectors) == 2 and len(vectors[0]) == 32
    assert abs(sum(v * v for v in vectors[0]) - 1) < 1e-3  # normalized
    assert vectors[0] != vectors[1]
    assert data["usage"]["prompt_tokens"] > 4
    b64 = s.post(
        "/v1/embeddings",
        {"model": "embedding", "input": "hello world", "encoding_format": "base64"},
    ).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert [round(x, 5) for x in decoded] == [round(x, 5) for x in vectors[0]]


def test_rerank_orders_documents(servers: Any) -> None:
    s = servers("rerank", "rerank")
    docs = ["the big house", "water and oil", "a small tree", "people read"]
    reply = s.post(
        "/v3/rerank",
        {
            "model": "rerank",
            "query": "house",
            "documents": docs,
            "top_n": 3,
            "return_documents": True,
        },
    )
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert len(results) == 3
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 3
    assert all(r["document"]["text"] == docs[r["index"]] for r in results)


# ----------------------------------------------------------------------------- audio
def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    import math

    frames = b"".join(
        struct.pack("<h", int(8000 * math.sin(i * 0.05))) for i in range(int(seconds * rate))
    )
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return out.getvalue()


def test_whisper_transcription_and_translation(servers: Any) -> None:
    s = servers("whisper", "speech2text")
    files = {"file": ("a.wav", wav_bytes(), "audio/wav")}
    for path in ("/v3/audio/transcriptions", "/v1/audio/transcriptions", "/v3/audio/translations"):
        reply = s.http.post(path, data={"model": "whisper"}, files=files)
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["text"].split()) >= 3
    # 8 kHz input is resampled, and the form's language is honoured.
    slow = {"file": ("b.wav", wav_bytes(rate=8000), "audio/wav")}
    fr = s.http.post(
        "/v3/audio/transcriptions", data={"model": "whisper", "language": "fr"}, files=slow
    )
    assert fr.status_code == 200 and fr.json()["text"].strip()
    # No model field in the form: the name comes from the URI, which no graph has.
    nameless = s.http.post("/v3/audio/transcriptions", files=files)
    assert nameless.status_code == 404


def test_speech_returns_wav(servers: Any) -> None:
    s = servers("speecht5", "text2speech")
    reply = s.post("/v3/audio/speech", {"model": "speecht5", "input": "hello world", "voice": "x"})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(reply.content)) as w:
        assert w.getframerate() == 16000 and w.getnframes() > 1000
    bad = s.post("/v1/audio/speech", {"model": "speecht5", "input": "x", "response_format": "mp3"})
    assert bad.status_code == 400


# ---------------------------------------------------------------------------- images
def test_image_generation_b64_png(servers: Any) -> None:
    s = servers("image", "image_generation")
    reply = s.post(
        "/v3/images/generations",
        {
            "model": "image",
            "prompt": "a red house",
            "size": "32x32",
            "num_inference_steps": 2,
            "n": 2,
        },
    )
    assert reply.status_code == 200, reply.text
    images = [base64.b64decode(d["b64_json"]) for d in reply.json()["data"]]
    assert len(images) == 2
    for png in images:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png[16:24])
        assert (width, height) == (32, 32)


# ---------------------------------------------------------------------------- KServe
def test_kserve_metadata_ready_and_json_infer(servers: Any) -> None:
    s = servers("classifier", None)
    meta = s.http.get("/v2/models/classifier").json()
    assert meta == {
        "name": "classifier",
        "versions": ["1"],
        "platform": "OpenVINO",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 3]}],
    }
    assert s.http.get("/v2/models/classifier/versions/1/ready").status_code == 200
    assert s.http.get("/v2/models/classifier/versions/2/ready").json() == {
        "error": "Model with requested version is not found"
    }
    body = {
        "id": "r1",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [0.5, -1.0, 2.0, 0.25]}
        ],
    }
    reply = s.post("/v2/models/classifier/infer", body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["model_name"] == "classifier" and data["id"] == "r1"
    (out,) = data["outputs"]
    assert out["name"] == "probabilities" and out["shape"] == [1, 3]
    assert abs(sum(out["data"]) - 1) < 1e-5 and all(p > 0 for p in out["data"])
    wrong = s.post("/v2/models/classifier/infer", {"inputs": [{**body["inputs"][0], "shape": [4]}]})
    assert wrong.status_code == 400 and wrong.json()["error"].startswith("Invalid input shape")
    assert s.post("/v2/models/classifier/infer", {"x": 1}).json() == {
        "error": "Invalid JSON structure, missing inputs"
    }
    assert s.post("/v3/chat/completions", {"model": "classifier"}).status_code == 404


def test_kserve_binary_extension_round_trip_is_byte_exact(servers: Any) -> None:
    s = servers("classifier", None)
    values = env_ovms.CLASSIFIER_VALUES
    as_json = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, 4],
                "data": list(struct.unpack("<4f", values)),
            }
        ]
    }
    expected = s.post("/v2/models/classifier/infer", as_json).json()["outputs"][0]["data"]

    header = env_ovms.classifier_binary_header(values)
    reply = s.http.post(
        "/v2/models/classifier/infer",
        content=header + values,
        headers=env_ovms.binary_headers(header),
    )
    assert reply.status_code == 200, reply.text
    head_len = int(reply.headers["Inference-Header-Content-Length"])
    head = json.loads(reply.content[:head_len])
    (out,) = head["outputs"]
    assert out["parameters"]["binary_data_size"] == 12 and "data" not in out
    raw = reply.content[head_len:]
    assert raw == struct.pack("<3f", *expected)  # the same float32 bytes as the JSON answer

    short = s.http.post(
        "/v2/models/classifier/infer",
        content=header + values[:8],
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert short.status_code == 400
    beyond = s.http.post(
        "/v2/models/classifier/infer",
        content=header,
        headers={"Inference-Header-Content-Length": str(len(header) + 5)},
    )
    assert beyond.status_code == 400
