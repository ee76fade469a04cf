"""llama.cpp's projector and vLLM's command line and routes. Pure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dynllm.backends import ADAPTERS, adapter_for, command_line, launch_for
from dynllm.config import BackendName, Config, ConfigError, ModelConfig, parse_config
from dynllm.registry import ApiFamily


def config_with(models_dir: str | None = "/models", **model: Any) -> Config:
    base = {"name": "m", "path": "m.gguf", "vram_mb": 10, "backend": "llamacpp"}
    return parse_config(
        {
            "enabled_backends": [b.value for b in BackendName],
            "models_dir": models_dir,
            "models": [{**base, **model}],
        },
        base_dir=Path("/etc/dynllm"),
    )


def argv(models_dir: str | None = "/models", **model: Any) -> list[str]:
    config = config_with(models_dir, **model)
    return command_line(config, config.models[0], 9123)


def flag(line: list[str], name: str) -> str:
    return line[line.index(name) + 1]


# ---- llama.cpp: --mmproj ------------------------------------------------------


def test_llamacpp_without_projector_has_no_mmproj_flag() -> None:
    assert argv() == [
        "llama-server", "-m", "/models/m.gguf", "--host", "127.0.0.1", "--port", "9123",
        "-c", "4096", "-ngl", "-1", "--alias", "m",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("models_dir", "path", "mmproj", "expected"),
    [
        ("/models", "m.gguf", "/abs/proj.gguf", "/abs/proj.gguf"),  # absolute: as is
        ("/models", "m.gguf", "proj.gguf", "/models/proj.gguf"),  # relative: under models_dir
        ("/models", "sub/dir/m.gguf", "mm/proj.gguf", "/models/mm/proj.gguf"),  # not the model's
        ("rel", "m.gguf", "proj.gguf", "/etc/dynllm/rel/proj.gguf"),  # models_dir from config dir
        (None, "m.gguf", "proj.gguf", "/etc/dynllm/proj.gguf"),  # no models_dir: config's folder
        ("/models", "/elsewhere/m.gguf", "proj.gguf", "/models/proj.gguf"),  # like any model file
    ],
)
def test_llamacpp_mmproj_is_resolved_like_the_model_path(
    models_dir: str | None, path: str, mmproj: str, expected: str
) -> None:
    config = config_with(models_dir, path=path, mmproj=mmproj)
    model = config.models[0]
    assert launch_for(config, model, 9123).mmproj_path == Path(expected)
    line = command_line(config, model, 9123)
    assert flag(line, "--mmproj") == expected
    assert flag(line, "-m") == str(config.model_path(model))


def test_llamacpp_mmproj_comes_before_extra_args() -> None:
    line = argv(model_type="transcription", mmproj="p.gguf", extra_args=["-t", "1"])
    assert line[-4:] == ["--mmproj", "/models/p.gguf", "-t", "1"]


def test_llamacpp_transcription_route_needs_the_projector() -> None:
    llama = ADAPTERS[BackendName.LLAMACPP]
    audio = config_with(model_type="transcription", mmproj="p.gguf").models[0]
    assert llama.upstream_path(audio, ApiFamily.TRANSCRIPTION) == "/v1/audio/transcriptions"
    # llama-server has no translations route at all.
    assert llama.upstream_path(audio, ApiFamily.TRANSLATION) is None
    # Without --mmproj llama-server answers 501 on transcriptions: not offered,
    # and the config is refused, naming the missing key.
    bare = ModelConfig(
        name="m", path="m.gguf", backend="llamacpp", model_type="transcription", vram_mb=1
    )
    assert llama.upstream_path(bare, ApiFamily.TRANSCRIPTION) is None
    with pytest.raises(ConfigError, match="transcription model needs 'mmproj'"):
        config_with(model_type="transcription")
    # A chat model with a (vision) projector keeps its chat route and gets no audio one.
    vision = config_with(mmproj="p.gguf").models[0]
    assert llama.upstream_path(vision, ApiFamily.CHAT) == "/v1/chat/completions"
    assert llama.upstream_path(vision, ApiFamily.TRANSCRIPTION) is None


# ---- vLLM --------------------------------------------------------------------


def test_vllm_full_command() -> None:
    line = argv(
        backend="vllm", path="/hf/qwen", context_size=512, dtype="float32",
        gpu_memory_utilization=0.85, extra_args=["--enforce-eager"],
    )  # fmt: skip
    assert line == [
        "vllm", "serve", "/hf/qwen", "--host", "127.0.0.1", "--port", "9123",
        "--served-model-name", "m", "--gpu-memory-utilization", "0.85",
        "--max-model-len", "512", "--dtype", "float32", "--enforce-eager",
    ]  # fmt: skip


def test_vllm_optional_flags_are_left_out() -> None:
    line = argv(backend="vllm", path="/hf/qwen", context_size=0)
    assert line == [
        "vllm", "serve", "/hf/qwen", "--host", "127.0.0.1", "--port", "9123",
        "--served-model-name", "m",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("model_type", "pooling"),
    [("embedding", True), ("rerank", True), ("llm", False), ("transcription", False)],
)
def test_vllm_pooling_runner_for_embedding_and_rerank(model_type: str, pooling: bool) -> None:
    line = argv(backend="vllm", model_type=model_type, extra_args=["--x"])
    assert (line[-3:-1] == ["--runner", "pooling"]) is pooling
    assert "--runner" not in line[:-3]


def test_vllm_routes_and_served_name() -> None:
    config = config_with(backend="vllm", aliases=["nick"])
    spec = config.models[0]
    vllm = adapter_for(spec)
    assert vllm.probe(spec) == "/health"
    assert vllm.rewrite_model(spec, Path("/models/m")) == "m"
    assert {f: vllm.upstream_path(spec, f) for f in ApiFamily if vllm.upstream_path(spec, f)} == {
        ApiFamily.CHAT: "/v1/chat/completions",
        ApiFamily.COMPLETIONS: "/v1/completions",
        ApiFamily.EMBEDDINGS: "/v1/embeddings",
        ApiFamily.RERANK: "/v1/rerank",
        ApiFamily.TRANSCRIPTION: "/v1/audio/transcriptions",
        ApiFamily.TRANSLATION: "/v1/audio/translations",
        ApiFamily.RESPONSES: "/v1/responses",
    }


def test_vllm_bind_failure_detection() -> None:
    vllm = ADAPTERS[BackendName.VLLM]
    assert vllm.is_bind_failure(["OSError: [Errno 98] Address already in use"])
    assert not vllm.is_bind_failure(["ValueError: max_model_len is too large"])
