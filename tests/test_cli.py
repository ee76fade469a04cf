"""The real ``dynllm`` command, run as a subprocess (``python -m dynllm``).

Only paths that exit on their own are exercised (``--check-config``,
``--version``, a config that fails to load), so no server is ever started
and each call takes about half a second.  Every run happens in a fresh
temporary working directory with no ``DYNLLM_*`` variables inherited.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynllm import __version__
from dynllm.app import instance_marker
from dynllm.cli import main as cli_main
from dynllm.config import load_config
from tests.conftest import ConfigFactory, backends_with_marker, poll, serve, subprocess_env
from tests.support.cli_process import LineReader, cli_process
from tests.support.net import free_port, http_ok
from tests.test_config import (
    DYNLLM_README_CONFIG,
    EXAMPLE_CONFIG,
    INVALID_CONFIGS,
    README_MODEL_NAMES,
    Invalid,
    names_key,
)

EXIT_CONFIG = 2


def run_cli(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dynllm", *args],
        cwd=cwd,
        env={**subprocess_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def commands(stdout: str) -> dict[str, list[str]]:
    """``--check-config`` output as {model name: argv}.

    Each model is a header line ``name (backend, type; flags)`` followed by
    its command line indented by two spaces.
    """
    found: dict[str, list[str]] = {}
    header: str | None = None
    for line in stdout.splitlines():
        if line.startswith("  ") and header is not None:
            found[header.split(" (", 1)[0]] = shlex.split(line.strip())
            header = None
        elif line.strip():
            header = line
    return found


def value_of(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {shlex.join(argv)}"
    return argv[argv.index(flag) + 1]


# ---- invalid configs: exit 2, the key named on stderr ---------------------------


@pytest.fixture(scope="module")
def invalid_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """``--check-config`` on every invalid case, run side by side to save time."""

    def check(case: Invalid) -> tuple[Path, subprocess.CompletedProcess[str]]:
        cwd = tmp_path_factory.mktemp(case.id)
        path = case.write(cwd)
        return path, run_cli(cwd, "--check-config", path.name)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(check, INVALID_CONFIGS))
    return {c.id: r for c, r in zip(INVALID_CONFIGS, results, strict=True)}


@pytest.mark.parametrize("case", INVALID_CONFIGS, ids=lambda c: c.id)
def test_check_config_rejects_invalid_config(
    invalid_runs: dict[str, tuple[Path, subprocess.CompletedProcess[str]]], case: Invalid
) -> None:
    path, result = invalid_runs[case.id]
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"dynllm: invalid config {path.name}:")
    details = "\n".join(line.strip() for line in result.stderr.splitlines()[1:])
    assert case.reason in details
    if case.key is not None:
        assert names_key(details, case.key), result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("case", INVALID_CONFIGS[:3], ids=lambda c: c.id)
def test_serving_an_invalid_config_exits_before_starting(tmp_path: Path, case: Invalid) -> None:
    path = case.write(tmp_path)
    result = run_cli(tmp_path, "--config", str(path))
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert case.key is not None and case.key in result.stderr
    assert "Uvicorn running" not in result.stderr


def test_missing_config_file_is_a_readable_error(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--config", "missing.yaml")
    assert result.returncode == EXIT_CONFIG
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "dynllm: invalid config missing.yaml:",
        "  cannot read config file missing.yaml: No such file or directory",
    ]


def test_default_config_path_and_environment(tmp_path: Path) -> None:
    plain = run_cli(tmp_path)
    assert plain.returncode == EXIT_CONFIG
    assert "invalid config config.yaml:" in plain.stderr

    from_env = run_cli(tmp_path, env={"DYNLLM_CONFIG": "from-env.yaml"})
    assert from_env.returncode == EXIT_CONFIG
    assert "invalid config from-env.yaml:" in from_env.stderr


# ---- --check-config on the DynLLM README example -------------------------------


@pytest.fixture(scope="module")
def readme_check(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    return run_cli(tmp_path_factory.mktemp("cwd"), "--check-config", str(DYNLLM_README_CONFIG))


def test_readme_example_checks_ok(readme_check: subprocess.CompletedProcess[str]) -> None:
    assert readme_check.returncode == 0, readme_check.stderr
    assert "OK, 5 model(s), VRAM budget 7500 MB" in readme_check.stdout
    assert list(commands(readme_check.stdout)) == README_MODEL_NAMES


def test_readme_example_llamacpp_command(readme_check: subprocess.CompletedProcess[str]) -> None:
    lines = [line.strip() for line in readme_check.stdout.splitlines()]
    assert (
        "llama-server -m /mnt/models/gguf/Meta-Llama-3-8B-Instruct.Q4_K_M.gguf "
        "--host 127.0.0.1 --port 9100 -c 4096 -ngl -1 --alias llama3-8b-q4"
    ) in lines


def test_readme_example_ovms_commands(readme_check: subprocess.CompletedProcess[str]) -> None:
    argv = commands(readme_check.stdout)
    expected = {  # model: (model_path, target_device, task)
        "phi3-mini-ov": (
            "/mnt/models/openvino/phi-3-mini-4k-instruct-ov",
            "GPU",
            "text_generation",
        ),
        "whisper-large-v3-ov": ("/mnt/models/openvino/whisper-large-v3-ov", "CPU", "speech2text"),
        "speecht5-ov": ("/mnt/models/openvino/speecht5-ov", "CPU", "text2speech"),
    }
    for name, (path, device, task) in expected.items():
        cmd = argv[name]
        assert cmd[0] == "ovms"
        assert value_of(cmd, "--rest_port") == "9100"
        assert value_of(cmd, "--rest_bind_address") == "127.0.0.1"
        assert value_of(cmd, "--port") == "0"  # gRPC off
        assert value_of(cmd, "--model_path") == path
        assert value_of(cmd, "--model_name") == name
        assert value_of(cmd, "--target_device") == device
        assert value_of(cmd, "--task") == task
    assert value_of(argv["phi3-mini-ov"], "--shape") == "auto"
    assert "--shape" not in argv["whisper-large-v3-ov"]


def test_readme_example_transformers_command(
    readme_check: subprocess.CompletedProcess[str],
) -> None:
    cmd = commands(readme_check.stdout)["qwen25-3b-hf"]
    assert cmd[:3] == ["transformers", "serve", "/mnt/models/huggingface/Qwen2.5-3B-Instruct"]
    assert value_of(cmd, "--host") == "127.0.0.1"
    assert value_of(cmd, "--port") == "9100"
    assert value_of(cmd, "--device") == "xpu"
    assert value_of(cmd, "--dtype") == "bfloat16"
    assert value_of(cmd, "--quantization") == "bnb-4bit"
    assert value_of(cmd, "--attn-implementation") == "sdpa"
    assert value_of(cmd, "--model-timeout") == "300"
    assert "--trust-remote-code" not in cmd


def test_readme_example_warns_about_missing_files(
    readme_check: subprocess.CompletedProcess[str],
) -> None:
    config = load_config(DYNLLM_README_CONFIG)
    missing = config.missing_model_files()
    if not missing:
        pytest.skip("this machine has the README's /mnt/models files")
    output = readme_check.stdout + readme_check.stderr
    for model in missing:
        assert f"WARNING: file not found: {config.model_path(model)}" in output


# ---- --check-config on config.example.yaml, --version -------------------------


def test_example_config_checks_ok(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--check-config", str(EXAMPLE_CONFIG))
    assert result.returncode == 0, result.stderr
    config = load_config(EXAMPLE_CONFIG)
    assert list(commands(result.stdout)) == [m.name for m in config.models]


def test_check_config_path_is_relative_to_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "chat.gguf").write_bytes(b"gguf")
    (tmp_path / "mine.yaml").write_text(
        "models_dir: models\n"
        "models:\n"
        "  - {name: chat, path: chat.gguf, backend: llamacpp, vram_mb: 10, pinned: true,\n"
        "     extra_args: [--threads, 4]}\n"
    )
    result = run_cli(tmp_path, "--check-config", "mine.yaml")
    assert result.returncode == 0, result.stderr
    assert "file not found" not in result.stdout  # the file exists
    assert "pinned" in result.stdout
    cmd = commands(result.stdout)["chat"]
    assert value_of(cmd, "-m") == str(tmp_path.resolve() / "models" / "chat.gguf")
    assert cmd[-2:] == ["--threads", "4"]


def test_version(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"dynllm {__version__}"


# ---- content that once escaped load_config with a traceback ----


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00 not text",  # UnicodeDecodeError
        b"idle_timeout_seconds: [300]\n",  # TypeError from float() in a validator
    ],
    ids=["non-utf8", "timeout-list"],
)
def test_unexpected_content_exits_2(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "config.yaml").write_bytes(content)
    result = run_cli(tmp_path, "--check-config", "config.yaml")
    assert result.returncode == EXIT_CONFIG
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("env", "args", "names"),
    [
        ({"DYNLLM_LOG_LEVEL": "loud"}, [], "DYNLLM_LOG_LEVEL"),
        ({"DYNLLM_PORT": "eighty"}, [], "DYNLLM_PORT"),
        ({}, ["--log-level", "loud"], "--log-level"),
    ],
)
def test_bad_overrides_exit_2_without_traceback(
    tmp_path: Path, env: dict[str, str], args: list[str], names: str
) -> None:
    result = run_cli(tmp_path, *args, env=env)
    assert result.returncode == EXIT_CONFIG
    assert names in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_names_a_missing_backend_program(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"gguf")
    (tmp_path / "c.yaml").write_text(
        "backend: {llamacpp_binary: /opt/none/llama-server}\n"
        "models:\n  - {name: chat, path: m.gguf, backend: llamacpp, vram_mb: 10}\n"
    )
    result = run_cli(tmp_path, "--check-config", "c.yaml")
    assert result.returncode == 0, result.stderr  # a warning: it may be installed later
    assert (
        "WARNING: the llamacpp backend program '/opt/none/llama-server' of model 'chat' was "
        "not found or is not executable: install llama.cpp's llama-server"
    ) in result.stdout


def test_sigterm_during_a_long_preload_stops_dynllm_promptly(
    make_config: ConfigFactory, dynllm_process: Any
) -> None:
    """uvicorn acts on SIGTERM only after startup; a preload waiting on a
    60 s load must not hold the service (and its backend) that long."""
    path, config = make_config.write_and_load(
        [{"name": "slow", "extra_args": ["--fake-load-seconds", "60"]}],
        preload_models=["slow"],
    )
    proc = dynllm_process(path)
    marker = {instance_marker(config)}
    poll(lambda: backends_with_marker(marker) or proc.poll() is not None, timeout=30)
    assert proc.poll() is None, proc.stderr.read().decode()
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=config.stop_timeout_seconds + 5)
    print(f"stopped {time.monotonic() - started:.2f} s after SIGTERM during a preload")
    poll(lambda: not backends_with_marker(marker), timeout=3)


def test_sighup_does_not_stop_dynllm(make_config: ConfigFactory, dynllm_process: Any) -> None:
    path, config = make_config.write_and_load([{"name": "m"}])
    proc = dynllm_process(path)
    with httpx.Client(base_url=f"http://127.0.0.1:{config.server.port}", trust_env=False) as http:
        poll(lambda: http_ok(http) or proc.poll() is not None, timeout=30)
        proc.send_signal(signal.SIGHUP)
        assert (
            http.post("/v1/chat/completions", json={"model": "m", "messages": []}).status_code
            == 200
        )
        assert proc.poll() is None and http_ok(http)


def test_a_second_dynllm_on_the_same_state_file_refuses_to_start(
    make_config: ConfigFactory, dynllm_process: Any
) -> None:
    path, config = make_config.write_and_load([{"name": "m"}])
    first = dynllm_process(path)
    with httpx.Client(base_url=f"http://127.0.0.1:{config.server.port}", trust_env=False) as http:
        poll(lambda: http_ok(http) or first.poll() is not None, timeout=30)
    second = run_cli(path.parent, "--config", str(path), "--port", str(free_port()))
    assert second.returncode == 1, second.stderr
    assert second.stderr.startswith(
        f"dynllm: the state file {config.db_file} is in use by another dynllm (pid {first.pid})"
    )
    assert first.poll() is None  # the first one is untouched


def test_dynllm_raises_its_open_file_limit_to_the_hard_limit(
    make_config: ConfigFactory, dynllm_process: Any
) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    path, config = make_config.write_and_load([{"name": "m"}])
    lowered = min(soft, 256)

    def start_low() -> Any:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        try:
            return dynllm_process(path)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    proc = start_low()
    with httpx.Client(base_url=f"http://127.0.0.1:{config.server.port}", trust_env=False) as http:
        poll(lambda: http_ok(http) or proc.poll() is not None, timeout=30)
    limits = Path(f"/proc/{proc.pid}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    assert line.split()[3:5] == [str(hard), str(hard)], line


def test_the_dynllm_command_serves_with_the_connection_limits(
    make_config: ConfigFactory, dynllm_process: Any
) -> None:
    """The command's server is built by dynllm.server: a connection that sends
    nothing is dropped at header_timeout_seconds, and with max_connections 2
    (the client's keep-alive connection and the silent one) a third
    connection gets dynllm's 503."""
    path, config = make_config.write_and_load(
        [{"name": "m"}], header_timeout_seconds=1, max_connections=2
    )
    proc = dynllm_process(path)
    with httpx.Client(base_url=f"http://127.0.0.1:{config.server.port}", trust_env=False) as http:
        poll(lambda: http_ok(http) or proc.poll() is not None, timeout=30)
        with socket.create_connection(("127.0.0.1", config.server.port), timeout=10) as silent:
            opened = time.monotonic()
            with httpx.Client(base_url=str(http.base_url), trust_env=False) as third:
                refused = third.get("/health")
            assert silent.recv(1) == b""  # closed by the server
            dropped = time.monotonic() - opened
    print(f"silent connection dropped after {dropped:.2f} s; third connection: {refused.text}")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "too_many_connections"
    assert 0.95 <= dropped <= 1.6


# ---- check-config: the three new findings, its forms, exit codes -------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_check_config_reports_the_three_new_problems(tmp_path: Path) -> None:
    """A backend program that is missing, a route a backend cannot serve, and
    pinned models that cannot all be loaded: warnings (exit 0), counted in
    the first line.  A model type the backend cannot serve at all: exit 2."""
    (tmp_path / "m.gguf").write_bytes(b"gguf")
    (tmp_path / "ov").mkdir()
    _write(
        tmp_path / "c.yaml",
        "total_vram_mb: 8000\n"
        "enabled_backends: [llamacpp, openvino]\n"
        "backend: {llamacpp_binary: /opt/none/llama-server, ovms_binary: /opt/none/ovms}\n"
        "models:\n"
        "  - {name: a, path: m.gguf, backend: llamacpp, vram_mb: 5000, pinned: true}\n"
        "  - {name: b, path: ov, backend: openvino, vram_mb: 4000, pinned: true}\n",
    )
    result = run_cli(tmp_path, "check-config", "c.yaml")
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "c.yaml: OK, 2 model(s), VRAM budget 8000 MB; 3 warning(s)"
    assert lines[1] == (
        "WARNING: pinned models need 9000 MB together but total_vram_mb is 8000 MB "
        "(a 5000 MB, b 4000 MB): pinned models are never evicted, so once some are loaded "
        "the others cannot load until one is unloaded by hand"
    )
    assert "WARNING: the llamacpp backend program '/opt/none/llama-server' of model 'a'" in (
        result.stdout
    )
    assert "WARNING: the openvino backend program '/opt/none/ovms' of model 'b'" in result.stdout
    header_b = next(line for line in lines if line.startswith("b ("))
    assert "openvino does not serve: responses" in header_b
    assert list(commands(result.stdout)) == ["a", "b"]  # the command lines still follow

    _write(
        tmp_path / "type.yaml",
        "models:\n  - {name: tts, path: m.gguf, backend: llamacpp, vram_mb: 10, "
        "model_type: speech}\n",
    )
    wrong_type = run_cli(tmp_path, "check-config", "type.yaml")
    assert wrong_type.returncode == EXIT_CONFIG
    assert wrong_type.stderr.splitlines() == [
        "dynllm: invalid config type.yaml:",
        "  models[0].model_type ('tts'): the llamacpp backend cannot serve model_type "
        "'speech' (it serves: llm, embedding, rerank)",
    ]


def test_check_config_reports_preload_that_cannot_stay_next_to_pinned(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"gguf")
    _write(
        tmp_path / "c.yaml",
        f"backend: {{llamacpp_binary: {sys.executable}}}\n"  # a program that exists
        "total_vram_mb: 8000\npreload_models: [q]\n"
        "models:\n"
        "  - {name: p, path: m.gguf, backend: llamacpp, vram_mb: 6000, pinned: true}\n"
        "  - {name: q, path: m.gguf, backend: llamacpp, vram_mb: 3000}\n",
    )
    result = run_cli(tmp_path, "check-config", "c.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == [
        "c.yaml: OK, 2 model(s), VRAM budget 8000 MB; 1 warning(s)",
        "WARNING: preload_models and the pinned models need 9000 MB together but "
        "total_vram_mb is 8000 MB (q 3000 MB, p 6000 MB): pinned models are never evicted, "
        "so a preloaded model is evicted to make room for them (or cannot load behind them)",
    ]


def test_check_config_forms_agree(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"gguf")
    _write(tmp_path / "c.yaml", "models:\n  - {name: a, path: m.gguf, backend: llamacpp, "
                                "vram_mb: 10}\n")  # fmt: skip
    forms = [
        ["check-config", "c.yaml"],
        ["check-config", "-c", "c.yaml"],
        ["-c", "c.yaml", "check-config"],
        ["--check-config", "c.yaml"],
        ["--check-config", "-c", "c.yaml"],
        ["-c", "c.yaml", "--check-config"],
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda argv: run_cli(tmp_path, *argv), forms))
    assert results[0].returncode == 0 and results[0].stdout.startswith("c.yaml: OK, 1 model(s)")
    for argv, result in zip(forms, results, strict=True):
        assert (result.returncode, result.stdout) == (0, results[0].stdout), argv
    env_form = run_cli(tmp_path, "check-config", env={"DYNLLM_CONFIG": "c.yaml"})
    assert env_form.stdout == results[0].stdout


def test_usage_errors_and_invalid_configs_have_different_exit_codes(tmp_path: Path) -> None:
    _write(tmp_path / "bad.yaml", "models: [{name: a}]\n")
    runs = {
        "usage": ["frobnicate"],
        "usage-option": ["check-config", "--bogus"],
        "usage-missing-model": ["load"],
        "config": ["check-config", "bad.yaml"],
        "config-serve": ["-c", "bad.yaml"],
        "config-port": ["--port", "eighty"],
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = pool.map(lambda a: run_cli(tmp_path, *a), runs.values())
        results = dict(zip(runs, outcomes, strict=True))
    codes = {name: r.returncode for name, r in results.items()}
    print(codes)
    assert codes == {"usage": 64, "usage-option": 64, "usage-missing-model": 64,
                     "config": 2, "config-serve": 2, "config-port": 2}  # fmt: skip
    assert all("Traceback" not in r.stderr for r in results.values())
    assert "invalid choice: 'frobnicate'" in results["usage"].stderr
    assert "invalid --port 'eighty'" in results["config-port"].stderr


# ---- the client commands against a running dynllm -------------------------------------

ADMIN_KEY = "cli-admin-key-7c2e"


@pytest.fixture
def no_dynllm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DYNLLM_"):
            monkeypatch.delenv(name)


async def dynllm_cmd(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``dynllm ARGV`` in this process (a thread: the server runs on this loop)."""
    code = await asyncio.to_thread(cli_main, list(argv))
    out, err = capsys.readouterr()
    print(f"$ dynllm {' '.join(argv)}  -> exit {code}\n{out}{err}", file=sys.__stdout__)
    return code, out, err


def table(text: str) -> dict[str, dict[str, str]]:
    """A command's table as {first column: {header: cell}} (columns are
    separated by two spaces or more)."""
    lines = [line for line in text.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.startswith("MODEL"))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = [dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=True))
            for line in lines[start + 1 :] if not re.match(r"^\S+: ", line)]  # fmt: skip
    return {row["MODEL"]: row for row in rows}


async def test_status_models_load_unload_logs_against_a_running_dynllm(
    make_config: ConfigFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_dynllm_env: None,
) -> None:
    """Each command against a real dynllm (its address and admin key read
    from its config file), with the fake llama-server as backend."""
    path, config = make_config.write_and_load(
        [
            {"name": "chat", "aliases": ["c"], "extra_args": ["--fake-token-rate", "50"]},
            {"name": "embed", "vram_mb": 500, "pinned": True, "unload_time": -1},
        ],
        admin_api_keys=[ADMIN_KEY],
    )
    c = ["-c", str(path)]
    async with serve(config) as app:
        app.client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        code, out, err = await dynllm_cmd(capsys, "status", *c)
        assert code == 0, err
        head, vram = out.splitlines()[:2]
        assert re.fullmatch(
            rf"dynllm {re.escape(__version__)} at http://127\.0\.0\.1:{config.server.port}, "
            r"up \d+s",
            head,
        ), head
        assert vram == "VRAM 0 of 8000 MB used (0%), 0 request(s) queued"
        rows = table(out)
        assert rows["chat"]["STATE"] == "unloaded" and rows["chat"]["LAST USED"] == "never"
        assert rows["embed"]["PID"] == "-"

        started = time.monotonic()
        code, out, err = await dynllm_cmd(capsys, "load", "c", *c)  # by its alias
        took = time.monotonic() - started
        print(f"dynllm load took {took:.2f} s", file=sys.__stdout__)  # not into capsys
        assert code == 0, err
        chat = (await app.admin_models())["chat"]
        assert chat["status"] == "loaded"
        assert re.fullmatch(
            rf"loaded chat: port {chat['port']}, pid {chat['pid']} \(\d+\.\d\d s\)\n", out
        )

        # One request in flight: status shows it, and unload refuses without --force.
        body = {"model": "chat", "stream": True, "max_tokens": 5000,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        async with app.client.stream("POST", "/v1/chat/completions", json=body) as stream:
            chunks = stream.aiter_bytes()
            assert await anext(chunks)  # the answer has started
            code, out, err = await dynllm_cmd(capsys, "status", *c)
            rows = table(out)
            assert (rows["chat"]["STATE"], rows["chat"]["IN-FLIGHT"]) == ("loaded", "1")
            assert rows["chat"]["PORT"] == str(chat["port"]) and rows["chat"]["PID"] == str(
                chat["pid"]
            )
            assert out.splitlines()[1] == "VRAM 1000 of 8000 MB used (12%), 0 request(s) queued"

            code, out, err = await dynllm_cmd(capsys, "unload", "chat", *c)
            assert code == 1 and out == ""
            assert err.startswith(
                f"dynllm: {app.base_url} answered 409: The model 'chat' is serving 1 request(s)"
            )
            assert err.rstrip().endswith("(`dynllm unload chat --force` stops it anyway)")
            assert (await app.admin_models())["chat"]["pid"] == chat["pid"]

            code, out, err = await dynllm_cmd(capsys, "unload", "chat", "--force", *c)
            assert (code, out) == (0, "unloaded chat\n"), err
        assert (await app.admin_models())["chat"]["status"] == "unloaded"
        code, out, _ = await dynllm_cmd(capsys, "unload", "chat", *c)
        assert (code, out) == (0, "chat was not loaded\n")

        code, out, _ = await dynllm_cmd(capsys, "logs", "chat", *c)
        assert code == 0
        assert f"fake-llama-server[{chat['pid']}] starting: alias=chat" in out
        code, out, _ = await dynllm_cmd(capsys, "logs", "chat", "-n", "1", *c)
        assert code == 0 and len(out.splitlines()) == 1

        code, out, _ = await dynllm_cmd(capsys, "models", *c)
        rows = table(out)
        assert rows["chat"] == {"MODEL": "chat", "ALIASES": "c", "BACKEND": "llamacpp",
                                "TYPE": "llm", "VRAM MB": "1000", "PINNED": "no",
                                "UNLOAD AFTER": "5m00s", "STATE": "unloaded"}  # fmt: skip
        assert (rows["embed"]["PINNED"], rows["embed"]["UNLOAD AFTER"]) == ("yes", "never")

        code, out, _ = await dynllm_cmd(capsys, "status", "--json", *c)
        state = json.loads(out)
        assert state["version"] == __version__ and state["vram_total_mb"] == 8000
        assert {m["name"]: m["status"] for m in state["models"]} == {
            "chat": "unloaded",
            "embed": "unloaded",
        }

        code, _, err = await dynllm_cmd(capsys, "load", "nope", *c)
        assert code == 1
        assert err == f"dynllm: {app.base_url} answered 404: The model 'nope' does not exist\n"

        monkeypatch.setenv("DYNLLM_ADMIN_API_KEY", "not-the-key")
        code, out, err = await dynllm_cmd(capsys, "status", *c)
        assert code == 1 and f"{app.base_url} answered 401: The API key is not valid" in err
        assert "not-the-key" not in out + err and ADMIN_KEY not in out + err


def test_the_commands_as_processes_status_load_and_logs_follow(
    make_config: ConfigFactory, dynllm_process: Any, tmp_path: Path
) -> None:
    """``python -m dynllm`` on both sides: a dynllm process, and ``logs -f``
    printing the backend's lines as they come until Ctrl-C (exit 130)."""
    path, config = make_config.write_and_load([{"name": "chat"}])
    server = dynllm_process(path)
    base = f"http://127.0.0.1:{config.server.port}"
    with httpx.Client(base_url=base, trust_env=False, timeout=30) as http:
        poll(lambda: http_ok(http) or server.poll() is not None, timeout=30)
        assert server.poll() is None
        status = run_cli(tmp_path, "status", "-c", str(path))
        assert status.returncode == 0, status.stderr
        assert table(status.stdout)["chat"]["STATE"] == "unloaded"

        with cli_process("logs", "chat", "-f", "-c", str(path)) as follower:
            reader = LineReader(follower)
            load = run_cli(tmp_path, "load", "chat", "-c", str(path))
            assert load.returncode == 0, load.stderr
            seen = []
            while "model loaded" not in (seen or [""])[-1]:
                seen.append(reader.line())
            sent = time.monotonic()
            chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
            assert http.post("/v1/chat/completions", json=chat).status_code == 200
            while '"POST /v1/chat/completions HTTP/1.1" 200' not in seen[-1]:
                try:
                    seen.append(reader.line())
                except AssertionError as exc:
                    raise AssertionError(
                        f"{exc}: a new backend line did not reach `dynllm logs -f` (the "
                        "tail did); GET /admin/models/{m}/logs?follow=true gets new lines "
                        "only once ProcessEffects passes on_line to the backend process"
                    ) from None
            latency = time.monotonic() - sent
            follower.send_signal(signal.SIGINT)
            code = follower.wait(timeout=15)
        assert follower.stderr is not None
        err = follower.stderr.read().decode()
    print("\n".join(seen))
    print(
        f"the request's log line reached `dynllm logs -f` {latency * 1000:.0f} ms after it was sent"
    )
    assert any("starting: alias=chat" in line for line in seen)
    assert code == 130 and "Traceback" not in err
