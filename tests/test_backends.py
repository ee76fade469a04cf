"""Backend adapters: exact command lines, environment hygiene, routes. Pure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dynllm.backends import (
    ADAPTERS,
    Upstream,
    adapter_for,
    command_line,
    missing_binary,
    upstream_table,
)
from dynllm.backends.base import MARKER_ENV, MODEL_ENV, rewrite_json_model
from dynllm.config import BackendName, ConfigError, parse_config
from dynllm.registry import SERVES, ApiFamily


def config_with(**model: Any) -> Any:
    base = {"name": "m", "path": "/models/m", "vram_mb": 10, "backend": "llamacpp"}
    return parse_config(
        {"enabled_backends": [b.value for b in BackendName], "models": [{**base, **model}]}
    )


def argv(**model: Any) -> list[str]:
    config = config_with(**model)
    return command_line(config, config.models[0], 9123)


def test_llamacpp_llm_command() -> None:
    assert argv(context_size=2048, n_gpu_layers=20, extra_args=["-t", 2]) == [
        "llama-server", "-m", "/models/m", "--host", "127.0.0.1", "--port", "9123",
        "-c", "2048", "-ngl", "20", "--alias", "m", "-t", "2",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("model_type", "flags"),
    [("embedding", ["--embeddings", "--pooling", "mean"]), ("rerank", ["--reranking"])],
)
def test_llamacpp_embedding_and_rerank_flags(model_type: str, flags: list[str]) -> None:
    line = argv(model_type=model_type)
    assert line[-len(flags) :] == flags


def test_ovms_command_per_task() -> None:
    line = argv(
        backend="openvino", model_type="transcription", target_device="GPU", ovms_shape="auto"
    )
    assert line[:3] == ["ovms", "--rest_port", "9123"]
    assert line[line.index("--rest_bind_address") + 1] == "127.0.0.1"
    assert line[line.index("--port") + 1] == "0"
    assert line[line.index("--task") + 1] == "speech2text"
    assert line[line.index("--target_device") + 1] == "GPU"
    assert line[line.index("--model_name") + 1] == "m"
    assert line[line.index("--shape") + 1] == "auto"
    assert "--task" not in argv(backend="openvino", model_type="classification")


def test_transformers_command_and_model_rewrite() -> None:
    line = argv(
        backend="transformers", device="cuda", dtype="bfloat16", quantization="bnb-4bit",
        trust_remote_code=True, compile_model=True, continuous_batching=True,
        attn_implementation="sdpa", model_timeout=300, revision="abc",
    )  # fmt: skip
    assert line[:3] == ["transformers", "serve", "/models/m@abc"]
    expected = [("--device", "cuda"), ("--dtype", "bfloat16"), ("--quantization", "bnb-4bit"),
                ("--attn-implementation", "sdpa"), ("--model-timeout", "300")]  # fmt: skip
    for flag, value in expected:
        assert line[line.index(flag) + 1] == value
    for flag in ("--trust-remote-code", "--compile", "--continuous-batching"):
        assert flag in line
    assert "--quantization" not in argv(backend="transformers", quantization="none")
    config = config_with(backend="transformers", revision="abc")
    spec = config.models[0]
    assert adapter_for(spec).rewrite_model(spec, Path("/models/m")) == "/models/m@abc"


def test_ovms_and_vllm_insist_on_the_served_name() -> None:
    for backend in ("openvino", "vllm"):
        config = config_with(backend=backend, aliases=["nick"])
        spec = config.models[0]
        assert adapter_for(spec).rewrite_model(spec, Path("/models/m")) == "m"
    llama = config_with(aliases=["nick"]).models[0]
    assert adapter_for(llama).rewrite_model(llama, Path("/models/m")) is None  # ignores `model`


def test_vllm_command() -> None:
    line = argv(backend="vllm", context_size=8192)
    assert line[:3] == ["vllm", "serve", "/models/m"]
    assert line[line.index("--served-model-name") + 1] == "m"
    assert line[line.index("--max-model-len") + 1] == "8192"


def test_environment_is_scrubbed_then_model_env_applied() -> None:
    config = config_with(env={"HF_HOME": "/cache", "CUDA_VISIBLE_DEVICES": "1"})
    spec = config.models[0]
    inherited = {
        "PATH": "/usr/bin", "LLAMA_ARG_PORT": "1", "LLAMA_API_KEY": "k", "API_KEY": "k",
        "VLLM_PORT": "2", "HF_TOKEN": "t", "HF_HOME": "/old", "OVMS_X": "y", "HOME": "/root",
    }  # fmt: skip
    env = adapter_for(spec).env(inherited, spec, "marker")
    assert env == {
        "PATH": "/usr/bin", "HOME": "/root", "HF_HOME": "/cache", "CUDA_VISIBLE_DEVICES": "1",
        MARKER_ENV: "marker", MODEL_ENV: "m",
    }  # fmt: skip


def test_every_route_an_adapter_claims_is_one_its_types_serve() -> None:
    families = set().union(*SERVES.values())
    for adapter in ADAPTERS.values():
        assert set(adapter.routes) <= families
    assert ADAPTERS[BackendName.LLAMACPP].routes[ApiFamily.CHAT] == "/v1/chat/completions"


def test_bind_failure_detection() -> None:
    llama = ADAPTERS[BackendName.LLAMACPP]
    assert llama.is_bind_failure(["main: couldn't bind HTTP server socket, hostname: 127.0.0.1"])
    assert not llama.is_bind_failure(["error: failed to load model"])


def test_rewrite_json_model_keeps_bytes_when_unchanged() -> None:
    body = b'{"model": "x",  "a": 1}'
    assert rewrite_json_model(body, {"model": "x", "a": 1}, "x") is body
    assert rewrite_json_model(body, {"model": "alias", "a": 1}, "x") == b'{"model": "x", "a": 1}'
    assert rewrite_json_model(body, {"model": "x", "a": 1}, None, {"a": 2}) is body  # present
    assert rewrite_json_model(body, {"model": "x"}, None, {"stream": False}) == (
        b'{"model": "x", "stream": false}'
    )


def test_transformers_serve_env_defaults_and_responses() -> None:
    config = config_with(backend="transformers")
    spec = config.models[0]
    adapter = adapter_for(spec)
    env = adapter.env({"HF_HUB_DISABLE_UPDATE_CHECK": "0", "HF_TOKEN": "t"}, spec, "k")
    assert env["HF_HUB_DISABLE_UPDATE_CHECK"] == "1" and "HF_TOKEN" not in env  # scrubbed, set
    own = config_with(backend="transformers", env={"HF_HUB_DISABLE_UPDATE_CHECK": "0"})
    assert adapter.env({}, own.models[0], "k")["HF_HUB_DISABLE_UPDATE_CHECK"] == "0"
    table = upstream_table(config)
    assert table["m", ApiFamily.RESPONSES] == Upstream(
        "/v1/responses", "/models/m", {"stream": False}
    )
    assert ("m", ApiFamily.EMBEDDINGS) not in table  # an llm model: not its type's route


@pytest.mark.parametrize(
    ("backend", "model_type", "served"),
    [
        ("llamacpp", "image_generation", "llm, embedding, rerank"),
        ("transformers", "embedding", "llm, transcription"),
        ("vllm", "speech", "llm, embedding, rerank, transcription"),
    ],
)
def test_a_type_the_backend_cannot_serve_is_a_config_error(
    backend: str, model_type: str, served: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config_with(backend=backend, model_type=model_type)
    assert str(info.value).startswith(
        f"models[0].model_type ('m'): the {backend} backend cannot serve model_type "
        f"'{model_type}' (it serves: {served})"
    )


def test_llamacpp_transcription_needs_a_projector() -> None:
    with pytest.raises(ConfigError, match="needs 'mmproj'"):
        config_with(model_type="transcription")
    config = config_with(model_type="transcription", mmproj="/models/proj.gguf")
    assert upstream_table(config)["m", ApiFamily.TRANSCRIPTION].path == "/v1/audio/transcriptions"


def test_missing_backend_program_names_it_and_how_to_install(tmp_path: Path) -> None:
    config = config_with(backend="vllm")
    spec = config.models[0]
    assert missing_binary(config, spec) == (
        "the vllm backend program 'vllm' of model 'm' was not found or is not executable: "
        "install it with `pip install vllm` and set backend.vllm_binary"
    )
    program = tmp_path / "llama-server"
    program.write_text("#!/bin/sh\n")
    found = parse_config(
        {"backend": {"llamacpp_binary": str(program)},
         "models": [{"name": "m", "path": "/m", "backend": "llamacpp", "vram_mb": 1}]}
    )  # fmt: skip
    assert "not executable" in str(missing_binary(found, found.models[0]))
    program.chmod(0o755)
    assert missing_binary(found, found.models[0]) is None


def test_a_program_under_home_is_expanded_as_it_is_checked(monkeypatch: Any) -> None:
    monkeypatch.setenv("HOME", "/home/u")
    config = parse_config(
        {"backend": {"llamacpp_binary": "~/bin/llama-server"},
         "enabled_backends": ["llamacpp", "command"],
         "models": [{"name": "m", "path": "/m", "backend": "llamacpp", "vram_mb": 1},
                    {"name": "c", "backend": "command", "vram_mb": 0,
                     "command": ["~/venv/bin/srv", "--port", "{port}"]}]}
    )  # fmt: skip
    assert command_line(config, config.models[0], 9123)[0] == "/home/u/bin/llama-server"
    assert command_line(config, config.models[1], 9123)[:3] == [
        "/home/u/venv/bin/srv",
        "--port",
        "9123",
    ]
    assert "'~/bin/llama-server'" in str(missing_binary(config, config.models[0]))


def test_a_model_name_in_a_backend_url_is_escaped() -> None:
    """A '?' would start the query, a '#' cut the path, a '%' start an
    escape; '/' (names like org/model) stays a path separator."""
    odd = "org/m%1?v#2 x"
    escaped = "org/m%251%3Fv%232%20x"
    ovms = config_with(name=odd, backend="openvino", model_type="classification").models[0]
    adapter = adapter_for(ovms)
    assert adapter.upstream_path(ovms, ApiFamily.KSERVE) == f"/v2/models/{escaped}"
    assert adapter.probe(ovms) == f"/v2/models/{escaped}/ready"
    command = config_with(
        name=odd, backend="command", command=["srv"], path="", model_type="classification",
        health_path="/v2/models/{name}/ready", upstream_paths={"kserve": "/api/{name}"},
    ).models[0]  # fmt: skip
    adapter = adapter_for(command)
    assert adapter.probe(command) == f"/v2/models/{escaped}/ready"
    assert adapter.upstream_path(command, ApiFamily.KSERVE) == f"/api/{escaped}"
    plain = config_with(
        name=odd, backend="command", command=["srv"], path="", model_type="classification"
    ).models[0]
    assert adapter_for(plain).upstream_path(plain, ApiFamily.KSERVE) == f"/v2/models/{escaped}"
