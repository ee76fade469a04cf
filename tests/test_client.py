"""The client commands against stand-ins (tests/support/stub_admin.py) for
what a real dynllm cannot be made to do on demand: an older dynllm without
reload or log streaming, a reload that succeeds or refuses the new config, a
log stream that goes on only when the test says so, a server that is not a
dynllm, nothing listening at all.  The same commands against a real running
dynllm are in test_cli.py.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dynllm import cli
from dynllm.client import AdminClient, NotSupported, SseEvent, Target, sse_events, url_for
from tests.support.cli_process import LineReader, cli_process
from tests.support.net import free_port
from tests.support.stub_admin import Reply, Seen, StubAdmin, event_stream, reply

SECRET = "admin-secret-4f1d"
EXIT_USAGE = 64


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No DYNLLM_* from the machine, and a working directory without a config."""
    for name in list(os.environ):
        if name.startswith("DYNLLM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    print(f"$ dynllm {' '.join(argv)}  -> exit {code}\n{out}{err}", file=sys.__stdout__)
    return code, out, err


# ---- pieces -----------------------------------------------------------------------------


def test_sse_events_follow_the_event_stream_rules() -> None:
    lines = [
        ": connected",
        "",
        "data: one",
        "",
        "event: lifecycle",
        'data: {"a":',
        "data: 1}",
        "",
        ": keepalive",
        "",
        "data:no-space",
        "",
        "data: trailing",
    ]
    assert list(sse_events(lines)) == [
        SseEvent("message", "one"),
        SseEvent("lifecycle", '{"a":\n1}'),
        SseEvent("message", "no-space"),
    ]  # the unterminated last event is not delivered (the stream was cut inside it)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("fe80::1", "http://[fe80::1]:8000"),
        ("gpu-box.lan", "http://gpu-box.lan:8000"),
    ],
)
def test_the_service_address_from_its_bind_address(host: str, url: str) -> None:
    assert url_for(host, 8000) == url


# ---- reload -----------------------------------------------------------------------------


def test_reload_on_a_dynllm_without_reload_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """A dynllm from before reload answers POST /admin/reload with FastAPI's 404."""
    with StubAdmin({}) as stub:
        code, out, err = run(capsys, "reload", "--url", stub.url)
    assert code == 1
    assert err.startswith("dynllm: this dynllm does not support reload")
    assert f"{stub.url}/admin/reload answered 404" in err
    assert out == ""


def test_reload_success_lists_what_changed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DYNLLM_ADMIN_API_KEY", SECRET)
    result = {
        "reloaded": True,
        "added": ["new"],
        "changed": ["chat"],
        "removed": [],
        "restart_needed": ["server.port"],
    }
    with StubAdmin({("POST", "/admin/reload"): reply(200, result)}) as stub:
        code, out, err = run(capsys, "reload", "--url", stub.url)
        json_code, json_out, _ = run(capsys, "reload", "--url", stub.url, "--json")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        "reloaded the config",
        "  added: new",
        "  changed (restart once idle): chat",
        "  removed (unload once idle): none",
        "  needs a restart of dynllm to apply: server.port",
    ]
    assert json_code == 0 and json.loads(json_out) == result
    sent = stub.seen[0]
    # What the admin front of dynllm insists on for a POST, and the key.
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["authorization"] == f"Bearer {SECRET}"


def test_reload_of_an_invalid_config_exits_2_with_the_services_words(
    capsys: pytest.CaptureFixture[str],
) -> None:
    error = {
        "error": {
            "message": "models[0].vram_mb: Input should be a valid integer",
            "type": "invalid_request_error",
            "code": "invalid_config",
        }
    }
    with StubAdmin({("POST", "/admin/reload"): reply(400, error)}) as stub:
        code, out, err = run(capsys, "reload", "--url", stub.url)
    assert code == 2  # the same status as any invalid config
    assert f"the service at {stub.url} refused the new config and keeps running the old one" in err
    assert "models[0].vram_mb: Input should be a valid integer" in err
    assert out == ""


# ---- errors: unreachable, refused key, not a dynllm ---------------------------------------


def test_nothing_listening_exits_1_naming_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    code, out, err = run(capsys, "status", "--url", url)
    print(f"refused in {time.monotonic() - started:.3f} s")
    assert code == 1 and out == ""
    assert err.startswith(f"dynllm: cannot reach the service at {url} (")
    assert "is it running? (the address comes from --url" in err


def test_unreachable_address_from_the_config_says_where_it_came_from(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    port = free_port()
    (tmp_path / "config.yaml").write_text(f"server: {{host: 0.0.0.0, port: {port}}}\n")
    code, _, err = run(capsys, "models")
    assert code == 1
    assert f"cannot reach the service at http://127.0.0.1:{port} (" in err
    assert "the address comes from config.yaml (server.host/port)" in err


def test_a_refused_key_exits_1_and_is_never_printed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DYNLLM_ADMIN_API_KEY", SECRET)
    unauthorized = {
        "error": {
            "message": "The API key is not valid",
            "type": "authentication_error",
            "code": "invalid_api_key",
        }
    }
    with StubAdmin({("GET", "/health"): reply(401, unauthorized)}) as stub:
        code, out, err = run(capsys, "status", "--url", stub.url)
    assert code == 1
    assert f"{stub.url} answered 401: The API key is not valid" in err
    assert "set DYNLLM_ADMIN_API_KEY" in err
    assert SECRET not in out + err


def test_a_server_that_is_not_dynllm(capsys: pytest.CaptureFixture[str]) -> None:
    page = lambda _: Reply(200, {"Content-Type": "text/html"}, b"<html>hello</html>")  # noqa: E731
    with StubAdmin({("GET", "/health"): page}) as stub:
        code, _, err = run(capsys, "status", "--url", stub.url)
    assert code == 1
    assert f"{stub.url}/health answered 200 without dynllm's JSON; is it a dynllm?" in err


# ---- logs -f ---------------------------------------------------------------------------


def test_logs_follow_prints_lines_as_the_stream_brings_them() -> None:
    """The stream per the contract: a ``: connected`` comment, the tail, then
    new lines as they come, keepalive comments in between.  The third line
    is sent only after the test saw the first two printed, so the command
    must print while the stream is still open."""
    more = threading.Event()

    def stream() -> Iterator[bytes]:
        yield b": connected\n\n"
        for line in ("llama.cpp: loading model", "server listening"):
            yield b"data: " + json.dumps({"model": "chat", "line": line}).encode() + b"\n\n"
        assert more.wait(15)
        yield b": keepalive\n\n"
        yield b"data: " + json.dumps({"model": "chat", "line": "request 1"}).encode() + b"\n\n"

    with StubAdmin({("GET", "/admin/models/chat/logs"): event_stream(stream)}) as stub:
        with cli_process(
            "logs", "chat", "-f", "--url", stub.url, env={"DYNLLM_ADMIN_API_KEY": SECRET}
        ) as proc:
            reader = LineReader(proc)
            first = [reader.line(), reader.line()]
            shown_at = time.monotonic()
            more.set()
            third = reader.line()
            latency = time.monotonic() - shown_at
            code = proc.wait(timeout=15)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
    print(f"third line printed {latency * 1000:.0f} ms after the stub was told to send it")
    assert first == ["llama.cpp: loading model", "server listening"]
    assert third == "request 1"
    assert code == 1  # the service ended the stream: not a normal end for a follower
    assert f"dynllm: {stub.url} ended the log stream" in err
    assert stub.seen[0].query == "follow=true&lines=200"
    assert stub.seen[0].headers["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in err


def test_logs_follow_on_a_dynllm_without_streams_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An older dynllm ignores ``follow=true`` and answers the JSON tail."""
    tail = reply(200, {"model": "chat", "lines": ["a"]})
    with StubAdmin({("GET", "/admin/models/chat/logs"): tail}) as stub:
        code, out, err = run(capsys, "logs", "chat", "-f", "--url", stub.url)
    assert code == 1 and out == ""
    assert "this dynllm does not stream logs" in err and "without -f" in err


def test_follow_logs_yields_each_payload() -> None:
    def stream() -> Iterator[bytes]:
        yield b": connected\r\n\r\n"  # CRLF line ends are allowed by the SSE rules
        yield b'data: {"model": "m", "line": "x"}\r\n\r\n'

    routes = {("GET", "/admin/models/a%2Fb/logs"): event_stream(stream)}
    with StubAdmin(routes) as stub, AdminClient(Target(stub.url, None, "test")) as client:
        items = list(client.follow_logs("a/b"))
    assert items == [{"model": "m", "line": "x"}]
    # A name with '/' travels as one escaped path segment.
    assert stub.seen[0].path == "/admin/models/a%2Fb/logs"
    assert "authorization" not in stub.seen[0].headers  # no key known, none sent


def test_reload_404_is_not_supported_from_the_client_too() -> None:
    with (
        StubAdmin({}) as stub,
        AdminClient(Target(stub.url, None, "test")) as client,
        pytest.raises(NotSupported),
    ):
        client.reload()


# ---- where the address and the key come from --------------------------------------------


def _seen_by(stub: StubAdmin) -> Seen:
    return stub.seen[-1]


def _health_stub() -> dict[tuple[str, str], Any]:
    return {
        ("GET", "/health"): reply(200, {"status": "ok", "version": "9.9"}),
        ("GET", "/admin/models"): reply(200, {"vram_total_mb": 0, "vram_used_mb": 0, "models": []}),
    }


def test_key_from_the_config_and_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with StubAdmin(_health_stub()) as stub:
        port = stub.url.rsplit(":", 1)[1]
        (tmp_path / "c.yaml").write_text(
            f"server: {{port: {port}}}\nadmin_api_keys: [from-config]\napi_keys: [plain]\n"
            "models: [{name: x, bogus_key: 1}]\n"  # the rest is the service's to judge
        )
        assert run(capsys, "status", "-c", "c.yaml")[0] == 0
        assert _seen_by(stub).headers["authorization"] == "Bearer from-config"

        monkeypatch.setenv("DYNLLM_ADMIN_API_KEYS", "first, second")
        assert run(capsys, "-c", "c.yaml", "status")[0] == 0  # -c before the command too
        assert _seen_by(stub).headers["authorization"] == "Bearer first"

        monkeypatch.setenv("DYNLLM_ADMIN_API_KEY", "single")
        monkeypatch.setenv("DYNLLM_CONFIG", "c.yaml")
        assert run(capsys, "status")[0] == 0
        assert _seen_by(stub).headers["authorization"] == "Bearer single"

        # No admin key anywhere: the first API key (admin routes then take any key).
        for name in ("DYNLLM_ADMIN_API_KEY", "DYNLLM_ADMIN_API_KEYS"):
            monkeypatch.delenv(name)
        (tmp_path / "c.yaml").write_text(f"server: {{port: {port}}}\napi_keys: [plain]\n")
        assert run(capsys, "models")[0] == 0
        assert _seen_by(stub).headers["authorization"] == "Bearer plain"

        # DYNLLM_URL wins over the config's address.
        (tmp_path / "c.yaml").write_text("server: {port: 1}\n")
        monkeypatch.setenv("DYNLLM_URL", stub.url)
        assert run(capsys, "models")[0] == 0


def test_a_config_whose_address_cannot_be_read_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "c.yaml").write_text("server: {port: eighty}\n")
    code, _, err = run(capsys, "status", "-c", "c.yaml")
    assert code == 2
    assert err.startswith("dynllm: invalid config c.yaml: cannot find server.host/port")
    assert "give the service's address with --url or DYNLLM_URL" in err
    code, _, err = run(capsys, "status", "-c", "missing.yaml")
    assert code == 2 and "cannot read it: No such file or directory" in err


def test_with_a_url_no_config_is_needed(capsys: pytest.CaptureFixture[str]) -> None:
    with StubAdmin(_health_stub()) as stub:
        code, out, _ = run(capsys, "status", "--url", stub.url + "/")
    assert code == 0
    assert out.splitlines()[0] == f"dynllm 9.9 at {stub.url}"


@pytest.mark.parametrize(
    "argv",
    [
        ["load"],
        ["unload"],
        ["logs"],
        ["status", "extra"],
        ["logs", "m", "-n", "many"],
        ["--url", "http://x", "status"],
        ["--check-config", "c.yaml", "status"],
        ["check-config", "a.yaml", "-c", "b.yaml"],
        ["frobnicate"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_usage_errors_exit_64(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == EXIT_USAGE
    assert "usage: dynllm" in err and "error:" in err
    assert out == ""
