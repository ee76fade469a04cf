"""llama.cpp ``llama-server``: one process per GGUF model.

A model with ``mmproj`` also loads that multimodal projector GGUF
(``--mmproj``): images in chat for a vision projector, and, for a
``transcription`` model with an audio projector, OpenAI's
``/v1/audio/transcriptions`` (multipart; ``response_format=json`` only).
llama-server has no translations route, and without ``--mmproj`` its
transcription route answers 501, so neither is offered then.
"""

from __future__ import annotations

from typing import ClassVar

from dynllm.backends.base import Adapter, Launch
from dynllm.config import BackendName, ModelConfig, ModelType
from dynllm.registry import ApiFamily


class LlamaCpp(Adapter):
    name = BackendName.LLAMACPP
    # probe_path: the default /health, 503 "Loading model" until the weights are in, then 200
    routes: ClassVar = {
        ApiFamily.CHAT: "/v1/chat/completions",
        ApiFamily.COMPLETIONS: "/v1/completions",
        ApiFamily.RESPONSES: "/v1/responses",
        ApiFamily.EMBEDDINGS: "/v1/embeddings",
        ApiFamily.RERANK: "/v1/rerank",
    }
    transcription_path: ClassVar = "/v1/audio/transcriptions"
    bind_failure_markers = ("couldn't bind http server socket", "address already in use")

    def argv(self, launch: Launch) -> list[str]:
        m = launch.model
        args = [
            launch.binary,
            "-m", str(launch.model_path),
            "--host", launch.host,
            "--port", str(launch.port),
            "-c", str(m.context_size),
            "-ngl", str(m.n_gpu_layers),
            "--alias", m.name,
        ]  # fmt: skip
        if launch.mmproj_path is not None:
            args += ["--mmproj", str(launch.mmproj_path)]
        if m.model_type is ModelType.EMBEDDING:
            args += ["--embeddings", "--pooling", "mean"]
        elif m.model_type is ModelType.RERANK:
            args += ["--reranking"]
        return args + list(m.extra_args)

    def upstream_path(self, model: ModelConfig, family: ApiFamily) -> str | None:
        if family is ApiFamily.TRANSCRIPTION:
            audio = model.model_type is ModelType.TRANSCRIPTION and model.mmproj is not None
            return self.transcription_path if audio else None
        return self.routes.get(family)

    def type_hint(self, model: ModelConfig) -> str:
        if model.model_type is ModelType.TRANSCRIPTION and model.mmproj is None:
            return "; a transcription model needs 'mmproj': an audio projector GGUF"
        return ""
