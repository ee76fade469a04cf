"""Large JSON bodies parsed off the event loop (src/dynllm/api/jsonwork.py):
the helper process answers as the inline parser would, ``/health`` stays fast
while a 60 MB body is parsed, a helper that dies gives a clear 503 and is
replaced, and concurrent bodies share one helper."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from starlette.types import Message

from dynllm.api import bodies, routes
from dynllm.api.dispatch import read_request
from dynllm.api.jsonwork import JsonWorker
from dynllm.backends.base import rewrite_json_model
from dynllm.errors import DynllmError
from dynllm.registry import ApiFamily
from tests.conftest import ConfigFactory, apoll, poll, serve
from tests.test_dispatch import fake_model
from tests.test_server import JSON_TYPE

POLLER = Path(__file__).parent / "support" / "health_poller.py"
MB = 1 << 20
CHAT = "/v1/chat/completions"


def chat_of(size: int) -> bytes:
    """A valid chat body of about ``size`` bytes (one long message)."""
    text = "hello world " * (size // 12)
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()


def empties_of(size: int, valid: bool = True) -> bytes:
    """A body of about ``size`` bytes that is mostly an array of ``{}``: the
    slowest JSON to parse per byte (50 MB: ~1.5 s and ~1.3 GB)."""
    array = b",".join([b"{}"] * (size // 3))
    return b'{"model": "m", "x": [' + array + (b"]}" if valid else b",]}")


ODD_BODIES = [
    b"not json",
    b"[" * 100_000,
    b'{"model": "m", "x": ' + b"1" * 5000 + b"}",
    b'["model"]',
    b'{"model": "m"} trailing',
    b'{"model": "\xff"}',
    b'{"model": 5}',
    b'{"model": ""}',
    b"{}",
    b'{"model": "\\ud800"}',
    b'{"model": "m", "nested": {"model": "x"}}',
]


def inline_answer(body: bytes) -> str:
    """What the inline path answers: the model, or the error's message."""
    try:
        return bodies.requested_model(bodies.parse_json_object(body))
    except DynllmError as exc:
        return f"{type(exc).__name__}: {exc.message}"


async def worker_answer(worker: JsonWorker, body: bytes) -> str:
    try:
        return bodies.model_name((await worker.model_and_settings([body[:3], body[3:]]))[0])
    except DynllmError as exc:
        return f"{type(exc).__name__}: {exc.message}"


async def test_the_helper_answers_exactly_as_the_inline_parser() -> None:
    worker = JsonWorker()
    try:
        for body in ODD_BODIES:
            assert await worker_answer(worker, body) == inline_answer(body), body[:40]
        cases: list[tuple[bytes, str | None, dict[str, Any] | None]] = [
            (b'{"model": "alias", "a": [1, 2]}', "served", None),
            (b'{"model": "served", "a": 1}', "served", None),  # unchanged: same bytes back
            (b'{"model": "m"}', None, {"stream": False}),
            (b'{"model": "m", "stream": true}', None, {"stream": False}),
            (b'{"model": "m", "t": "\\ud800 \xc3\xa9"}', "/models/m@abc", {"stream": False}),
        ]
        for body, served, defaults in cases:
            expected = rewrite_json_model(body, json.loads(body), served, defaults)
            pieces = [body[:7], body[7:]]
            assert await worker.rewrite(pieces, served, defaults) == (
                None if expected is body else expected
            )
        first = worker.pid
        assert first is not None
    finally:
        await worker.close()
    assert not psutil.pid_exists(first)
    with pytest.raises(DynllmError, match="shutting down"):
        await worker.model_and_settings([b"{}"])


async def test_a_large_body_is_rewritten_for_the_backend_off_the_loop(
    make_config: ConfigFactory,
) -> None:
    """A 2 MB /v1/responses body for a transformers model (which wants its
    model path and ``"stream": false``) comes out of ``read_request`` already
    rewritten by the helper; ``to_backend`` passes it as is."""
    config = make_config(
        [{"name": "t", "backend": "transformers", "aliases": ["nick"]}],
        enabled_backends=["llamacpp", "transformers"],
    )
    async with serve(config) as app:
        services = app.services
        body = json.dumps({"model": "nick", "input": "x" * (2 * MB)}).encode()
        assert len(body) > bodies.INLINE_JSON_BYTES
        pieces = [body[i : i + 256 * 1024] for i in range(0, len(body), 256 * 1024)]

        async def receive() -> Message:
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

        scope = {"headers": [(b"content-type", b"application/json")], "method": "POST"}
        route = routes.BY_PATH["/v1/responses"]
        incoming = await read_request(services, route, None, scope, receive)
        assert incoming.label == "nick" and incoming.data is None
        upstream = services.upstreams["t", ApiFamily.RESPONSES]
        sent = incoming.to_backend(upstream)
        assert isinstance(sent, bodies.Spool)  # in pieces: no 60 MB write on the loop
        assert json.loads(b"".join([piece async for piece in sent.stream()])) == {
            "model": upstream.served_name,
            "input": "x" * (2 * MB),
            "stream": False,
        }
        assert services.json_worker.pid is not None  # it did go through the helper


def helper_pids() -> list[int]:
    """This test's own JSON helper processes (children of this process)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "dynllm.api.jsonwork" in child.cmdline():
                found.append(child.pid)
        except psutil.Error:  # exited meanwhile
            continue
    return found


class HealthPoller:
    """tests/support/health_poller.py in its own process (so the measure is
    the server's, not this process's GIL while it uploads 60 MB)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []
        self.failures = 0

    def __enter__(self) -> HealthPoller:
        self.proc = subprocess.Popen(
            [sys.executable, str(POLLER), "127.0.0.1", str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self.proc.communicate(timeout=30)  # closes its stdin: it stops and reports
        result = json.loads(out)
        self.latencies, self.failures = result["latencies"], result["failures"]

    def figures(self) -> tuple[float, float, float]:
        """p50, p99 and max in ms."""
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return statistics.median(ordered) * 1e3, p99 * 1e3, ordered[-1] * 1e3


@pytest.fixture
def running_dynllm(make_config: ConfigFactory, dynllm_process: Any) -> Iterator[httpx.Client]:
    """``python -m dynllm`` (its own process, so the client here does not share
    its event loop) with the stand-in backend, already loaded."""
    path, config = make_config.write_and_load(
        [fake_model("m")], enabled_backends=["llamacpp", "command"]
    )
    proc = dynllm_process(path)
    base_url = f"http://127.0.0.1:{config.server.port}"
    with httpx.Client(base_url=base_url, timeout=120, trust_env=False) as client:

        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                return client.get("/health").status_code == 200
            except httpx.HTTPError:
                return False

        poll(up, timeout=30)
        warm = client.post(CHAT, json={"model": "m", "messages": []})
        assert warm.status_code == 200, warm.text
        yield client


@pytest.mark.parametrize(
    ("what", "body", "status"),
    [
        ("60 MB chat body", chat_of(60 * MB), 200),
        ("50 MB array of {}", empties_of(50 * MB), 200),
        ("50 MB array of {}, invalid at its end", empties_of(50 * MB, valid=False), 400),
    ],
    ids=["chat-60MB", "empties-50MB", "empties-50MB-invalid"],
)
def test_health_stays_fast_while_a_large_body_is_parsed(
    running_dynllm: httpx.Client, what: str, body: bytes, status: int
) -> None:
    client = running_dynllm
    with HealthPoller(client.base_url.port or 0) as poller:
        start = time.perf_counter()
        response = client.post(CHAT, content=body, headers=JSON_TYPE)
        took = time.perf_counter() - start
    p50, p99, worst = poller.figures()
    print(
        f"\n{what}: answered {response.status_code} in {took:.2f} s; /health during it: "
        f"{len(poller.latencies)} polls, p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms"
    )
    assert response.status_code == status, response.text[:200]
    assert poller.failures == 0
    assert p99 < 50
    if status == 400:
        error = response.json()["error"]
        assert error["code"] == "invalid_json"
        assert error["message"].startswith("The request body is not valid JSON: Expecting value")
        return
    port = client.get("/admin/models").json()["models"][0]["port"]
    stats = httpx.get(f"http://127.0.0.1:{port}/fake/stats", trust_env=False).json()
    assert stats["seen"][-1]["sha256"] == hashlib.sha256(body).hexdigest()  # forwarded intact


async def test_a_helper_that_dies_gives_a_clear_503_and_is_replaced(
    make_config: ConfigFactory,
) -> None:
    """The helper killed (as the OOM killer would) while it parses a body: that
    request gets a 503 saying so, and the next large body gets a new helper."""
    config = make_config([fake_model("m")], enabled_backends=["llamacpp", "command"])
    async with (
        serve(config) as app,
        httpx.AsyncClient(base_url=app.base_url, timeout=60, trust_env=False) as client,
    ):
        worker = app.services.json_worker
        body = empties_of(30 * MB)
        first = asyncio.create_task(client.post(CHAT, content=body, headers=JSON_TYPE))
        # Kill it once it holds the whole body (it is parsing, ~1 s for 30 MB).
        pid = await apoll(lambda: worker.pid, timeout=30)
        await apoll(lambda: psutil.Process(pid).io_counters().read_chars >= len(body), 30)
        os.kill(pid, signal.SIGKILL)
        response = await first
        print(f"\nhelper killed mid-parse: {response.status_code} {response.text}")
        assert response.status_code == 503
        assert response.json()["error"]["message"] == (
            "dynllm's JSON parser stopped while reading this request body "
            "(out of memory?); try again, or send a smaller body"
        )
        assert not psutil.pid_exists(pid)  # reaped, not a zombie
        again = await client.post(CHAT, content=chat_of(2 * MB), headers=JSON_TYPE)
        assert again.status_code == 200, again.text
        assert worker.pid not in (None, pid)
        replacement = worker.pid
    assert replacement is not None and not psutil.pid_exists(replacement)  # stopped with dynllm


async def test_concurrent_large_bodies_share_one_helper(make_config: ConfigFactory) -> None:
    """Four 20 MB bodies at once are parsed one after another by a single
    helper (the parse memory is one body's, not four); each gets its answer."""
    config = make_config([fake_model("m")], enabled_backends=["llamacpp", "command"])
    async with (
        serve(config) as app,
        httpx.AsyncClient(base_url=app.base_url, timeout=120, trust_env=False) as client,
    ):
        helpers: set[int] = set()
        most = 0
        bodies_ = [empties_of(20 * MB, valid=i % 2 == 0) for i in range(4)]
        sent = [
            asyncio.create_task(client.post(CHAT, content=b, headers=JSON_TYPE)) for b in bodies_
        ]
        while not all(task.done() for task in sent):
            running = helper_pids()
            most = max(most, len(running))
            helpers.update(running)
            await asyncio.wait(sent, timeout=0.02)
        statuses = [task.result().status_code for task in sent]
    print(f"\n4 concurrent 20 MB bodies: {statuses}, helper processes at once: at most {most}")
    assert statuses == [200, 400, 200, 400]
    assert most == 1 and len(helpers) == 1
