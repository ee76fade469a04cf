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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from starlette.types import Receive, Scope, Send

from dynllm.api import bodies
from dynllm.api.access import is_json
from dynllm.api.routes import Body, KServePath, ModelAt, Route
from dynllm.backends import Upstream
from dynllm.backends.base import rewrite_json_model
from dynllm.config import ModelConfig
from dynllm.errors import (
    DynllmError,
    MethodNotAllowed,
    Shape,
    UnsupportedMediaType,
    WrongModelType,
)
from dynllm.proxy import Answer, BackendGone, Finish, forward, send_json_payload

if TYPE_CHECKING:
    from dynllm.app import Services

log = logging.getLogger("dynllm.api")
JSON = "application/json"
_INTERNAL = DynllmError("Internal error in dynllm; see its log")


async def send_error(send: Send, exc: DynllmError, shape: Shape = Shape.OPENAI) -> None:
    status, headers, payload = exc.render(shape)
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send_json_payload(send, status, payload, raw)


async def send_json(send: Send, status: int, data: Any) -> None:
    await send_json_payload(send, status, json.dumps(data).encode())


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


@dataclass(slots=True)
class Incoming:
    """A request's body as read for its route, and the model it names."""

    label: str
    body: bytes | bodies.Spool | None
    content_type: str | None = JSON  # None: the client's own goes upstream
    data: dict[str, Any] | None = None  # the parsed JSON body (None past INLINE_JSON_BYTES)
    field: bodies.ModelField | None = None  # where a multipart "model" lies

    def to_backend(self, upstream: Upstream) -> bytes | bodies.Spool | None:
        """The body as the backend must receive it (its own model name, its defaults)."""
        if self.data is not None and (upstream.served_name or upstream.defaults):
            assert isinstance(self.body, bytes)
            return rewrite_json_model(self.body, self.data, upstream.served_name, upstream.defaults)
        field, spool = self.field, self.body
        if upstream.served_name not in (None, self.label) and field and spool:
            assert isinstance(spool, bodies.Spool)
            assert field.start is not None and field.end is not None
            spool.replace = (field.start, field.end, str(upstream.served_name).encode())
        return self.body

    def close(self) -> None:
        if isinstance(self.body, bodies.Spool):
            self.body.close()


async def read_request(
    services: Services, route: Route, kserve: KServePath | None, scope: Scope, receive: Receive
) -> Incoming:
    """Read the body the way the route says and find the model it names."""
    if route.body is Body.JSON:
        if not is_json(bodies.header(scope, b"content-type")):
            # Also what keeps a cross-origin "simple" request (text/plain, no
            # preflight) from loading models.
            raise UnsupportedMediaType(
                f"{route.path} takes a JSON body: send 'Content-Type: application/json'"
            )
        limit = services.json_limit
        bodies.check_length(scope, limit)  # 413 before a byte is read
        pieces, size = await bodies.read_pieces(receive, limit)
        if size > bodies.INLINE_JSON_BYTES:
            return await _large_json(services, route, pieces)
        body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        data = bodies.parse_json_object(body)
        return Incoming(bodies.requested_model(data), body, data=data)
    label = kserve.name if kserve is not None else ""
    if route.body is Body.NONE:
        return Incoming(label, None, content_type=None)
    limit = services.upload_limit
    bodies.check_length(scope, limit)  # 413 before a byte is read
    field = None
    if route.model_at is ModelAt.FORM:
        field = bodies.ModelField(bodies.header(scope, b"content-type"))
    spool = bodies.Spool.new()
    try:
        await bodies.spool_body(receive, limit, spool, field and field.feed)
        if field is not None:
            label = field.model()
    except BaseException:
        spool.close()
        raise
    return Incoming(label, spool, content_type=None, field=field)


async def _large_json(services: Services, route: Route, pieces: list[bytes]) -> Incoming:
    """A JSON body too large to parse on the event loop: the helper process
    reads its model and, if the backend wants its own model name or defaults,
    re-encodes it too, so ``to_backend`` has nothing left to do (the same
    errors as the inline path, in the same order).  The body stays in the
    pieces it came in, and goes to the backend in pieces."""
    worker = services.json_worker
    label = bodies.model_name(await worker.model_of(pieces))
    upstream = _upstream(services, services.registry.for_family(label, route.family), route)
    if upstream.served_name or upstream.defaults:
        new = await worker.rewrite(pieces, upstream.served_name, upstream.defaults)
        if new is not None:
            pieces = [new]
    return Incoming(label, bodies.Spool.of_pieces(pieces))


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
    finish = Finish()
    watch: ClientWatch | None = None
    incoming: Incoming | None = None
    try:
        incoming = await read_request(services, route, kserve, scope, receive)
        spec = services.registry.for_family(incoming.label, route.family)
        upstream = _upstream(services, spec, route)
        path = upstream.path + (kserve.model_part if kserve is not None else "")
        body = incoming.to_backend(upstream)
        # From here on a client that leaves cancels this task, wherever it waits.
        watch = ClientWatch(receive, finish)
        answer = await lease_and_forward(
            services, spec, scope, path, body, incoming.content_type, route.shape
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
        if incoming is not None:
            incoming.close()


async def lease_and_forward(
    services: Services,
    spec: ModelConfig,
    scope: Scope,
    path: str,
    body: bytes | bodies.Spool | None,
    content_type: str | None,
    shape: Shape,
) -> Answer:
    """Take a lease and send the request.  A request that could not be sent
    because the backend had just died (a crash a moment before, maybe not yet
    noticed by the scheduler) goes, once, to a restarted backend instead of
    failing with a 502; one that may have reached a backend is never re-sent."""
    lease = await services.scheduler.acquire(spec)
    for tries_left in (1, 0):
        try:
            return await forward(
                services.client,
                lease,
                scope["method"],
                path,
                body,
                scope["headers"],
                scope.get("query_string", b""),
                content_type=content_type,
                shape=shape,
            )
        except BackendGone:  # forward released the lease
            if not tries_left:
                raise
            lease = await services.scheduler.replace(lease)
    raise AssertionError("unreachable")


async def _reply_error(
    send: Send, exc: DynllmError, shape: Shape, finish: Finish, watch: ClientWatch | None
) -> None:
    if finish.started or (watch is not None and watch.gone):
        return  # too late for a status; or nobody to tell
    with contextlib.suppress(OSError):  # the client went away
        await send_error(send, exc, shape)
