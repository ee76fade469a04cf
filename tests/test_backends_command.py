"""The ``command`` backend adapter: placeholders, probe, routes by model type, overrides. Pure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dynllm.backends import ADAPTERS, Launch, adapter_for, command_line
from dynllm.backends.command import OPENAI_PATHS, Command
from dynllm.config import BackendName, ConfigError, ModelType, parse_config
from dynllm.registry import SERVES, ApiFamily


def config_with(**model: Any) -> Any:
    base = {
        "name": "m",
        "path": "/models/m",
        "vram_mb": 0,
        "backend": "command",
        "command": ["srv", "--port", "{port}"],
    }
    return parse_config({"enabled_backends": ["command"], "models": [{**base, **model}]})


def spec(**model: Any) -> Any:
    return config_with(**model).models[0]


def argv(**model: Any) -> list[str]:
    config = config_with(**model)
    return command_line(config, config.models[0], 9123)


def test_registered_for_the_command_backend() -> None:
    assert isinstance(ADAPTERS[BackendName.COMMAND], Command)
    assert isinstance(adapter_for(spec()), Command)


def test_every_placeholder_is_replaced_inside_arguments() -> None:
    line = argv(
        name="voice",
        path="/data/voices/joe",
        command=["/opt/tts/bin/serve", "--bind={host}:{port}", "--model", "{model_path}",
                 "--served-name", "{name}", "{port}"],
    )  # fmt: skip
    assert line == [
        "/opt/tts/bin/serve", "--bind=127.0.0.1:9123", "--model", "/data/voices/joe",
        "--served-name", "voice", "9123",
    ]  # fmt: skip


def test_model_path_is_resolved_like_other_backends() -> None:
    config = parse_config(
        {
            "enabled_backends": ["command"],
            "models_dir": "/srv/models",
            "models": [{"name": "m", "path": "sub/x.onnx", "vram_mb": 0, "backend": "command",
                        "command": ["run", "{model_path}"]}],
        }
    )  # fmt: skip
    assert command_line(config, config.models[0], 1) == ["run", "/srv/models/sub/x.onnx"]


def test_other_braces_pass_through_and_launch_binary_is_not_used() -> None:
    line = argv(
        command=["srv", '{"threads": 1}', "{unknown}", "{{port}}"], extra_args=["-p", "{port}"]
    )
    assert line == ["srv", '{"threads": 1}', "{unknown}", "{9123}", "-p", "9123"]
    assert "" not in line  # binary_for(COMMAND) is "": never part of the argv


@pytest.mark.parametrize("command", [None, [], [""]])
def test_missing_command_is_a_config_error(command: list[str] | None) -> None:
    with pytest.raises(ConfigError, match=r"models\[0\] \('m'\)\.command: .*argv"):
        config_with(command=command)


@pytest.mark.parametrize("command", [None, []])
def test_adapter_refuses_a_model_without_command(command: list[str] | None) -> None:
    # a ModelConfig that skipped validation (model_copy does not validate)
    model = spec().model_copy(update={"command": command})
    launch = Launch(binary="", model=model, model_path=Path("/m"), port=1)
    with pytest.raises(ValueError, match=r"model 'm'.*'command'"):
        Command().argv(launch)


def test_model_path_placeholder_needs_a_path() -> None:
    assert argv(path="", command=["srv", "{port}"]) == ["srv", "9123"]
    with pytest.raises(ConfigError, match=r"uses \{model_path\}, so the model needs a path"):
        argv(path="", command=["srv", "--model", "{model_path}"])


def test_probe_is_the_health_path_with_the_name() -> None:
    adapter = adapter_for(spec())
    assert adapter.probe(spec()) == "/health"
    assert adapter.probe(spec(health_path="/")) == "/"
    assert adapter.probe(spec(name="cls", health_path="/v2/models/{name}/ready")) == (
        "/v2/models/cls/ready"
    )


@pytest.mark.parametrize("model_type", list(ModelType))
def test_routes_are_the_openai_paths_of_the_families_the_type_serves(model_type: ModelType) -> None:
    model = spec(name="m", model_type=model_type.value)
    adapter = adapter_for(model)
    routes = {f: adapter.upstream_path(model, f) for f in ApiFamily}
    served = {f: p for f, p in routes.items() if p is not None}
    assert set(served) == SERVES[model_type]
    for family, path in served.items():
        expected = "/v2/models/m" if family is ApiFamily.KSERVE else OPENAI_PATHS[family.value]
        assert path == expected


def test_speech_and_llm_defaults() -> None:
    speech = spec(model_type="speech")
    adapter = adapter_for(speech)
    assert adapter.upstream_path(speech, ApiFamily.SPEECH) == "/v1/audio/speech"
    assert adapter.upstream_path(speech, ApiFamily.CHAT) is None
    llm = spec()
    assert adapter.upstream_path(llm, ApiFamily.CHAT) == "/v1/chat/completions"
    assert adapter.upstream_path(llm, ApiFamily.COMPLETIONS) == "/v1/completions"
    assert adapter.upstream_path(llm, ApiFamily.SPEECH) is None


def test_upstream_paths_override_per_family() -> None:
    model = spec(upstream_paths={"chat": "/v3/chat/completions", "audio.speech": "/tts"})
    adapter = adapter_for(model)
    assert adapter.upstream_path(model, ApiFamily.CHAT) == "/v3/chat/completions"
    assert adapter.upstream_path(model, ApiFamily.COMPLETIONS) == "/v1/completions"
    # an override for a family the type does not serve opens no route
    assert adapter.upstream_path(model, ApiFamily.SPEECH) is None


def test_kserve_prefix_is_the_model_name_unless_overridden() -> None:
    model = spec(name="digits", model_type="classification", aliases=["mnist"])
    adapter = adapter_for(model)
    assert adapter.upstream_path(model, ApiFamily.KSERVE) == "/v2/models/digits"
    renamed = spec(name="digits", model_type="ocr", upstream_paths={"kserve": "/v2/models/resnet"})
    assert adapter.upstream_path(renamed, ApiFamily.KSERVE) == "/v2/models/resnet"
    templated = spec(
        name="digits", model_type="detection", upstream_paths={"kserve": "/api/{name}/v2/models/x"}
    )
    assert adapter.upstream_path(templated, ApiFamily.KSERVE) == "/api/digits/v2/models/x"


def test_bodies_are_forwarded_untouched() -> None:
    model = spec(aliases=["nick"])
    assert adapter_for(model).rewrite_model(model, Path("/models/m")) is None


def test_env_keeps_the_models_env_and_scrubs_inherited_backend_vars() -> None:
    model = spec(env={"LOCAL_TTS_DATA_DIR": "/d", "HF_HOME": "/h"})
    env = adapter_for(model).env({"HF_TOKEN": "x", "PATH": "/bin"}, model, "mark")
    assert env["LOCAL_TTS_DATA_DIR"] == "/d" and env["HF_HOME"] == "/h"
    assert "HF_TOKEN" not in env and env["PATH"] == "/bin"
