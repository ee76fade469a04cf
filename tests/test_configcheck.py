"""check-config's rules, pure: which pinned and preload sets cannot be in VRAM
together, and which routes of a model's type its backend does not serve.
The command itself (output, exit status) is tested in test_cli.py."""

from __future__ import annotations

from typing import Any

import pytest

from dynllm.config import ModelConfig, parse_config
from dynllm.configcheck import fit_problems, unserved_families


def config(models: list[dict[str, Any]], **top: Any) -> Any:
    entries = [{"path": "m.gguf", "backend": "llamacpp", **m} for m in models]
    return parse_config({"total_vram_mb": 8000, "models": entries, **top})


def test_pinned_models_that_cannot_all_be_loaded() -> None:
    problems = fit_problems(
        config(
            [
                {"name": "a", "vram_mb": 5000, "pinned": True},
                {"name": "b", "vram_mb": 4000, "pinned": True},
                {"name": "c", "vram_mb": 1000},
            ]
        )
    )
    print(problems)
    assert problems == [
        "pinned models need 9000 MB together but total_vram_mb is 8000 MB (a 5000 MB, "
        "b 4000 MB): pinned models are never evicted, so once some are loaded the others "
        "cannot load until one is unloaded by hand"
    ]


def test_pinned_models_that_fit_exactly() -> None:
    models = [
        {"name": "a", "vram_mb": 5000, "pinned": True},
        {"name": "b", "vram_mb": 3000, "pinned": True},
        {"name": "zero", "vram_mb": 0, "pinned": True},  # holds nothing: never in the way
    ]
    assert fit_problems(config(models, preload_models=["a", "b", "zero"])) == []


def test_preload_next_to_the_pinned_models() -> None:
    models = [
        {"name": "p", "vram_mb": 6000, "pinned": True},
        {"name": "q", "vram_mb": 3000, "aliases": ["q-alias"]},
    ]
    problems = fit_problems(config(models, preload_models=["q-alias"]))
    print(problems)
    assert problems == [
        "preload_models and the pinned models need 9000 MB together but total_vram_mb is "
        "8000 MB (q 3000 MB, p 6000 MB): pinned models are never evicted, so a preloaded "
        "model is evicted to make room for them (or cannot load behind them)"
    ]
    # Without the preload, the pinned model alone fits: nothing to say.
    assert fit_problems(config(models)) == []


def test_preload_models_that_evict_each_other() -> None:
    models = [{"name": "a", "vram_mb": 5000}, {"name": "b", "vram_mb": 4000}]
    problems = fit_problems(config(models, preload_models=["a", "b", "a"]))
    assert problems == [
        "preload_models need 9000 MB together but total_vram_mb is 8000 MB (a 5000 MB, "
        "b 4000 MB): loading them in order evicts earlier ones, so they do not stay "
        "loaded together"
    ]
    assert fit_problems(config(models, preload_models=["a", "a"])) == []  # counted once


def model(backend: str, model_type: str) -> ModelConfig:
    extra = {"command": ["srv"]} if backend == "command" else {}
    return ModelConfig(name="x", path="p", backend=backend, vram_mb=1,  # type: ignore[arg-type]
                       model_type=model_type, **extra)  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize(
    ("backend", "model_type", "unserved"),
    [
        ("openvino", "llm", ["responses"]),
        ("transformers", "transcription", ["audio.translations"]),
        ("llamacpp", "llm", []),
        ("command", "ocr", []),
    ],
)
def test_routes_a_backend_does_not_serve(
    backend: str, model_type: str, unserved: list[str]
) -> None:
    assert unserved_families(model(backend, model_type)) == unserved
