"""The models dynllm serves, built whole: the YAML's, the ones discovered on
disk, and the variants requests asked for.  Pure, apart from resolving the
YAML models' paths (to tell which discovered file a YAML entry covers).

A ``Catalog`` is immutable; ``hotreload.Reloader`` builds a new one when the
config is re-read, the folders are scanned again or a request asks for a new
variant, and swaps it in whole (the effective ``Config`` it holds is what the
registry, the upstream table and the scheduler are built from).

Discovered models (``discovery.Found``) become ``ModelConfig`` entries with
``discovered_defaults`` and a VRAM estimate (``estimate``): weights plus the
KV cache for the context they are started with plus an overhead; vLLM books
the share of the GPU it takes (``gpu_memory_utilization``, default 0.9).

A *variant* is a model started with settings a request chose (XandRouting's
``backend``, ``device``, ``n_gpu_layers``, ``n_ctx``,
``gpu_memory_utilization``, ``max_model_len``): its own entry, process, VRAM
and idle timer, named ``BASE@key=value,...`` after the settings that differ
from the base model's.  Settings the chosen backend does not read are
ignored (XandRouting's example bodies carry all of them), so they never make
a variant of their own.  YAML models take request settings only with
``allow_request_overrides: true``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dynllm.api.bodies import REQUEST_FIELDS
from dynllm.backends import type_problem
from dynllm.config import _BACKEND_ONLY_KEYS, BackendName, Config, ModelConfig
from dynllm.discovery import Found, Kind, Scan, backends_for
from dynllm.errors import BadRequest
from dynllm.estimate import Estimate, estimate

VLLM_DEFAULT_GPU_SHARE = 0.9  # vLLM's own default for --gpu-memory-utilization
MAX_VARIANTS = 32
"""Variants kept at most; beyond it the unloaded ones used longest ago go."""
MAX_LIVE_VARIANTS = 8
"""Variants with a process at once; a request for another new one gets 503."""

_DEVICE = re.compile(r"(cpu|cuda|gpu|auto|npu|mps)(:\d{1,3})?", re.IGNORECASE)
_HF_BACKENDS = backends_for(Kind.HF, tuple(BackendName))


class Source(StrEnum):
    CONFIG = "config"
    DISCOVERED = "discovered"
    VARIANT = "variant"


@dataclass(frozen=True)
class Discovered:
    found: Found
    estimate: Estimate | None
    """None where the backend books a share of the GPU instead (vLLM)."""


@dataclass(frozen=True)
class Variant:
    base: str
    settings: tuple[tuple[str, Any], ...]
    """The request-facing settings that differ from the base, in a fixed order."""


@dataclass(frozen=True)
class Catalog:
    yaml: Config
    """The config as read (file + command line)."""
    scan: Scan
    variants: Mapping[str, Variant]
    config: Config
    """The effective config: YAML models, discovered ones, variants."""
    sources: Mapping[str, Source]
    discovered: Mapping[str, Discovered]
    served_as: Mapping[str, str]
    """A discovered name whose file a YAML model serves -> that model's name."""
    problems: tuple[str, ...] = ()
    paths: Mapping[Path, str] = field(default_factory=dict)
    """Resolved model file or folder -> the name serving it."""

    @property
    def dirs(self) -> tuple[Path, ...]:
        """The folders discovery scans (none with discovery off)."""
        return model_dirs(self.yaml)

    def source(self, name: str) -> Source:
        return self.sources.get(name, Source.CONFIG)

    def base_of(self, name: str) -> str:
        variant = self.variants.get(name)
        return variant.base if variant is not None else name


def model_dirs(config: Config) -> tuple[Path, ...]:
    """The folders discovery scans: models_dir first, then model_dirs."""
    if not config.discovery:
        return ()
    dirs = [config.models_dir] if config.models_dir else []
    return tuple(config.resolve(d) for d in [*dirs, *config.model_dirs])


def empty_scan() -> Scan:
    return Scan(found=(), problems=())


def build(yaml: Config, scan: Scan, variants: Mapping[str, Variant] | None = None) -> Catalog:
    """The catalog of ``yaml`` plus what ``scan`` found plus ``variants``
    (those whose base is gone are dropped)."""
    models = list(yaml.models)
    sources: dict[str, Source] = {m.name: Source.CONFIG for m in models}
    labels = {label for m in models for label in (m.name, *m.aliases)}
    paths: dict[Path, str] = {}
    for m in models:
        if m.path:
            path = _resolved(yaml.model_path(m))
            if path is not None:
                paths.setdefault(path, m.name)
    problems = list(scan.problems)
    discovered: dict[str, Discovered] = {}
    served_as: dict[str, str] = {}
    if yaml.discovery:
        for found in scan.found:
            if found.path in paths:
                served_as[found.name] = paths[found.path]
                continue
            if found.name in labels:
                problems.append(
                    f"{found.path}: not served as '{found.name}': "
                    "a model in the config has that name"
                )
                continue
            spec, problem = discovered_spec(yaml, found)
            if spec is None:
                problems.append(f"{found.path}: {problem}")
                continue
            models.append(spec)
            sources[spec.name] = Source.DISCOVERED
            labels.add(spec.name)
            paths[found.path] = spec.name
            discovered[spec.name] = Discovered(found, _estimate_of(yaml, found.meta, spec))
    kept: dict[str, Variant] = {}
    by_name = {m.name: m for m in models}
    for name, variant in (variants or {}).items():
        base = by_name.get(variant.base)
        if base is None or name in labels:
            continue
        entry = discovered.get(base.name)
        meta = entry.found.meta if entry is not None else None
        try:  # its base may have changed under it (a reload): then it goes
            _effective(yaml, _allowed_backends(entry, base), base, dict(variant.settings))
            spec = _variant_spec(yaml, base, meta, name, dict(variant.settings))
        except (ValidationError, BadRequest) as exc:
            problems.append(f"variant '{name}' dropped: {_reason(exc)}")
            continue
        if (wrong_type := type_problem(spec)) is not None:
            problems.append(f"variant '{name}' dropped: {wrong_type}")
            continue
        models.append(spec)
        sources[name] = Source.VARIANT
        kept[name] = variant
    config = yaml.model_copy(update={"models": models})
    return Catalog(
        yaml=yaml,
        scan=scan,
        variants=kept,
        config=config,
        sources=sources,
        discovered=discovered,
        served_as=served_as,
        problems=tuple(problems),
        paths=paths,
    )


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(str(e["msg"]) for e in exc.errors())
    return str(exc)


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def discovered_spec(config: Config, found: Found) -> tuple[ModelConfig | None, str]:
    """The entry a discovered model is served by, or None and why not."""
    # The backends enabled now (a reload may have changed them since the scan).
    enabled = backends_for(found.kind, config.enabled_backends)
    if not enabled:
        wanted = ", ".join(b.value for b in backends_for(found.kind, tuple(BackendName)))
        return None, f"no enabled backend serves it (add {wanted} to enabled_backends)"
    problem = ""
    for backend in enabled:  # the first that serves its model type
        spec, problem = _spec_on(config, found, backend)
        if spec is not None:
            return spec, ""
    return None, problem


def _spec_on(config: Config, found: Found, backend: BackendName) -> tuple[ModelConfig | None, str]:
    d = config.discovered_defaults
    data: dict[str, Any] = {
        "name": found.name,
        "path": str(found.path),
        "backend": backend,
        "model_type": found.model_type,
        "vram_mb": 0,
        "context_size": d.context_size,
        "unload_time": d.unload_time,
        "load_timeout_seconds": d.load_timeout_seconds,
        "allow_request_overrides": True,
    }
    if backend is BackendName.LLAMACPP:
        data["n_gpu_layers"] = d.n_gpu_layers
        if found.mmproj is not None:
            data["mmproj"] = str(found.mmproj)
    elif backend is BackendName.TRANSFORMERS:
        data["device"] = d.device
    elif backend is BackendName.VLLM and d.gpu_memory_utilization is not None:
        data["gpu_memory_utilization"] = d.gpu_memory_utilization
    elif backend is BackendName.OPENVINO:
        data["target_device"] = d.target_device
    try:
        spec = ModelConfig.model_validate(data)
    except ValidationError as exc:
        return None, "; ".join(str(e["msg"]) for e in exc.errors())
    if (problem := type_problem(spec)) is not None:
        return None, problem
    return spec.model_copy(update={"vram_mb": _vram_mb(config, found.meta, spec)}), ""


def runs_on_gpu(spec: ModelConfig) -> bool:
    if spec.backend is BackendName.LLAMACPP:
        return spec.n_gpu_layers != 0
    if spec.backend is BackendName.TRANSFORMERS:
        return (spec.device or "auto").lower() != "cpu"
    if spec.backend is BackendName.OPENVINO:
        return not spec.target_device.upper().startswith(("CPU", "NPU"))
    return True


def device_of(spec: ModelConfig) -> str:
    """The device as XandRouting names it (``cuda`` or ``cpu``), or the backend's own word."""
    if spec.backend is BackendName.LLAMACPP:
        return "cuda" if spec.n_gpu_layers != 0 else "cpu"
    if spec.backend is BackendName.TRANSFORMERS:
        return spec.device or "auto"
    if spec.backend is BackendName.OPENVINO:
        return spec.target_device.lower()
    return "cuda"


def _estimate_of(config: Config, meta: Any, spec: ModelConfig) -> Estimate | None:
    if spec.backend is BackendName.VLLM or meta is None:
        return None
    return estimate(
        meta,
        context=spec.context_size,
        n_gpu_layers=spec.n_gpu_layers if spec.backend is BackendName.LLAMACPP else -1,
        overhead_mb=config.discovered_defaults.vram_overhead_mb,
        on_gpu=runs_on_gpu(spec),
    )


def _vram_mb(config: Config, meta: Any, spec: ModelConfig) -> int:
    if not runs_on_gpu(spec):
        return 0
    if spec.backend is BackendName.VLLM:
        share = spec.gpu_memory_utilization or VLLM_DEFAULT_GPU_SHARE
        return math.ceil(share * config.total_vram_mb)
    est = _estimate_of(config, meta, spec)
    return est.total_mb if est is not None else 0


# ---- request settings ------------------------------------------------------------
@dataclass(frozen=True)
class RequestSettings:
    settings: dict[str, Any]
    """The settings fields present, checked (REQUEST_SETTINGS)."""
    keep: float | None
    """Idle seconds after this request (ttl / keep_alive); None: not given;
    0: unload right after it; inf: never unload on idle."""
    present: frozenset[str]
    """Every REQUEST_FIELDS key the body carried (removed before forwarding)."""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float:
    """Ollama's ``keep_alive``: seconds as a number, or a duration such as
    ``"5m"``, ``"1h30m"``, ``"10s"``; 0 unloads after the request, a
    negative value keeps the model loaded."""
    if isinstance(value, bool):
        raise BadRequest('keep_alive: a duration such as "5m", seconds, 0 or -1, not a boolean')
    if isinstance(value, int | float):
        return _seconds(_float(value), "keep_alive")
    if isinstance(value, str):
        text = value.strip()
        try:
            return _seconds(float(text), "keep_alive")
        except ValueError:
            pass
        negative = text.startswith("-")
        body = text.removeprefix("-")
        parts = _DURATION.findall(body)
        if parts and "".join(n + u for n, u in parts) == body:
            total = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
            return math.inf if negative else total
    raise BadRequest(
        f'keep_alive: a duration such as "5m" or "1h", seconds, 0 (unload after this '
        f"request) or -1 (keep loaded), not {_quoted(value)}"
    )


def _seconds(number: float, key: str) -> float:
    if math.isnan(number):
        raise BadRequest(f"{key}: a number of seconds, not NaN")
    return math.inf if number < 0 or math.isinf(number) else number


def parse_ttl(value: Any) -> float:
    """XandRouting's ``ttl``: seconds the model stays loaded when idle
    (-1: keep loaded)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"ttl: a number of seconds (-1: keep loaded), not {_quoted(value)}")
    return _seconds(_float(value), "ttl")


def _float(value: float) -> float:
    """A JSON number as seconds; an integer too large for a float is forever."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _quoted(value: Any) -> str:
    try:
        text = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    except ValueError:  # an int past Python's digit limit for repr
        return "a number too long to show"
    return text if len(text) <= 60 else text[:57] + "..."


def _int_field(data: Mapping[str, Any], key: str, low: int) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value > 1 << 31:
        raise BadRequest(f"{key}: a whole number >= {low}, not {_quoted(value)}")
    return value


def parse_request(data: Mapping[str, Any]) -> RequestSettings:
    """The settings and lifetime a request body carries (400 for bad values)."""
    present = frozenset(REQUEST_FIELDS.intersection(data))
    settings: dict[str, Any] = {}
    if "backend" in present:
        value = data["backend"]
        try:
            settings["backend"] = BackendName(value) if isinstance(value, str) else None
        except ValueError:
            settings["backend"] = None
        if settings["backend"] is None:
            names = ", ".join(b.value for b in BackendName)
            raise BadRequest(f"backend: one of {names}, not {_quoted(value)}")
    if "device" in present:
        value = data["device"]
        if not isinstance(value, str) or not _DEVICE.fullmatch(value.strip()):
            raise BadRequest(
                f"device: cpu, cuda (or cuda:N), gpu, auto, npu or mps, not {_quoted(value)}"
            )
        settings["device"] = value.strip().lower()
    if "n_gpu_layers" in present:
        settings["n_gpu_layers"] = _int_field(data, "n_gpu_layers", -1)
    if "n_ctx" in present:
        settings["n_ctx"] = _int_field(data, "n_ctx", 0)
    if "max_model_len" in present:
        settings["max_model_len"] = _int_field(data, "max_model_len", 1)
    if "gpu_memory_utilization" in present:
        value = data["gpu_memory_utilization"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise BadRequest(
                f"gpu_memory_utilization: a share of the GPU above 0 and at most 1, "
                f"not {_quoted(value)}"
            )
        settings["gpu_memory_utilization"] = float(value)
    keep: float | None = None
    if "ttl" in present:
        keep = parse_ttl(data["ttl"])
    if "keep_alive" in present:
        keep = parse_keep_alive(data["keep_alive"])  # Ollama's word wins over XandRouting's
    return RequestSettings(settings, keep, present)


# ---- variants ----------------------------------------------------------------------
def variant_for(
    catalog: Catalog, spec: ModelConfig, settings: Mapping[str, Any]
) -> tuple[str, Variant] | None:
    """The variant of ``spec`` (or of its base, for a variant) that ``settings``
    ask for: its name and definition, or None when they change nothing."""
    base_name = catalog.base_of(spec.name)
    base = next(m for m in catalog.config.models if m.name == base_name)
    merged = dict(catalog.variants[spec.name].settings) if spec.name in catalog.variants else {}
    merged.update(settings)
    allowed = _allowed_backends(catalog.discovered.get(base_name), base)
    wanted = _effective(catalog.config, allowed, base, merged)
    if not wanted:
        return None  # settings that match the model's own (or that its backend ignores)
    if catalog.source(base_name) is Source.CONFIG and not base.allow_request_overrides:
        given = ", ".join(k for k, _ in wanted)
        raise BadRequest(
            f"The model '{base_name}' is set up in the config and takes no per-request "
            f"settings ({given}); its entry may allow them with allow_request_overrides: true"
        )
    name = base_name + "@" + ",".join(f"{k}={_show(v)}" for k, v in wanted)
    return name, Variant(base_name, wanted)


def _show(value: Any) -> str:
    return value.value if isinstance(value, StrEnum) else str(value)


def _allowed_backends(entry: Discovered | None, base: ModelConfig) -> tuple[BackendName, ...]:
    """The backends that could run ``base``'s file (enabled or not)."""
    if entry is not None:
        return backends_for(entry.found.kind, tuple(BackendName))
    if base.backend in _HF_BACKENDS:
        return _HF_BACKENDS
    return (base.backend,)


def _effective(
    config: Config,
    allowed: tuple[BackendName, ...],
    base: ModelConfig,
    settings: Mapping[str, Any],
) -> tuple[tuple[str, Any], ...]:
    """The settings that make a difference for ``base`` (whose file the
    ``allowed`` backends can run), checked and in a fixed order (so one set
    of settings always names one variant)."""
    backend = settings.get("backend", base.backend)
    if backend is not base.backend:
        if backend not in allowed:
            raise BadRequest(
                f"backend: '{backend.value}' cannot serve '{base.name}'; it can be served by "
                + ", ".join(b.value for b in allowed)
            )
        if backend not in config.enabled_backends:
            enabled = ", ".join(b.value for b in config.enabled_backends)
            raise BadRequest(f"backend: '{backend.value}' is not in enabled_backends ({enabled})")
    out: list[tuple[str, Any]] = []
    if backend is not base.backend:
        out.append(("backend", backend))
    fresh = backend is not base.backend  # a new backend starts from its own defaults
    device = settings.get("device")
    if backend is BackendName.LLAMACPP:
        layers = settings.get("n_gpu_layers", base.n_gpu_layers)
        if device == "cpu":
            layers = 0
        elif device is not None and "n_gpu_layers" not in settings and layers == 0:
            layers = -1  # a GPU asked for, and no layer count: all of them (XandRouting's default)
        if layers != base.n_gpu_layers or (fresh and layers != -1):
            out.append(("n_gpu_layers", layers))
        ctx = settings.get("n_ctx", base.context_size)
        if ctx != base.context_size:
            out.append(("n_ctx", ctx))
    elif backend is BackendName.TRANSFORMERS:
        if device is not None and (fresh or device != (base.device or "").lower()):
            out.append(("device", device))
    elif backend is BackendName.VLLM:
        if device == "cpu":
            raise BadRequest(
                "device: vLLM runs on the GPU; for the CPU choose backend transformers "
                "(or llamacpp for a GGUF)"
            )
        share = settings.get("gpu_memory_utilization", base.gpu_memory_utilization)
        if share is not None and (fresh or share != base.gpu_memory_utilization):
            out.append(("gpu_memory_utilization", share))
        length = settings.get("max_model_len", base.context_size)
        if length != base.context_size:
            out.append(("max_model_len", length))
    elif backend is BackendName.OPENVINO and device is not None:
        target = "CPU" if device == "cpu" else "NPU" if device.startswith("npu") else "GPU"
        if target != base.target_device.upper():
            out.append(("device", target.lower()))
    return tuple(out)


def _variant_spec(
    config: Config, base: ModelConfig, meta: Any, name: str, settings: Mapping[str, Any]
) -> ModelConfig:
    data = base.model_dump(exclude_unset=True)
    backend = settings.get("backend", base.backend)
    if backend is not base.backend:
        data = {k: v for k, v in data.items() if _BACKEND_ONLY_KEYS.get(k, backend) is backend}
        data["backend"] = backend
    for key, value in settings.items():
        if key == "n_gpu_layers":
            data["n_gpu_layers"] = value
        elif key in ("n_ctx", "max_model_len"):
            data["context_size"] = value
        elif key == "gpu_memory_utilization":
            data["gpu_memory_utilization"] = value
        elif key == "device":
            if backend is BackendName.OPENVINO:
                data["target_device"] = str(value).upper()
            elif backend is BackendName.TRANSFORMERS:
                data["device"] = value
    data.update(name=name, aliases=[], hidden=True)
    spec = ModelConfig.model_validate(data)
    if meta is not None:
        vram = _vram_mb(config, meta, spec)
    elif not runs_on_gpu(spec):
        vram = 0
    else:
        vram = base.vram_mb
    return spec.model_copy(update={"vram_mb": vram})


def with_variant(catalog: Catalog, name: str, variant: Variant, idle: Iterable[str]) -> Catalog:
    """``catalog`` plus one variant.  Past MAX_VARIANTS, variants in ``idle``
    (unloaded, nobody waiting) go first, in the order given (oldest first)."""
    variants = dict(catalog.variants)
    variants[name] = variant
    if len(variants) <= MAX_VARIANTS:
        return _plus_variant(catalog, name, variant, variants)
    for old in idle:
        if len(variants) <= MAX_VARIANTS:
            break
        if old != name:
            variants.pop(old, None)
    return build(catalog.yaml, catalog.scan, variants)


def _plus_variant(
    catalog: Catalog, name: str, variant: Variant, variants: dict[str, Variant]
) -> Catalog:
    """``catalog`` with one more variant, without rebuilding the rest (a
    request is waiting for it)."""
    base = next(m for m in catalog.config.models if m.name == variant.base)
    entry = catalog.discovered.get(base.name)
    try:
        spec = _variant_spec(
            catalog.yaml, base, entry.found.meta if entry else None, name, dict(variant.settings)
        )
    except ValidationError as exc:
        raise BadRequest(f"These settings cannot serve '{base.name}': {_reason(exc)}") from None
    if (problem := type_problem(spec)) is not None:
        raise BadRequest(f"These settings cannot serve '{base.name}': {problem}")
    config = catalog.config.model_copy(update={"models": [*catalog.config.models, spec]})
    return replace(
        catalog,
        variants=variants,
        config=config,
        sources={**catalog.sources, name: Source.VARIANT},
    )
