"""Fuzzing dynllm's HTTP API with schemathesis (issue 8, item 6): no 500 for any input.

dynllm runs as its own process (uvicorn on a real socket) with one model per
model type on the ``command`` backend, each the OpenAI/KServe stand-in
(tests/support/fake_openai_server.py, starts in tens of milliseconds), plus
one model whose command exits at once, so dynllm's deliberate 502
(``backend_exited``) and 503 (``load_cooldown``) answers are reached too.

The schema fuzzed is the one dynllm serves at ``/openapi.json`` (``/health``,
the admin routes, the KServe server routes), plus the forwarding routes,
which dynllm serves in front of FastAPI and so are not in that schema: they
are added here from ``api.routes.ROUTES`` (so a new row is fuzzed without
touching this file) and the listing routes ``/v1/models[/{model}]``.  Every
``model``/``name`` in the schema is one of the configured names, so positive
cases load models and reach a backend instead of stopping at 404, and
negative cases send any other name.

Each response is checked: never a 500; a 5xx only as one of dynllm's own
502/503/504 error classes; every 4xx/5xx body in its route's documented error
shape (OpenAI ``{"error": {"message", "type", "code"}}``, KServe
``{"error": "..."}`` on ``/v2``); and dynllm's log holds no traceback.

Deterministic for CI: hypothesis is derandomized, with no example database,
and a bounded number of examples per operation.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.core.result import Ok

from dynllm import errors
from dynllm.api.routes import ROUTES, Body, ModelAt
from dynllm.app import instance_marker
from dynllm.config import ModelType
from tests.conftest import ConfigFactory, backends_with_marker, poll, subprocess_env
from tests.support.net import http_ok

FAKE = Path(__file__).parent / "support" / "fake_openai_server.py"
EXAMPLES_PER_OPERATION = 12
"""Per operation and generation mode: ~30 operations x 2 modes stay well
under a minute on two cores, and every route still sees odd inputs."""

MODELS = {kind.value: kind for kind in ModelType} | {"broken": ModelType.LLM}
FIVE_XX: list[type[errors.DynllmError]] = [errors.BackendError, errors.Unavailable]
FIVE_XX += [sub for base in FIVE_XX for sub in base.__subclasses__()] + [errors.LoadTimeout]
FIVE_XX += [errors.HubUnavailable, errors.InsufficientStorage]  # the download routes
DYNLLM_5XX_CODES = {cls.code for cls in FIVE_XX}
"""The codes of dynllm's deliberate 502/503/504 answers (errors.py)."""


def _model(name: str, kind: ModelType) -> dict[str, Any]:
    if name == "broken":  # fails fast: dynllm's 502, then its 503 cooldown
        argv = [sys.executable, "-c", "import sys; sys.exit(3)"]
    else:
        argv = [sys.executable, str(FAKE), "--host", "{host}", "--port", "{port}"]
        argv += ["--name", "{name}"]
    return {
        "name": name,
        "backend": "command",
        "model_type": kind.value,
        "vram_mb": 100,
        "path": "",  # the stand-in reads no model file
        "command": argv,
    }


@dataclass
class Dynllm:
    base_url: str
    log: Path
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)


@pytest.fixture(scope="module")
def dynllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dynllm]:
    """dynllm as its own process; stopped after the module, its backends with it."""
    tmp = tmp_path_factory.mktemp("fuzz-api")
    path, config = ConfigFactory(tmp, tmp).write_and_load(
        [_model(name, kind) for name, kind in MODELS.items()],
        enabled_backends=["command"],
        total_vram_mb=len(MODELS) * 100,
    )
    log = tmp / "dynllm.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dynllm", "--config", str(path)],
            env=subprocess_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{config.server.port}"
    try:
        with httpx.Client(base_url=base_url, trust_env=False) as http:
            poll(lambda: proc.poll() is not None or http_ok(http), timeout=30)
        assert proc.poll() is None, log.read_text()
        yield Dynllm(base_url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    marker = instance_marker(config)
    poll(lambda: not backends_with_marker({marker}), timeout=5)


# ---- the schema -----------------------------------------------------------

OPENAI_ERROR = {"$ref": "#/components/schemas/DynllmError"}
CHAT_MESSAGES = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
        "required": ["role", "content"],
    },
}


def _json_request(schema: dict[str, Any], media_type: str = "application/json") -> dict[str, Any]:
    return {"required": True, "content": {media_type: {"schema": schema}}}


def _operation(summary: str, body: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "The backend's answer"},
            "default": {
                "description": "An error",
                "content": {"application/json": {"schema": OPENAI_ERROR}},
            },
        },
        **extra,
    }
    if body is not None:
        operation["requestBody"] = body
    return operation


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def forwarding_paths() -> dict[str, dict[str, Any]]:
    """The forwarding routes (``api.routes.ROUTES``) and ``/v1/models`` as OpenAPI paths."""
    json_body = _json_request(
        {
            "type": "object",
            "required": ["model"],
            "properties": {
                "model": {"type": "string"},
                "messages": CHAT_MESSAGES,
                "prompt": {"type": "string"},
                "input": {"type": "string"},
                "query": {"type": "string"},
                "documents": {"type": "array", "items": {"type": "string"}},
                "stream": {"type": "boolean"},
            },
        }
    )
    form_body = _json_request(
        {
            "type": "object",
            "required": ["model", "file"],
            "properties": {
                "model": {"type": "string"},
                "file": {"type": "string", "format": "binary"},
            },
        },
        "multipart/form-data",
    )
    infer_body = _json_request(
        {
            "type": "object",
            "properties": {
                "inputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "datatype": {"type": "string"},
                            "shape": {"type": "array", "items": {"type": "integer"}},
                            "data": {"type": "array", "items": {"type": "number"}},
                        },
                    },
                }
            },
        }
    )
    paths: dict[str, dict[str, Any]] = {
        "/v1/models": {"get": _operation("List the models")},
        "/v1/models/{model}": {
            "get": _operation("One model", parameters=[_path_param("model")]),
        },
    }
    for route in ROUTES:
        if route.model_at is ModelAt.PATH:
            continue
        body = form_body if route.body is Body.MULTIPART else json_body
        for method in route.methods:
            paths.setdefault(route.path, {})[method.lower()] = _operation(route.family.value, body)
    kserve = {"/v2/models/{name}": "", "/v2/models/{name}/versions/{version}": ""}
    for base in kserve:
        params = [_path_param("name")] + ([_path_param("version")] if "version" in base else [])
        paths[base] = {"get": _operation("KServe model metadata", parameters=params)}
        paths[base + "/ready"] = {"get": _operation("KServe model ready", parameters=params)}
        paths[base + "/infer"] = {
            "post": _operation("KServe inference", infer_body, parameters=params)
        }
    return paths


def _with_model_names(node: Any) -> Any:
    """Every ``model``/``name`` property or parameter is a configured name:
    positive cases reach models and backends; negative ones name anything else."""
    if isinstance(node, list):
        return [_with_model_names(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _with_model_names(value) for key, value in node.items()}
    names = {"type": "string", "enum": sorted(MODELS)}
    if node.get("in") == "path" and node.get("name") in ("model", "name"):
        node["schema"] = names
    properties = node.get("properties")
    if isinstance(properties, dict) and properties.get("model", {}).get("type") == "string":
        properties["model"] = names
    return node


def fuzzed_schema(base_url: str) -> dict[str, Any]:
    """dynllm's own ``/openapi.json`` plus the forwarding routes."""
    raw: dict[str, Any] = httpx.get(base_url + "/openapi.json", trust_env=False).json()
    served = set(raw["paths"])
    raw["paths"].update(forwarding_paths())
    raw.setdefault("components", {}).setdefault("schemas", {})["DynllmError"] = {
        "type": "object",
        "required": ["error"],
    }
    assert served.isdisjoint(forwarding_paths()), "a forwarding route is in the schema now"
    # Event streams never end, so a fuzzer reading whole bodies would wait
    # forever (tests/test_events.py covers them): no /admin/events, no follow.
    del raw["paths"]["/admin/events"]
    logs = raw["paths"]["/admin/models/{model}/logs"]["get"]
    logs["parameters"] = [p for p in logs["parameters"] if p["name"] != "follow"]
    return dict(_with_model_names(raw))


# ---- the checks -----------------------------------------------------------


def check_response(path: str, status: int, headers: dict[str, str], content: bytes) -> None:
    """No 500; a 5xx only as dynllm's own error; error bodies in the route's shape."""
    assert status != 500, f"500 from dynllm: {content[:500]!r}"
    if status < 400:
        return
    assert headers.get("content-type", "").startswith("application/json"), (status, headers)
    body = json.loads(content)
    if path.startswith("/v2"):
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        assert status not in range(500, 600) or status in (502, 503, 504), (status, body)
        return
    error = body["error"]
    assert set(error) == {"message", "type", "code"}, body
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and isinstance(error["code"], str), body
    if status >= 500:
        assert error["code"] in DYNLLM_5XX_CODES, (status, body)


def fuzz(dynllm: Dynllm, mode: GenerationMode) -> dict[str, str]:
    """Every operation of the schema, ``EXAMPLES_PER_OPERATION`` cases each;
    the failures found, by operation."""
    schema = schemathesis.openapi.from_dict(fuzzed_schema(dynllm.base_url))
    failures: dict[str, str] = {}
    http = requests.Session()
    http.trust_env = False  # a proxy in the environment must not see loopback requests
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert len(operations) >= 25, [op.label for op in operations]
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def one(case: Case[Any]) -> None:
            response = case.call(base_url=dynllm.base_url, session=http, timeout=30)
            dynllm.statuses[response.status_code] += 1
            headers = {k: ", ".join(v) for k, v in response.headers.items()}
            try:
                check_response(case.formatted_path, response.status_code, headers, response.content)
            except AssertionError as exc:
                raise AssertionError(f"{case.method} {case.formatted_path}: {exc}") from None

        try:
            one()
        except Unsatisfiable:
            # Negative mode only: an operation with no parameter and no body
            # (GET /health) cannot be sent "against" its schema.
            assert mode is GenerationMode.NEGATIVE, operation.label
        except AssertionError as exc:
            failures[operation.label] = str(exc)
    http.close()
    return failures


def _no_traceback(dynllm: Dynllm) -> None:
    log = dynllm.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def test_schema_covers_admin_and_forwarding_routes(dynllm: Dynllm) -> None:
    """What is fuzzed: every admin route with its JSON body, every forwarding row."""
    raw = fuzzed_schema(dynllm.base_url)
    for path in ("/admin/models/load", "/admin/models/unload", "/admin/models/unload-all"):
        assert "application/json" in raw["paths"][path]["post"]["requestBody"]["content"], path
    for path in ("/health", "/admin/models", "/admin/models/{model}/logs", "/v2"):
        assert "get" in raw["paths"][path], path
    for route in ROUTES:
        assert route.path in raw["paths"], route.path
    print(f"operations fuzzed: {sum(len(v) for v in raw['paths'].values())}")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_500_for_any_input(dynllm: Dynllm, mode: GenerationMode) -> None:
    started = time.monotonic()
    dynllm.statuses.clear()
    failures = fuzz(dynllm, mode)
    took = time.monotonic() - started
    total = sum(dynllm.statuses.values())
    print(f"{mode.value}: {total} requests in {took:.1f} s, statuses {dict(dynllm.statuses)}")
    assert not failures, "\n\n".join(f"{op}:\n{text}" for op, text in failures.items())
    assert total >= EXAMPLES_PER_OPERATION * 10  # the fuzzing really ran
    if mode is GenerationMode.POSITIVE:
        # Positive cases name configured models: backends were reached and
        # dynllm's deliberate 5xx (the broken model) was seen, not only 4xx.
        assert dynllm.statuses[200] > 0 and any(s in dynllm.statuses for s in (502, 503))
    _no_traceback(dynllm)
