"""OpenAI routes: request validation and the error vocabulary, against the fake backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ConfigFactory, serve


def error_of(response: object) -> dict[str, object]:
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code"}
    return dict(body["error"])


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (b'{"messages": []}', 400, "invalid_request"),
        (b'{"model": 5}', 400, "invalid_request"),
        (b'{"model": "ghost", "messages": []}', 404, "model_not_found"),
        (b'{"model": "emb", "messages": []}', 400, "model_type_mismatch"),
    ],
)
async def test_bad_requests_get_openai_errors_and_spawn_nothing(
    make_config: ConfigFactory, body: bytes, status: int, code: str
) -> None:
    config = make_config([{"name": "A"}, {"name": "emb", "model_type": "embedding"}])
    async with serve(config) as app:
        r = await app.client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == status
        assert error_of(r)["code"] == code
        assert await app.spawned_pids() == []


async def test_embeddings_and_rerank_routes(make_config: ConfigFactory) -> None:
    config = make_config([
        {"name": "emb", "model_type": "embedding"},
        {"name": "rr", "model_type": "rerank"},
    ])  # fmt: skip
    async with serve(config) as app:
        r = await app.client.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b"]})
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        for path in ("/v1/rerank", "/rerank"):
            r = await app.client.post(
                path, json={"model": "rr", "query": "q", "documents": ["x", "y"]}
            )
            assert r.status_code == 200, r.text
            assert {x["index"] for x in r.json()["results"]} == {0, 1}
        r = await app.client.post("/v1/completions", json={"model": "rr", "prompt": "x"})
        assert r.status_code == 400 and error_of(r)["code"] == "model_type_mismatch"


async def test_missing_model_file_is_a_clear_error(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = make_config([{"name": "A", "path": str(tmp_path / "gone.gguf")}])
    async with serve(config) as app:
        r = await app.chat("A")
        assert r.status_code == 502
        error = error_of(r)
        assert error["code"] == "model_file_missing"
        assert "gone.gguf" in str(error["message"])
        assert await app.spawned_pids() == []


async def test_unknown_route_and_method(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "A"}])
    async with serve(config) as app:
        r = await app.client.get("/v1/nothing")
        assert r.status_code == 404 and error_of(r)["code"] == "not_found"
        r = await app.client.get("/v1/chat/completions")
        assert r.status_code == 405 and error_of(r)["type"] == "invalid_request_error"


async def test_upstream_status_and_headers_pass_through(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "A"}])
    async with serve(config) as app:
        r = await app.client.post(
            "/v1/chat/completions",
            content=b'{"model": "A", "messages": [], "x": [}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400  # caught before any backend is involved
        ok = await app.chat("A", max_tokens=3)
        assert ok.status_code == 200
        assert ok.headers["x-fake-pid"] == str((await app.admin_models())["A"]["pid"])
        assert ok.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
        assert "transfer-encoding" not in ok.headers or ok.headers["transfer-encoding"] == "chunked"
        assert ok.headers["content-length"] == str(len(ok.content))


# ---- /v1/models ----------------------------------------------------------------------------


async def test_models_lists_aliases_as_entries_and_leaves_hidden_models_out(
    make_config: ConfigFactory,
) -> None:
    config = make_config([
        {"name": "A", "aliases": ["a-chat", "gpt-4o-mini"]},
        {"name": "secret", "aliases": ["s"], "hidden": True},
        {"name": "emb", "model_type": "embedding"},
    ])  # fmt: skip
    async with serve(config) as app:
        listed = (await app.client.get("/v1/models")).json()
        assert listed["object"] == "list"
        entries = {m["id"]: m for m in listed["data"]}
        assert list(entries) == ["A", "a-chat", "gpt-4o-mini", "emb"]
        assert entries["A"]["parent"] is None
        assert entries["a-chat"]["parent"] == "A" and entries["gpt-4o-mini"]["parent"] == "A"
        for entry in entries.values():
            assert entry["object"] == "model" and entry["owned_by"] == "dynllm"
        assert entries["a-chat"]["model_type"] == "llm"
        assert entries["a-chat"]["aliases"] == ["a-chat", "gpt-4o-mini"]
        # a hidden model is still served, and answers by name or alias
        for name in ("secret", "s"):
            one = await app.client.get(f"/v1/models/{name}")
            assert one.status_code == 200 and one.json()["id"] == name
        assert (await app.client.get("/v1/models/s")).json()["parent"] == "secret"
        assert (await app.chat("s")).status_code == 200
        alias = (await app.client.get("/v1/models/a-chat")).json()
        assert alias["id"] == "a-chat" and alias["parent"] == "A"
        assert (await app.client.get("/v1/models/nope")).status_code == 404


async def test_list_aliases_false_lists_only_the_models(make_config: ConfigFactory) -> None:
    config = make_config([{"name": "A", "aliases": ["a-chat"]}], list_aliases=False)
    async with serve(config) as app:
        listed = (await app.client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in listed] == ["A"]
        assert (await app.client.get("/v1/models/a-chat")).json()["parent"] == "A"
        assert (await app.chat("a-chat")).status_code == 200  # still served


async def test_openai_client_lists_an_alias_and_chats_with_it(make_config: ConfigFactory) -> None:
    import openai

    config = make_config([{"name": "llama-3.2-3b-q4", "aliases": ["gpt-4o-mini"]}])
    async with serve(config) as app:
        client = openai.AsyncOpenAI(base_url=f"{app.base_url}/v1", api_key="unused", max_retries=0)
        listed = [m async for m in client.models.list()]
        alias = next(m for m in listed if m.id == "gpt-4o-mini")
        assert alias.model_extra is not None and alias.model_extra["parent"] == "llama-3.2-3b-q4"
        answer = await client.chat.completions.create(
            model=alias.id, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        print(f"openai client via alias {alias.id!r}: {answer.choices[0].message.content!r}")
        assert answer.choices[0].message.content == "tok0 tok1 tok2"
        retrieved = await client.models.retrieve("gpt-4o-mini")
        assert retrieved.id == "gpt-4o-mini"
        await client.close()
