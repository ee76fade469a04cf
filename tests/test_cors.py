"""CORS: off by default, listed origins only, admin routes never cross-origin."""

from __future__ import annotations

from typing import Any

import pytest

from dynllm.api.cors import Cors, is_cross_origin, is_preflight
from tests.conftest import ConfigFactory, serve

PAGE = "https://chat.example"
OTHER = "https://evil.example"
API = "inference-key-123"


def _preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    }


def _scope(method: str = "GET", **headers: str) -> dict[str, Any]:
    raw = [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": method, "path": "/v1/models", "headers": raw}


@pytest.mark.parametrize(
    ("headers", "cross"),
    [
        ({}, False),  # curl, SDKs
        ({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"}, False),  # same page
        ({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8001"}, True),
        ({"host": "localhost:8000", "origin": "null"}, True),  # sandboxed frame, file://
        ({"host": "127.0.0.1:8000", "origin": PAGE}, True),
        ({"host": "127.0.0.1:8000", "sec_fetch_site": "cross-site"}, True),
        ({"host": "127.0.0.1:8000", "sec_fetch_site": "same-site"}, True),
        ({"host": "127.0.0.1:8000", "sec_fetch_site": "same-origin"}, False),
    ],
)
def test_cross_origin_is_told_from_origin_and_fetch_metadata(
    headers: dict[str, str], cross: bool
) -> None:
    assert is_cross_origin(_scope(**headers)) is cross


def test_a_preflight_is_an_options_request_with_origin_and_a_requested_method() -> None:
    assert is_preflight(_scope("OPTIONS", origin=PAGE, access_control_request_method="POST"))
    assert not is_preflight(_scope("OPTIONS", origin=PAGE))
    assert not is_preflight(_scope("GET", origin=PAGE, access_control_request_method="POST"))


def test_origins_are_compared_without_case_or_trailing_slash() -> None:
    cors = Cors(["https://Chat.Example/"])
    assert cors.allowed(b"https://chat.example")
    assert not cors.allowed(b"https://chat.example:8443")
    assert not cors.allowed(b"http://chat.example")
    assert Cors(["*"]).allowed(b"https://anything.example")
    assert Cors.from_config([]) is None


async def test_cors_is_off_unless_origins_are_listed(make_config: ConfigFactory) -> None:
    async with serve(make_config([{"name": "m"}])) as app:
        preflight = await app.client.options("/v1/chat/completions", headers=_preflight(PAGE))
        assert preflight.status_code == 403
        assert "cors_origins" in preflight.json()["error"]["message"]
        assert "access-control-allow-origin" not in preflight.headers
        answer = await app.client.get("/v1/models", headers={"Origin": PAGE})
        assert answer.status_code == 200
        assert "access-control-allow-origin" not in answer.headers  # the page cannot read it


async def test_a_listed_origin_may_call_the_model_routes(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "m"}], cors_origins=[PAGE], api_keys=[API])
    async with serve(config) as app:
        # A browser sends no key on a preflight: it must not need one.
        preflight = await app.client.options("/v1/chat/completions", headers=_preflight(PAGE))
        assert preflight.status_code == 204, preflight.text
        assert preflight.headers["access-control-allow-origin"] == PAGE
        allowed_headers = preflight.headers["access-control-allow-headers"]
        assert "authorization" in allowed_headers and "content-type" in allowed_headers
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "access-control-allow-credentials" not in preflight.headers

        headers = {"Origin": PAGE, "Authorization": f"Bearer {API}"}
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        chat = await app.client.post("/v1/chat/completions", json=payload, headers=headers)
        assert chat.status_code == 200, chat.text
        assert chat.headers["access-control-allow-origin"] == PAGE
        assert "Origin" in chat.headers.get_list("vary")
        models = await app.client.get("/v1/models", headers=headers)  # a FastAPI route
        assert models.headers["access-control-allow-origin"] == PAGE
        # Errors are readable by the page too (it must see why it failed).
        unknown = await app.client.post(
            "/v1/chat/completions", json={**payload, "model": "nope"}, headers=headers
        )
        assert unknown.status_code == 404
        assert unknown.headers["access-control-allow-origin"] == PAGE
        # The key is still needed for the request itself.
        keyless = await app.client.get("/v1/models", headers={"Origin": PAGE})
        assert keyless.status_code == 401

        other = await app.client.options("/v1/chat/completions", headers=_preflight(OTHER))
        assert other.status_code == 403
        assert "access-control-allow-origin" not in other.headers
        other_get = await app.client.get(
            "/v1/models", headers={"Origin": OTHER, "Authorization": f"Bearer {API}"}
        )
        assert "access-control-allow-origin" not in other_get.headers


async def test_a_wildcard_allows_every_origin_without_credentials(
    make_config: ConfigFactory,
) -> None:
    async with serve(make_config([{"name": "m"}], cors_origins=["*"])) as app:
        preflight = await app.client.options("/v1/embeddings", headers=_preflight(OTHER))
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "*"
        answer = await app.client.get("/v1/models", headers={"Origin": OTHER})
        assert answer.headers["access-control-allow-origin"] == "*"


async def test_admin_routes_never_answer_cross_origin(make_config: ConfigFactory) -> None:
    async with serve(make_config([{"name": "m"}], cors_origins=["*", PAGE])) as app:
        same_origin = app.base_url
        preflight = await app.client.options("/admin/models/load", headers=_preflight(PAGE))
        assert preflight.status_code == 403
        assert "access-control-allow-origin" not in preflight.headers
        for headers in (
            {"Origin": PAGE},
            {"Origin": "null"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Origin": same_origin, "Sec-Fetch-Site": "same-site"},
        ):
            listing = await app.client.get("/admin/models", headers=headers)
            assert listing.status_code == 403, headers
            assert "cross-origin" in listing.json()["error"]["message"]
            assert "access-control-allow-origin" not in listing.headers
            load = await app.client.post("/admin/models/load", json={"model": "m"}, headers=headers)
            assert load.status_code == 403, headers
        assert (await app.admin_models())["m"]["status"] == "unloaded"  # nothing was loaded
        # The same page (a dashboard served by dynllm itself) is not cross-origin.
        own = await app.client.get(
            "/admin/models", headers={"Origin": same_origin, "Sec-Fetch-Site": "same-origin"}
        )
        assert own.status_code == 200
