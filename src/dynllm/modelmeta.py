"""What a model's files say about it: its type (llm, embedding, ...) and the
figures the VRAM estimate needs, from a GGUF header's metadata or a Hugging Face
/ OpenVINO folder's ``config.json``. Pure: the callers read the files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dynllm.config import ModelType

__all__ = [
    "PROJECTOR_ARCH",
    "ModelMeta",
    "gguf_meta",
    "gguf_model_type",
    "hf_meta",
    "hf_model_type",
]


@dataclass(frozen=True)
class ModelMeta:
    """What the VRAM estimate needs; None where the files do not say."""

    architecture: str | None
    layers: int | None
    kv_heads: int | None
    """KV heads per layer (per-layer counts are averaged, rounded up)."""
    head_dim_k: int | None
    """Key length per head."""
    head_dim_v: int | None
    """Value length per head."""
    train_context: int | None
    weight_bytes: int
    """Tensor data bytes (GGUF: over all shards); HF and IR: the weight files' sizes."""
    kv_bytes_per_element: float = 2.0
    """f16 KV cache (llama.cpp's default); HF: from ``torch_dtype``."""
    causal: bool = True
    """False for encoders (BERT-like): llama.cpp allocates no KV cache for them."""


# ---- model types ---------------------------------------------------------------------
# llama.cpp's encoder-only architectures (no KV cache; embedding models).
_GGUF_ENCODERS = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "neo-bert",
        "modern-bert",
        "eurobert",
        "t5encoder",
    }
)
_POOLING_NONE = 0
_POOLING_RANK = 4  # gguf.PoolingType.RANK
PROJECTOR_ARCH = "clip"  # llama.cpp's mtmd projectors (vision and audio)


def gguf_model_type(metadata: Mapping[str, Any]) -> ModelType:
    """llm, embedding or rerank from a GGUF's architecture and pooling type."""
    arch = metadata.get("general.architecture")
    pooling = metadata.get(f"{arch}.pooling_type")
    if pooling == _POOLING_RANK:
        return ModelType.RERANK
    if arch in _GGUF_ENCODERS or (isinstance(pooling, int) and pooling != _POOLING_NONE):
        return ModelType.EMBEDDING
    return ModelType.LLM


# transformers' model_type of encoder-only families (no KV cache).
_HF_ENCODERS = frozenset(
    {
        "albert",
        "bert",
        "camembert",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "jina_bert",
        "modernbert",
        "mpnet",
        "new",
        "nomic_bert",
        "roberta",
        "xlm-roberta",
    }
)
_HF_SUFFIX_TYPES: tuple[tuple[tuple[str, ...], ModelType], ...] = (
    (("ForSpeechSeq2Seq", "ForCTC"), ModelType.TRANSCRIPTION),
    (("ForSequenceClassification",), ModelType.RERANK),
    (("ForTextToSpeech", "ForTextToWaveform"), ModelType.SPEECH),
    (
        ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel", "ForImageTextToText"),
        ModelType.LLM,
    ),
    (("ForImageClassification",), ModelType.CLASSIFICATION),
    (("ForObjectDetection",), ModelType.DETECTION),
    (
        ("ForSemanticSegmentation", "ForInstanceSegmentation", "ForUniversalSegmentation"),
        ModelType.SEGMENTATION,
    ),
    (("Model", "ForMaskedLM"), ModelType.EMBEDDING),
)


def hf_model_type(config: Mapping[str, Any], files: Iterable[str] = ()) -> ModelType:
    """The model type of a Hugging Face (or IR) folder from its ``config.json``.

    A sentence-transformers folder (``modules.json``) is an embedding model whatever
    its architecture (Qwen3-Embedding says ``Qwen3ForCausalLM``); Whisper is
    transcription before ``*ForConditionalGeneration`` makes it an llm.
    """
    names = set(files)
    if "modules.json" in names or "sentence_bert_config.json" in names:
        return ModelType.EMBEDDING
    archs = [a for a in config.get("architectures") or () if isinstance(a, str)]
    if any(a.startswith("Whisper") for a in archs) or config.get("model_type") == "whisper":
        return ModelType.TRANSCRIPTION
    for arch in archs:
        for suffixes, kind in _HF_SUFFIX_TYPES:
            if arch.endswith(suffixes):
                return kind
    return ModelType.LLM


# ---- metadata -------------------------------------------------------------------------
def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    return None


def _per_layer(value: Any) -> int | None:
    """An int, or a per-layer tuple averaged and rounded up (so layers x it >= the sum)."""
    if isinstance(value, tuple) and value and all(_int(v) is not None for v in value):
        return math.ceil(sum(value) / len(value))
    return _int(value)


def gguf_meta(metadata: Mapping[str, Any], weight_bytes: int) -> ModelMeta:
    arch = metadata.get("general.architecture")
    arch = arch if isinstance(arch, str) else None

    def key(name: str) -> Any:
        return metadata.get(f"{arch}.{name}")

    heads = _per_layer(key("attention.head_count"))
    kv_heads = _per_layer(key("attention.head_count_kv"))
    if kv_heads is None:
        kv_heads = heads  # llama.cpp's default
    width = _int(key("embedding_length"))
    head_k = _int(key("attention.key_length"))
    if head_k is None and width and heads:
        head_k = width // heads
    head_v = _int(key("attention.value_length"))
    if head_v is None:
        head_v = head_k
    return ModelMeta(
        architecture=arch,
        layers=_int(key("block_count")),
        kv_heads=kv_heads,
        head_dim_k=head_k,
        head_dim_v=head_v,
        train_context=_int(key("context_length")),
        weight_bytes=weight_bytes,
        causal=arch not in _GGUF_ENCODERS,
    )


_DTYPE_BYTES = {"float32": 4.0, "float": 4.0, "float64": 8.0, "float16": 2.0, "bfloat16": 2.0}


def _first(config: Mapping[str, Any], *keys: str) -> int | None:
    for k in keys:
        value = _int(config.get(k))
        if value is not None:
            return value
    return None


def hf_meta(config: Mapping[str, Any], weight_bytes: int) -> ModelMeta:
    """Estimate inputs from a ``config.json`` (the text model's part of a multimodal one)."""
    text = config
    for nested in ("text_config", "llm_config", "language_config"):
        sub = config.get(nested)
        if isinstance(sub, dict):
            text = sub
            break
    layers = _first(
        text, "num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"
    )
    heads = _first(text, "num_attention_heads", "n_head", "n_heads", "decoder_attention_heads")
    kv_heads = _first(text, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if text.get("multi_query") is True else heads
    width = _first(text, "hidden_size", "n_embd", "d_model", "dim")
    head_dim = _first(text, "head_dim")
    if head_dim is None and width and heads:
        head_dim = width // heads
    dtype = text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype")
    dtype = dtype or config.get("dtype")
    archs = config.get("architectures") or ()
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    return ModelMeta(
        architecture=arch,
        layers=layers,
        kv_heads=kv_heads,
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        train_context=_first(
            text,
            "max_position_embeddings",
            "n_positions",
            "max_sequence_length",
            "seq_length",
            "max_target_positions",
        ),
        weight_bytes=weight_bytes,
        kv_bytes_per_element=_DTYPE_BYTES.get(str(dtype), 2.0),
        causal=config.get("model_type") not in _HF_ENCODERS,
    )
