"""OpenVINO Model Server ``ovms``: one process per OpenVINO IR model directory."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from dynllm.backends.base import Adapter, Launch
from dynllm.config import BackendName, ModelConfig, ModelType
from dynllm.registry import ApiFamily

# ``--task`` per model type; computer-vision types use the plain model flow (no task).
TASKS: dict[ModelType, str] = {
    ModelType.LLM: "text_generation",
    ModelType.EMBEDDING: "embeddings",
    ModelType.RERANK: "rerank",
    ModelType.IMAGE_GENERATION: "image_generation",
    ModelType.TRANSCRIPTION: "speech2text",
    ModelType.SPEECH: "text2speech",
}


class Ovms(Adapter):
    name = BackendName.OPENVINO
    routes: ClassVar = {
        ApiFamily.CHAT: "/v3/chat/completions",
        ApiFamily.COMPLETIONS: "/v3/completions",
        ApiFamily.EMBEDDINGS: "/v3/embeddings",
        ApiFamily.RERANK: "/v3/rerank",
        ApiFamily.IMAGES: "/v3/images/generations",
        ApiFamily.TRANSCRIPTION: "/v3/audio/transcriptions",
        ApiFamily.TRANSLATION: "/v3/audio/translations",
        ApiFamily.SPEECH: "/v3/audio/speech",
    }

    def argv(self, launch: Launch) -> list[str]:
        m = launch.model
        args = [
            launch.binary,
            "--rest_port", str(launch.port),
            "--rest_bind_address", launch.host,
            "--port", "0",  # gRPC off: only the REST API is proxied
            "--model_path", str(launch.model_path),
            "--model_name", m.name,
            "--target_device", m.target_device,
        ]  # fmt: skip
        task = TASKS.get(m.model_type)
        if task is not None:
            args += ["--task", task]
        if m.ovms_shape:
            args += ["--shape", m.ovms_shape]
        return args + list(m.extra_args)

    def upstream_path(self, model: ModelConfig, family: ApiFamily) -> str | None:
        if family is ApiFamily.KSERVE:  # the prefix for /v2/models/{name}[...]
            return None if model.model_type in TASKS else f"/v2/models/{self.in_url(model.name)}"
        return self.routes.get(family)

    def rewrite_model(self, model: ModelConfig, launch_path: Path) -> str | None:
        return model.name  # OVMS answers 404 for any name but the one it serves

    def probe(self, model: ModelConfig) -> str:
        # /v2/health/ready only says the config is parsed; the model-level
        # endpoint is the one that guarantees requests will be served.
        return f"/v2/models/{self.in_url(model.name)}/ready"
