"""Discovery of models on disk: every kind and layout the models folders may hold,
built for real in tmp_path (GGUF files written with the gguf package, split as
llama.cpp's gguf-split splits, Hugging Face and OpenVINO IR folders laid out
as their exporters lay them out), plus the GGUF header reader against the gguf
package's own and the cost of a scan.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from dynllm import discovery
from dynllm.config import BackendName, ModelType
from dynllm.discovery import (
    Found,
    HeaderCache,
    Kind,
    gguf_model_type,
    hf_model_type,
    pick_projector,
    scan,
    scan_one,
)
from dynllm.ggufheader import GGUFError, read_header
from tests.support.llama_run import running_llama_server
from tests.support.tiny_gguf import write_tiny_embedding, write_tiny_llama
from tests.support.tiny_split import rewrite_gguf, tensor_bytes, write_mmproj, write_split_llama

ALL = (BackendName.LLAMACPP, BackendName.OPENVINO, BackendName.TRANSFORMERS, BackendName.VLLM)
NO_VLLM = (BackendName.LLAMACPP, BackendName.OPENVINO, BackendName.TRANSFORMERS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny llama GGUF, copied wherever a test needs a model file."""
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "tiny.gguf")


def names(result: Any) -> list[str]:
    return [f.name for f in result.found]


def by_name(result: Any) -> dict[str, Found]:
    return {f.name: f for f in result.found}


def put(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def write_bytes(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)


QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "hidden_size": 896,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}


def hf_folder(path: Path, config: dict[str, Any], weights: dict[str, int]) -> Path:
    write_json(path / "config.json", config)
    write_json(path / "tokenizer_config.json", {})
    for name, size in weights.items():
        write_bytes(path / name, size)
    return path


# ---- GGUF ---------------------------------------------------------------------------
def test_single_gguf_is_one_model_named_by_its_relative_path(tmp_path: Path, tiny: Path) -> None:
    put(tiny, tmp_path / "qwen" / "Qwen2.5-0.5B-Q4_K_M.gguf")
    put(tiny, tmp_path / "a" / "b" / "c" / "deep.gguf")
    result = scan([tmp_path], ALL)
    assert result.problems == ()
    assert names(result) == ["a/b/c/deep", "qwen/Qwen2.5-0.5B-Q4_K_M"]
    found = by_name(result)["qwen/Qwen2.5-0.5B-Q4_K_M"]
    size = tiny.stat().st_size
    assert found.kind is Kind.GGUF
    assert found.root == tmp_path.resolve()
    assert found.path == (tmp_path / "qwen" / "Qwen2.5-0.5B-Q4_K_M.gguf").resolve()
    assert [(f.name, f.size, f.type) for f in found.files] == [
        ("Qwen2.5-0.5B-Q4_K_M.gguf", size, "gguf")
    ]
    assert found.size == size
    assert found.mmproj is None
    assert found.model_type is ModelType.LLM
    assert found.backends == (BackendName.LLAMACPP,)
    meta = found.meta
    assert (meta.architecture, meta.layers, meta.kv_heads) == ("llama", 2, 4)
    assert (meta.head_dim_k, meta.head_dim_v, meta.train_context) == (16, 16, 4096)
    assert meta.weight_bytes == tensor_bytes(tiny)


def test_gguf_without_llamacpp_enabled_has_no_backend(tmp_path: Path, tiny: Path) -> None:
    put(tiny, tmp_path / "m.gguf")
    (found,) = scan([tmp_path], [BackendName.OPENVINO]).found
    assert found.backends == ()  # the catalog skips it with a problem line


def test_split_gguf_is_one_model_and_its_shards_are_not(tmp_path: Path) -> None:
    shards = write_split_llama(tmp_path / "qwen", "Qwen-7B-Q8_0", 3)
    assert [p.name for p in shards] == [
        "Qwen-7B-Q8_0-00001-of-00003.gguf",
        "Qwen-7B-Q8_0-00002-of-00003.gguf",
        "Qwen-7B-Q8_0-00003-of-00003.gguf",
    ]
    result = scan([tmp_path], ALL)
    assert result.problems == ()
    (found,) = result.found
    assert found.name == "qwen/Qwen-7B-Q8_0"
    assert found.path == shards[0].resolve()
    assert [f.name for f in found.files] == [p.name for p in shards]
    assert found.size == sum(p.stat().st_size for p in shards)
    # The weights are the tensors of every shard, metadata from the first.
    assert found.meta.weight_bytes == sum(tensor_bytes(p) for p in shards)
    assert (found.meta.layers, found.meta.train_context) == (2, 4096)
    # Each shard carries what gguf-split writes.
    for index, shard in enumerate(shards):
        header = read_header(shard)
        assert header.metadata["split.no"] == index
        assert header.metadata["split.count"] == 3
        assert header.metadata["split.tensors.count"] == 21
        assert ("general.architecture" in header.metadata) == (index == 0)


def test_incomplete_split_is_a_problem_not_a_model(tmp_path: Path) -> None:
    shards = write_split_llama(tmp_path, "big", 3)
    shards[1].unlink()
    # A shard still downloading is skipped (hidden .cache, .incomplete).
    write_bytes(tmp_path / "big-00002-of-00003.gguf.incomplete", 10)
    result = scan([tmp_path], ALL)
    assert result.found == ()
    assert len(result.problems) == 1
    assert "incomplete split" in result.problems[0] and "2" in result.problems[0]
    print(result.problems[0])


def test_projector_is_attached_never_a_model_and_chosen_by_name(tmp_path: Path, tiny: Path) -> None:
    folder = tmp_path / "vl"
    put(tiny, folder / "Qwen2.5-VL-7B-Q4_K_M.gguf")
    put(tiny, folder / "Other-3B-Q4_K_M.gguf")
    write_mmproj(folder, "mmproj-Other-3B-f16.gguf")
    write_mmproj(folder, "mmproj-Qwen2.5-VL-7B-f16.gguf")
    write_mmproj(folder, "mmproj-Qwen2.5-VL-7B-f32.gguf")
    write_mmproj(tmp_path / "alone", "mmproj-F16.gguf")  # a projector alone: nothing
    result = scan([tmp_path], ALL)
    assert result.problems == ()
    assert names(result) == ["vl/Other-3B-Q4_K_M", "vl/Qwen2.5-VL-7B-Q4_K_M"]
    found = by_name(result)
    qwen = found["vl/Qwen2.5-VL-7B-Q4_K_M"]
    assert qwen.mmproj == (folder / "mmproj-Qwen2.5-VL-7B-f16.gguf").resolve()
    assert [(f.name, f.type) for f in qwen.files] == [
        ("Qwen2.5-VL-7B-Q4_K_M.gguf", "gguf"),
        ("mmproj-Qwen2.5-VL-7B-f16.gguf", "mmproj"),
    ]
    assert qwen.size == sum(f.size for f in qwen.files)
    assert found["vl/Other-3B-Q4_K_M"].mmproj == (folder / "mmproj-Other-3B-f16.gguf").resolve()


def test_pick_projector_prefix_rule() -> None:
    assert pick_projector("model.gguf", []) is None
    # No shared prefix: the first by name.
    assert pick_projector("model.gguf", ["mmproj-b.gguf", "mmproj-a.gguf"]) == "mmproj-a.gguf"
    assert (
        pick_projector(
            "gemma-3-4b-it-Q4_K_M.gguf", ["mmproj-F16.gguf", "mmproj-gemma-3-4b-it-f16.gguf"]
        )
        == "mmproj-gemma-3-4b-it-f16.gguf"
    )


def test_projector_by_architecture_even_without_the_name(tmp_path: Path, tiny: Path) -> None:
    put(tiny, tmp_path / "llava-7b.gguf")
    write_mmproj(tmp_path, "llava-7b-vision.gguf")  # architecture clip
    (found,) = scan([tmp_path], ALL).found
    assert found.name == "llava-7b"
    assert found.mmproj == (tmp_path / "llava-7b-vision.gguf").resolve()


def test_gguf_model_types_from_architecture_and_pooling(tmp_path: Path) -> None:
    embedding = write_tiny_embedding(tmp_path / "src" / "embed.gguf")  # pooling MEAN
    put(embedding, tmp_path / "m" / "embed.gguf")
    rewrite_gguf(embedding, tmp_path / "m" / "rerank.gguf", {"llama.pooling_type": 4})
    found = by_name(scan([tmp_path / "m"], ALL))
    assert found["embed"].model_type is ModelType.EMBEDDING
    assert found["rerank"].model_type is ModelType.RERANK
    # The rules, for architectures no tiny fixture has.
    assert gguf_model_type({"general.architecture": "bert"}) is ModelType.EMBEDDING
    assert gguf_model_type({"general.architecture": "nomic-bert"}) is ModelType.EMBEDDING
    assert gguf_model_type({"general.architecture": "jina-bert-v2"}) is ModelType.EMBEDDING
    bge_reranker = {"general.architecture": "bert", "bert.pooling_type": 4}
    assert gguf_model_type(bge_reranker) is ModelType.RERANK
    qwen3_embedding = {"general.architecture": "qwen3", "qwen3.pooling_type": 3}
    assert gguf_model_type(qwen3_embedding) is ModelType.EMBEDDING
    assert gguf_model_type({"general.architecture": "qwen2", "qwen2.pooling_type": 0}) is (
        ModelType.LLM
    )
    assert gguf_model_type({"general.architecture": "llama"}) is ModelType.LLM


# ---- Hugging Face folders ----------------------------------------------------------
def test_hf_folders_every_weight_layout(tmp_path: Path) -> None:
    hf_folder(tmp_path / "Qwen" / "Qwen2.5-0.5B", QWEN2, {"model.safetensors": 1000})
    sharded = {
        "model-00001-of-00002.safetensors": 600,
        "model-00002-of-00002.safetensors": 400,
        "model.safetensors.index.json": 50,
    }
    hf_folder(tmp_path / "sharded", QWEN2, sharded)
    hf_folder(tmp_path / "old", QWEN2, {"pytorch_model.bin": 700})
    hf_folder(tmp_path / "both", QWEN2, {"model.safetensors": 900, "pytorch_model.bin": 800})
    write_json(tmp_path / "config-only" / "config.json", QWEN2)  # no weights: not a model
    result = scan([tmp_path], ALL)
    assert result.problems == ()
    assert names(result) == ["Qwen/Qwen2.5-0.5B", "both", "old", "sharded"]
    found = by_name(result)
    qwen = found["Qwen/Qwen2.5-0.5B"]
    assert qwen.kind is Kind.HF
    assert qwen.path == (tmp_path / "Qwen" / "Qwen2.5-0.5B").resolve()
    assert qwen.model_type is ModelType.LLM
    assert qwen.backends == (BackendName.VLLM, BackendName.TRANSFORMERS)
    assert sorted(f.name for f in qwen.files) == [
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
    ]
    assert qwen.size == sum(f.size for f in qwen.files)
    meta = qwen.meta
    assert (meta.layers, meta.kv_heads, meta.head_dim_k, meta.head_dim_v) == (24, 2, 64, 64)
    assert (meta.train_context, meta.weight_bytes, meta.kv_bytes_per_element) == (32768, 1000, 2)
    assert found["sharded"].meta.weight_bytes == 1000  # the shards, not their index
    assert found["old"].meta.weight_bytes == 700
    assert found["both"].meta.weight_bytes == 900  # safetensors, as transformers loads them
    # Without vLLM enabled: transformers only; with neither: none.
    (no_vllm,) = [f for f in scan([tmp_path], NO_VLLM).found if f.name == "old"]
    assert no_vllm.backends == (BackendName.TRANSFORMERS,)
    (none,) = [f for f in scan([tmp_path], [BackendName.LLAMACPP]).found if f.name == "old"]
    assert none.backends == ()


@pytest.mark.parametrize(
    ("architectures", "extra_files", "expected"),
    [
        (["LlamaForCausalLM"], [], ModelType.LLM),
        (["GPT2LMHeadModel"], [], ModelType.LLM),
        (["Qwen2VLForConditionalGeneration"], [], ModelType.LLM),
        (["WhisperForConditionalGeneration"], [], ModelType.TRANSCRIPTION),
        (["XLMRobertaForSequenceClassification"], [], ModelType.RERANK),
        (["BertModel"], [], ModelType.EMBEDDING),
        (["XLMRobertaModel"], [], ModelType.EMBEDDING),
        (["NomicBertModel"], [], ModelType.EMBEDDING),
        (["Qwen3ForCausalLM"], ["modules.json"], ModelType.EMBEDDING),  # Qwen3-Embedding
        (["SpeechT5ForTextToSpeech"], [], ModelType.SPEECH),
        (["ViTForImageClassification"], [], ModelType.CLASSIFICATION),
        ([], [], ModelType.LLM),
    ],
)
def test_hf_model_type_from_architectures(
    tmp_path: Path, architectures: list[str], extra_files: list[str], expected: ModelType
) -> None:
    folder = hf_folder(tmp_path / "m", {"architectures": architectures}, {"model.safetensors": 8})
    for name in extra_files:
        write_json(folder / name, {})
    (found,) = scan([tmp_path], ALL).found
    assert found.model_type is expected
    assert hf_model_type({"architectures": architectures}, extra_files) is expected


def test_hf_meta_from_nested_text_config_and_dtype(tmp_path: Path) -> None:
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": {
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "hidden_size": 4096,
            "max_position_embeddings": 8192,
        },
        "torch_dtype": "float32",
    }
    hf_folder(tmp_path / "llava", config, {"model.safetensors": 10})
    bert = {"architectures": ["BertModel"], "model_type": "bert", "num_hidden_layers": 12}
    hf_folder(tmp_path / "bert", bert, {"model.safetensors": 10})
    found = by_name(scan([tmp_path], ALL))
    meta = found["llava"].meta
    assert (meta.layers, meta.kv_heads, meta.head_dim_k, meta.train_context) == (32, 8, 128, 8192)
    assert meta.kv_bytes_per_element == 4.0
    assert meta.causal
    assert not found["bert"].meta.causal  # an encoder: no KV cache


def test_hf_folder_subfolders_belong_to_it(tmp_path: Path, tiny: Path) -> None:
    folder = hf_folder(tmp_path / "st", {"architectures": ["BertModel"]}, {"model.safetensors": 8})
    write_json(folder / "modules.json", {})
    write_json(folder / "1_Pooling" / "config.json", {})
    # A nested folder that would be a model on its own is part of this one.
    hf_folder(folder / "onnx", {"architectures": ["BertModel"]}, {"model.safetensors": 8})
    put(tiny, folder / "onnx" / "inner.gguf")
    # huggingface_hub's local_dir bookkeeping is hidden.
    write_bytes(folder / ".cache" / "huggingface" / "download" / "model.safetensors.lock", 1)
    (found,) = scan([tmp_path], ALL).found
    assert found.name == "st"
    assert found.model_type is ModelType.EMBEDDING
    listed = sorted(f.name for f in found.files)
    assert "1_Pooling/config.json" in listed
    assert "onnx/inner.gguf" in listed
    assert not any(".cache" in name for name in listed)


def test_gguf_next_to_hf_weights_is_a_model_of_its_own(tmp_path: Path, tiny: Path) -> None:
    folder = hf_folder(tmp_path / "repo", QWEN2, {"model.safetensors": 8})
    put(tiny, folder / "repo-Q4_K_M.gguf")
    found = by_name(scan([tmp_path], ALL))
    assert sorted(found) == ["repo", "repo/repo-Q4_K_M"]
    assert "repo-Q4_K_M.gguf" not in [f.name for f in found["repo"].files]


# ---- OpenVINO IR folders --------------------------------------------------------------
def ir_files(folder: Path, *stems: str) -> None:
    for stem in stems:
        write_bytes(folder / f"{stem}.xml", 100)
        write_bytes(folder / f"{stem}.bin", 1000)


def test_openvino_layouts(tmp_path: Path) -> None:
    llm = tmp_path / "ov" / "llm"
    ir_files(llm, "openvino_model", "openvino_tokenizer", "openvino_detokenizer")
    write_json(llm / "config.json", QWEN2)
    embed = tmp_path / "ov" / "embedding"
    ir_files(embed, "openvino_model", "openvino_tokenizer")
    write_json(embed / "config.json", {"architectures": ["DistilBertModel"]})
    rerank = tmp_path / "ov" / "rerank"
    ir_files(rerank, "openvino_model")
    write_json(rerank / "config.json", {"architectures": ["DistilBertForSequenceClassification"]})
    vlm = tmp_path / "ov" / "vlm"
    ir_files(
        vlm,
        "openvino_language_model",
        "openvino_text_embeddings_model",
        "openvino_vision_embeddings_model",
    )
    write_json(vlm / "config.json", {"architectures": ["Qwen2VLForConditionalGeneration"]})
    whisper = tmp_path / "ov" / "whisper"
    ir_files(whisper, "openvino_encoder_model", "openvino_decoder_model")
    write_json(whisper / "config.json", {"architectures": ["WhisperForConditionalGeneration"]})
    speech = tmp_path / "ov" / "speecht5"
    ir_files(speech, "openvino_encoder_model", "openvino_decoder_model")
    ir_files(speech, "openvino_postnet", "openvino_vocoder")
    write_json(speech / "config.json", {"architectures": ["SpeechT5ForTextToSpeech"]})
    whisper_bare = tmp_path / "ov" / "whisper-no-config"
    ir_files(whisper_bare, "openvino_encoder_model", "openvino_decoder_model")
    # optimum's diffusers export: model_index.json and one IR per part.
    image = tmp_path / "ov" / "image"
    write_json(image / "model_index.json", {"_class_name": "StableDiffusionPipeline"})
    for part in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        ir_files(image / part, "openvino_model")
        write_json(image / part / "config.json", {})
    flat_image = tmp_path / "ov" / "flat-image"
    ir_files(flat_image, "openvino_text_encoder", "openvino_unet", "openvino_vae_decoder")

    result = scan([tmp_path], ALL)
    assert result.problems == ()
    found = by_name(result)
    expected = {
        "ov/llm": ModelType.LLM,
        "ov/embedding": ModelType.EMBEDDING,
        "ov/rerank": ModelType.RERANK,
        "ov/vlm": ModelType.LLM,
        "ov/whisper": ModelType.TRANSCRIPTION,
        "ov/speecht5": ModelType.SPEECH,
        "ov/whisper-no-config": ModelType.TRANSCRIPTION,
        "ov/image": ModelType.IMAGE_GENERATION,
        "ov/flat-image": ModelType.IMAGE_GENERATION,
    }
    assert {n: f.model_type for n, f in found.items()} == expected
    assert all(f.kind is Kind.OPENVINO for f in found.values())
    assert all(f.backends == (BackendName.OPENVINO,) for f in found.values())
    assert found["ov/llm"].meta.weight_bytes == 3000  # the .bin files
    assert found["ov/llm"].meta.layers == 24
    image_files = sorted(f.name for f in found["ov/image"].files)
    assert "unet/openvino_model.xml" in image_files and "model_index.json" in image_files
    assert found["ov/image"].meta.weight_bytes == 4000


def test_real_openvino_fixtures_when_built(tmp_path: Path) -> None:
    """The IR folders the OVMS stand-in serves, when a test run built them before."""
    from tests.support.env_ovms import IR_FIXTURE

    root = IR_FIXTURE.path  # only looked at: building it takes a backend venv and minutes
    if not (root / ".complete").exists():
        pytest.skip("the OpenVINO fixtures are not built on this machine")
    found = by_name(scan([root], ALL))
    expected = {
        "llm": ModelType.LLM,
        "embedding": ModelType.EMBEDDING,
        "rerank": ModelType.RERANK,
        "whisper": ModelType.TRANSCRIPTION,
        "speecht5": ModelType.SPEECH,
        "image": ModelType.IMAGE_GENERATION,
    }
    assert {n: f.model_type for n, f in found.items() if n in expected} == expected


def test_diffusers_pipeline_in_pytorch_form_is_not_served(tmp_path: Path) -> None:
    sd = tmp_path / "sd"
    write_json(sd / "model_index.json", {"_class_name": "StableDiffusionPipeline"})
    hf_folder(sd / "unet", {"_class_name": "UNet2DConditionModel"}, {"model.safetensors": 8})
    hf_folder(sd / "text_encoder", {"architectures": ["CLIPTextModel"]}, {"model.safetensors": 8})
    result = scan([tmp_path], ALL)
    assert result.found == ()  # its parts are not models either
    assert len(result.problems) == 1 and "diffusers" in result.problems[0]


# ---- the walk ---------------------------------------------------------------------------
def test_hidden_and_partial_entries_are_skipped(tmp_path: Path, tiny: Path) -> None:
    put(tiny, tmp_path / "real.gguf")
    put(tiny, tmp_path / ".hidden.gguf")
    put(tiny, tmp_path / ".cache" / "huggingface" / "download" / "x.gguf")
    put(tiny, tmp_path / "downloading.gguf.incomplete")
    put(tiny, tmp_path / "downloading.gguf.part")
    put(tiny, tmp_path / ".git" / "objects" / "y.gguf")
    result = scan([tmp_path], ALL)
    assert names(result) == ["real"]
    assert result.problems == ()


def test_symlink_loops_end_and_each_model_is_listed_once(tmp_path: Path, tiny: Path) -> None:
    put(tiny, tmp_path / "a" / "m.gguf")
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "a" / "self").symlink_to(".", target_is_directory=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "back").symlink_to("../a", target_is_directory=True)
    (tmp_path / "dangling.gguf").symlink_to(tmp_path / "gone.gguf")
    began = time.perf_counter()
    result = scan([tmp_path], ALL)
    print(f"scan with symlink loops: {(time.perf_counter() - began) * 1000:.1f} ms")
    assert names(result) == ["a/m"]
    assert result.problems == ()


def test_hugging_face_cache_layout_follows_symlinks(tmp_path: Path) -> None:
    """huggingface_hub's cache: snapshots/<rev>/ holds symlinks into blobs/."""
    repo = tmp_path / "models--org--Tiny-GGUF"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    staging = tmp_path.parent / f"{tmp_path.name}-staging"
    shards = write_split_llama(staging, "Tiny-Q8_0", 2)
    for index, shard in enumerate(shards):
        blob = blobs / f"sha{index}"
        shutil.move(shard, blob)
        (snapshot / shard.name).symlink_to(Path("../../blobs") / blob.name)
    write_bytes(repo / "refs" / "main", 8)
    (found,) = scan([tmp_path], ALL).found
    assert found.name == "models--org--Tiny-GGUF/snapshots/0123abcd/Tiny-Q8_0"
    # llama.cpp finds shard 2 next to the first by name: the path keeps the link's name.
    assert found.path == snapshot.resolve() / "Tiny-Q8_0-00001-of-00002.gguf"
    assert found.size == sum((blobs / f"sha{i}").stat().st_size for i in range(2))


def test_name_clash_between_folders_first_wins(tmp_path: Path, tiny: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    put(tiny, first / "x.gguf")
    put(tiny, second / "x.gguf")
    put(tiny, second / "y.gguf")
    result = scan([first, second], ALL)
    assert names(result) == ["x", "y"]
    assert by_name(result)["x"].root == first.resolve()
    assert len(result.problems) == 1
    assert str(second / "x.gguf") in result.problems[0] and "taken" in result.problems[0]
    print(result.problems[0])


def test_name_clash_within_a_folder(tmp_path: Path, tiny: Path) -> None:
    put(tiny, tmp_path / "m.gguf")
    hf_folder(tmp_path / "m", QWEN2, {"model.safetensors": 8})
    result = scan([tmp_path], ALL)
    assert names(result) == ["m"]
    assert by_name(result)["m"].kind is Kind.GGUF  # the file comes first in the walk
    assert len(result.problems) == 1


def test_overlapping_folders_list_a_model_once(tmp_path: Path, tiny: Path) -> None:
    put(tiny, tmp_path / "sub" / "m.gguf")
    result = scan([tmp_path, tmp_path / "sub"], ALL)
    assert names(result) == ["sub/m"]
    # The same file linked into a second folder under the same name: one model, no clash.
    other = tmp_path.parent / f"{tmp_path.name}-other"
    other.mkdir()
    (other / "m.gguf").symlink_to(tmp_path / "sub" / "m.gguf")
    linked = scan([tmp_path / "sub", other], ALL)
    assert names(linked) == ["m"] and linked.problems == ()


def test_names_are_stable_across_scans_and_the_cache_rereads_changed_files(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []

    def counted(path: Path) -> Any:
        reads.append(path.name)
        return read_header(path)

    monkeypatch.setattr(discovery, "read_header", counted)
    for name in ("z/last.gguf", "a/first.gguf", "m/mid.gguf"):
        put(tiny, tmp_path / name)
    cache = HeaderCache()
    one = scan([tmp_path], ALL, cache)
    assert sorted(reads) == ["first.gguf", "last.gguf", "mid.gguf"]
    reads.clear()
    two = scan([tmp_path], ALL, cache)
    assert reads == []  # nothing changed: every header from the cache
    assert names(one) == names(two) == ["a/first", "m/mid", "z/last"]
    assert one == two
    assert len(cache) == 3
    # A file replaced in place is read again; a removed one leaves the cache.
    write_tiny_llama(tmp_path / "m" / "mid.gguf", n_layer=3)
    (tmp_path / "z" / "last.gguf").unlink()
    three = scan([tmp_path], ALL, cache)
    assert reads == ["mid.gguf"]
    assert names(three) == ["a/first", "m/mid"]
    assert by_name(three)["m/mid"].meta.layers == 3
    assert len(cache) == 2


def test_missing_and_unreadable_folders_are_problems(tmp_path: Path, tiny: Path) -> None:
    put(tiny, tmp_path / "ok" / "m.gguf")
    (tmp_path / "file").write_text("not a folder")
    locked = tmp_path / "ok" / "locked"
    put(tiny, locked / "hidden-by-mode.gguf")
    locked.chmod(0)
    try:
        result = scan([tmp_path / "missing", tmp_path / "file", tmp_path / "ok"], ALL)
    finally:
        locked.chmod(0o755)
    assert "m" in names(result)
    problems = "\n".join(result.problems)
    print(problems)
    assert f"{tmp_path / 'missing'}: models folder missing" in problems
    assert f"{tmp_path / 'file'}: models folder missing" in problems
    if os.geteuid() != 0:  # root reads a mode-0 folder anyway
        assert f"{locked}: cannot be read" in problems


# ---- corrupt files -------------------------------------------------------------------
def test_corrupt_gguf_is_a_problem_line_never_an_exception(tmp_path: Path, tiny: Path) -> None:
    data = tiny.read_bytes()
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "text.gguf").write_text("this is not a model")
    (tmp_path / "header-only.gguf").write_bytes(data[:200])
    (tmp_path / "no-tensor-data.gguf").write_bytes(data[: len(data) // 2])
    put(tiny, tmp_path / "good.gguf")
    result = scan([tmp_path], ALL)
    assert names(result) == ["good"]
    problems = dict(line.split(": ", 1) for line in result.problems)
    for line in result.problems:
        print(line)
    assert problems[str(tmp_path / "empty.gguf")] == "empty file"
    assert "not a GGUF file" in problems[str(tmp_path / "text.gguf")]
    assert problems[str(tmp_path / "header-only.gguf")].startswith("truncated")
    assert problems[str(tmp_path / "no-tensor-data.gguf")].startswith("truncated: tensor")


def test_header_reader_survives_every_truncation_and_random_damage(tmp_path: Path) -> None:
    src = write_tiny_llama(tmp_path / "src.gguf", n_vocab=300)
    data = src.read_bytes()
    header_end = 16_000  # the metadata and tensor infos of this file end before this
    target = tmp_path / "damaged.gguf"
    rng = np.random.default_rng(7)
    outcomes = {"error": 0, "read": 0}
    cuts = [*range(0, header_end, 37), len(data) - 1]
    for cut in cuts:
        target.write_bytes(data[:cut])
        with pytest.raises(GGUFError):
            read_header(target)
        outcomes["error"] += 1
    for _ in range(300):
        damaged = bytearray(data)
        for at in rng.integers(0, header_end, size=4):
            damaged[int(at)] = int(rng.integers(0, 256))
        target.write_bytes(bytes(damaged))
        try:
            read_header(target)
        except GGUFError:
            outcomes["error"] += 1
        else:
            outcomes["read"] += 1
    print(f"damaged headers: {outcomes}")  # (anything but GGUFError would have failed above)


# ---- the reader against the gguf package's --------------------------------------------
def test_header_reader_agrees_with_gguf_reader(tmp_path: Path) -> None:
    files = [
        write_tiny_llama(tmp_path / "llama.gguf"),
        write_tiny_embedding(tmp_path / "embed.gguf"),
        write_mmproj(tmp_path, "mmproj.gguf"),
        *write_split_llama(tmp_path / "split", "s", 2),
    ]
    for path in files:
        ours = read_header(path)
        theirs = gguf.GGUFReader(path)
        expected: dict[str, Any] = {}
        for field in theirs.fields.values():
            if field.name.startswith("GGUF."):
                continue
            value = field.contents()
            if isinstance(value, list):
                if field.types[-1] == gguf.GGUFValueType.STRING or len(value) > 4096:
                    continue
                value = tuple(value)
            expected[field.name] = value
        assert ours.metadata == expected, path.name
        assert ours.tensor_count == len(theirs.tensors)
        assert ours.tensor_bytes == sum(int(t.n_bytes) for t in theirs.tensors)


# ---- scan_one ------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path: Path, tiny: Path) -> Path:
    models = tmp_path / "models"
    put(tiny, models / "qwen" / "tiny.gguf")
    write_split_llama(models / "split", "big", 2)
    hf_folder(models / "hf" / "Qwen2.5", QWEN2, {"model.safetensors": 8})
    put(tiny, models / "two" / "a.gguf")
    put(tiny, models / "two" / "b.gguf")
    put(tiny, tmp_path / "outside" / "secret.gguf")
    (models / "escape.gguf").symlink_to(tmp_path / "outside" / "secret.gguf")
    (models / "escape-dir").symlink_to(tmp_path / "outside", target_is_directory=True)
    return models


def test_scan_one_finds_paths_inside_with_the_scan_names(tree: Path) -> None:
    enabled = ALL
    dirs = [tree]
    names_by_scan = {f.name: f for f in scan(dirs, enabled).found}
    cases = {
        "qwen/tiny.gguf": "qwen/tiny",
        "qwen/tiny": "qwen/tiny",  # the name, without extension
        "split/big-00001-of-00002.gguf": "split/big",
        "split/big-00002-of-00002.gguf": "split/big",  # any shard means the model
        "split": "split/big",  # a folder holding exactly one model
        "hf/Qwen2.5": "hf/Qwen2.5",
        "hf": "hf/Qwen2.5",
        "qwen/../qwen/tiny.gguf": "qwen/tiny",
        str(tree / "qwen" / "tiny.gguf"): "qwen/tiny",
    }
    for request, expected in cases.items():
        found = scan_one(Path(request), dirs, enabled)
        assert found is not None, request
        assert found.name == expected, request
        if expected in names_by_scan:
            assert found == names_by_scan[expected], request


def test_scan_one_refuses_paths_outside_and_non_models(tree: Path, tmp_path: Path) -> None:
    dirs = [tree]
    refused = [
        "../outside/secret.gguf",
        "qwen/../../outside/secret.gguf",
        str(tmp_path / "outside" / "secret.gguf"),
        "escape.gguf",  # a symlink out of the folder
        "escape-dir/secret.gguf",
        "escape-dir",
        "/etc/passwd",
        "/",
        "..",
        "missing.gguf",
        "two",  # two models: which one is not for dynllm to guess
        "hf/Qwen2.5/config.json",
        "qwen/tiny.gguf\0",
        "",
    ]
    for request in refused:
        assert scan_one(Path(request), dirs, ALL) is None, request
    assert scan_one(Path("qwen/tiny.gguf"), [tmp_path / "nowhere"], ALL) is None


def test_scan_one_tries_each_folder_in_order(tmp_path: Path, tiny: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    put(tiny, second / "only-here.gguf")
    first.mkdir()
    found = scan_one(Path("only-here.gguf"), [first, second], ALL)
    assert found is not None and found.root == second.resolve()


# ---- what llama-server makes of it ----------------------------------------------------
def test_llama_server_serves_discovered_split_models(tmp_path: Path) -> None:
    """The paths discovery hands out load in the real llama-server: a split model by
    its first shard (plain, and in the Hugging Face cache's symlink layout) with the
    projector attached next to it."""
    models = tmp_path / "models"
    write_split_llama(models / "plain", "Tiny-Q8_0", 3)
    write_mmproj(models / "plain")
    repo = models / "models--org--Tiny" / "snapshots" / "abc"
    blobs = models / "models--org--Tiny" / "blobs"
    blobs.mkdir(parents=True)
    repo.mkdir(parents=True)
    for index, shard in enumerate(write_split_llama(tmp_path / "staging", "Tiny-F16", 2)):
        shutil.move(shard, blobs / f"sha{index}")
        (repo / shard.name).symlink_to(Path("../../blobs") / f"sha{index}")
    found = by_name(scan([models], ALL))
    assert sorted(found) == ["models--org--Tiny/snapshots/abc/Tiny-F16", "plain/Tiny-Q8_0"]
    for model in found.values():
        extra = ["--mmproj", str(model.mmproj)] if model.mmproj else []
        log = tmp_path / f"{model.path.name}.log"
        with running_llama_server(model.path, log, *extra) as http:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            began = time.perf_counter()
            r = http.post("/v1/chat/completions", json=body)
            took = time.perf_counter() - began
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        print(f"llama-server on {model.name} ({len(model.files)} files): {answer!r} in "
              f"{took * 1000:.0f} ms")  # fmt: skip
        assert len(answer.split()) == 4
