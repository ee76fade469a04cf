"""Model lookup by name or alias, and which API families each model type serves. Pure."""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum

from dynllm.config import Config, ModelConfig, ModelType
from dynllm.errors import ModelNotFound, WrongModelType


class ApiFamily(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    RESPONSES = "responses"
    EMBEDDINGS = "embeddings"
    RERANK = "rerank"
    TRANSCRIPTION = "audio.transcriptions"
    TRANSLATION = "audio.translations"
    SPEECH = "audio.speech"
    IMAGES = "images.generations"
    KSERVE = "kserve"


SERVES: dict[ModelType, frozenset[ApiFamily]] = {
    ModelType.LLM: frozenset({ApiFamily.CHAT, ApiFamily.COMPLETIONS, ApiFamily.RESPONSES}),
    ModelType.EMBEDDING: frozenset({ApiFamily.EMBEDDINGS}),
    ModelType.RERANK: frozenset({ApiFamily.RERANK}),
    ModelType.TRANSCRIPTION: frozenset({ApiFamily.TRANSCRIPTION, ApiFamily.TRANSLATION}),
    ModelType.SPEECH: frozenset({ApiFamily.SPEECH}),
    ModelType.IMAGE_GENERATION: frozenset({ApiFamily.IMAGES}),
    ModelType.CLASSIFICATION: frozenset({ApiFamily.KSERVE}),
    ModelType.DETECTION: frozenset({ApiFamily.KSERVE}),
    ModelType.SEGMENTATION: frozenset({ApiFamily.KSERVE}),
    ModelType.OCR: frozenset({ApiFamily.KSERVE}),
}


class Registry:
    """Resolves the names clients send (canonical names and aliases) to models."""

    def __init__(self, config: Config) -> None:
        self._by_label: dict[str, ModelConfig] = {}
        for model in config.models:
            self._by_label[model.name] = model
            for alias in model.aliases:
                self._by_label[alias] = model
        self._models = list(config.models)

    def __iter__(self) -> Iterator[ModelConfig]:
        return iter(self._models)

    def find(self, label: str) -> ModelConfig | None:
        return self._by_label.get(label)

    def get(self, label: str) -> ModelConfig:
        try:
            return self._by_label[label]
        except KeyError:
            raise ModelNotFound(f"The model '{label}' does not exist") from None

    def for_family(self, label: str, family: ApiFamily) -> ModelConfig:
        return check_family(self.get(label), family, label)


def check_family(model: ModelConfig, family: ApiFamily, label: str) -> ModelConfig:
    """``model`` if its type serves ``family``, else WrongModelType naming ``label``."""
    served = SERVES[model.model_type]
    if family not in served:
        raise WrongModelType(
            f"The model '{label}' has model_type '{model.model_type.value}' and does not "
            f"serve {family.value} requests; it serves: "
            + ", ".join(sorted(f.value for f in served))
        )
    return model
