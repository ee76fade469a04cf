"""One dispatcher for every forwarding route, and the one place where errors
become responses.

The forwarding routes are the hot path, so they are served as plain ASGI
endpoints in front of FastAPI (see ``app.Front``): no middleware stack, no
router scan, no request object.  For each request the dispatcher reads the
body the way its route row says, finds the model, checks that its type and
backend serve the route, takes a lease from the scheduler and relays the
backend's answer.

A client that leaves is noticed at every step: once its body is in, a
watcher waits for uvicorn's ``http.disconnect`` and cancels the task serving
the request, wherever it is (queued for VRAM, waiting on a load, waiting for
the backend's first byte, relaying a body or a stream).  Each of those steps
undoes its own part on cancellation: the scheduler uncounts the request, the
proxy closes the backend connection and frees the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

import aiohttp
from starlette.types import Receive, Scope, Send

from dynllm.api import bodies
from dynllm.api.routes import Body, KServePath, ModelAt, Route
from dynllm.backends import Upstream
from dynllm.backends.base import rewrite_json_model
from dynllm.config import ModelConfig
from dynllm.errors import DynllmError, MethodNotAllowed, Shape, WrongModelType
from dynllm.proxy import Finish, forward

if TYPE_CHECKING:
    from dynllm.app import Services

log = logging.getLogger("dynllm.api")
JSON = "application/json"
_INTERNAL = DynllmError("Internal error in dynllm; see its log")


async def send_error(send: Send, exc: DynllmError, shape: Shape = Shape.OPENAI) -> None:
    status, headers, payload = exc.render(shape)
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def send_json(send: Send, status: int, data: Any) -> None:
    payload = json.dumps(data).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class ClientWatch:
    """Cancels the serving task when the client disconnects before the
    response is complete (uvicorn itself never cancels the app)."""

    __slots__ = ("finish", "gone", "task", "watcher")

    def __init__(self, receive: Receive, finish: Finish) -> None:
        self.finish = finish
        self.gone = False
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        # After the body, uvicorn's receive() returns only when the client
        # disconnects or the response is complete.
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.finish.done:
            self.gone = True
            self.task.cancel()

    def close(self) -> None:
        self.finish.done = True
        self.watcher.cancel()


def _upstream(services: Services, spec: ModelConfig, route: Route) -> Upstream:
    upstream = services.upstreams.get((spec.name, route.family))
    if upstream is None:
        served = sorted(f.value for (name, f) in services.upstreams if name == spec.name)
        raise WrongModelType(
            f"The {spec.backend.value} backend of '{spec.name}' does not serve "
            f"{route.family.value} requests; it serves: {', '.join(served) or 'nothing'}"
        )
    return upstream


async def dispatch(
    services: Services,
    route: Route,
    kserve: KServePath | None,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """Serve one forwarded request: the whole hot path."""
    if scope["method"] not in route.methods:
        message = f"Method {scope['method']} not allowed on {scope['path']}; use {route.allow}"
        await send_error(send, MethodNotAllowed(message, allow=route.allow), route.shape)
        return
    spool: bodies.Spool | None = None
    finish = Finish()
    watch: ClientWatch | None = None
    field: bodies.ModelField | None = None
    data: dict[str, Any] = {}
    try:
        body: bytes | bodies.Spool | None
        content_type: str | None = JSON
        if route.body is Body.JSON:
            body = await bodies.read_body(receive)
            data = bodies.parse_json_object(body)
            label = bodies.requested_model(data)
        else:
            if route.body is not Body.NONE:
                limit = int(services.config.max_upload_mb * (1 << 20))
                bodies.check_length(scope, limit)
                spool = bodies.Spool.new()
                if route.model_at is ModelAt.FORM:
                    field = bodies.ModelField(bodies.header(scope, b"content-type"))
                await bodies.spool_body(receive, limit, spool, field and field.feed)
                body = spool
                content_type = None  # the client's, boundary and all
                label = field.model() if field is not None else ""
            else:
                body = None
                content_type = None
            if kserve is not None:
                label = kserve.name
        spec = services.registry.for_family(label, route.family)
        upstream = _upstream(services, spec, route)
        path = upstream.path
        if kserve is not None:
            path += kserve.model_part
        if route.body is Body.JSON and (upstream.served_name or upstream.defaults):
            assert isinstance(body, bytes)
            body = rewrite_json_model(body, data, upstream.served_name, upstream.defaults)
        elif upstream.served_name not in (None, label) and field and spool:
            assert field.start is not None and field.end is not None
            spool.replace = (field.start, field.end, str(upstream.served_name).encode())
        watch = ClientWatch(receive, finish)
        lease = await services.scheduler.acquire(spec)
        answer = await forward(
            services.client,
            lease,
            scope["method"],
            path,
            body,
            scope["headers"],
            scope.get("query_string", b""),
            content_type=content_type,
            shape=route.shape,
        )
        await answer.send_to(send, finish)
    except bodies.ClientGone:
        return
    except DynllmError as exc:
        await _reply_error(send, exc, route.shape, finish, watch)
    except asyncio.CancelledError:
        if watch is None or not watch.gone:
            raise  # not ours: shutdown, or the server cancelled us
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
    except Exception as exc:
        if finish.started and isinstance(exc, aiohttp.ClientError | TimeoutError | OSError):
            # A plain body broke off midway (logged by the relay); returning with
            # the response incomplete makes the server drop the connection, so
            # the client sees a truncated answer rather than a wrong one.
            return
        log.exception("unexpected error serving %s", scope["path"])
        await _reply_error(send, _INTERNAL, route.shape, finish, watch)
    finally:
        if watch is not None:
            watch.close()
        if spool is not None:
            spool.close()


async def _reply_error(
    send: Send, exc: DynllmError, shape: Shape, finish: Finish, watch: ClientWatch | None
) -> None:
    if finish.started or (watch is not None and watch.gone):
        return  # too late for a status; or nobody to tell
    with contextlib.suppress(OSError):  # the client went away
        await send_error(send, exc, shape)
