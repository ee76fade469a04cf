"""XandRouting's model management routes (admin routes, see ``api.access``):
the inventory of model files, the models loaded now ("the cache"), cache
statistics, and unloading by model path plus backend and device.

The shapes are XandRouting's (its README), with dynllm's own fields added:
a client written for XandRouting finds every field it reads.  Registered
before ``/v1/models/{model}``, so a model cannot hide these paths.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request

from dynllm import catalog as cat
from dynllm.api.admin import unload_all
from dynllm.api.bodies import REQUEST_SETTINGS, parse_json_object
from dynllm.api.dispatch import find_model
from dynllm.config import ModelConfig
from dynllm.downloadjob import iso_time
from dynllm.errors import BadRequest
from dynllm.events import ModelState
from dynllm.inventory import inventory

if TYPE_CHECKING:
    from dynllm.app import Services

router = APIRouter()

_UNLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {
                        "model": {"type": "string", "description": "name or path"},
                        "backend": {"type": "string"},
                        "device": {"type": "string"},
                        "force": {"type": "boolean", "default": False},
                    },
                }
            }
        },
    }
}


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def loaded_entry(services: Services, spec: ModelConfig) -> dict[str, Any]:
    scheduler = services.scheduler
    slot = scheduler.slots[spec.name]
    ttl = scheduler.unload_after(slot)
    expires = None
    if slot.state is ModelState.READY and not slot.busy and not spec.pinned and math.isfinite(ttl):
        expires = (slot.last_used_wall or slot.loaded_at or 0.0) + ttl
    catalog = services.catalog
    return {
        "cache_key": spec.name,
        "model_path": str(services.config.model_path(spec)) if spec.path else None,
        "backend": spec.backend.value,
        "device": cat.device_of(spec),
        "loaded_at": iso_time(slot.loaded_at),
        "ttl": None if math.isinf(ttl) else ttl,
        "expires_at": iso_time(expires),
        "status": slot.state.value,
        "model": catalog.base_of(spec.name),
        "source": catalog.source(spec.name).value,
        "in_flight": slot.in_flight,
        "vram_mb": spec.vram_mb,
        "pid": slot.handle.pid if slot.handle is not None else None,
    }


@router.get("/v1/models/loaded")
async def models_loaded(request: Request) -> dict[str, Any]:
    """The models with a backend process now (loading, ready or stopping)."""
    services = _services(request)
    entries = [
        loaded_entry(services, spec)
        for spec in services.registry
        if services.scheduler.slots[spec.name].state is not ModelState.UNLOADED
    ]
    return {"loaded_models": entries, "total_count": len(entries)}


@router.get("/v1/models/stats")
async def models_stats(request: Request) -> dict[str, Any]:
    services = _services(request)
    slots = services.scheduler.slots
    return services.stats.view(
        [spec.name for spec in services.registry],
        [n for n, s in slots.items() if s.state is ModelState.READY],
    )


@router.get("/v1/models/inventory")
async def models_inventory(request: Request) -> dict[str, Any]:
    """The model files found in models_dir and model_dirs (as of the last scan)."""
    catalog = _services(request).catalog
    estimates = {n: d.estimate for n, d in catalog.discovered.items() if d.estimate is not None}
    return inventory(catalog.scan, estimates, catalog.served_as)


@router.post("/v1/models/unload", openapi_extra=_UNLOAD_BODY)
async def models_unload(request: Request) -> dict[str, Any]:
    """Unload a model by name or path; with ``backend`` / ``device`` only that
    variant, without them the model and every variant of it."""
    services = _services(request)
    data = parse_json_object(await request.body())
    label, force = data.get("model"), data.get("force", False)
    if not isinstance(label, str) or not label:
        raise BadRequest('The body needs "model": the name or path of the model to unload')
    if not isinstance(force, bool):
        raise BadRequest('"force" must be true or false')
    unknown = set(data) - {"model", "force", *REQUEST_SETTINGS}
    if unknown:
        raise BadRequest(f"Unknown field(s): {', '.join(sorted(unknown))}")
    spec = await find_model(services, label)
    settings = cat.parse_request(data).settings
    catalog = services.catalog
    base = catalog.base_of(spec.name)
    family = [base, *(n for n, v in catalog.variants.items() if v.base == base)]
    if set(settings) - {"backend", "device"}:  # a variant's own settings: that one
        wanted = cat.variant_for(catalog, spec, settings)
        names = [wanted[0] if wanted is not None else base]
    else:  # XandRouting's cache key: every entry of the model on that backend and device
        names = [n for n in family if _matches(services.registry.get(n), settings)]
    unloaded = []
    for name in names:
        target = services.registry.find(name)
        if target is not None and await services.scheduler.unload(target, force=force):
            unloaded.append(name)
    message = f"Unloaded {', '.join(unloaded)}" if unloaded else "Nothing of it was loaded"
    return {"model": label, "unloaded": unloaded, "status": "success", "message": message}


def _matches(spec: ModelConfig, settings: dict[str, Any]) -> bool:
    backend, device = settings.get("backend"), settings.get("device")
    if backend is not None and spec.backend is not backend:
        return False
    if device is None or device == "auto":
        return True
    return _device_class(device) == _device_class(cat.device_of(spec))


def _device_class(device: str) -> str:
    return device if device in ("cpu", "auto", "npu", "mps") else "gpu"


@router.post("/v1/models/unload-all")
async def models_unload_all(request: Request, force: bool = False) -> dict[str, Any]:
    """Every model without requests in flight (``force``: those too)."""
    result = await unload_all(_services(request), await request.body(), force)
    count = len(result["unloaded"])
    return {**result, "status": "success", "message": f"Unloaded {count} model(s)"}


def install(app: FastAPI) -> None:
    app.include_router(router)
