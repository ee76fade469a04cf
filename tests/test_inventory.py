"""The inventory view in XandRouting's shape (its README's ``GET /v1/models/inventory``
example), plus model type, kind, the VRAM estimate and ``served_as``."""

from __future__ import annotations

import json
from pathlib import Path

from dynllm.config import BackendName, ModelType
from dynllm.discovery import Found, FoundFile, Kind, ModelMeta, Scan, scan
from dynllm.estimate import estimate
from dynllm.inventory import inventory
from tests.support.tiny_gguf import write_tiny_llama
from tests.support.tiny_split import write_mmproj

META = ModelMeta("qwen2", 28, 4, 128, 128, 32768, weight_bytes=4_200_000_000)


def xandrouting_model() -> Found:
    """The model of XandRouting's example: one 4200 MB GGUF."""
    folder = Path("/models/qwen2.5-coder-7b-instruct-gguf")
    return Found(
        name="qwen2.5-coder-7b-instruct-gguf/model-Q4_K_M",
        root=Path("/models"),
        path=folder / "model-Q4_K_M.gguf",
        kind=Kind.GGUF,
        files=(FoundFile("model-Q4_K_M.gguf", 4_200_000_000, "gguf"),),
        size=4_200_000_000,
        mmproj=None,
        model_type=ModelType.LLM,
        backends=(BackendName.LLAMACPP,),
        meta=META,
    )


def test_xandrouting_example_shape_and_figures() -> None:
    found = xandrouting_model()
    est = estimate(META, context=4096, overhead_mb=512)
    view = inventory(Scan(found=(found,), problems=()), {found.name: est})
    print(json.dumps(view, indent=1))
    assert view == {
        "models": [
            {
                "name": "qwen2.5-coder-7b-instruct-gguf/model-Q4_K_M",
                "path": "/models/qwen2.5-coder-7b-instruct-gguf/model-Q4_K_M.gguf",
                "size_gb": 4.2,
                "files": [{"name": "model-Q4_K_M.gguf", "size_mb": 4200.0, "type": "gguf"}],
                "recommended_backends": ["llamacpp"],
                "model_type": "llm",
                "kind": "gguf",
                "vram_estimate": {
                    "weights_mb": est.weights_mb,
                    "kv_cache_mb": est.kv_cache_mb,
                    "overhead_mb": 512,
                    "total_mb": est.total_mb,
                    "context": 4096,
                },
            }
        ],
        "total_models": 1,
        "total_size_gb": 4.2,
    }
    # 28 layers x 4 KV heads x 256 x 4096 x 2 bytes = 224 MiB
    assert est.kv_cache_mb == 224


def test_real_scan_rounding_served_as_and_missing_estimates(tmp_path: Path) -> None:
    write_tiny_llama(tmp_path / "vl" / "tiny.gguf")
    write_mmproj(tmp_path / "vl")
    write_tiny_llama(tmp_path / "plain.gguf", n_layer=3)
    result = scan([tmp_path], [BackendName.LLAMACPP])
    estimates = {"plain": estimate(result.found[0].meta, context=0, overhead_mb=256)}
    view = inventory(result, estimates, served={"vl/tiny": "my-yaml-model"})
    json.dumps(view)  # plain JSON all the way down
    plain, vl = view["models"]
    assert plain["name"] == "plain" and vl["name"] == "vl/tiny"
    assert "served_as" not in plain
    assert vl["served_as"] == "my-yaml-model"
    assert plain["vram_estimate"]["context"] == 4096  # the model's own context
    assert plain["vram_estimate"]["overhead_mb"] == 256
    assert vl["vram_estimate"] is None  # no estimate given (the catalog's choice)
    assert vl["mmproj"] == str((tmp_path / "vl" / "mmproj-F16.gguf").resolve())
    assert [f["type"] for f in vl["files"]] == ["gguf", "mmproj"]
    for model, found in zip(view["models"], result.found, strict=True):
        assert model["size_gb"] == round(found.size / 1e9, 2)
        for entry, f in zip(model["files"], found.files, strict=True):
            assert entry["size_mb"] == round(f.size / 1e6, 2)
    assert view["total_models"] == 2
    assert view["total_size_gb"] == round(sum(f.size for f in result.found) / 1e9, 2)
    print(f"tiny models: {[(m['name'], m['size_gb'], m['files']) for m in view['models']]}")


def test_empty_scan() -> None:
    assert inventory(Scan(found=(), problems=("x: missing",)), {}) == {
        "models": [],
        "total_models": 0,
        "total_size_gb": 0.0,
    }
