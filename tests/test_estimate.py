"""The VRAM estimate: the issue's done-when item 6 (a GGUF's estimate within 10% of
the figure computed by hand from the tensors written and the KV cache for the
chosen context), the same model measured by llama-server itself, and the rules
for context, partial offload and CPU runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest

from dynllm.config import BackendName
from dynllm.discovery import ModelMeta, scan
from dynllm.estimate import MIB, Estimate, estimate, kv_cache_bytes
from tests.support.llama_run import running_llama_server
from tests.support.tiny_gguf import TinyModelSpec
from tests.support.tiny_split import write_gqa_llama

# Grouped-query attention: 4 query heads share 2 KV heads of 128 (n_embd 512 / 4).
SPEC = TinyModelSpec(n_embd=512, n_layer=4, n_vocab=512, n_head=4, n_ff=1024)
N_HEAD_KV = 2
CONTEXT = 2048


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gqa_llama(
        tmp_path_factory.mktemp("models") / "gqa.gguf", SPEC, n_head_kv=N_HEAD_KV
    )


def hand_weight_bytes(spec: TinyModelSpec, n_head_kv: int) -> int:
    """Bytes of every tensor tiny_gguf writes (F16 matrices, F32 norms), with K and V
    cut to the KV heads, summed by hand from their shapes."""
    d, ff, vocab = spec.n_embd, spec.n_ff, spec.n_vocab
    kv = n_head_kv * (d // spec.n_head)
    f16, f32 = 2, 4
    per_layer = (
        d * f32  # attn_norm
        + d * d * f16  # attn_q
        + 2 * kv * d * f16  # attn_k, attn_v
        + d * d * f16  # attn_output
        + d * f32  # ffn_norm
        + 3 * ff * d * f16  # ffn_gate, ffn_up, ffn_down
    )
    return vocab * d * f16 + spec.n_layer * per_layer + d * f32 + vocab * d * f16


def hand_kv_bytes(spec: TinyModelSpec, n_head_kv: int, context: int) -> int:
    head_dim = spec.n_embd // spec.n_head
    # layers x KV heads x (K + V head size) x context x 2 bytes (f16)
    return spec.n_layer * n_head_kv * (head_dim + head_dim) * context * 2


def test_estimate_within_10_percent_of_the_hand_sum(gqa_model: Path) -> None:
    """Done-when item 6."""
    weights = hand_weight_bytes(SPEC, N_HEAD_KV)
    # The hand sum is the sum of the arrays' nbytes in the file written.
    reader = gguf.GGUFReader(gqa_model)
    assert weights == sum(int(t.data.nbytes) for t in reader.tensors)
    kv = hand_kv_bytes(SPEC, N_HEAD_KV, CONTEXT)
    expected_mib = (weights + kv) / MIB

    (found,) = scan([gqa_model.parent], [BackendName.LLAMACPP]).found
    est = estimate(found.meta, context=CONTEXT, overhead_mb=0)
    print(
        f"by hand: weights {weights / MIB:.2f} MiB + KV {kv / MIB:.2f} MiB = "
        f"{expected_mib:.2f} MiB; estimate: weights {est.weights_mb} + KV {est.kv_cache_mb} "
        f"= {est.total_mb} MiB ({(est.total_mb / expected_mib - 1) * 100:+.1f}%)"
    )
    assert abs(est.total_mb - expected_mib) <= 0.10 * expected_mib
    assert est.kv_cache_mb == math.ceil(kv / MIB)
    assert est.weights_mb == math.ceil(weights / MIB)
    assert est.context == CONTEXT
    # With the overhead, the parts add up.
    with_overhead = estimate(found.meta, context=CONTEXT, overhead_mb=512)
    assert with_overhead.total_mb == est.total_mb + 512


@pytest.fixture
def llama_log(tmp_path: Path) -> Iterator[Path]:
    """A real llama-server on the GQA model at CONTEXT, CPU only; its log file."""
    model = write_gqa_llama(tmp_path / "gqa.gguf", SPEC, n_head_kv=N_HEAD_KV)
    log = tmp_path / "llama-server.log"
    # -lv 4: the buffer sizes are logged at this level
    with running_llama_server(model, log, "-lv", "4", context=CONTEXT):
        yield log


def test_estimate_against_what_llama_server_allocates(llama_log: Path) -> None:
    """llama-server prints the buffers it allocated; the estimate's parts match them."""
    text = llama_log.read_text(errors="replace")
    model = re.search(r"CPU(?:_Mapped)? model buffer size =\s*([\d.]+) MiB", text)
    kv = re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells", text)
    compute = re.search(r"CPU compute buffer size =\s*([\d.]+) MiB", text)
    assert model and kv and compute, text[-3000:]
    model_mib, kv_mib, cells = float(model[1]), float(kv[1]), int(kv[2])

    (found,) = scan([llama_log.parent], [BackendName.LLAMACPP]).found
    est = estimate(found.meta, context=CONTEXT, overhead_mb=0)
    print(
        f"llama-server: model {model_mib:.2f} MiB, KV {kv_mib:.2f} MiB ({cells} cells), "
        f"compute {float(compute[1]):.2f} MiB; estimate: weights {est.weights_mb} MiB "
        f"({found.meta.weight_bytes / MIB:.2f} before rounding up), KV {est.kv_cache_mb} MiB"
    )
    assert cells == CONTEXT
    assert kv_cache_bytes(found.meta, CONTEXT) / MIB == pytest.approx(kv_mib, abs=0.01)
    assert found.meta.weight_bytes / MIB == pytest.approx(model_mib, rel=0.10)
    assert model_mib <= est.weights_mb and kv_mib <= est.kv_cache_mb


# ---- the rules --------------------------------------------------------------------------
META = ModelMeta(
    architecture="llama",
    layers=32,
    kv_heads=8,
    head_dim_k=128,
    head_dim_v=128,
    train_context=8192,
    weight_bytes=4 * 1024 * MIB,  # 4 GiB of weights
)


def test_context_zero_means_the_models_own() -> None:
    est = estimate(META, context=0, overhead_mb=0)
    assert est.context == 8192
    # 32 x 8 x 256 x 8192 x 2 bytes = 1 GiB
    assert est.kv_cache_mb == 1024
    unknown = ModelMeta(None, 32, 8, 128, 128, None, 0)
    assert estimate(unknown, context=0, overhead_mb=0).context == 4096


def test_full_partial_and_no_offload() -> None:
    full = estimate(META, context=4096, overhead_mb=300)
    assert (full.weights_mb, full.kv_cache_mb, full.overhead_mb) == (4096, 512, 300)
    assert full.total_mb == 4096 + 512 + 300 and full.gpu_layers is None
    assert estimate(META, context=4096, n_gpu_layers=99, overhead_mb=300) == full
    assert estimate(META, context=4096, n_gpu_layers=32, overhead_mb=300) == full
    half = estimate(META, context=4096, n_gpu_layers=16, overhead_mb=300)
    assert (half.weights_mb, half.kv_cache_mb, half.total_mb) == (2048, 256, 2048 + 256 + 300)
    assert half.gpu_layers == 16
    cpu = Estimate(0, 0, 0, 0, context=4096, gpu_layers=0)
    assert estimate(META, context=4096, n_gpu_layers=0, overhead_mb=300) == cpu
    assert estimate(META, context=4096, overhead_mb=300, on_gpu=False) == cpu


def test_rounding_up_and_element_size() -> None:
    small = ModelMeta("llama", 1, 1, 1, 1, 128, weight_bytes=1)
    est = estimate(small, context=1, overhead_mb=0)
    assert (est.weights_mb, est.kv_cache_mb, est.total_mb) == (1, 1, 2)  # never 0 for a byte
    f32 = ModelMeta("qwen2", 2, 2, 64, 64, 1024, weight_bytes=0, kv_bytes_per_element=4.0)
    assert kv_cache_bytes(f32, 1024) == 2 * 2 * 128 * 1024 * 4
    # K and V of different sizes (DeepSeek-style key_length != value_length).
    mixed = ModelMeta("x", 1, 1, 192, 128, 1, weight_bytes=0)
    assert kv_cache_bytes(mixed, 10) == (192 + 128) * 10 * 2


def test_encoders_and_unknown_shapes_have_no_kv_cache() -> None:
    bert = ModelMeta("bert", 12, 12, 64, 64, 512, weight_bytes=MIB, causal=False)
    assert estimate(bert, context=512, overhead_mb=0).kv_cache_mb == 0
    shapeless = ModelMeta(None, None, None, None, None, None, weight_bytes=10 * MIB)
    est = estimate(shapeless, context=4096, overhead_mb=100)
    assert (est.weights_mb, est.kv_cache_mb, est.total_mb) == (10, 0, 110)
