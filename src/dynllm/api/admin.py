"""Admin and status routes: model state, manual load/unload, backend logs (and
their live stream), lifecycle events as a stream, metrics, health."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from dynllm import __version__
from dynllm.admission import queued
from dynllm.api import sse
from dynllm.api.bodies import parse_json_object
from dynllm.config import ModelConfig
from dynllm.errors import BadRequest, ModelBusy, invalid_request
from dynllm.events import Feed, LifecycleEvent, Reason
from dynllm.metrics import CONTENT_TYPE


class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    force: bool = False


def _services(request: Request) -> Any:
    return request.app.state.services


def _model_view(services: Any, spec: ModelConfig) -> dict[str, Any]:
    scheduler = services.scheduler
    slot = scheduler.slots[spec.name]
    return {
        "name": spec.name,
        "aliases": list(spec.aliases),
        "backend": spec.backend.value,
        "model_type": spec.model_type.value,
        "source": services.catalog.source(spec.name).value,
        **scheduler.snapshot(slot),
        # Waiting for its load, for VRAM, or for a max_concurrent_requests slot.
        "queued": queued(scheduler, services.admission, slot),
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

_SSE = {"text/event-stream": {"schema": {"type": "string"}}}
_LOGS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": 'JSON {"model", "lines"}; with follow=true a text/event-stream',
        "content": {"application/json": {}, **_SSE},
    }
}
_EVENTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "A text/event-stream of lifecycle events", "content": _SSE}
}

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
        "uptime_seconds": round(time.time() - services.started_at, 1),
    }


@router.get("/admin/models")
async def admin_models(request: Request) -> dict[str, Any]:
    services = _services(request)
    return {
        "vram_total_mb": services.config.total_vram_mb,
        "vram_used_mb": services.scheduler.used_vram_mb(),
        "models": [_model_view(services, spec) for spec in services.registry],
    }


@router.get("/admin/models/{model:path}/logs", response_model=None, responses=_LOGS_RESPONSES)
async def admin_logs(
    request: Request, model: str, lines: int = 200, follow: bool = False
) -> dict[str, Any] | Response:
    """The backend's recent output.  With ``follow=true``, a text/event-stream:
    the same tail, then each new line as it comes (across restarts of the
    model), each as ``data: {"model", "line"}``."""
    services = _services(request)
    spec = services.registry.get(model)
    name = spec.name
    if not follow:
        return {"model": name, "lines": _last(services.effects.logs(name), lines)}

    def open_feed() -> tuple[Feed[str], list[bytes]]:
        feed = services.lines.feed(name)  # in the same step as the tail: no gap
        return feed, [render(line) for line in _last(services.effects.logs(name), lines)]

    def render(line: str) -> bytes:
        return sse.frame({"model": name, "line": line})

    return sse.response(sse.relay(open_feed, render, services.events.keepalive_seconds))


@router.get("/admin/events", response_class=Response, responses=_EVENTS_RESPONSES)
async def admin_events(request: Request) -> Response:
    """Lifecycle events as a text/event-stream, from the moment ``: connected``
    is sent: ``event: lifecycle`` with ``data: {"model", "from", "to",
    "reason", "detail", "at", "duration_s"}``."""
    services = _services(request)

    def open_feed() -> tuple[Feed[LifecycleEvent], list[bytes]]:
        return services.events.feed(), []

    def render(event: LifecycleEvent) -> bytes:
        return sse.frame(event.public(), "lifecycle")

    return sse.response(sse.relay(open_feed, render, services.events.keepalive_seconds))


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
)
async def metrics(request: Request) -> Response:
    """Prometheus text format (an admin route: an admin key when keys are set)."""
    return Response(_services(request).metrics.exposition(), media_type=CONTENT_TYPE)


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
    lease = await services.scheduler.acquire(spec, Reason.ADMIN)
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
    return await unload_all(_services(request), await request.body(), force)


async def unload_all(services: Any, raw: bytes, force: bool) -> dict[str, Any]:
    """Unload every model; busy ones are listed unless ``force`` (query or body)."""
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


@router.post("/admin/reload")
async def admin_reload(request: Request) -> dict[str, Any]:
    """Re-read the config file; an invalid one is refused (400) and the running one stays."""
    return {"reloaded": True, **_services(request).reloader.reload().as_dict()}


@router.post("/admin/models/rescan")
async def admin_rescan(request: Request) -> dict[str, Any]:
    """Scan models_dir and model_dirs again: new files are served at once,
    removed ones unload once idle and go."""
    return {"rescanned": True, **(await _services(request).reloader.rescan()).as_dict()}


def _last(lines: list[str], n: int) -> list[str]:
    return lines[-n:] if n > 0 else []  # (lines[-0:] would be all of them)


def install(app: FastAPI) -> None:
    app.include_router(router)
