"""KServe v2 routes that dynllm answers itself, without touching a backend.

Server liveness, readiness and metadata describe dynllm.  A model's readiness
(``/v2/models/{name}[/versions/{v}]/ready``) is answered from the scheduler's
state: 200 only when the model is loaded and ready, 400 otherwise (the
protocol's "4xx when not ready"); asking never loads anything.  Metadata and
inference are forwarded (``api.routes``) and load the model on demand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI
from starlette.types import Send

from dynllm import __version__
from dynllm.api.dispatch import send_json
from dynllm.api.routes import KServePath
from dynllm.errors import DynllmError, MethodNotAllowed, Shape
from dynllm.proxy import send_error

if TYPE_CHECKING:
    from dynllm.app import Services

EXTENSIONS = ["binary_tensor_data"]


class NotReady(DynllmError):
    status = 400
    type = "invalid_request_error"
    code = "model_not_ready"


async def model_ready(services: Services, path: KServePath, method: str, send: Send) -> None:
    try:
        if method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"Method {method} not allowed; use GET", allow="GET")
        spec = services.registry.get(path.name)
        state = services.scheduler.slots[spec.name].state
        if state.value != "loaded":
            raise NotReady(f"Model '{path.name}' is not ready: it is {state.value}")
    except DynllmError as exc:
        await send_error(send, exc, Shape.KSERVE)
        return
    await send_json(send, 200, {"name": path.name, "ready": True})


router = APIRouter()


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready() -> dict[str, bool]:
    """dynllm takes requests for every configured model (loading them on demand)."""
    return {"ready": True}


@router.get("/v2")
async def server_metadata() -> dict[str, object]:
    return {"name": "dynllm", "version": __version__, "extensions": EXTENSIONS}


def install(app: FastAPI) -> None:
    app.include_router(router)
