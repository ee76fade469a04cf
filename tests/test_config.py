"""Unit tests for ``dynllm.config``: DynLLM compatibility, defaults, validation.

Pure and fast: every test writes a small YAML file under ``tmp_path`` (or
loads one of the two checked-in examples) and calls ``load_config`` or
``parse_config``.  Nothing is started.

``INVALID_CONFIGS`` is shared with ``tests/test_cli.py``, which feeds the
same files to the real ``dynllm`` command.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from dynllm.config import (
    BackendName,
    BackendSettings,
    Config,
    ConfigError,
    EvictionPolicy,
    ModelConfig,
    ModelType,
    ServerConfig,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "config.example.yaml"
DYNLLM_README_CONFIG = ROOT / "tests" / "data" / "dynllm_readme_config.yaml"
DYNLLM_README_SEED = Path("/work/shared/seeds/DynLLM-README.txt")

README_MODEL_NAMES = [
    "llama3-8b-q4",
    "phi3-mini-ov",
    "whisper-large-v3-ov",
    "speecht5-ov",
    "qwen25-3b-hf",
]


def model(**overrides: Any) -> dict[str, Any]:
    """A valid model entry; keyword arguments replace or add keys."""
    return {
        "name": "chat",
        "path": "chat.gguf",
        "backend": "llamacpp",
        "vram_mb": 1000,
        **overrides,
    }


def with_unload_time(literal: str) -> str:
    """A one-model config whose ``unload_time`` is written exactly as ``literal``."""
    return (
        "models:\n"
        "  - name: chat\n"
        "    path: chat.gguf\n"
        "    backend: llamacpp\n"
        "    vram_mb: 1000\n"
        f"    unload_time: {literal}\n"
    )


def write(tmp_path: Path, data: Any, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(tmp_path: Path, data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data))
    return str(info.value)


def names_key(message: str, key: str) -> bool:
    """True if one line of ``message`` is about ``key`` (``key: reason``)."""
    return any(line.startswith(f"{key}: ") for line in message.splitlines())


# ---- the DynLLM README example ------------------------------------------------


def test_dynllm_readme_example_loads_unchanged() -> None:
    config = load_config(DYNLLM_README_CONFIG)

    assert config.server == ServerConfig(host="0.0.0.0", port=8000)
    assert config.total_vram_mb == 7500
    assert config.idle_timeout_seconds == 300
    assert config.enabled_backends == [
        BackendName.LLAMACPP,
        BackendName.OPENVINO,
        BackendName.TRANSFORMERS,
    ]
    assert config.backend == BackendSettings(
        llamacpp_binary="llama-server",
        ovms_binary="ovms",
        transformers_binary="transformers",
        port_range_start=9100,
        port_range_end=9200,
    )
    assert config.preload_models == ["llama3-8b-q4"]
    assert [m.name for m in config.models] == README_MODEL_NAMES
    assert config.base_dir == DYNLLM_README_CONFIG.parent
    # Keys DynLLM does not have take their defaults.
    assert config.eviction_policy is EvictionPolicy.LRU
    assert config.load_timeout_seconds == 600
    assert all(not m.pinned and not m.aliases and not m.extra_args for m in config.models)


def test_dynllm_readme_example_model_fields() -> None:
    models = {m.name: m for m in load_config(DYNLLM_README_CONFIG).models}
    expected: dict[str, dict[str, Any]] = {
        "llama3-8b-q4": {
            "path": "/mnt/models/gguf/Meta-Llama-3-8B-Instruct.Q4_K_M.gguf",
            "backend": BackendName.LLAMACPP,
            "model_type": ModelType.LLM,
            "vram_mb": 5500,
            "n_gpu_layers": -1,
            "context_size": 4096,
            "unload_time": None,
        },
        "phi3-mini-ov": {
            "path": "/mnt/models/openvino/phi-3-mini-4k-instruct-ov",
            "backend": BackendName.OPENVINO,
            "model_type": ModelType.LLM,
            "target_device": "GPU",
            "vram_mb": 4096,
            "ovms_shape": "auto",
            "unload_time": math.inf,
        },
        "whisper-large-v3-ov": {
            "path": "/mnt/models/openvino/whisper-large-v3-ov",
            "backend": BackendName.OPENVINO,
            "model_type": ModelType.TRANSCRIPTION,
            "target_device": "CPU",
            "vram_mb": 0,
        },
        "speecht5-ov": {
            "path": "/mnt/models/openvino/speecht5-ov",
            "backend": BackendName.OPENVINO,
            "model_type": ModelType.SPEECH,
            "target_device": "CPU",
            "vram_mb": 0,
        },
        "qwen25-3b-hf": {
            "path": "/mnt/models/huggingface/Qwen2.5-3B-Instruct",
            "backend": BackendName.TRANSFORMERS,
            "model_type": ModelType.LLM,
            "device": "xpu",
            "dtype": "bfloat16",
            "quantization": "bnb-4bit",
            "attn_implementation": "sdpa",
            "model_timeout": 300,
            "vram_mb": 6500,
            "trust_remote_code": False,
            "revision": None,
        },
    }
    for name, fields in expected.items():
        actual = {key: getattr(models[name], key) for key in fields}
        assert actual == fields, name


def test_dynllm_readme_unload_time_minus_one_means_never() -> None:
    config = load_config(DYNLLM_README_CONFIG)
    by_name = {m.name: m for m in config.models}
    assert by_name["phi3-mini-ov"].unload_time == math.inf
    assert config.unload_after(by_name["phi3-mini-ov"]) == math.inf
    assert config.unload_after(by_name["llama3-8b-q4"]) == 300


def test_dynllm_readme_data_file_is_the_readme_example() -> None:
    """The checked-in copy must not drift from (or be "fixed" away from) the README."""
    if not DYNLLM_README_SEED.is_file():
        pytest.skip(f"{DYNLLM_README_SEED} is not available here")
    readme = DYNLLM_README_SEED.read_text(encoding="utf-8")
    section = readme.split("\nExample config\n", 1)[1].split("\nAPI Reference\n", 1)[0]
    lines = DYNLLM_README_CONFIG.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#")
    assert "\n".join(lines[1:]).strip() == section.strip()


# ---- config.example.yaml ------------------------------------------------------


def documented_fields() -> list[str]:
    """Every key a user can write, taken from the pydantic models themselves."""
    models: list[type[BaseModel]] = [Config, ServerConfig, BackendSettings, ModelConfig]
    names = {name for m in models for name in m.model_fields}
    return sorted(names - {"base_dir"})


def key_line(text: str, key: str) -> int | None:
    """Index of the first line that sets ``key``, possibly commented out."""
    pattern = re.compile(rf"^[ \t]*(?:#[ \t]*)?(?:-[ \t]+)?{re.escape(key)}:(?:[ \t]|$)")
    for i, line in enumerate(text.splitlines()):
        if pattern.match(line):
            return i
    return None


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE_CONFIG)
    assert config.models
    assert config.base_dir == ROOT


def test_example_config_mentions_every_field() -> None:
    """Adding a field to config.py without documenting it here fails this test."""
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    fields = documented_fields()
    assert {"unload_time", "pinned", "port_range_end", "queue_timeout_seconds"} <= set(fields)
    missing = [name for name in fields if key_line(text, name) is None]
    assert not missing, f"config.example.yaml does not show: {missing}"


def test_example_config_explains_every_field() -> None:
    """Each key carries a comment on its own line or on the line just above."""
    lines = EXAMPLE_CONFIG.read_text(encoding="utf-8").splitlines()
    text = "\n".join(lines)
    unexplained = []
    for name in documented_fields():
        i = key_line(text, name)
        assert i is not None
        line = lines[i].lstrip().removeprefix("#")
        above = lines[i - 1].strip() if i > 0 else ""
        if "#" not in line and not above.startswith("#"):
            unexplained.append(name)
    assert not unexplained, f"no comment explains: {unexplained}"


def test_example_config_starts_as_is() -> None:
    """Local-only, nothing preloaded, state next to the file, model files optional."""
    config = load_config(EXAMPLE_CONFIG)
    assert config.server == ServerConfig(host="127.0.0.1", port=8000)
    assert config.preload_models == []
    assert not Path(config.db_path).is_absolute()
    assert config.db_file == ROOT / config.db_path
    assert {m.backend for m in config.models} <= set(config.enabled_backends)
    assert all(m.vram_mb <= config.total_vram_mb for m in config.models)


def test_example_config_shows_the_usual_kinds_of_model() -> None:
    config = load_config(EXAMPLE_CONFIG)
    kinds = {(m.backend, m.model_type) for m in config.models}
    assert {
        (BackendName.LLAMACPP, ModelType.LLM),
        (BackendName.LLAMACPP, ModelType.EMBEDDING),
        (BackendName.LLAMACPP, ModelType.RERANK),
        (BackendName.OPENVINO, ModelType.TRANSCRIPTION),
        (BackendName.TRANSFORMERS, ModelType.LLM),
    } <= kinds


# ---- defaults -----------------------------------------------------------------


def test_top_level_defaults(tmp_path: Path) -> None:
    config = parse_config({}, base_dir=tmp_path)
    assert config.server.host == "127.0.0.1"  # this machine only unless asked
    assert config.api_keys == [] and config.admin_api_keys == []
    assert config.server.port == 8000
    assert config.total_vram_mb == 8192
    assert config.idle_timeout_seconds == 300
    assert config.enabled_backends == [BackendName.LLAMACPP, BackendName.OPENVINO]
    assert config.backend == BackendSettings(
        llamacpp_binary="llama-server",
        ovms_binary="ovms",
        transformers_binary="transformers",
        vllm_binary="vllm",
        port_range_start=9100,
        port_range_end=9200,
    )
    assert config.models_dir is None
    assert config.db_path == "dynllm_state.db"
    assert config.db_file == tmp_path / "dynllm_state.db"
    assert config.log_level == "info"
    assert config.preload_models == []
    assert config.models == []
    assert config.eviction_policy is EvictionPolicy.LRU
    assert config.load_timeout_seconds == 600
    assert config.health_poll_interval_ms == 100
    assert config.stop_timeout_seconds == 10
    assert config.idle_check_interval_seconds == 5
    assert config.queue_timeout_seconds == 120
    assert config.upstream_read_timeout_seconds is None


def test_model_defaults(tmp_path: Path) -> None:
    m = parse_config({"models": [model()]}, base_dir=tmp_path).models[0]
    assert m.model_type is ModelType.LLM
    assert m.n_gpu_layers == -1
    assert m.context_size == 4096
    assert m.target_device == "CPU"
    assert m.ovms_shape is None
    assert (m.device, m.dtype, m.quantization, m.attn_implementation) == (None, None, None, None)
    assert (m.trust_remote_code, m.compile_model, m.continuous_batching) == (False,) * 3
    assert (m.model_timeout, m.revision, m.unload_time, m.load_timeout_seconds) == (None,) * 4
    assert m.pinned is False
    assert (m.extra_args, m.env, m.aliases) == ([], {}, [])


@pytest.mark.parametrize(
    "text",
    ["", "# only a comment\n", "models:\npreload_models:\n"],
    ids=["empty", "comment-only", "empty-lists"],
)
def test_empty_sections_take_defaults(tmp_path: Path, text: str) -> None:
    config = load_config(write(tmp_path, text))
    assert config.models == []
    assert config.preload_models == []
    assert config.total_vram_mb == 8192


# ---- unload_time / idle_timeout_seconds ---------------------------------------


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("-1", math.inf),
        ('"-1"', math.inf),
        (".inf", math.inf),
        ("inf", math.inf),  # YAML reads a bare inf as the string "inf"
        ('"inf"', math.inf),
        ("Infinity", math.inf),
        ("-1.0", math.inf),
        ("0", 0.0),
        ("30", 30.0),
        ('"30"', 30.0),
        ("2.5", 2.5),
        ("null", None),
    ],
)
def test_unload_time_forms(tmp_path: Path, literal: str, expected: float | None) -> None:
    config = load_config(write(tmp_path, with_unload_time(literal)))
    m = config.models[0]
    assert m.unload_time == expected
    assert config.unload_after(m) == (300 if expected is None else expected)


@pytest.mark.parametrize("value", [-2, -0.5, "-5", -1.5])
def test_unload_time_negative_other_than_minus_one_is_an_error(tmp_path: Path, value: Any) -> None:
    message = error_of(tmp_path, {"models": [model(unload_time=value)]})
    assert names_key(message, "models[0] ('chat').unload_time")
    assert "-1" in message  # says what is allowed


@pytest.mark.parametrize(("value", "expected"), [(-1, math.inf), ("inf", math.inf), (45, 45.0)])
def test_idle_timeout_seconds_forms(tmp_path: Path, value: Any, expected: float) -> None:
    config = parse_config({"idle_timeout_seconds": value, "models": [model()]}, base_dir=tmp_path)
    assert config.idle_timeout_seconds == expected
    assert config.unload_after(config.models[0]) == expected


def test_idle_timeout_seconds_negative_is_an_error(tmp_path: Path) -> None:
    assert names_key(error_of(tmp_path, {"idle_timeout_seconds": -3}), "idle_timeout_seconds")


# ---- paths ----------------------------------------------------------------------


def test_relative_paths_resolve_from_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    config = load_config(
        write(
            conf_dir,
            {
                "models_dir": "models",
                "db_path": "state/dynllm.db",
                "models": [model(path="gguf/chat.gguf"), model(name="abs", path="/srv/x.gguf")],
            },
        )
    )
    chat, absolute = config.models
    assert config.model_path(chat) == conf_dir / "models" / "gguf" / "chat.gguf"
    assert config.model_path(absolute) == Path("/srv/x.gguf")  # models_dir does not apply
    assert config.db_file == conf_dir / "state" / "dynllm.db"


def test_absolute_models_dir(tmp_path: Path) -> None:
    store = tmp_path / "store"
    config = load_config(write(tmp_path, {"models_dir": str(store), "models": [model()]}))
    assert config.model_path(config.models[0]) == store / "chat.gguf"


def test_relative_model_path_without_models_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    config = load_config(write(conf_dir, {"models": [model(path="chat.gguf")]}))
    assert config.model_path(config.models[0]) == conf_dir / "chat.gguf"


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config(write(tmp_path, {"models_dir": "~/models", "models": [model()]}))
    assert config.model_path(config.models[0]) == tmp_path / "home" / "models" / "chat.gguf"


def test_missing_model_files_are_reported_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "present.gguf").write_bytes(b"gguf")
    config = load_config(
        write(
            tmp_path,
            {
                "models": [
                    model(name="present", path="present.gguf"),
                    model(name="absent", path="absent.gguf"),
                ]
            },
        )
    )
    assert [m.name for m in config.missing_model_files()] == ["absent"]


# ---- load timeout and other per-model values ----------------------------------


def test_load_timeout_per_model_overrides_global(tmp_path: Path) -> None:
    config = parse_config(
        {
            "load_timeout_seconds": 30,
            "models": [model(name="slow", load_timeout_seconds=900), model(name="plain")],
        },
        base_dir=tmp_path,
    )
    slow, plain = config.models
    assert config.load_timeout(slow) == 900
    assert config.load_timeout(plain) == 30


def test_load_timeout_default(tmp_path: Path) -> None:
    config = parse_config({"models": [model()]}, base_dir=tmp_path)
    assert config.load_timeout(config.models[0]) == 600


def test_extra_args_and_env_become_strings(tmp_path: Path) -> None:
    text = (
        "models:\n"
        "  - {name: chat, path: chat.gguf, backend: llamacpp, vram_mb: 1,\n"
        "     extra_args: [--threads, 8, --temp, 0.7], env: {OMP_NUM_THREADS: 4, DEBUG: true}}\n"
    )
    m = load_config(write(tmp_path, text)).models[0]
    assert m.extra_args == ["--threads", "8", "--temp", "0.7"]
    assert m.env == {"OMP_NUM_THREADS": "4", "DEBUG": "True"}


def test_aliases_and_preload_by_alias(tmp_path: Path) -> None:
    config = parse_config(
        {"preload_models": ["gpt-4o-mini"], "models": [model(aliases=["gpt-4o-mini", "chat2"])]},
        base_dir=tmp_path,
    )
    assert config.models[0].aliases == ["gpt-4o-mini", "chat2"]
    assert config.preload_models == ["gpt-4o-mini"]


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    assert parse_config({"log_level": "WARNING"}, base_dir=tmp_path).log_level == "warning"


def test_vllm_backend_and_lifo_policy(tmp_path: Path) -> None:
    config = parse_config(
        {
            "enabled_backends": ["vllm"],
            "eviction_policy": "lifo",
            "models": [model(backend="vllm", pinned=True)],
        },
        base_dir=tmp_path,
    )
    assert config.models[0].backend is BackendName.VLLM
    assert config.models[0].pinned is True
    assert config.eviction_policy is EvictionPolicy.LIFO


# ---- invalid configs ------------------------------------------------------------


@dataclass(frozen=True)
class Invalid:
    """A config that must be refused; ``key`` is the path its message must start with."""

    id: str
    data: dict[str, Any] | str | Callable[[Path], Path]  # dumped, raw YAML, or makes the file
    key: str | None
    reason: str

    def write(self, tmp_path: Path) -> Path:
        if callable(self.data):
            path: Path = self.data(tmp_path)
            return path
        return write(tmp_path, self.data)


def _directory(tmp_path: Path) -> Path:
    folder = tmp_path / "a-folder.yaml"
    folder.mkdir()
    return folder


def _absent(tmp_path: Path) -> Path:
    return tmp_path / "no-such-config.yaml"


INVALID_CONFIGS: list[Invalid] = [
    Invalid(
        "unknown-backend",
        {"models": [model(backend="ollama")]},
        "models[0] ('chat').backend",
        "unknown backend 'ollama'",
    ),
    Invalid(
        "duplicate-name",
        {"models": [model(), model(path="other.gguf")]},
        "models[1].name",
        "'chat' is already used by models[0].name",
    ),
    Invalid(
        "alias-collides-with-name",
        {"models": [model(), model(name="other", aliases=["chat"])]},
        "models[1].aliases[0]",
        "'chat' is already used by models[0].name",
    ),
    Invalid(
        "two-aliases-collide",
        {"models": [model(aliases=["fast"]), model(name="other", aliases=["fast"])]},
        "models[1].aliases[0]",
        "'fast' is already used by models[0].aliases[0]",
    ),
    Invalid(
        "missing-path",
        {"models": [{"name": "chat", "backend": "llamacpp", "vram_mb": 1}]},
        "models[0] ('chat').path",
        "backend 'llamacpp' needs the model's path",
    ),
    Invalid(
        "negative-vram",
        {"models": [model(vram_mb=-100)]},
        "models[0] ('chat').vram_mb",
        "greater than or equal to 0",
    ),
    Invalid(
        "inverted-port-range",
        {"backend": {"port_range_start": 9200, "port_range_end": 9100}},
        "backend.port_range_end",
        "below port_range_start",
    ),
    Invalid(
        "preload-unknown-model",
        {"preload_models": ["ghost"], "models": [model()]},
        "preload_models[0]",
        "no model is named 'ghost'",
    ),
    Invalid(
        "model-larger-than-budget",
        {"total_vram_mb": 4096, "models": [model(vram_mb=6000)]},
        "models[0].vram_mb",
        "larger than total_vram_mb",
    ),
    Invalid(
        "backend-not-enabled",
        {"enabled_backends": ["llamacpp"], "models": [model(backend="openvino")]},
        "models[0].backend",
        "not in enabled_backends",
    ),
    Invalid(
        "unknown-model-key",
        {"models": [model(vram_m=1000)]},
        "models[0] ('chat').vram_m",
        "unknown key",
    ),
    Invalid(
        "unknown-top-level-key",
        {"idle_timeout_second": 60},
        "idle_timeout_second",
        "unknown key",
    ),
    Invalid(
        "unknown-server-key",
        {"server": {"prot": 8000}},
        "server.prot",
        "unknown key",
    ),
    Invalid(
        "wrong-type",
        {"models": [model(vram_mb="lots")]},
        "models[0] ('chat').vram_mb",
        "valid integer",
    ),
    Invalid(
        "invalid-eviction-policy",
        {"eviction_policy": "fifo"},
        "eviction_policy",
        "'lru' or 'lifo'",
    ),
    Invalid(
        "negative-unload-time",
        {"models": [model(unload_time=-5)]},
        "models[0] ('chat').unload_time",
        "-1/inf",
    ),
    Invalid(
        "invalid-log-level",
        {"log_level": "verbose"},
        "log_level",
        "'debug'",
    ),
    Invalid(
        "port-out-of-range",
        {"server": {"port": 70000}},
        "server.port",
        "65535",
    ),
    Invalid(
        "zero-load-timeout",
        {"models": [model(load_timeout_seconds=0)]},
        "models[0] ('chat').load_timeout_seconds",
        "greater than 0",
    ),
    Invalid(
        "invalid-quantization",
        {"models": [model(quantization="gptq")]},
        "models[0] ('chat').quantization",
        "'bnb-4bit'",
    ),
    Invalid(
        "model-not-a-mapping",
        {"models": ["chat"]},
        "models[0]",
        "valid dictionary",
    ),
    Invalid(
        "invalid-yaml",
        "server:\n  host: 127.0.0.1\n  port: [8000\nmodels: []\n",
        None,
        "invalid YAML",
    ),
    Invalid(
        "not-a-mapping",
        "- name: chat\n  path: chat.gguf\n",
        "(top level)",
        "must be a YAML mapping",
    ),
    Invalid("unreadable-directory", _directory, None, "cannot read config file"),
    Invalid("absent-file", _absent, None, "No such file or directory"),
]


@pytest.mark.parametrize("case", INVALID_CONFIGS, ids=lambda c: c.id)
def test_invalid_config_names_the_key(tmp_path: Path, case: Invalid) -> None:
    path = case.write(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert case.reason in message
    if case.key is not None:
        assert names_key(message, case.key), message
    else:
        assert str(path) in message  # file-level problems name the file


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"models": [model(vram_mb=-1, backend="x")]})
    assert names_key(message, "models[0] ('chat').backend")
    assert names_key(message, "models[0] ('chat').vram_mb")


def test_invalid_yaml_says_where(tmp_path: Path) -> None:
    message = error_of(tmp_path, "models:\n  - name: a\n   path: b\n")
    assert "invalid YAML" in message
    assert "line 3" in message


def test_parse_config_rejects_a_non_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^\(top level\): "):
        parse_config(["models"])


def test_config_is_immutable(tmp_path: Path) -> None:
    config = parse_config({"models": [model()]}, base_dir=tmp_path)
    with pytest.raises(ValueError):
        config.total_vram_mb = 1  # type: ignore[misc]
    with pytest.raises(ValueError):
        config.models[0].vram_mb = 1  # type: ignore[misc]


# ---- content that once escaped load_config or was silently accepted ----


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"models": [model(unload_time="soon")]}, "models[0] ('chat').unload_time"),
        ({"idle_timeout_seconds": "soon"}, "idle_timeout_seconds"),
        ({"models": [model(unload_time=[60])]}, "models[0] ('chat').unload_time"),
        ({"idle_timeout_seconds": {"minutes": 5}}, "idle_timeout_seconds"),
    ],
    ids=["unload_time-str", "idle_timeout_seconds-str", "unload_time-list", "idle-mapping"],
)
def test_non_numeric_timeout_names_the_key(tmp_path: Path, data: Any, key: str) -> None:
    message = error_of(tmp_path, data)
    assert names_key(message, key), message


@pytest.mark.parametrize("literal", [".nan", "nan"])
def test_nan_unload_time_is_an_error(tmp_path: Path, literal: str) -> None:
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, with_unload_time(literal)))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            {"backend": "command", "command": ["srv", "{model_path}"]},
            "models[0] ('m').path: the command uses {model_path}, so the model needs a path",
        ),
        (
            {"backend": "llamacpp", "path": "m.gguf", "command": ["srv"]},
            "models[0] ('m').command: only backend 'command' uses it, not 'llamacpp'",
        ),
        (
            {"backend": "command", "command": ["srv"], "extra_args": ["--m", "{model_path}"]},
            "models[0] ('m').path: the command uses {model_path}, so the model needs a path",
        ),
        (
            {
                "backend": "llamacpp",
                "path": "m.gguf",
                "model_type": "llm",
                "mmproj": "p.gguf",
                "gpu_memory_utilization": 0.5,
            },
            "models[0] ('m').gpu_memory_utilization: only backend 'vllm' uses it, not 'llamacpp'",
        ),
        (
            {"backend": "vllm", "path": "m", "model_type": "llm", "mmproj": "p.gguf"},
            "models[0] ('m').mmproj: only backend 'llamacpp' uses it, not 'vllm'",
        ),
        (
            {"backend": "llamacpp", "path": "m", "model_type": "llm", "health_path": "/h"},
            "models[0] ('m').health_path: only backend 'command' uses it, not 'llamacpp'",
        ),
        (
            {"backend": "command", "command": ["srv"], "health_path": "health"},
            "models[0] ('m').health_path: a URL path must start with '/', not 'health'",
        ),
        (
            {"backend": "command", "command": ["srv"], "upstream_paths": {"audio.speech": "tts"}},
            "models[0] ('m').upstream_paths.audio.speech: a URL path must start with '/'",
        ),
        (
            {"backend": "command", "command": ["srv"], "upstream_paths": {"chatt": "/c"}},
            "models[0].upstream_paths ('m'): unknown API family 'chatt'",
        ),
    ],
)
def test_new_backend_keys_are_checked(model: dict[str, Any], message: str) -> None:
    entry = {"name": "m", "vram_mb": 1, "model_type": "speech", **model}
    with pytest.raises(ConfigError) as info:
        parse_config({"enabled_backends": ["llamacpp", "vllm", "command"], "models": [entry]})
    assert str(info.value).startswith(message)


def test_max_queued_requests_needs_max_concurrent_requests() -> None:
    model = {"name": "m", "path": "m.gguf", "backend": "llamacpp", "vram_mb": 1}
    with pytest.raises(ConfigError, match=r"max_queued_requests: .*max_concurrent_requests"):
        parse_config({"models": [{**model, "max_queued_requests": 3}]})
    both = parse_config({"models": [{**model, "max_queued_requests": 3,
                                     "max_concurrent_requests": 1}]})  # fmt: skip
    assert both.models[0].max_queued_requests == 3
