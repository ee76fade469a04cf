"""The catalog, pure: discovered models as entries, YAML winning, variants
and their names, request settings and lifetimes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from dynllm import catalog as cat
from dynllm.config import BackendName, ModelType, parse_config
from dynllm.discovery import Found, FoundFile, Kind, ModelMeta, Scan, backends_for
from dynllm.errors import BadRequest

META = ModelMeta(
    architecture="llama",
    layers=24,
    kv_heads=2,
    head_dim_k=64,
    head_dim_v=64,
    train_context=32768,
    weight_bytes=400 << 20,
)


def found(root: Path, name: str, kind: Kind = Kind.GGUF, **extra: Any) -> Found:
    path = root / (name + ".gguf" if kind is Kind.GGUF else name)
    backends = backends_for(kind, tuple(BackendName))
    fields: dict[str, Any] = {
        "name": name,
        "root": root,
        "path": path,
        "kind": kind,
        "files": (FoundFile(path.name, 400 << 20, kind.value),),
        "size": 400 << 20,
        "mmproj": None,
        "model_type": ModelType.LLM,
        "backends": backends,
        "meta": META,
    }
    fields.update(extra)
    return Found(**fields)


def config(tmp_path: Path, models: list[dict[str, Any]] | None = None, **top: Any) -> Any:
    return parse_config(
        {
            "models_dir": str(tmp_path),
            "total_vram_mb": 24000,
            "enabled_backends": ["llamacpp", "transformers", "vllm", "openvino"],
            "models": models or [],
            **top,
        },
        base_dir=tmp_path,
    )


def test_discovered_models_become_entries_with_an_estimated_vram(tmp_path: Path) -> None:
    scan = Scan((found(tmp_path, "qwen/q4"), found(tmp_path, "hf-model", Kind.HF)), ())
    c = cat.build(config(tmp_path), scan)
    q4 = c.config.models[0]
    assert (q4.name, q4.backend, c.source("qwen/q4")) == (
        "qwen/q4",
        "llamacpp",
        cat.Source.DISCOVERED,
    )
    est = c.discovered["qwen/q4"].estimate
    assert est is not None and q4.vram_mb == est.total_mb
    # weights 400 MB + KV 24 x 2 x (64 + 64) x 4096 x 2 bytes = 48 MB + 512 MB overhead
    assert est.kv_cache_mb == 48 and q4.vram_mb == 400 + 48 + 512
    hf = c.config.models[1]
    assert hf.backend is BackendName.VLLM  # vllm enabled: first choice for HF folders
    assert hf.vram_mb == math.ceil(0.9 * 24000)  # vLLM takes its share of the GPU


def test_yaml_wins_on_a_name_and_on_a_file(tmp_path: Path) -> None:
    (tmp_path / "mine.gguf").write_bytes(b"x")
    yaml_models = [
        {"name": "qwen/q4", "path": "other.gguf", "backend": "llamacpp", "vram_mb": 1},
        {"name": "mine", "path": "mine.gguf", "backend": "llamacpp", "vram_mb": 1},
    ]
    scan = Scan(
        (
            found(tmp_path, "qwen/q4"),
            found(tmp_path, "renamed", path=(tmp_path / "mine.gguf").resolve()),
        ),
        (),
    )
    c = cat.build(config(tmp_path, yaml_models), scan)
    assert [m.name for m in c.config.models] == ["qwen/q4", "mine"]
    assert c.source("qwen/q4") is cat.Source.CONFIG
    assert c.served_as == {"renamed": "mine"}
    assert any("qwen/q4" in p for p in c.problems)


def test_discovery_false_serves_only_the_yaml(tmp_path: Path) -> None:
    c = cat.build(config(tmp_path, discovery=False), Scan((found(tmp_path, "a"),), ()))
    assert c.config.models == [] and c.dirs == ()


def test_a_file_no_enabled_backend_serves_is_a_problem_not_an_entry(tmp_path: Path) -> None:
    c = cat.build(
        config(tmp_path, enabled_backends=["llamacpp"]),
        Scan((found(tmp_path, "ir", Kind.OPENVINO, backends=()),), ()),
    )
    assert c.config.models == []
    assert "openvino" in c.problems[0]


def variant(c: cat.Catalog, name: str, **settings: Any) -> tuple[str, cat.Variant] | None:
    spec = next(m for m in c.config.models if m.name == name)
    return cat.variant_for(c, spec, cat.parse_request(settings).settings)


def test_variants_are_named_by_what_differs_and_ignore_what_the_backend_does_not_read(
    tmp_path: Path,
) -> None:
    c = cat.build(config(tmp_path), Scan((found(tmp_path, "q"), found(tmp_path, "h", Kind.HF)), ()))
    assert variant(c, "q", n_ctx=4096, backend="llamacpp", max_model_len=9) is None
    assert variant(c, "q", gpu_memory_utilization=0.5) is None
    name, v = variant(c, "q", n_ctx=8192, device="cpu") or ("", None)
    assert name == "q@n_gpu_layers=0,n_ctx=8192"
    assert v is not None and v.base == "q"
    assert variant(c, "q", device="cpu", n_gpu_layers=0, n_ctx=8192) == (name, v)
    assert variant(c, "h", backend="transformers", device="cpu")[0] == (  # type: ignore[index]
        "h@backend=transformers,device=cpu"
    )
    assert variant(c, "h", max_model_len=8000)[0] == "h@max_model_len=8000"  # type: ignore[index]
    with pytest.raises(BadRequest, match="vLLM runs on the GPU"):
        variant(c, "h", device="cpu")
    with pytest.raises(BadRequest, match="cannot serve"):
        variant(c, "q", backend="vllm")


def test_a_variant_gets_its_own_entry_vram_and_keeps_its_base(tmp_path: Path) -> None:
    c = cat.build(config(tmp_path), Scan((found(tmp_path, "q"),), ()))
    name, v = variant(c, "q", n_ctx=32768) or ("", None)
    assert v is not None
    c2 = cat.with_variant(c, name, v, idle=[])
    spec = next(m for m in c2.config.models if m.name == name)
    assert spec.hidden and spec.context_size == 32768 and c2.source(name) is cat.Source.VARIANT
    assert spec.vram_mb == 400 + 384 + 512  # the KV cache for 32768 tokens
    cpu = variant(c2, name, device="cpu")
    assert cpu is not None and cpu[0] == "q@n_gpu_layers=0,n_ctx=32768"  # merged with its own
    c3 = cat.with_variant(c2, *cpu, idle=[])
    assert next(m for m in c3.config.models if m.name == cpu[0]).vram_mb == 0
    gone = cat.build(c3.yaml, Scan((), ()), c3.variants)
    assert gone.config.models == [] and gone.variants == {}


def test_variants_beyond_the_cap_drop_idle_ones_oldest_first(tmp_path: Path) -> None:
    c = cat.build(config(tmp_path), Scan((found(tmp_path, "q"),), ()))
    names = []
    for ctx in range(cat.MAX_VARIANTS + 3):
        name, v = variant(c, "q", n_ctx=1000 + ctx) or ("", None)
        assert v is not None
        names.append(name)
        c = cat.with_variant(c, name, v, idle=names[:3])
    assert len(c.variants) == cat.MAX_VARIANTS
    assert not set(names[:3]) & set(c.variants)


def test_yaml_models_take_settings_only_when_allowed(tmp_path: Path) -> None:
    models = [
        {"name": "y", "path": "y.gguf", "backend": "llamacpp", "vram_mb": 3000},
        {"name": "o", "path": "o.gguf", "backend": "llamacpp", "vram_mb": 3000,
         "allow_request_overrides": True},
    ]  # fmt: skip
    c = cat.build(config(tmp_path, models), Scan((), ()))
    assert variant(c, "y", n_ctx=4096, n_gpu_layers=-1) is None  # its own settings
    with pytest.raises(BadRequest, match="allow_request_overrides"):
        variant(c, "y", n_ctx=8192)
    name, v = variant(c, "o", n_ctx=8192) or ("", None)
    c2 = cat.with_variant(c, name, v, idle=[])  # type: ignore[arg-type]
    assert next(m for m in c2.config.models if m.name == name).vram_mb == 3000  # as declared


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(0, 0), (-1, math.inf), ("5m", 300), ("1h30m", 5400), ("10s", 10), ("250ms", 0.25),
     ("-1", math.inf), ("-5m", math.inf), (120, 120), ("120", 120)],
)  # fmt: skip
def test_keep_alive_reads_ollamas_forms(value: Any, seconds: float) -> None:
    assert cat.parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", True, None, [], "m5", "nan"])
def test_bad_keep_alive_and_ttl_are_400s_naming_the_field(value: Any) -> None:
    with pytest.raises(BadRequest, match="keep_alive"):
        cat.parse_request({"keep_alive": value})
    if not isinstance(value, str) or not value.lstrip("-").isdigit():
        with pytest.raises(BadRequest, match="ttl"):
            cat.parse_request({"ttl": value})


@pytest.mark.parametrize(
    ("body", "field"),
    [({"backend": "ollama"}, "backend"), ({"backend": 1}, "backend"),
     ({"device": "tpu"}, "device"), ({"device": 3}, "device"),
     ({"n_gpu_layers": -2}, "n_gpu_layers"), ({"n_ctx": 1.5}, "n_ctx"), ({"n_ctx": True}, "n_ctx"),
     ({"max_model_len": 0}, "max_model_len"),
     ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
     ({"gpu_memory_utilization": "0.5"}, "gpu_memory_utilization")],
)  # fmt: skip
def test_bad_settings_are_400s_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest, match=field):
        cat.parse_request(body)


def test_parse_request_reports_every_field_to_strip() -> None:
    asked = cat.parse_request(
        {
            "model": "m",
            "messages": [],
            "ttl": 300,
            "keep_alive": "1m",
            "n_ctx": 512,
            "device": "CUDA",
        }
    )
    assert asked.present == {"ttl", "keep_alive", "n_ctx", "device"}
    assert asked.keep == 60  # Ollama's keep_alive wins over ttl
    assert asked.settings == {"n_ctx": 512, "device": "cuda"}


def test_a_variant_its_base_can_no_longer_run_is_dropped_with_a_problem(tmp_path: Path) -> None:
    c = cat.build(config(tmp_path), Scan((found(tmp_path, "h", Kind.HF),), ()))
    name, v = variant(c, "h", gpu_memory_utilization=0.5) or ("", None)
    c = cat.with_variant(c, name, v, idle=[])  # type: ignore[arg-type]
    assert name == "h@gpu_memory_utilization=0.5" and name in c.variants
    # vLLM no longer enabled: the folder is served by transformers, which has no such key.
    rebuilt = cat.build(config(tmp_path, enabled_backends=["transformers"]), c.scan, c.variants)
    assert [m.name for m in rebuilt.config.models] == ["h"] and rebuilt.variants == {}
    assert any(name in p and "dropped" in p for p in rebuilt.problems)


def test_huge_numbers_are_forever_not_errors() -> None:
    assert cat.parse_request({"ttl": 10**400}).keep == math.inf
    assert cat.parse_request({"keep_alive": -(10**400)}).keep == math.inf
    with pytest.raises(BadRequest, match="n_ctx"):
        cat.parse_request({"n_ctx": 10**5000})


def test_backends_enabled_by_a_reload_serve_what_the_last_scan_found(tmp_path: Path) -> None:
    """The scan ran with only llamacpp enabled; a reload enabling transformers
    serves the HF folder at once, from the same scan."""
    scanned = found(tmp_path, "h", Kind.HF, backends=())
    before = cat.build(config(tmp_path, enabled_backends=["llamacpp"]), Scan((scanned,), ()))
    assert before.config.models == [] and "transformers" in before.problems[0]
    after = cat.build(config(tmp_path, enabled_backends=["llamacpp", "transformers"]), before.scan)
    assert [(m.name, m.backend) for m in after.config.models] == [("h", "transformers")]
