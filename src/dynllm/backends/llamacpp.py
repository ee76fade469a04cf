"""llama.cpp ``llama-server``: one process per GGUF model."""

from __future__ import annotations

from typing import ClassVar

from dynllm.backends.base import Adapter, Launch
from dynllm.config import BackendName, ModelType
from dynllm.registry import ApiFamily


class LlamaCpp(Adapter):
    name = BackendName.LLAMACPP
    # probe_path: the default /health, 503 "Loading model" until the weights are in, then 200
    routes: ClassVar = {
        ApiFamily.CHAT: "/v1/chat/completions",
        ApiFamily.COMPLETIONS: "/v1/completions",
        ApiFamily.EMBEDDINGS: "/v1/embeddings",
        ApiFamily.RERANK: "/v1/rerank",
    }
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
        if m.model_type is ModelType.EMBEDDING:
            args += ["--embeddings", "--pooling", "mean"]
        elif m.model_type is ModelType.RERANK:
            args += ["--reranking"]
        return args + list(m.extra_args)
