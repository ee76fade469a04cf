"""Admin and status routes: model state, manual load/unload, backend logs, health."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, ValidationError

from dynllm import __version__
from dynllm.api.bodies import parse_json_object
from dynllm.config import ModelConfig
from dynllm.errors import BadRequest, ModelBusy, invalid_request


class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    force: bool = False


def _services(request: Request) -> Any:
    return request.app.state.services


def _model_view(services: Any, spec: ModelConfig) -> dict[str, Any]:
    return {
        "name": spec.name,
        "aliases": list(spec.aliases),
        "backend": spec.backend.value,
        "model_type": spec.model_type.value,
        **services.scheduler.snapshot(services.scheduler.slots[spec.name]),
    }


def _json_body(schema: dict[str, Any], required: bool) -> dict[str, Any]:
    """The request body as the OpenAPI schema shows it.  The admin POSTs read
    their body by hand (one JSON error vocabulary with the model routes), so
    FastAPI cannot see it: without this, ``/docs`` and ``/openapi.json`` said
    they take no body at all."""
    content = {"application/json": {"schema": schema}}
    return {"requestBody": {"required": required, "content": content}}


_MODEL_BODY = _json_body(ModelRequest.model_json_schema(), required=True)
_FORCE_BODY = _json_body(
    {
        "type": "object",
        "properties": {"force": {"type": "boolean", "default": False}},
        "additionalProperties": False,
    },
    required=False,
)

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    services = _services(request)
    scheduler = services.scheduler
    return {
        "status": "ok",
        "version": __version__,
        "models_loaded": sum(1 for s in scheduler.slots.values() if s.handle is not None),
        "vram_used_mb": scheduler.used_vram_mb(),
        "vram_total_mb": services.config.total_vram_mb,
        "queued_requests": scheduler.queue_length(),
    }


@router.get("/admin/models")
async def admin_models(request: Request) -> dict[str, Any]:
    services = _services(request)
    return {
        "vram_total_mb": services.config.total_vram_mb,
        "vram_used_mb": services.scheduler.used_vram_mb(),
        "models": [_model_view(services, spec) for spec in services.registry],
    }


@router.get("/admin/models/{model}/logs")
async def admin_logs(request: Request, model: str, lines: int = 200) -> dict[str, Any]:
    services = _services(request)
    spec = services.registry.get(model)
    return {"model": spec.name, "lines": services.effects.logs(spec.name)[-max(lines, 0) :]}


async def _model_request(request: Request) -> ModelRequest:
    """``{"model", "force"}`` (the JSON content type is checked in the front)."""
    data = parse_json_object(await request.body())
    try:
        return ModelRequest.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None


@router.post("/admin/models/load", openapi_extra=_MODEL_BODY)
async def admin_load(request: Request) -> dict[str, Any]:
    """Load a model now.  A model cooling down after failed loads is refused
    like any request (503 + Retry-After) unless ``force``: an admin who fixed
    the cause need not wait out the cooldown."""
    services = _services(request)
    body = await _model_request(request)
    spec = services.registry.get(body.model)
    if body.force:
        services.scheduler.clear_cooldown(spec)
    lease = await services.scheduler.acquire(spec)
    lease.release()
    return {"model": spec.name, "loaded": True, **_model_view(services, spec)}


@router.post("/admin/models/unload", openapi_extra=_MODEL_BODY)
async def admin_unload(request: Request) -> dict[str, Any]:
    services = _services(request)
    body = await _model_request(request)
    spec = services.registry.get(body.model)
    was_running = await services.scheduler.unload(spec, force=body.force)
    return {"model": spec.name, "unloaded": was_running, **_model_view(services, spec)}


@router.post("/admin/models/unload-all", openapi_extra=_FORCE_BODY)
async def admin_unload_all(request: Request, force: bool = False) -> dict[str, Any]:
    """``force`` as a query parameter or in an optional JSON body ``{"force": true}``."""
    services = _services(request)
    raw = await request.body()
    if raw.strip():
        body = parse_json_object(raw)
        if not isinstance(body.get("force", False), bool) or set(body) - {"force"}:
            raise BadRequest('The body may only hold {"force": true|false}')
        force = force or bool(body.get("force", False))
    unloaded, busy = [], []
    for spec in services.registry:
        try:
            if await services.scheduler.unload(spec, force=force):
                unloaded.append(spec.name)
        except ModelBusy:
            busy.append(spec.name)
    return {"unloaded": unloaded, "busy": busy}


def install(app: FastAPI) -> None:
    app.include_router(router)
