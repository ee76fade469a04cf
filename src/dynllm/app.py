"""create_app(config): the one place where the long-lived objects are wired.

They live in the lifespan (no module globals), so every test builds its own.
Startup order: open the state file, stop orphans a crashed run left behind,
start the idle job, load ``preload_models``, then accept traffic.

Lifecycle events flow from the scheduler to one ``EventHub``; its
subscribers, in order: the store, the log, the metrics; and the event streams
of ``GET /admin/events``.  Backend output flows to a ``LineHub`` for
``GET /admin/models/{m}/logs?follow=true``.  Both hubs are closed as soon as
the server is asked to stop: uvicorn waits for open responses before it runs
the lifespan's shutdown, so an open stream would otherwise hold it up until
its graceful-shutdown timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from dynllm import __version__
from dynllm.admission import Admission
from dynllm.api import admin, downloads, kserve, modelcache, openai, routes, ui
from dynllm.api.access import Access, is_loopback
from dynllm.api.cors import Cors, is_preflight
from dynllm.api.dispatch import dispatch
from dynllm.api.jsonwork import JsonWorker
from dynllm.backends import Upstream, missing_binary, upstream_table
from dynllm.catalog import Catalog, model_dirs
from dynllm.catalog import build as build_catalog
from dynllm.config import Config
from dynllm.downloads import DownloadManager
from dynllm.errors import DynllmError, Forbidden, Shape, error_body, invalid_request
from dynllm.events import EventHub, LineHub, Reason, log_event
from dynllm.hotreload import Reloader, scan_folders
from dynllm.launcher import ProcessEffects
from dynllm.metrics import Metrics
from dynllm.proxy import make_client, send_error
from dynllm.registry import ApiFamily, Registry
from dynllm.requestlog import RequestSink, default_sinks
from dynllm.scheduler import Scheduler
from dynllm.stats import CacheStats
from dynllm.store import Store

log = logging.getLogger("dynllm")


@dataclass
class Services:
    config: Config
    registry: Registry
    scheduler: Scheduler
    store: Store
    effects: ProcessEffects
    client: aiohttp.ClientSession
    catalog: Catalog
    """The served models (YAML, discovered, variants); ``config`` is its effective config."""
    started_at: float = field(default_factory=time.time)
    json_worker: JsonWorker = field(default_factory=JsonWorker)
    """Parses JSON bodies too large for the event loop (no process until the first)."""
    request_sinks: list[RequestSink] = field(default_factory=default_sinks)
    """Called with each finished request's record (requestlog); the log line is the first."""
    admission: Admission = field(default_factory=Admission)
    """Per-model max_concurrent_requests / max_queued_requests gates."""
    events: EventHub = field(default_factory=EventHub)
    """Lifecycle events from the scheduler to the store, log, metrics and streams."""
    lines: LineHub = field(default_factory=LineHub)
    """Backend output lines to the followers of a model's log."""
    reloader: Reloader = field(init=False)
    """Swaps in a new catalog: config reloads, folder rescans, variants."""
    stats: CacheStats = field(default_factory=CacheStats)
    """Cache hits and misses per model (``/v1/models/stats``)."""
    downloads: DownloadManager = field(init=False)
    """Hugging Face download jobs (``/v1/models/download``, ``dynllm pull``)."""
    metrics: Metrics = field(init=False)
    upstreams: dict[tuple[str, ApiFamily], Upstream] = field(init=False)
    json_limit: int = field(init=False)
    upload_limit: int = field(init=False)

    def __post_init__(self) -> None:
        self.upstreams = upstream_table(self.config)
        self.json_limit = int(self.config.max_body_mb * (1 << 20))
        self.upload_limit = int(self.config.max_upload_mb * (1 << 20))
        self.metrics = Metrics(self.scheduler, self.admission)


def instance_marker(config: Config) -> str:
    """Stable per state file: backends carry it, so a restart can tell its own orphans."""
    return hashlib.sha256(str(config.db_file.resolve()).encode()).hexdigest()[:16]


def _shape(path: str) -> Shape:
    return Shape.KSERVE if path.startswith("/v2") else Shape.OPENAI


class Front:
    """The ASGI app uvicorn runs: forwarding routes straight to their dispatcher
    (the hot path skips FastAPI's middleware and router), everything else,
    lifespan included, to FastAPI."""

    def __init__(self, api: FastAPI, access: Access, cors: Cors | None = None) -> None:
        self.api = api
        self.state = api.state
        self.access = access
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            refused = self.access.check(scope)
            if refused is not None:
                await send_error(send, refused, _shape(path))
                return
            if is_preflight(scope):
                await self._preflight(scope, send)
                return
            if self.cors is not None:
                send = self.cors.wrap(scope, send)
            route = routes.BY_PATH.get(path)  # the OpenAI routes: one dict lookup
            if route is not None:
                await dispatch(self.state.services, route, None, scope, receive, send)
                return
            kserve_path = routes.parse_kserve(path)
            if kserve_path is not None:
                if kserve_path.suffix == routes.READY_SUFFIX:
                    await kserve.model_ready(
                        self.state.services, kserve_path, scope["method"], send
                    )
                    return
                kroute = routes.KSERVE_INFER if kserve_path.suffix else routes.KSERVE_METADATA
                await dispatch(self.state.services, kroute, kserve_path, scope, receive, send)
                return
        await self.api(scope, receive, send)

    async def _preflight(self, scope: Scope, send: Send) -> None:
        headers = self.cors.preflight_headers(scope) if self.cors is not None else None
        if headers is None:
            refused = Forbidden(
                "Cross-origin requests from this origin are not allowed; "
                "list it in cors_origins if they are meant to be"
            )
            await send_error(send, refused, _shape(scope["path"]))
            return
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


PRELOAD_STOP_POLL_SECONDS = 0.2
STREAMS_STOP_POLL_SECONDS = 0.2


async def _preload(services: Services, stopping: Callable[[], bool]) -> None:
    """Load ``preload_models`` before traffic is accepted, giving up at once
    when the server is asked to stop meanwhile (a SIGTERM during a long load:
    the server only acts on it after startup)."""

    async def preload_all() -> None:
        for name in services.config.preload_models:
            spec = services.registry.get(name)
            log.info("preloading '%s'", spec.name)
            try:
                (await services.scheduler.acquire(spec, Reason.PRELOAD)).release()
            except DynllmError as exc:
                log.error("preloading '%s' failed: %s", spec.name, exc.message)

    task = asyncio.create_task(preload_all(), name="preload")
    while not task.done():
        await asyncio.wait({task}, timeout=PRELOAD_STOP_POLL_SECONDS)
        if not task.done() and stopping():
            log.warning("asked to stop during preloading; giving up on it")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
    task.result()


async def _end_streams_when_stopping(services: Services, stopping: Callable[[], bool]) -> None:
    """Close the event and log streams once the server is asked to stop.

    uvicorn stops accepting, then waits (up to its graceful timeout) for open
    responses to end, and only then runs the lifespan's shutdown: streams
    that never end would hold it up to the timeout and then be cancelled."""
    # A poll: uvicorn tells its app of no "asked to stop" but its should_exit flag.
    while not stopping():  # noqa: ASYNC110
        await asyncio.sleep(STREAMS_STOP_POLL_SECONDS)
    services.events.close()
    services.lines.close()


def create_app(
    config: Config,
    stopping: Callable[[], bool] = lambda: False,
    *,
    config_path: Path | None = None,
    adjust: Callable[[Config], Config] = lambda new: new,
    reload_on_sighup: bool = False,
) -> Front:
    """``stopping`` tells whether the server was asked to stop (checked while
    preloading, before the server itself looks).  ``config_path``: the file
    a reload re-reads (``adjust`` adds the command line's overrides), and
    with ``reload_on_sighup`` SIGHUP reloads it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        marker = instance_marker(config)
        if not is_loopback(config.server.host) and not config.admin_api_keys:
            log.warning(
                "listening on %s, beyond this machine, %s; admin routes answer only "
                "local clients until admin_api_keys is set",
                config.server.host,
                "with API keys"
                if config.api_keys
                else "WITHOUT API KEYS: anyone who can reach it may use every model (set api_keys)",
            )
        for model in config.models:
            if (problem := missing_binary(config, model)) is not None:
                log.warning("%s", problem)
        for model in config.missing_model_files():
            log.warning(
                "model file for '%s' does not exist: %s", model.name, config.model_path(model)
            )
        catalog = build_catalog(config, await scan_folders(config))
        for problem in catalog.problems:
            log.warning("model discovery: %s", problem)
        if catalog.dirs:
            log.info(
                "discovered %d model(s) in %s",
                len(catalog.discovered),
                ", ".join(str(d) for d in catalog.dirs),
            )
        served = catalog.config  # the YAML's models and the discovered ones
        store = Store(config.db_file, marker)
        await store.open()
        orphans = await store.reconcile(
            [m.name for m in served.models], config.stop_timeout_seconds
        )
        if orphans:
            log.warning("stopped %d process(es) left by a previous run", len(orphans))
        client = make_client(config)
        probe_client = httpx.AsyncClient(trust_env=False)
        lines = LineHub()
        effects = ProcessEffects(served, marker, probe_client, on_line=lines.publish)
        events = EventHub()
        events.subscribe(store.on_event)  # the durable shadow first
        events.subscribe(log_event)
        scheduler = Scheduler(served, effects, events.publish, usage=store.record_usage)
        rows = await store.rows()
        scheduler.restore(rows)
        services = Services(
            served,
            Registry(served),
            scheduler,
            store,
            effects,
            client,
            catalog,
            events=events,
            lines=lines,
        )
        services.stats.restore(rows)
        events.subscribe(services.metrics.on_event)
        services.request_sinks.append(services.metrics.observe_request)
        app.state.services = services
        services.reloader = Reloader(front, config_path, adjust)

        def downloaded(folder: Path) -> None:
            # Served at once: scan the folders now rather than at the next interval.
            log.info("download finished in %s; scanning the model folders", folder)
            services.reloader.rescan_soon("after-download")

        services.downloads = DownloadManager(config, store, on_finished=downloaded)
        await services.downloads.start()
        if config_path is not None and reload_on_sighup:
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, _reload_on_signal, services.reloader
            )
        streams_closer = asyncio.create_task(
            _end_streams_when_stopping(services, stopping), name="end-streams"
        )

        async def every_check_interval() -> None:
            services.stats.flush(store.record)
            await scheduler.unload_idle()

        jobs = AsyncIOScheduler()
        jobs.add_job(
            every_check_interval,
            "interval",
            seconds=config.idle_check_interval_seconds,
            max_instances=1,
            coalesce=True,
            id="idle-unload",
        )

        def schedule_rescans(new: Config) -> None:
            """The periodic rescan as ``new`` wants it (also after a reload)."""
            if jobs.get_job("rescan") is not None:
                jobs.remove_job("rescan")
            if model_dirs(new) and new.rescan_interval_seconds > 0:
                jobs.add_job(
                    services.reloader.rescan,
                    "interval",
                    seconds=new.rescan_interval_seconds,
                    max_instances=1,
                    coalesce=True,
                    id="rescan",
                )

        schedule_rescans(config)
        services.reloader.on_config = schedule_rescans
        jobs.start()
        try:
            await _preload(app.state.services, stopping)
            yield
        finally:
            if config_path is not None and reload_on_sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            streams_closer.cancel()
            events.close()
            lines.close()
            jobs.shutdown(wait=False)
            await services.downloads.close()
            await services.reloader.close()
            await scheduler.shutdown()
            services.stats.flush(store.record)
            await client.close()
            await probe_client.aclose()
            await app.state.services.json_worker.close()
            await store.close()

    app = FastAPI(
        title="dynllm",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    install_error_handlers(app)
    modelcache.install(app)  # these two before openai's /v1/models/{model}
    downloads.install(app)
    openai.install(app)
    kserve.install(app)
    admin.install(app)
    ui.install(app)
    front = Front(app, Access(config), Cors.from_config(config.cors_origins))
    return front


def _reload_on_signal(reloader: Reloader) -> None:
    log.info("SIGHUP: reloading the config")
    with contextlib.suppress(DynllmError):  # refused: logged, the running config stays
        reloader.reload()


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped (as ``DynllmError.render`` writes it): a
    message that quotes client input (a path with a lone surrogate) can always
    be encoded."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def install_error_handlers(app: FastAPI) -> None:
    async def dynllm_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DynllmError)
        shape = Shape.KSERVE if request.url.path.startswith("/v2") else Shape.OPENAI
        status, headers, payload = exc.render(shape)  # the same rendering as the model routes
        return Response(payload, status, headers, media_type="application/json")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else str(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"Unknown route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            code = "method_not_allowed"
            allow = (getattr(exc, "headers", None) or {}).get("Allow", "")
            message = f"Method {request.method} not allowed on {request.url.path}; use {allow}"
        kserve = request.url.path.startswith("/v2")
        return AsciiJSONResponse(
            {"error": message} if kserve else error_body(message, type_, code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return await dynllm_error(request, invalid_request(exc.errors()))

    async def client_gone(request: Request, exc: Exception) -> Response:
        # The client left mid-body (or its body went idle and was cut): nobody
        # reads this answer; without a handler Starlette logs a traceback.
        return Response(status_code=400)

    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(DynllmError, dynllm_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
