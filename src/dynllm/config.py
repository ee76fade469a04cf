"""The YAML config as pydantic models; ``load_config`` is the only entry point.

DynLLM's config format is accepted unchanged; every key dynllm adds has a
default, so an old file keeps working.  All validation lives here and is
pure: it reads the YAML file and nothing else (a missing model file is only
reported through ``Config.missing_model_files``, never an error, because a
disk may be mounted after the service starts).
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(Exception):
    """A config that must stop startup; ``str()`` names the key and the reason."""


class BackendName(StrEnum):
    LLAMACPP = "llamacpp"
    OPENVINO = "openvino"
    TRANSFORMERS = "transformers"
    VLLM = "vllm"
    COMMAND = "command"


class ModelType(StrEnum):
    LLM = "llm"
    EMBEDDING = "embedding"
    RERANK = "rerank"
    TRANSCRIPTION = "transcription"
    SPEECH = "speech"
    IMAGE_GENERATION = "image_generation"
    CLASSIFICATION = "classification"
    DETECTION = "detection"
    SEGMENTATION = "segmentation"
    OCR = "ocr"


class EvictionPolicy(StrEnum):
    LRU = "lru"
    LIFO = "lifo"


NonNegInt = Annotated[int, Field(ge=0)]
# Finite: only the idle timeouts give infinity a meaning ("never", see
# _timeout_seconds); elsewhere ``.inf`` loaded and then crashed dynllm where
# the value became an int (a Retry-After header, a byte limit, a timer).
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
MAX_BODY_MB = 1 << 20  # 1 TiB: beyond it the limit in bytes overflowed a float
BodyMB = Annotated[float, Field(gt=0, le=MAX_BODY_MB, allow_inf_nan=False)]
MAX_CHECK_INTERVAL_SECONDS = 86400  # the scheduler's timer cannot take seconds near 1e14


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


LogLevel = Annotated[
    Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)
]
LOG_LEVELS: tuple[str, ...] = get_args(get_args(LogLevel)[0])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"  # this machine only unless the config says otherwise
    port: int = Field(8000, ge=1, le=65535)


class BackendSettings(_Strict):
    llamacpp_binary: str = "llama-server"
    ovms_binary: str = "ovms"
    transformers_binary: str = "transformers"
    vllm_binary: str = "vllm"
    port_range_start: int = Field(9100, ge=1, le=65535)
    port_range_end: int = Field(9200, ge=1, le=65535)

    @model_validator(mode="after")
    def _ordered_range(self) -> BackendSettings:
        if self.port_range_end < self.port_range_start:
            raise ValueError(
                f"port_range_end: {self.port_range_end} is below "
                f"port_range_start ({self.port_range_start})"
            )
        return self

    def binary_for(self, backend: BackendName) -> str:
        return {
            BackendName.LLAMACPP: self.llamacpp_binary,
            BackendName.OPENVINO: self.ovms_binary,
            BackendName.TRANSFORMERS: self.transformers_binary,
            BackendName.VLLM: self.vllm_binary,
            BackendName.COMMAND: "",  # per model: ModelConfig.command[0]
        }[backend]


MAX_SHOWN = 80


def _shown(value: Any) -> str:
    """A value as an error message quotes it: short, and never an exception
    of its own (``repr`` of an int past Python's 4300-digit cap raises)."""
    try:
        text = repr(value)
    except ValueError:
        return "a number too long to show"
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _timeout_seconds(value: Any) -> float | None:
    """``-1``, ``inf`` and ``"inf"`` mean never; ``None`` means use the global one."""
    allowed = "must be -1/inf (never) or a number of seconds >= 0"
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in {"inf", "infinity", "-1", "never"}:
            return math.inf
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{allowed}, not {_shown(value)}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{allowed}, not {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int with hundreds of digits
        raise ValueError(f"{allowed}, not a number this large") from None
    if math.isnan(number):
        raise ValueError(f"{allowed}, not NaN")
    if number == -1 or math.isinf(number):
        return math.inf
    if number < 0:
        raise ValueError(allowed)
    return number


# Keys dynllm added that only one backend reads: set on another, they would be
# silently ignored, so they are refused.
_BACKEND_ONLY_KEYS: dict[str, BackendName] = {
    "mmproj": BackendName.LLAMACPP,
    "gpu_memory_utilization": BackendName.VLLM,
    "command": BackendName.COMMAND,
    "health_path": BackendName.COMMAND,
    "upstream_paths": BackendName.COMMAND,
    "port_owner_check": BackendName.COMMAND,
}


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    path: str = ""
    backend: BackendName
    model_type: ModelType = ModelType.LLM
    vram_mb: NonNegInt
    # llama.cpp
    n_gpu_layers: int = -1
    context_size: int = Field(4096, ge=0)
    mmproj: str | None = None
    """Multimodal projector GGUF (``--mmproj``): audio input, or images in chat."""
    # OpenVINO Model Server
    target_device: str = "CPU"
    ovms_shape: str | None = None
    # transformers serve
    device: str | None = None
    dtype: str | None = None
    quantization: Literal["none", "bnb-4bit", "bnb-8bit"] | None = None
    trust_remote_code: bool = False
    compile_model: bool = False
    continuous_batching: bool = False
    attn_implementation: str | None = None
    model_timeout: NonNegInt | None = None
    revision: str | None = None
    # vLLM
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = None
    # command: any OpenAI- or KServe-compatible server
    command: list[str] | None = None
    """argv with {port}, {host}, {model_path} and {name} replaced at launch."""
    health_path: str = "/health"
    upstream_paths: dict[str, str] = Field(default_factory=dict)
    """Per API family (chat, completions, embeddings, rerank, audio.transcriptions,
    audio.translations, audio.speech, images.generations, responses, kserve):
    the backend's path, where it differs from OpenAI's."""
    port_owner_check: bool = True
    """Probe and use the port only once a process of the backend's own tree
    listens on it.  Off for a server whose port another process holds by
    design (``docker run -p``: docker-proxy); a squatter is then not noticed."""
    # dynllm
    unload_time: float | None = None
    pinned: bool = False
    load_timeout_seconds: PositiveFloat | None = None
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    aliases: list[str] = Field(default_factory=list)
    hidden: bool = False
    """Kept out of /v1/models (still served by name)."""
    max_concurrent_requests: Annotated[int, Field(ge=1)] | None = None
    """Requests served at once; beyond them requests queue (max_queued_requests)."""
    max_queued_requests: NonNegInt | None = None
    """Requests waiting for this model; beyond them 429 with Retry-After."""
    allow_request_overrides: bool = False
    """Let requests choose backend, device, n_gpu_layers, n_ctx,
    gpu_memory_utilization and max_model_len (each choice is its own variant,
    with its own process); discovered models always allow it."""

    @model_validator(mode="after")
    def _backend_needs(self) -> ModelConfig:
        for key, owner in _BACKEND_ONLY_KEYS.items():
            if key in self.model_fields_set and self.backend is not owner:
                raise ValueError(
                    f"{key}: only backend '{owner.value}' uses it, not '{self.backend.value}'"
                )
        if self.max_queued_requests is not None and self.max_concurrent_requests is None:
            raise ValueError(
                "max_queued_requests: it bounds the wait for a max_concurrent_requests "
                "slot; set max_concurrent_requests too"
            )
        if self.backend is BackendName.COMMAND:
            if not self.command or not self.command[0]:
                raise ValueError(
                    "command: backend 'command' needs the argv that starts the server, "
                    'e.g. ["my-server", "--port", "{port}", "--host", "{host}"]'
                )
            argv = [*self.command, *self.extra_args]
            if not self.path and any("{model_path}" in a for a in argv):
                raise ValueError("path: the command uses {model_path}, so the model needs a path")
        elif not self.path:
            raise ValueError(f"path: backend '{self.backend.value}' needs the model's path")
        for key, value in [("health_path", self.health_path), *self.upstream_paths.items()]:
            if not value.startswith("/"):
                where = "health_path" if key == "health_path" else f"upstream_paths.{key}"
                raise ValueError(f"{where}: a URL path must start with '/', not {value!r}")
        return self

    @field_validator("unload_time", mode="before")
    @classmethod
    def _unload_time(cls, value: Any) -> float | None:
        return _timeout_seconds(value)

    @field_validator("extra_args", mode="before")
    @classmethod
    def _stringify_args(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [str(v) for v in value]
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _stringify_env(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        return value


class DiscoveredDefaults(_Strict):
    """Settings for models found in ``models_dir`` / ``model_dirs`` (no YAML entry)."""

    context_size: int = Field(4096, ge=0)
    """Context of llama.cpp (``-c``) and vLLM (``--max-model-len``; 0: the model's own)."""
    n_gpu_layers: int = -1
    unload_time: float | None = None
    """Idle seconds before unloading (-1/inf: never); default idle_timeout_seconds."""
    device: str | None = None
    """transformers serve ``--device`` (cpu, cuda, auto, ...)."""
    target_device: str = "CPU"
    """OpenVINO device for IR folders."""
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = None
    vram_overhead_mb: NonNegInt = 512
    """Added to weights + KV cache in the VRAM estimate (compute buffers, CUDA context)."""
    load_timeout_seconds: PositiveFloat | None = None

    @field_validator("unload_time", mode="before")
    @classmethod
    def _unload_time(cls, value: Any) -> float | None:
        return _timeout_seconds(value)


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    total_vram_mb: NonNegInt = 8192
    idle_timeout_seconds: float = 300
    enabled_backends: list[BackendName] = Field(
        default_factory=lambda: [BackendName.LLAMACPP, BackendName.OPENVINO]
    )
    backend: BackendSettings = Field(default_factory=BackendSettings)
    models_dir: str | None = None
    db_path: str = "dynllm_state.db"
    log_level: LogLevel = "info"
    preload_models: list[str] = Field(default_factory=list)
    models: list[ModelConfig] = Field(default_factory=list)
    # dynllm additions
    eviction_policy: EvictionPolicy = EvictionPolicy.LRU
    load_timeout_seconds: PositiveFloat = 600
    health_poll_interval_ms: Annotated[int, Field(ge=1)] = 100
    stop_timeout_seconds: PositiveFloat = 10
    idle_check_interval_seconds: Annotated[
        float, Field(gt=0, le=MAX_CHECK_INTERVAL_SECONDS, allow_inf_nan=False)
    ] = 5
    queue_timeout_seconds: PositiveFloat = 120
    upstream_read_timeout_seconds: PositiveFloat | None = None
    max_upload_mb: BodyMB = 256
    max_body_mb: BodyMB = 64
    allowed_hosts: list[str] = Field(default_factory=list)
    """Host names accepted besides loopback ones while bound to loopback."""
    api_keys: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    admin_api_keys: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    cors_origins: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    """Origins (``https://chat.example``, or ``*``) whose pages may call the model
    routes from a browser; admin routes never answer cross-origin."""
    header_timeout_seconds: PositiveFloat = 10
    """A connection must finish its request line and headers within this."""
    body_idle_timeout_seconds: PositiveFloat = 30
    """A request body that sends no byte for this long is dropped."""
    max_connections: Annotated[int, Field(ge=1)] = 1024
    """Concurrent connections and requests beyond this get 503."""
    load_failure_cooldown_seconds: NonNegFloat = 5
    """After a failed load, the first wait before the next try (doubles per failure; 0: off)."""
    load_failure_cooldown_max_seconds: NonNegFloat = 300
    log_format: Literal["text", "json"] = "text"
    """One line per record: human text, or one JSON object (for log shippers)."""
    backend_log_level: LogLevel = "info"
    """The level backends' output is logged at, tagged by model."""
    loading_progress: bool = True
    """SSE comment lines (``: loading MODEL 3.2s``) once a second while a
    streaming request waits for a cold model."""
    list_aliases: bool = True
    """/v1/models lists each alias as its own entry."""
    # models without YAML (discovery, per-request settings, downloads)
    discovery: bool = True
    """Serve the models found in models_dir and model_dirs without YAML entries."""
    model_dirs: list[str] = Field(default_factory=list)
    """More folders to discover models in (models_dir is always the first)."""
    rescan_interval_seconds: NonNegFloat = 60
    """How often the model folders are scanned again (0: only at startup and
    on POST /admin/models/rescan)."""
    discovered_defaults: DiscoveredDefaults = Field(default_factory=DiscoveredDefaults)
    hf_token: str | None = None
    """Hugging Face token for gated and private repos (else HF_TOKEN)."""
    hf_endpoint: str | None = None
    """The Hub's address (else HF_ENDPOINT, else https://huggingface.co)."""
    max_concurrent_downloads: Annotated[int, Field(ge=1)] = 2
    """Downloads running at once; more wait their turn as "queued"."""

    # Where relative paths are resolved from (the config file's folder).
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @field_validator("idle_timeout_seconds", mode="before")
    @classmethod
    def _idle_timeout(cls, value: Any) -> float:
        parsed = _timeout_seconds(value)
        return math.inf if parsed is None else parsed

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        owners: dict[str, str] = {}
        for i, model in enumerate(self.models):
            for j, label in enumerate([model.name, *model.aliases]):
                key = f"models[{i}].name" if j == 0 else f"models[{i}].aliases[{j - 1}]"
                if label in owners:
                    raise ValueError(f"{key}: '{label}' is already used by {owners[label]}")
                owners[label] = f"{key} ('{model.name}')"
            if model.backend not in self.enabled_backends:
                enabled = ", ".join(b.value for b in self.enabled_backends) or "none"
                raise ValueError(
                    f"models[{i}].backend: '{model.backend.value}' is not in "
                    f"enabled_backends ({enabled})"
                )
            if model.vram_mb > self.total_vram_mb:
                raise ValueError(
                    f"models[{i}].vram_mb: {model.vram_mb} MB is larger than "
                    f"total_vram_mb ({self.total_vram_mb} MB); it could never be loaded"
                )
        for i, name in enumerate(self.preload_models):
            if name not in owners:
                raise ValueError(f"preload_models[{i}]: no model is named '{name}'")
        return self

    # ---- derived values -------------------------------------------------
    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        return self.base_dir / p

    def model_file(self, path: str) -> Path:
        """A model file's ``path`` as is when absolute, else under ``models_dir``
        (or the config's folder)."""
        base = self.base_dir if self.models_dir is None else self.resolve(self.models_dir)
        return base / Path(path).expanduser()  # an absolute right side wins

    def model_path(self, model: ModelConfig) -> Path:
        return self.model_file(model.path)

    @property
    def db_file(self) -> Path:
        return self.resolve(self.db_path)

    def unload_after(self, model: ModelConfig) -> float:
        return self.idle_timeout_seconds if model.unload_time is None else model.unload_time

    def load_timeout(self, model: ModelConfig) -> float:
        return model.load_timeout_seconds or self.load_timeout_seconds

    def missing_model_files(self) -> list[ModelConfig]:
        return [m for m in self.models if m.path and not self.model_path(m).exists()]


_PLAIN_KEY = re.compile(r"[^\W\d][\w-]*")


def _format_location(loc: tuple[int | str, ...], data: Any) -> str:
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item == "[key]":  # pydantic's mark: the mapping's key itself is wrong
            parts.append(item)
        else:
            # An empty or odd key is quoted: unquoted, '' read as "(top level)".
            key = item if _PLAIN_KEY.fullmatch(item) else _shown(item)
            parts.append(("." if parts else "") + key)
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
        if isinstance(item, int) and isinstance(node, dict) and len(parts) == 2:
            name = node.get("name")
            if isinstance(name, str):  # a name that is not text has its own line
                parts[-1] += f" ('{name}')"
    return "".join(parts) or "(top level)"


def _readable(error: ValidationError, data: Any) -> str:
    lines = []
    for err in error.errors():
        loc = tuple(x for x in err["loc"] if not str(x).startswith("function-"))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see config.example.yaml)"
        elif err["type"] == "enum" and loc and loc[-1] == "backend":
            message = f"unknown backend {_shown(err.get('input'))}: {message}"
        where = _format_location(loc, data)
        own_key = re.match(r"^[A-Za-z_]\w*(?:\[\d+\]|\.[A-Za-z_]\w*)*(?: \('[^']*'\))?: ", message)
        if own_key and not loc:  # cross-field checks name their own key
            lines.append(message)
        elif own_key and err["type"] == "value_error":
            lines.append(f"{where}.{message}")
        else:
            lines.append(f"{where}: {message}")
    return "\n".join(lines)


def _odd_keys(data: dict[Any, Any]) -> list[str]:
    """Keys that are not text where the config's own keys are (YAML reads
    ``no:`` as False and ``1:`` as a number); pydantic would name them by an
    index (``[0]: Keys should be strings``), which points nowhere."""
    sections: list[tuple[str, Any]] = [("", data)]
    sections += [(f"{key}.", data.get(key)) for key in ("server", "backend")]
    models = data.get("models")
    if isinstance(models, list):
        sections += [(f"models[{i}].", entry) for i, entry in enumerate(models)]
    return [
        f"{where}{_shown(key)}: a key must be text, not {type(key).__name__} (YAML reads "
        "unquoted yes/no/on/off/true/false as booleans and digits as numbers: quote it)"
        for where, section in sections
        if isinstance(section, dict)
        for key in section
        if not isinstance(key, str)
    ]


def parse_config(data: Any, base_dir: Path | None = None) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("(top level): the config must be a YAML mapping")
    if odd := _odd_keys(data):
        raise ConfigError("\n".join(odd))
    if data.get("models") is None:
        data = {**data, "models": []}
    if data.get("preload_models") is None:
        data = {**data, "preload_models": []}
    try:
        config = Config.model_validate({**data, "base_dir": base_dir or Path.cwd()})
    except ValidationError as exc:
        raise ConfigError(_readable(exc, data)) from None
    from dynllm.backends import type_problem  # the adapters import this module
    from dynllm.registry import ApiFamily

    families = {f.value for f in ApiFamily}
    problems = [
        f"models[{i}].model_type ('{model.name}'): {problem}"
        for i, model in enumerate(config.models)
        if (problem := type_problem(model))
    ]
    problems += [
        f"models[{i}].upstream_paths ('{model.name}'): unknown API family '{key}'; one of "
        + ", ".join(sorted(families))
        for i, model in enumerate(config.models)
        for key in model.upstream_paths
        if key not in families
    ]
    if problems:
        raise ConfigError("\n".join(problems))
    return config


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that an integer past Python's digit cap
    (4300 by default) is a YAML error at its line and column: ``int()``
    raises a plain ValueError there, which would escape as a traceback."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return int(super().construct_yaml_int(node))
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, "found a number with too many digits", node.start_mark
            ) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def load_config(path: str | Path) -> Config:
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"cannot read config file {file}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {exc}") from None
    except RecursionError:  # PyYAML parses nested lists and mappings recursively
        raise ConfigError(f"{file}: invalid YAML: nested too deeply") from None
    return parse_config(data, base_dir=file.resolve().parent)
