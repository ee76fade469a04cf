"""API keys, admin keys and admin routes kept to loopback, route by route."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dynllm.api.access import Access, RouteClass, classify, presented_key
from dynllm.api.routes import ROUTES, Body
from dynllm.app import create_app
from dynllm.cli import EnvSettings, effective_config, parse_args
from dynllm.config import parse_config
from tests.conftest import ConfigFactory, serve

API, ADMIN = "inference-key-123", "admin-key-456"

# Every route dynllm serves and its class.  A route added to the app or to the
# forwarding table without an entry here fails test_every_route_is_classified.
EXPECTED: dict[str, RouteClass] = {
    "/health": RouteClass.PUBLIC,
    "/v2/health/live": RouteClass.PUBLIC,
    "/v2/health/ready": RouteClass.PUBLIC,
    "/": RouteClass.PUBLIC,
    "/ui": RouteClass.PUBLIC,
    "/ui/{name}": RouteClass.PUBLIC,
    "/openapi.json": RouteClass.INFERENCE,
    "/docs": RouteClass.INFERENCE,
    "/docs/oauth2-redirect": RouteClass.INFERENCE,
    "/v1/models": RouteClass.INFERENCE,
    "/v1/models/{model:path}": RouteClass.INFERENCE,
    "/v2": RouteClass.INFERENCE,
    "/v2/models/{name}/ready": RouteClass.INFERENCE,
    "/admin/models": RouteClass.ADMIN,
    "/admin/models/{model:path}/logs": RouteClass.ADMIN,
    "/admin/models/load": RouteClass.ADMIN,
    "/admin/models/unload": RouteClass.ADMIN,
    "/admin/models/unload-all": RouteClass.ADMIN,
    "/admin/reload": RouteClass.ADMIN,
    "/admin/events": RouteClass.ADMIN,
    "/metrics": RouteClass.ADMIN,
    "/admin/models/rescan": RouteClass.ADMIN,
    # XandRouting's management routes
    "/v1/models/inventory": RouteClass.ADMIN,
    "/v1/models/loaded": RouteClass.ADMIN,
    "/v1/models/stats": RouteClass.ADMIN,
    "/v1/models/unload": RouteClass.ADMIN,
    "/v1/models/unload-all": RouteClass.ADMIN,
    "/v1/models/download": RouteClass.ADMIN,
    "/v1/models/download/{job_id}": RouteClass.ADMIN,
    "/v1/models/verify-repo": RouteClass.ADMIN,
    **{r.path: RouteClass.INFERENCE for r in ROUTES},
}


def _walk(routes: list[Any]) -> Iterator[tuple[str, str]]:
    for route in routes:
        if getattr(route, "methods", None):
            for method in sorted(set(route.methods) - {"HEAD"}):
                yield route.path, method
            continue
        inner = getattr(route, "routes", None) or getattr(route, "router", None)
        if inner is None:
            inner = route.original_router
        yield from _walk(inner if isinstance(inner, list) else inner.routes)


def registered_routes() -> list[tuple[str, str]]:
    """(path template, method) of everything the app answers."""
    front = create_app(parse_config({}))
    routes = list(_walk(front.api.router.routes))
    routes += [(r.path, sorted(r.methods)[0]) for r in ROUTES]
    routes.append(("/v2/models/{name}/ready", "GET"))  # answered in the front
    return routes


def test_every_route_is_classified() -> None:
    routes = registered_routes()
    assert {p for p, _ in routes} == set(EXPECTED)  # none missing here, none stale
    for path, _ in routes:
        assert path in EXPECTED, f"{path} has no access class in this test"
        concrete = path.replace("{model:path}", "m").replace("{model}", "m").replace("{name}", "m")
        assert classify(concrete) is EXPECTED[path], path


def _request(path: str, method: str) -> dict[str, Any]:
    concrete = path.replace("{model:path}", "m").replace("{model}", "m").replace("{name}", "m")
    route = next((r for r in ROUTES if r.path == path), None)
    if route is not None and route.body is Body.MULTIPART:
        return {"method": method, "url": concrete, "data": {"model": "m"},
                "files": {"file": ("a.wav", b"RIFF", "audio/wav")}}  # fmt: skip
    if method == "POST":
        return {"method": method, "url": concrete, "json": {"model": "nope"}}
    return {"method": method, "url": concrete}


async def test_every_route_with_no_key_a_bad_key_an_inference_key_and_an_admin_key(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = make_config([{"name": "m"}], api_keys=[API], admin_api_keys=[ADMIN])
    async with serve(config) as app:
        for path, method in registered_routes():
            kind = EXPECTED[path]
            request = _request(path, method)
            results = {}
            for who, headers in (
                ("none", {}),
                ("bad", {"Authorization": "Bearer wrong"}),
                ("api", {"Authorization": f"Bearer {API}"}),
                ("admin", {"x-api-key": ADMIN}),
            ):
                async with app.client.stream(**request, headers=headers) as response:
                    results[who] = response.status_code
                    # An event stream never ends: its status is the answer.
                    if not response.headers.get("content-type", "").startswith("text/event-stream"):
                        await response.aread()
                        assert API not in response.text and ADMIN not in response.text
                if response.status_code == 401:
                    assert response.headers["www-authenticate"] == 'Bearer realm="dynllm"'
            where = f"{method} {path}: {results}"
            if kind is RouteClass.PUBLIC:
                assert 401 not in results.values() and 403 not in results.values(), where
            elif kind is RouteClass.INFERENCE:
                assert results["none"] == results["bad"] == 401, where
                assert results["api"] not in (401, 403) and results["admin"] not in (401, 403), (
                    where
                )
            else:
                assert results["none"] == results["bad"] == 401, where
                assert results["api"] == 403, where
                assert results["admin"] not in (401, 403), where
    assert API not in caplog.text and ADMIN not in caplog.text  # never logged


def _scope(path: str, client: str = "127.0.0.1", **headers: str) -> dict[str, Any]:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": "GET", "path": path, "headers": raw, "client": (client, 5555)}


def test_without_admin_keys_admin_routes_answer_only_this_machine() -> None:
    open_access = Access(parse_config({}))
    assert open_access.check(_scope("/admin/models")) is None
    assert open_access.check(_scope("/admin/models", client="::1")) is None
    refused = open_access.check(_scope("/admin/models/unload-all", client="192.0.2.7"))
    assert refused is not None and refused.status == 403
    assert "set admin_api_keys" in refused.message
    assert open_access.check(_scope("/v1/chat/completions", client="192.0.2.7")) is None
    keyed = Access(parse_config({"api_keys": [API]}))  # inference keys only
    assert keyed.check(_scope("/admin/models", authorization=f"Bearer {API}")) is None
    remote = keyed.check(_scope("/admin/models", "192.0.2.7", authorization=f"Bearer {API}"))
    assert remote is not None and remote.status == 403


def test_keys_are_read_from_bearer_or_x_api_key_only() -> None:
    assert presented_key(_scope("/", authorization="Bearer abc")) == b"abc"
    assert presented_key(_scope("/", authorization="bearer  abc ")) == b"abc"
    assert presented_key(_scope("/", x_api_key="k")) == b"k"
    assert presented_key(_scope("/", authorization="Basic abc")) is None
    assert presented_key(_scope("/", authorization="Bearer ")) is None


async def test_a_public_bind_without_keys_warns_at_startup(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config([{"name": "m"}], server={"host": "127.0.0.1"})
    exposed = config.model_copy(
        update={"server": config.server.model_copy(update={"host": "0.0.0.0"})}
    )
    app = create_app(exposed)
    async with app.api.router.lifespan_context(app.api):
        pass
    assert "listening on 0.0.0.0, beyond this machine, WITHOUT API KEYS" in caplog.text


def test_keys_from_the_environment_are_added(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNLLM_API_KEYS", " a1, a2 ,")
    monkeypatch.setenv("DYNLLM_ADMIN_API_KEYS", "z9")
    config = parse_config({"api_keys": ["c1"]})
    merged = effective_config(config, parse_args(["--host", "0.0.0.0"]), EnvSettings())
    assert merged.api_keys == ["c1", "a1", "a2"] and merged.admin_api_keys == ["z9"]
    assert merged.server.host == "0.0.0.0"


async def test_health_stays_open_with_keys(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "m"}], api_keys=[API])
    async with serve(config) as app:
        assert (await app.client.get("/health")).status_code == 200
        async with httpx.AsyncClient(base_url=app.base_url, trust_env=False) as other:
            docs = await other.get("/docs")
            assert docs.status_code == 401 and docs.json()["error"]["code"] == "invalid_api_key"
            kserve = await other.get("/v2/models/m/ready")
            assert kserve.status_code == 401 and "error" in kserve.json()


async def test_foreign_host_is_refused_while_on_loopback(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "m"}], allowed_hosts=["dynllm.lan"])
    async with serve(config) as app:
        for host, status in [("evil.example", 421), ("evil.example:8000", 421),
                             ("localhost:1234", 200), ("127.0.0.1", 200), ("[::1]:80", 200),
                             ("dynllm.lan", 200), ("app.localhost", 200)]:  # fmt: skip
            response = await app.client.get("/v1/models", headers={"Host": host})
            assert response.status_code == status, host
        refused = await app.client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": []},
            headers={"Host": "evil.example"},
        )
        assert refused.status_code == 421
        assert refused.json()["error"]["code"] == "host_not_allowed"
        assert await app.spawned_pids() == []  # nothing was loaded


def test_a_public_bind_does_not_check_host() -> None:
    access = Access(parse_config({"server": {"host": "0.0.0.0"}}))
    assert access.check(_scope("/v1/models", host="anything.example")) is None


async def test_a_cross_origin_simple_request_changes_nothing(make_config: ConfigFactory) -> None:
    """text/plain POSTs need no CORS preflight, so a web page can send them."""
    async with serve(make_config([{"name": "m"}])) as app:
        plain = {"content-type": "text/plain", "origin": "http://evil.example"}
        chat = await app.client.post(
            "/v1/chat/completions", content=b'{"model": "m", "messages": []}', headers=plain
        )
        assert chat.status_code == 415
        assert chat.json()["error"]["code"] == "unsupported_media_type"
        load = await app.client.post("/admin/models/load", content=b'{"model": "m"}', headers=plain)
        assert load.status_code == 403  # cross-origin: admin routes refuse it before anything
        same_page = {"content-type": "text/plain"}  # no Origin: e.g. a form without one
        load = await app.client.post(
            "/admin/models/load", content=b'{"model": "m"}', headers=same_page
        )
        assert load.status_code == 415
        assert await app.spawned_pids() == []
        assert "access-control-allow-origin" not in chat.headers
