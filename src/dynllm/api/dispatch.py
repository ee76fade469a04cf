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

Before the scheduler, a model with ``max_concurrent_requests`` passes its
admission gate (``dynllm.admission``): a full line is a 429 at once.  A
streaming request for a model that is not ready gets loading progress
(``api.progress``) while it waits.

Every request ends with one ``RequestRecord`` (``dynllm.requestlog``) handed
to each of ``Services.request_sinks``: errors and clients that left
included.  What it needs is gathered on the request's ``Exchange`` as it
goes (a few ``time.monotonic()`` calls and counters), nothing per chunk
beyond a byte count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from starlette.types import Receive, Scope, Send

from dynllm.admission import Gate
from dynllm.api import bodies
from dynllm.api.access import is_json
from dynllm.api.bodies import REQUEST_FIELDS
from dynllm.api.progress import LoadingProgress
from dynllm.api.routes import Body, KServePath, ModelAt, Route
from dynllm.backends import Upstream
from dynllm.backends.base import rewrite_json_model
from dynllm.catalog import parse_request
from dynllm.config import ModelConfig
from dynllm.errors import (
    DynllmError,
    MethodNotAllowed,
    Shape,
    UnsupportedMediaType,
    WrongModelType,
)
from dynllm.events import ModelState
from dynllm.proxy import (
    Answer,
    BackendGone,
    Exchange,
    forward,
    send_error,
    send_json_payload,
)
from dynllm.registry import ApiFamily, check_family
from dynllm.requestlog import RequestRecord
from dynllm.scheduler import Lease, Slot

if TYPE_CHECKING:
    from dynllm.app import Services

log = logging.getLogger("dynllm.api")
JSON = "application/json"
_INTERNAL = DynllmError("Internal error in dynllm; see its log")
CLIENT_LEFT = 499  # nginx's "client closed request": no status reached anyone
_PROGRESS_FAMILIES = frozenset({ApiFamily.CHAT, ApiFamily.COMPLETIONS, ApiFamily.RESPONSES})


async def send_json(send: Send, status: int, data: Any) -> None:
    await send_json_payload(send, status, json.dumps(data).encode())


class ClientWatch:
    """Cancels the serving task when the client disconnects before the
    response is complete (uvicorn itself never cancels the app)."""

    __slots__ = ("finish", "gone", "task", "watcher")

    def __init__(self, receive: Receive, finish: Exchange) -> None:
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
    drop: frozenset[str] = frozenset()  # dynllm's request settings, kept from the backend
    keep: float | None = None  # the idle timeout the request asked for (ttl / keep_alive)
    spec: ModelConfig | None = None  # the model, once found (a large body's, by the helper)

    def to_backend(self, upstream: Upstream) -> bytes | bodies.Spool | None:
        """The body as the backend must receive it (its own model name, its
        defaults, without dynllm's request settings)."""
        if self.data is not None and (upstream.served_name or upstream.defaults or self.drop):
            assert isinstance(self.body, bytes)
            return rewrite_json_model(
                self.body, self.data, upstream.served_name, upstream.defaults, self.drop
            )
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
    model, settings = await worker.model_and_settings(pieces)
    label = bodies.model_name(model)
    incoming = Incoming(label, None)
    spec = await _with_settings(services, incoming, await find_model(services, label), settings)
    upstream = _upstream(services, check_family(spec, route.family, label), route)
    if upstream.served_name or upstream.defaults or incoming.drop:
        new = await worker.rewrite(pieces, upstream.served_name, upstream.defaults, incoming.drop)
        if new is not None:
            pieces = [new]
    incoming.body = bodies.Spool.of_pieces(pieces)
    incoming.spec = spec
    return incoming


async def dispatch(
    services: Services,
    route: Route,
    kserve: KServePath | None,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """Serve one forwarded request: the whole hot path."""
    arrived = time.monotonic()
    ex = Exchange()
    watch: ClientWatch | None = None
    incoming: Incoming | None = None
    spec: ModelConfig | None = None
    gate: Gate | None = None
    progress: LoadingProgress | None = None
    client_left = False
    try:
        if scope["method"] not in route.methods:
            message = f"Method {scope['method']} not allowed on {scope['path']}; use {route.allow}"
            raise MethodNotAllowed(message, allow=route.allow)
        incoming = await read_request(services, route, kserve, scope, receive)
        spec = await _model_for(services, incoming, route)
        upstream = _upstream(services, spec, route)
        path = upstream.path + (kserve.model_part if kserve is not None else "")
        body = incoming.to_backend(upstream)
        slot = services.scheduler.slots[spec.name]
        # From here on a client that leaves cancels this task, wherever it waits.
        watch = ClientWatch(receive, ex)
        if slot.state is not ModelState.READY and _wants_progress(services, route, incoming):
            progress = LoadingProgress(send, ex, slot, arrived)
        if (limit := spec.max_concurrent_requests) is not None:
            gate = services.admission.gate(spec)
            waited_from = time.monotonic()
            try:
                await gate.enter(
                    limit, spec.max_queued_requests, services.config.queue_timeout_seconds
                )
            except BaseException:
                gate = None  # not admitted: nothing to leave
                raise
            finally:
                ex.queued_ms += (time.monotonic() - waited_from) * 1000
        answer = await lease_and_forward(
            services,
            spec,
            slot,
            ex,
            scope,
            path,
            body,
            incoming.content_type,
            route.shape,
            incoming.keep,
        )
        if progress is not None:
            progress.stop()  # before anything else is sent: the answer writes next
        await answer.send_to(send, ex)
    except bodies.ClientGone:
        client_left = True
    except DynllmError as exc:
        await _reply_error(send, exc, route.shape, ex, watch, progress)
    except asyncio.CancelledError:
        if watch is None or not watch.gone:
            raise  # not ours: shutdown, or the server cancelled us
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
    except Exception as exc:
        if ex.started and isinstance(exc, aiohttp.ClientError | TimeoutError | OSError):
            # A plain body broke off midway (logged by the relay); returning with
            # the response incomplete makes the server drop the connection, so
            # the client sees a truncated answer rather than a wrong one.
            return
        log.exception("unexpected error serving %s", scope["path"])
        await _reply_error(send, _INTERNAL, route.shape, ex, watch, progress)
    finally:
        if progress is not None:
            progress.stop()
        if gate is not None:
            gate.leave()
        if watch is not None:
            client_left = client_left or watch.gone
            watch.close()
        if incoming is not None:
            incoming.close()
        _record(services, route, spec, incoming, ex, arrived, client_left)


async def find_model(services: Services, label: str) -> ModelConfig:
    """The model a client named: a name or alias (one dict lookup), else a
    path to a model file or folder inside a models folder (discovery)."""
    spec = services.registry.find(label)
    if spec is not None:
        return spec
    return await services.reloader.find(label)


async def _model_for(services: Services, incoming: Incoming, route: Route) -> ModelConfig:
    """The model that serves this request: the one it names, or the variant
    its settings (backend, device, context...) ask for; its ``ttl`` /
    ``keep_alive`` and those settings are noted and kept from the backend."""
    if incoming.spec is not None:  # a large body: found (and its settings read) already
        return check_family(incoming.spec, route.family, incoming.label)
    spec = await find_model(services, incoming.label)
    data = incoming.data
    if data is not None and not REQUEST_FIELDS.isdisjoint(data):
        spec = await _with_settings(services, incoming, spec, data)
    return check_family(spec, route.family, incoming.label)


async def _with_settings(
    services: Services, incoming: Incoming, spec: ModelConfig, data: dict[str, Any]
) -> ModelConfig:
    """The model (or variant) the request's settings ask for; its ``ttl`` /
    ``keep_alive`` and the fields to keep from the backend noted on ``incoming``."""
    if not data:
        return spec
    asked = parse_request(data)
    incoming.drop, incoming.keep = asked.present, asked.keep
    if asked.settings:
        return services.reloader.with_variant(spec, asked.settings)
    return spec


def _wants_progress(services: Services, route: Route, incoming: Incoming) -> bool:
    """A streaming request on an SSE route, with loading progress on."""
    data = incoming.data
    return (
        data is not None
        and data.get("stream") is True
        and route.family in _PROGRESS_FAMILIES
        and services.config.loading_progress
    )


def _record(
    services: Services,
    route: Route,
    spec: ModelConfig | None,
    incoming: Incoming | None,
    ex: Exchange,
    arrived: float,
    client_left: bool,
) -> None:
    """Hand the request's record to every sink (after the response: a sink
    never delays an answer, and one that fails never fails the request)."""
    now = time.monotonic()
    # Unknown (404) or never read: the name as sent, if any.
    model = spec.name if spec is not None else incoming.label if incoming is not None else ""
    first = ex.first_byte
    record = RequestRecord(
        model,
        route.path,
        CLIENT_LEFT if client_left or not ex.status else ex.status,
        ex.queued_ms,
        ex.load_ms,
        ex.cold,
        None if first is None else (first - arrived) * 1000,
        (now - arrived) * 1000,
        ex.sent,
        ex.prompt_tokens,
        ex.completion_tokens,
    )
    for sink in services.request_sinks:
        try:
            sink(record)
        except Exception:
            log.exception("a request sink failed")


async def lease_and_forward(
    services: Services,
    spec: ModelConfig,
    slot: Slot,
    ex: Exchange,
    scope: Scope,
    path: str,
    body: bytes | bodies.Spool | None,
    content_type: str | None,
    shape: Shape,
    keep: float | None = None,
) -> Answer:
    """Take a lease and send the request.  A request that could not be sent
    because the backend had just died (a crash a moment before, maybe not yet
    noticed by the scheduler) goes, once, to a restarted backend instead of
    failing with a 502; one that may have reached a backend is never re-sent."""
    scheduler = services.scheduler
    if slot.state is ModelState.READY:
        lease = await scheduler.acquire(spec)  # returns at once: nothing to time
        services.stats.count(spec.name, hit=True)
    else:
        try:
            lease = await _timed(ex, slot, scheduler.acquire(spec))
        except BaseException:
            if ex.cold:  # it had to wait for a load: a miss, served or not
                services.stats.count(spec.name, hit=False)
            raise  # refused before any load (cooldown, queue timeout, left): neither
        services.stats.count(spec.name, hit=not ex.cold)
    lease.keep = keep
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
            lease = await _timed(ex, slot, scheduler.replace(lease))
            lease.keep = keep
    raise AssertionError("unreachable")


async def _timed(ex: Exchange, slot: Slot, waiting: Coroutine[Any, Any, Lease]) -> Lease:
    """Await a lease, adding the wait to the request's queued and load times.

    The request waited for a load (``cold``) if the model was loading when
    it began waiting or a load began meanwhile (the slot's load future
    changed).  Of a cold wait, the part since the backend process was
    spawned (or since the request arrived, if later) is load time; the rest
    (the scheduler's queue, evictions, a previous backend still stopping) is
    queued time.  A wait that failed counts as load time if a load was
    involved, else as queued time."""
    state, load = slot.state, slot.load
    began = time.monotonic()
    lease: Lease | None = None
    try:
        lease = await waiting
        return lease
    finally:
        waited = (time.monotonic() - began) * 1000
        if state is ModelState.LOADING or slot.load is not load:
            ex.cold = True
            loading = waited
            handle = slot.handle
            if lease is not None and handle is not None:
                spawned_ago = (time.time() - handle.started_at) * 1000
                loading = min(max(spawned_ago, 0.0), waited)
            ex.load_ms += loading
            ex.queued_ms += waited - loading
        else:
            ex.queued_ms += waited


async def _reply_error(
    send: Send,
    exc: DynllmError,
    shape: Shape,
    ex: Exchange,
    watch: ClientWatch | None,
    progress: LoadingProgress | None,
) -> None:
    if progress is not None:
        progress.stop()  # nothing else may write from here on
    if watch is not None and watch.gone:
        return  # nobody to tell
    with contextlib.suppress(OSError):  # the client went away
        if ex.progress and not ex.done:
            # Loading progress began the event stream: the error ends it.
            await ex.end_stream_with(send, exc)
            return
        if ex.started:
            return  # too late for a status
        await send_error(send, exc, shape, ex=ex)
