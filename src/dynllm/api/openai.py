"""OpenAI-compatible routes: one table, one dispatcher.

The forwarding routes are the hot path, so they are served as plain ASGI
endpoints in front of FastAPI (see ``app.Front``): no middleware stack, no
router scan, no request object.  Forwarded bodies are parsed once, to check
they are a JSON object and to read ``model``; the body goes upstream as
received unless the backend insists on its own model name.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dynllm.backends import adapter_for
from dynllm.backends.base import rewrite_json_model
from dynllm.config import Config, ModelConfig
from dynllm.errors import BadRequest, DynllmError, InvalidJSON, WrongModelType, error_body
from dynllm.proxy import forward
from dynllm.registry import ApiFamily

if TYPE_CHECKING:
    from dynllm.app import Services

log = logging.getLogger("dynllm.api")
JSON = "application/json"


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
BY_PATH: dict[str, JsonRoute] = {r.path: r for r in ROUTES}


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where one model's requests of one family go on its backend."""

    path: str
    served_name: str | None  # the ``model`` value the backend insists on; None: untouched


def upstream_table(config: Config) -> dict[tuple[str, ApiFamily], Upstream]:
    """Every (model, family) its backend serves, worked out once at startup so
    the hot path does one lookup; a missing pair is a family the backend lacks."""
    table = {}
    for spec in config.models:
        adapter = adapter_for(spec)
        served = adapter.rewrite_model(spec, config.model_path(spec))
        for family in ApiFamily:
            path = adapter.upstream_path(spec, family)
            if path is not None:
                table[spec.name, family] = Upstream(path, served)
    return table


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


async def send_json(
    send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client left first."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def dispatch(
    services: Services, route: JsonRoute, scope: Scope, receive: Receive, send: Send
) -> None:
    """Serve one forwarded request: the whole hot path."""
    if scope["method"] != "POST":
        message = f"Method {scope['method']} not allowed on {route.path}; use POST"
        await send_json(send, 405, error_body(message, "invalid_request_error", "405"),
                        {"Allow": "POST"})  # fmt: skip
        return
    try:
        body = await read_body(receive)
        if body is None:
            return
        data = parse_json_object(body)
        spec: ModelConfig = services.registry.for_family(requested_model(data), route.family)
        upstream = services.upstreams.get((spec.name, route.family))
        if upstream is None:
            raise WrongModelType(
                f"The {spec.backend.value} backend of '{spec.name}' does not serve "
                f"{route.family.value} requests"
            )
        if upstream.served_name is not None:
            body = rewrite_json_model(body, data, upstream.served_name)
        lease = await services.scheduler.acquire(spec)
        response = await forward(
            services.client,
            lease,
            scope["method"],
            upstream.path,
            body,
            scope["headers"],
            scope.get("query_string", b""),
            content_type=JSON,  # the body was checked to be JSON
        )
    except DynllmError as exc:
        await send_json(send, exc.status, exc.body(), exc.headers())
        return
    except Exception:
        log.exception("unexpected error serving %s", route.path)
        internal = DynllmError("Internal error in dynllm; see its log")
        await send_json(send, internal.status, internal.body())
        return
    await response(scope, receive, send)


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
