"""OpenAI-compatible routes: one table, one dispatcher.

Forwarded requests are parsed only far enough to read ``model``; the body
goes upstream as received unless the backend insists on its own model name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dynllm.backends import adapter_for
from dynllm.backends.base import rewrite_json_model
from dynllm.config import ModelConfig
from dynllm.errors import BadRequest, DynllmError, InvalidJSON, WrongModelType
from dynllm.proxy import forward
from dynllm.registry import ApiFamily


@dataclass(frozen=True, slots=True)
class JsonRoute:
    path: str
    family: ApiFamily


ROUTES: tuple[JsonRoute, ...] = (
    JsonRoute("/v1/chat/completions", ApiFamily.CHAT),
    JsonRoute("/v1/completions", ApiFamily.COMPLETIONS),
    JsonRoute("/v1/embeddings", ApiFamily.EMBEDDINGS),
    JsonRoute("/v1/rerank", ApiFamily.RERANK),
    JsonRoute("/rerank", ApiFamily.RERANK),
)


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidJSON("The request body must be a JSON object")
    return data


def requested_model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("The request must name a model: a non-empty string 'model' field")
    return model


def _json_dispatcher(route: JsonRoute) -> Any:
    async def endpoint(request: Request) -> Response:
        services = request.app.state.services
        try:
            body = await request.body()
            data = parse_json_object(body)
            spec = services.registry.for_family(requested_model(data), route.family)
            adapter = adapter_for(spec)
            path = adapter.upstream_path(spec, route.family)
            if path is None:
                raise WrongModelType(
                    f"The {spec.backend.value} backend of '{spec.name}' does not serve "
                    f"{route.family.value} requests"
                )
            served = adapter.rewrite_model(spec, services.config.model_path(spec))
            if served is not None:
                body = rewrite_json_model(body, data, served)
            lease = await services.scheduler.acquire(spec)
            upstream = await forward(
                services.client,
                lease,
                request.method,
                path,
                body,
                request.headers.raw,
                request.scope.get("query_string", b""),
                content_type=b"application/json",  # the body was checked to be JSON
            )
        except DynllmError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())
        return upstream  # type: ignore[return-value]  # a plain ASGI app, like Response

    return endpoint


def _model_entry(services: Any, spec: ModelConfig) -> dict[str, Any]:
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
    try:
        spec = services.registry.get(request.path_params["model"])
    except DynllmError as exc:
        return JSONResponse(exc.body(), status_code=exc.status)
    return JSONResponse(_model_entry(services, spec))


def install(app: FastAPI) -> None:
    for route in ROUTES:
        app.router.routes.append(
            Route(route.path, _json_dispatcher(route), methods=["POST"], include_in_schema=False)
        )
    app.router.routes.append(Route("/v1/models", list_models, methods=["GET"]))
    app.router.routes.append(Route("/v1/models/{model:path}", get_model, methods=["GET"]))
