"""vLLM ``vllm serve``: one engine per model, served under the model's name."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from dynllm.backends.base import Adapter, Launch
from dynllm.config import BackendName, ModelConfig
from dynllm.registry import ApiFamily


class Vllm(Adapter):
    name = BackendName.VLLM
    routes: ClassVar = {
        ApiFamily.CHAT: "/v1/chat/completions",
        ApiFamily.COMPLETIONS: "/v1/completions",
        ApiFamily.EMBEDDINGS: "/v1/embeddings",
        ApiFamily.RERANK: "/v1/rerank",
        ApiFamily.TRANSCRIPTION: "/v1/audio/transcriptions",
        ApiFamily.TRANSLATION: "/v1/audio/translations",
    }

    def argv(self, launch: Launch) -> list[str]:
        m = launch.model
        args = [
            launch.binary, "serve", str(launch.model_path),
            "--host", launch.host,
            "--port", str(launch.port),
            "--served-model-name", m.name,
        ]  # fmt: skip
        if m.dtype:
            args += ["--dtype", m.dtype]
        if m.context_size:
            args += ["--max-model-len", str(m.context_size)]
        return args + list(m.extra_args)

    def rewrite_model(self, model: ModelConfig, launch_path: Path) -> str | None:
        return model.name  # an alias the client used would be a 404 upstream
