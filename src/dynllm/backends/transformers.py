"""Hugging Face ``transformers serve`` with the model preloaded (positional argument)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from dynllm.backends.base import Adapter, Launch
from dynllm.config import BackendName, ModelConfig
from dynllm.registry import ApiFamily


def served_name(model: ModelConfig, path: Path) -> str:
    return f"{path}@{model.revision}" if model.revision else str(path)


class Transformers(Adapter):
    name = BackendName.TRANSFORMERS
    routes: ClassVar = {
        ApiFamily.CHAT: "/v1/chat/completions",
        ApiFamily.COMPLETIONS: "/v1/completions",
        ApiFamily.TRANSCRIPTION: "/v1/audio/transcriptions",
    }

    def argv(self, launch: Launch) -> list[str]:
        m = launch.model
        args = [
            launch.binary, "serve", served_name(m, launch.model_path),
            "--host", launch.host,
            "--port", str(launch.port),
        ]  # fmt: skip
        for flag, value in (
            ("--device", m.device),
            ("--dtype", m.dtype),
            ("--attn-implementation", m.attn_implementation),
            ("--model-timeout", m.model_timeout),
        ):
            if value is not None:
                args += [flag, str(value)]
        if m.quantization and m.quantization != "none":
            args += ["--quantization", m.quantization]
        if m.trust_remote_code:
            args.append("--trust-remote-code")
        if m.continuous_batching:
            args.append("--continuous-batching")
        if m.compile_model:
            args.append("--compile")
        return args + list(m.extra_args)

    def rewrite_model(self, model: ModelConfig, launch_path: Path) -> str | None:
        # The server is pinned to its positional model and rejects any other name.
        return served_name(model, launch_path)
