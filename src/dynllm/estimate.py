"""The VRAM a model needs when its YAML entry does not say: weights plus the KV
cache for the context it is started with plus a fixed overhead (compute
buffers, the CUDA context). Pure: no I/O, no logging.

KV cache (llama.cpp, f16 by default; one cache of ``context`` cells shared by
all slots)::

    layers x kv_heads x (head_dim_k + head_dim_v) x context x bytes_per_element

Each part is rounded up to whole MiB (2**20 bytes, the unit llama.cpp prints
and the ledger books in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dynllm.modelmeta import ModelMeta

__all__ = ["DEFAULT_CONTEXT", "MIB", "Estimate", "estimate", "kv_cache_bytes"]

MIB = 2**20
DEFAULT_CONTEXT = 4096
"""The context sized for when neither the caller nor the model says."""


@dataclass(frozen=True)
class Estimate:
    weights_mb: int
    kv_cache_mb: int
    overhead_mb: int
    total_mb: int
    context: int
    """The context the KV cache was sized for."""
    gpu_layers: int | None
    """Layers on the GPU for a partial offload; None: all of them (or not applicable)."""


def kv_cache_bytes(meta: ModelMeta, context: int) -> int:
    """Bytes of K and V for ``context`` cells over all layers; 0 for an encoder or
    when the model does not say its shape."""
    if not meta.causal:
        return 0
    parts = (meta.layers, meta.kv_heads, meta.head_dim_k, meta.head_dim_v)
    if any(p is None for p in parts):
        return 0
    layers, kv_heads, head_k, head_v = (int(p or 0) for p in parts)
    return math.ceil(layers * kv_heads * (head_k + head_v) * context * meta.kv_bytes_per_element)


def estimate(
    meta: ModelMeta,
    *,
    context: int,
    n_gpu_layers: int = -1,
    overhead_mb: int,
    on_gpu: bool = True,
) -> Estimate:
    """The VRAM ``meta``'s model takes at ``context`` (0: the model's own training
    context, or DEFAULT_CONTEXT if unknown).

    ``n_gpu_layers`` as llama.cpp reads it: negative or at least the layer count puts
    everything on the GPU; 0 < n < layers puts that share of the weights and the KV
    cache there; 0 (or ``on_gpu`` False) runs on the CPU and takes no VRAM at all.
    """
    ctx = context if context > 0 else (meta.train_context or DEFAULT_CONTEXT)
    if not on_gpu or n_gpu_layers == 0:
        return Estimate(0, 0, 0, 0, context=ctx, gpu_layers=0)
    share = 1.0
    gpu_layers: int | None = None
    if meta.layers and 0 < n_gpu_layers < meta.layers:
        share = n_gpu_layers / meta.layers
        gpu_layers = n_gpu_layers
    weights_mb = math.ceil(meta.weight_bytes * share / MIB)
    kv_mb = math.ceil(kv_cache_bytes(meta, ctx) * share / MIB)
    overhead = max(0, overhead_mb)
    return Estimate(
        weights_mb=weights_mb,
        kv_cache_mb=kv_mb,
        overhead_mb=overhead,
        total_mb=weights_mb + kv_mb + overhead,
        context=ctx,
        gpu_layers=gpu_layers,
    )
