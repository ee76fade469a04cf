"""vLLM ``vllm serve``: one engine per model, served under the model's name.

The port is bound early but refuses connections until the engine is up; then
``GET /health`` answers 200 with an empty body (503 once the engine died), so
the default probe is the right one.  vLLM answers 404 to any ``model`` but its
``--served-model-name``, hence the rewrite to the canonical name.

Embedding and rerank models run on the pooling runner (``--runner pooling``):
a decoder-only checkpoint is then converted to an embedding model, and a
``*ForSequenceClassification`` cross-encoder scores pairs for ``/v1/rerank``.
``context_size`` becomes ``--max-model-len`` (0 leaves it to the model's own).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from dynllm.backends.base import Adapter, Launch
from dynllm.config import BackendName, ModelConfig, ModelType
from dynllm.registry import ApiFamily

POOLING_TYPES = frozenset({ModelType.EMBEDDING, ModelType.RERANK})


class Vllm(Adapter):
    name = BackendName.VLLM
    routes: ClassVar = {
        ApiFamily.CHAT: "/v1/chat/completions",
        ApiFamily.COMPLETIONS: "/v1/completions",
        ApiFamily.EMBEDDINGS: "/v1/embeddings",
        ApiFamily.RERANK: "/v1/rerank",
        ApiFamily.TRANSCRIPTION: "/v1/audio/transcriptions",
        ApiFamily.TRANSLATION: "/v1/audio/translations",
        ApiFamily.RESPONSES: "/v1/responses",
    }

    def argv(self, launch: Launch) -> list[str]:
        m = launch.model
        args = [
            launch.binary, "serve", str(launch.model_path),
            "--host", launch.host,
            "--port", str(launch.port),
            "--served-model-name", m.name,
        ]  # fmt: skip
        if m.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(m.gpu_memory_utilization)]
        if m.context_size:
            args += ["--max-model-len", str(m.context_size)]
        if m.dtype:
            args += ["--dtype", m.dtype]
        if m.model_type in POOLING_TYPES:
            args += ["--runner", "pooling"]
        return args + list(m.extra_args)

    def rewrite_model(self, model: ModelConfig, launch_path: Path) -> str | None:
        return model.name  # an alias the client used would be a 404 upstream
