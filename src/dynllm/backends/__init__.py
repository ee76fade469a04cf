"""Backend adapters, one per kind of inference server."""

from __future__ import annotations

from dynllm.backends.base import Adapter, Launch
from dynllm.backends.command import Command
from dynllm.backends.llamacpp import LlamaCpp
from dynllm.backends.ovms import Ovms
from dynllm.backends.transformers import Transformers
from dynllm.backends.vllm import Vllm
from dynllm.config import BackendName, Config, ModelConfig

ADAPTERS: dict[BackendName, Adapter] = {
    a.name: a for a in (LlamaCpp(), Ovms(), Transformers(), Vllm(), Command())
}


def adapter_for(model: ModelConfig) -> Adapter:
    return ADAPTERS[model.backend]


def launch_for(config: Config, model: ModelConfig, port: int) -> Launch:
    return Launch(
        binary=config.backend.binary_for(model.backend),
        model=model,
        model_path=config.model_path(model),
        port=port,
    )


def command_line(config: Config, model: ModelConfig, port: int) -> list[str]:
    return adapter_for(model).argv(launch_for(config, model, port))


__all__ = ["ADAPTERS", "Adapter", "Launch", "adapter_for", "command_line", "launch_for"]
