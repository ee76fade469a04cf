"""hubfiles: which files a download takes, repo addresses, destinations (pure)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynllm.errors import BadRequest, ModelNotFound, QuantizationNotFound
from dynllm.hubfiles import (
    RepoFile,
    RepoRef,
    confine,
    default_destination,
    human_size,
    origin,
    parse_pull_spec,
    parse_repo,
    quant_of,
    quantizations,
    select_files,
)

# The layouts of real GGUF repos (names as they appear on the Hub).
LISTING = [
    RepoFile(".gitattributes", 1519),
    RepoFile("README.md", 9000),
    RepoFile("LICENSE", 11000),
    RepoFile("config.json", 700),
    RepoFile("qwen2.5-coder-7b-instruct-q4_k_m.gguf", 4_680_000_000),
    RepoFile("qwen2.5-coder-7b-instruct-q8_0.gguf", 8_100_000_000),
    RepoFile("qwen2.5-coder-7b-instruct-IQ4_XS.gguf", 4_220_000_000),
    RepoFile("qwen2.5-coder-7b-instruct-fp16-00001-of-00004.gguf", 3_990_000_000),
    RepoFile("qwen2.5-coder-7b-instruct-fp16-00002-of-00004.gguf", 3_990_000_000),
    RepoFile("qwen2.5-coder-7b-instruct-fp16-00003-of-00004.gguf", 3_990_000_000),
    RepoFile("qwen2.5-coder-7b-instruct-fp16-00004-of-00004.gguf", 3_260_000_000),
    RepoFile("Q6_K/model-Q6_K-00001-of-00002.gguf", 4_000_000_000),
    RepoFile("Q6_K/model-Q6_K-00002-of-00002.gguf", 2_000_000_000),
    RepoFile("UD-Q4_K_XL/model-00001-of-00002.gguf", 4_000_000_000),
    RepoFile("UD-Q4_K_XL/model-00002-of-00002.gguf", 1_000_000_000),
    RepoFile("mmproj-model-f16.gguf", 600_000_000),
    RepoFile("mmproj-model-BF16.gguf", 600_000_000),
]


def names(files: list[RepoFile]) -> list[str]:
    return [f.name for f in files]


@pytest.mark.parametrize(
    ("path", "tag"),
    [
        ("tiny-Q4_K_M.gguf", "Q4_K_M"),
        ("qwen2.5-coder-7b-instruct-q4_k_m.gguf", "Q4_K_M"),
        ("Meta-Llama-3-8B.Q8_0.gguf", "Q8_0"),
        ("model-IQ4_XS.gguf", "IQ4_XS"),
        ("model-IQ2_XXS.gguf", "IQ2_XXS"),
        ("model-IQ4_NL.gguf", "IQ4_NL"),
        ("model-Q6_K.gguf", "Q6_K"),
        ("model-Q4_0_4_4.gguf", "Q4_0_4_4"),
        ("model-BF16.gguf", "BF16"),
        ("model-f16.gguf", "F16"),
        ("model-TQ1_0.gguf", "TQ1_0"),
        ("gpt-oss-20b-MXFP4.gguf", "MXFP4"),
        ("tiny-Q2_K-00001-of-00002.gguf", "Q2_K"),
        ("Q5_K_M/tiny-00001-of-00002.gguf", "Q5_K_M"),  # folder-per-quant
        ("UD-Q4_K_XL/DeepSeek-R1-UD-Q4_K_XL-00001-of-00006.gguf", "UD-Q4_K_XL"),
        ("README.md", None),
        ("qwen2.5-coder-7b.gguf", None),
        ("Q4_K_Mx.gguf", None),  # a tag must stand alone
    ],
)
def test_quant_of(path: str, tag: str | None) -> None:
    assert quant_of(path) == tag


def test_quantizations_offered_leave_projectors_out() -> None:
    assert quantizations(LISTING) == ["FP16", "IQ4_XS", "Q4_K_M", "Q6_K", "Q8_0", "UD-Q4_K_XL"]


def test_one_quantization_takes_its_file_and_one_projector_only() -> None:
    chosen = select_files(LISTING, "Q4_K_M")
    # No README, LICENSE, config.json or .gitattributes; the F16 projector of the two.
    assert names(chosen) == ["qwen2.5-coder-7b-instruct-q4_k_m.gguf", "mmproj-model-f16.gguf"]


def test_the_quantization_is_matched_without_regard_to_case() -> None:
    assert names(select_files(LISTING, "iq4_xs"))[0] == "qwen2.5-coder-7b-instruct-IQ4_XS.gguf"


def test_a_split_quantization_takes_every_shard() -> None:
    chosen = names(select_files(LISTING, "FP16", exclude=["mmproj*"]))
    assert chosen == [f"qwen2.5-coder-7b-instruct-fp16-0000{i}-of-00004.gguf" for i in range(1, 5)]


def test_a_folder_per_quant_layout_takes_the_folder() -> None:
    chosen = names(select_files(LISTING, "Q6_K", exclude=["mmproj*"]))
    assert chosen == ["Q6_K/model-Q6_K-00001-of-00002.gguf", "Q6_K/model-Q6_K-00002-of-00002.gguf"]


def test_unsloth_dynamic_quants_answer_to_their_plain_name_too() -> None:
    chosen = names(select_files(LISTING, "Q4_K_XL", exclude=["mmproj*"]))
    assert chosen == [
        "UD-Q4_K_XL/model-00001-of-00002.gguf",
        "UD-Q4_K_XL/model-00002-of-00002.gguf",
    ]


def test_a_projector_with_the_requested_tag_wins() -> None:
    listing = [
        RepoFile("model-BF16.gguf", 10),
        RepoFile("model-Q4_K_M.gguf", 5),
        RepoFile("mmproj-F32.gguf", 4),
        RepoFile("mmproj-BF16.gguf", 2),
        RepoFile("mmproj-F16.gguf", 2),
    ]
    assert names(select_files(listing, "BF16")) == ["model-BF16.gguf", "mmproj-BF16.gguf"]
    assert names(select_files(listing, "Q4_K_M")) == ["model-Q4_K_M.gguf", "mmproj-F16.gguf"]
    assert names(select_files(listing[1:3], "Q4_K_M")) == ["model-Q4_K_M.gguf", "mmproj-F32.gguf"]


def test_a_quantization_matching_nothing_is_404_listing_those_there_are() -> None:
    with pytest.raises(QuantizationNotFound) as caught:
        select_files(LISTING, "Q3_K_S", repo_id="Qwen/Qwen2.5-Coder-7B-Instruct-GGUF")
    error = caught.value
    assert isinstance(error, ModelNotFound) and error.status == 404
    assert error.code == "quantization_not_found"
    assert "Q3_K_S" in error.message
    assert "FP16, IQ4_XS, Q4_K_M, Q6_K, Q8_0, UD-Q4_K_XL" in error.message
    print(f"\n404 {error.code}: {error.message}")


def test_include_and_exclude_are_globs_applied_first() -> None:
    assert names(select_files(LISTING, include=["*.json", "README*"])) == [
        "README.md",
        "config.json",
    ]
    assert "LICENSE" not in names(select_files(LISTING, exclude=["LICENSE", "*.gguf"]))
    # "*" crosses folders (huggingface_hub's filter_repo_objects)
    assert len(select_files(LISTING, include=["Q6_K/*"])) == 2
    with pytest.raises(BadRequest, match="matches the include/exclude"):
        select_files(LISTING, include=["*.safetensors"])


def test_no_filter_takes_everything() -> None:
    assert select_files(LISTING) == LISTING


def test_listed_paths_that_would_leave_the_destination_are_skipped() -> None:
    hostile = [RepoFile(n, 1) for n in ("../x.gguf", "/etc/x.gguf", "a//b.gguf", "a\\..\\b.gguf")]
    assert select_files([*hostile, RepoFile("ok-Q8_0.gguf", 1)]) == [RepoFile("ok-Q8_0.gguf", 1)]


# ---- repo addresses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "ref"),
    [
        ("https://huggingface.co/Qwen/Qwen2.5-Coder-7B-Instruct-GGUF",
         RepoRef("Qwen/Qwen2.5-Coder-7B-Instruct-GGUF")),
        ("https://huggingface.co/org/model-name/", RepoRef("org/model-name")),
        ("https://hf.co/org/model-name", RepoRef("org/model-name")),
        ("hf.co/org/model-name", RepoRef("org/model-name")),
        ("huggingface.co/org/model-name", RepoRef("org/model-name")),
        ("https://huggingface.co/gpt2", RepoRef("gpt2")),
        ("https://huggingface.co/org/m/tree/v1.0", RepoRef("org/m", "v1.0")),
        ("https://huggingface.co/org/m/resolve/main/a/b.gguf",
         RepoRef("org/m", "main", "a/b.gguf")),
        ("http://127.0.0.1:8999/org/model-name", RepoRef("org/model-name")),
        ("http://127.0.0.1:8999/mirror/org/model-name", None),  # endpoint with a path: below
    ],
)  # fmt: skip
def test_repo_addresses(url: str, ref: RepoRef | None) -> None:
    endpoint = "http://127.0.0.1:8999"
    if ref is None:
        assert parse_repo(url, None, endpoint + "/mirror") == RepoRef("org/model-name")
        return
    assert parse_repo(url, None, endpoint) == ref


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://example.com/org/model", "not a Hugging Face repo address"),
        ("http://127.0.0.1:9000/org/model", "not a Hugging Face repo address"),  # another port
        ("https://huggingface.co/datasets/org/data", "dataset"),
        ("https://huggingface.co/org/m--x", "not a Hugging Face repo id"),
        ("https://huggingface.co/org/m/commits/main", "expected the repo's address"),
        ("https://huggingface.co/", "not a Hugging Face repo id"),
    ],
)
def test_addresses_that_are_refused(url: str, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        parse_repo(url, None, "http://127.0.0.1:8999")


def test_repo_ids() -> None:
    assert parse_repo(None, "org/model") == RepoRef("org/model")
    assert parse_repo(None, " org/model ") == RepoRef("org/model")
    for bad in ("org/model/x", "../etc", "org/..", "a b/c", ""):
        with pytest.raises(BadRequest):
            parse_repo(None, bad)
    with pytest.raises(BadRequest, match="Name the repo"):
        parse_repo(None, None)


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("org/model", ("org/model", None)),
        ("org/model:Q4_K_M", ("org/model", "Q4_K_M")),
        ("https://huggingface.co/org/model:q8_0", ("https://huggingface.co/org/model", "q8_0")),
        ("https://huggingface.co/org/model", ("https://huggingface.co/org/model", None)),
        ("http://127.0.0.1:8999/org/model", ("http://127.0.0.1:8999/org/model", None)),
        ("http://127.0.0.1:8999/org/m:IQ4_XS", ("http://127.0.0.1:8999/org/m", "IQ4_XS")),
    ],
)
def test_pull_specs(spec: str, parsed: tuple[str, str | None]) -> None:
    assert parse_pull_spec(spec) == parsed


def test_origins_fill_in_the_default_port() -> None:
    assert origin("https://Hub.example/a") == origin("https://hub.example:443/b")
    assert origin("http://hub.example/a") != origin("https://hub.example/a")
    assert origin("http://hub.example:8080/") != origin("http://hub.example/")


def test_sizes_for_people() -> None:
    sizes = [0, 999, 1000, 2_670_944, 4_680_000_000, 1 << 50, 500_000.0]
    assert [human_size(n) for n in sizes] == [
        "0 B", "999 B", "1.0 kB", "2.7 MB", "4.7 GB", "1.1 PB", "500.0 kB",
    ]  # fmt: skip


# ---- destinations -------------------------------------------------------------------


def test_default_destination_is_xandroutings_folder_name() -> None:
    name = default_destination("Qwen/Qwen2.5-Coder-7B-Instruct-GGUF")
    assert name == "qwen2.5-coder-7b-instruct-gguf"


def test_destinations_stay_inside_models_dir(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (models / "link").symlink_to(outside)
    assert confine(models, "custom-name") == models.resolve() / "custom-name"
    assert confine(models, "a/b") == models.resolve() / "a" / "b"
    assert confine(models, str(models / "abs")) == models.resolve() / "abs"  # absolute, inside
    loop = models / "loop"
    loop.symlink_to(loop)
    unusable = ("a" * 256, "x/" + "b" * 300, "bad\ud800name", "loop/x")
    escapes = ("..", "../x", "a/../../x", str(outside), "/etc", "link", "link/x", ".", "")
    for escape in (*escapes, *unusable):
        with pytest.raises(BadRequest) as caught:
            confine(models, escape)
        assert caught.value.status == 400
    assert os.listdir(outside) == []
