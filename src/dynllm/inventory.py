"""The inventory view: what discovery found, in XandRouting's shape
(``GET /v1/models/inventory``) plus dynllm's model type, kind and VRAM estimate.
Pure: a function of a scan and its estimates.

Sizes are decimal, as XandRouting shows them (a 4.2 GB model is 4200 MB), rounded
to two places; the VRAM estimate is in MiB, as llama.cpp and the ledger count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dynllm.discovery import Found, Scan
from dynllm.estimate import Estimate

__all__ = ["inventory", "model_entry"]

_GB = 1e9
_MB = 1e6
_NO_SERVED: Mapping[str, str] = {}


def _estimate(est: Estimate | None) -> dict[str, int] | None:
    if est is None:
        return None
    return {
        "weights_mb": est.weights_mb,
        "kv_cache_mb": est.kv_cache_mb,
        "overhead_mb": est.overhead_mb,
        "total_mb": est.total_mb,
        "context": est.context,
    }


def model_entry(found: Found, est: Estimate | None, served_as: str | None = None) -> dict[str, Any]:
    """One model of the inventory."""
    entry: dict[str, Any] = {
        "name": found.name,
        "path": str(found.path),
        "size_gb": round(found.size / _GB, 2),
        "files": [
            {"name": f.name, "size_mb": round(f.size / _MB, 2), "type": f.type} for f in found.files
        ],
        "recommended_backends": [b.value for b in found.backends],
        "model_type": found.model_type.value,
        "kind": found.kind.value,
        "vram_estimate": _estimate(est),
    }
    if found.mmproj is not None:
        entry["mmproj"] = str(found.mmproj)
    if served_as is not None and served_as != found.name:
        entry["served_as"] = served_as
    return entry


def inventory(
    scan: Scan, estimates: Mapping[str, Estimate], served: Mapping[str, str] = _NO_SERVED
) -> dict[str, Any]:
    """``{"models": [...], "total_models", "total_size_gb"}`` for ``scan``.

    ``estimates`` maps a found name to its estimate (absent: ``"vram_estimate": null``,
    e.g. a vLLM model that books a share of the GPU instead); ``served`` maps a
    found name to the name it is served under when a YAML entry covers its file.
    """
    models = [model_entry(f, estimates.get(f.name), served.get(f.name)) for f in scan.found]
    return {
        "models": models,
        "total_models": len(models),
        "total_size_gb": round(sum(f.size for f in scan.found) / _GB, 2),
    }
