"""OpenAI-compatible listing routes (``/v1/models``).  The forwarding routes
are a table in ``api.routes``, served by ``api.dispatch``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dynllm.config import ModelConfig

if TYPE_CHECKING:
    from dynllm.app import Services


def _model_entry(services: Services, spec: ModelConfig) -> dict[str, Any]:
    return {
        "id": spec.name,
        "object": "model",
        "created": int(services.started_at),
        "owned_by": "dynllm",
        "status": services.scheduler.slots[spec.name].state.value,
        "backend": spec.backend.value,
        "model_type": spec.model_type.value,
        "aliases": list(spec.aliases),
    }


async def list_models(request: Request) -> Response:
    services = request.app.state.services
    data = [_model_entry(services, spec) for spec in services.registry]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    services = request.app.state.services
    spec = services.registry.get(request.path_params["model"])  # 404 via the app's handler
    return JSONResponse(_model_entry(services, spec))


def install(app: FastAPI) -> None:
    app.router.routes.append(Route("/v1/models", list_models, methods=["GET"]))
    app.router.routes.append(Route("/v1/models/{model:path}", get_model, methods=["GET"]))
