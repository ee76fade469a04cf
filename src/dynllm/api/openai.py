"""OpenAI-compatible listing routes (``/v1/models``).  The forwarding routes
are a table in ``api.routes``, served by ``api.dispatch``.

Each alias is listed as its own entry (clients such as Open WebUI offer only
the ids they see listed), with ``"parent"`` naming the model it stands for,
as vLLM lists a LoRA adapter with its base model; a model's own entry has
``"parent": null``.  ``list_aliases: false`` lists only the models.  A model
with ``hidden: true`` (and its aliases) is left out of the list, but is
served and answers ``/v1/models/{name}`` like any other.  ``"source"`` says
where a model comes from: ``config``, ``discovered`` (a file in a models
folder) or ``variant`` (request settings; variants are never listed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dynllm.config import ModelConfig

if TYPE_CHECKING:
    from dynllm.app import Services


def _model_entry(services: Services, spec: ModelConfig, label: str | None = None) -> dict[str, Any]:
    """The entry of ``spec``, or of its alias ``label``."""
    alias = label is not None and label != spec.name
    return {
        "id": label if alias else spec.name,
        "object": "model",
        "created": int(services.started_at),
        "owned_by": "dynllm",
        "parent": spec.name if alias else None,
        "status": services.scheduler.slots[spec.name].state.value,
        "backend": spec.backend.value,
        "model_type": spec.model_type.value,
        "aliases": list(spec.aliases),
        "source": services.catalog.source(spec.name).value,
    }


async def list_models(request: Request) -> Response:
    services = request.app.state.services
    with_aliases = services.config.list_aliases
    data = []
    for spec in services.registry:
        if spec.hidden:
            continue
        data.append(_model_entry(services, spec))
        if with_aliases:
            data.extend(_model_entry(services, spec, alias) for alias in spec.aliases)
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    services = request.app.state.services
    label = request.path_params["model"]
    spec = services.registry.get(label)  # 404 via the app's handler
    return JSONResponse(_model_entry(services, spec, label))


def install(app: FastAPI) -> None:
    app.router.routes.append(Route("/v1/models", list_models, methods=["GET"]))
    app.router.routes.append(Route("/v1/models/{model:path}", get_model, methods=["GET"]))
