"""Backend environments and model fixtures for the real-process tests.

A backend that is not a dev dependency of dynllm (transformers serve, the
OpenVINO stand-in, kserve, Piper, vLLM) gets its own virtual environment,
built with pip from pinned requirements.  pip, not uv: the CPU build of torch
lies on this machine's disk (pip's find-links) and uv would download several
GB of CUDA wheels instead.  Tiny models are built by scripts, often inside one
of those environments.

Both are cached outside the repository, under ``$DYNLLM_TEST_CACHE`` (default
``~/.cache/dynllm-tests``), in a folder named by a hash of their recipe (the
pinned requirements, or the builder's version), so a change of recipe builds
afresh and only the first run pays.  A build that fails leaves a
``<folder>.failed`` file with its reason; tests that need it are then skipped
with that reason, loudly (see ``require``), and the next run tries again.

Each ``tests/support/env_*.py`` module lists what it provides in ``ALL``; the
test session builds every missing one before the tests run (conftest), and
``python -m tests.support.envs`` does the same by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "env_"
SUPPORT = Path(__file__).parent


def cache_root() -> Path:
    root = Path(os.environ.get("DYNLLM_TEST_CACHE", "~/.cache/dynllm-tests")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def base_python() -> str:
    """The interpreter new environments are made from (not uv's venv: its
    ``python -m venv`` would nest a venv inside a venv)."""
    return getattr(sys, "_base_executable", None) or sys.executable


class Unavailable(Exception):
    """An environment or fixture that could not be built; ``str()`` says why."""


@dataclass(frozen=True)
class Venv:
    """A virtual environment built by running ``pip`` with each step's arguments in order.

    Example step lists: ``("install", "torch==2.13.0", "transformers==5.23.0")``,
    ``("uninstall", "-y", "torchvision")``.  ``files`` are extra files written
    into the environment after the steps (path relative to the venv -> text),
    e.g. a dist-info a wheel forgot.
    """

    name: str
    steps: tuple[tuple[str, ...], ...]
    files: tuple[tuple[str, str], ...] = ()
    opt_in: str | None = None
    """An environment variable that must be "1" for this to be built (huge installs)."""

    @property
    def key(self) -> str:
        recipe = repr((self.steps, self.files, sys.version_info[:2]))
        return hashlib.sha256(recipe.encode()).hexdigest()[:12]

    @property
    def path(self) -> Path:
        return cache_root() / "venvs" / f"{self.name}-{self.key}"

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def bin(self, name: str) -> Path:
        return self.path / "bin" / name

    def run(self, *args: str | Path, timeout: float = 1800) -> str:
        """Run this environment's python with ``args``; its output, or Unavailable."""
        return _run([str(self.python), *map(str, args)], timeout=timeout, what=self.name)

    def _build(self, into: Path) -> None:
        _run([base_python(), "-m", "venv", str(into)], timeout=300, what=self.name)
        pip = [str(into / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
        for step in self.steps:
            _run([*pip, *step, *(("--quiet",) if step[0] == "install" else ())],
                 timeout=1800, what=self.name)  # fmt: skip
        for rel, text in self.files:
            target = into / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)


@dataclass(frozen=True)
class Fixture:
    """Files made by ``build(out_dir)``; rebuilt when ``version`` or a needed venv changes."""

    name: str
    version: str
    build: Callable[[Path], None] = field(compare=False)
    needs: tuple[Venv, ...] = ()

    @property
    def key(self) -> str:
        recipe = repr((self.version, [v.key for v in self.needs]))
        return hashlib.sha256(recipe.encode()).hexdigest()[:12]

    @property
    def path(self) -> Path:
        return cache_root() / "fixtures" / f"{self.name}-{self.key}"

    def _build(self, into: Path) -> None:
        for venv in self.needs:
            ensure(venv)
        into.mkdir(parents=True)
        self.build(into)


Buildable = Venv | Fixture


def _run(argv: list[str], *, timeout: float, what: str) -> str:
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    env.pop("VIRTUAL_ENV", None)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{what}: `{' '.join(argv[:4])} ...` ran over {timeout:.0f} s") from None
    except OSError as exc:
        raise Unavailable(f"{what}: cannot run {argv[0]}: {exc}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise Unavailable(
            f"{what}: `{' '.join(argv[:6])} ...` exited {done.returncode}:\n" + "\n".join(tail)
        )
    return done.stdout


def _failed_file(item: Buildable) -> Path:
    return item.path.with_name(item.path.name + ".failed")


@contextlib.contextmanager
def _locked(item: Buildable) -> Iterator[None]:
    item.path.parent.mkdir(parents=True, exist_ok=True)
    with open(item.path.with_name(item.path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it
        yield


COMPLETE = ".complete"


def is_built(item: Buildable) -> bool:
    return (item.path / COMPLETE).exists()


def ensure(item: Buildable) -> Path:
    """Build ``item`` unless it is already cached; its path, or Unavailable.

    Built in place (a venv's scripts carry its absolute path in their
    shebangs, so it cannot be built elsewhere and moved); a ``.complete``
    file written last marks it finished."""
    if is_built(item):
        return item.path
    if isinstance(item, Venv) and item.opt_in and os.environ.get(item.opt_in) != "1":
        raise Unavailable(f"{item.name}: opt-in; set {item.opt_in}=1 to build it")
    with _locked(item):
        if is_built(item):
            return item.path
        failed = _failed_file(item)
        shutil.rmtree(item.path, ignore_errors=True)  # a build that was cut short
        try:
            item._build(item.path)
        except Unavailable as exc:
            shutil.rmtree(item.path, ignore_errors=True)
            failed.write_text(str(exc))
            raise
        except Exception as exc:
            shutil.rmtree(item.path, ignore_errors=True)
            failed.write_text(f"{item.name}: builder raised {exc!r}")
            raise Unavailable(failed.read_text()) from exc
        failed.unlink(missing_ok=True)
        (item.path / COMPLETE).touch()
    return item.path


def unavailable_reason(item: Buildable) -> str | None:
    """None if built; else why not (a failed build's reason, or 'not built yet')."""
    if is_built(item):
        return None
    failed = _failed_file(item)
    if failed.exists():
        return failed.read_text().strip()
    if isinstance(item, Venv) and item.opt_in and os.environ.get(item.opt_in) != "1":
        return f"{item.name}: opt-in; set {item.opt_in}=1 to build it"
    return f"{item.name}: not built (run `uv run python -m tests.support.envs`)"


SKIPPED: list[str] = []
"""Reasons of every backend skip in this session, repeated in pytest's summary."""


def require(item: Buildable) -> Path:
    """For tests: the built item's path, or skip the test loudly saying why."""
    import pytest

    reason = unavailable_reason(item)
    if reason is None:
        return item.path
    SKIPPED.append(reason)
    pytest.skip(f"BACKEND ENVIRONMENT UNAVAILABLE: {reason}")


def registered() -> list[Buildable]:
    """Everything the ``tests/support/env_*.py`` modules list in ``ALL``."""
    items: list[Buildable] = []
    for module_file in sorted(SUPPORT.glob(f"{ENV_PREFIX}*.py")):
        module = importlib.import_module(f"tests.support.{module_file.stem}")
        items.extend(getattr(module, "ALL", ()))
    return items


def build_all(items: Sequence[Buildable], log: Callable[[str], None] = print) -> dict[str, str]:
    """Build what is missing, venvs in parallel (mostly downloads) then fixtures;
    returns name -> reason for each that could not be built."""
    failures: dict[str, str] = {}

    def one(item: Buildable) -> None:
        if is_built(item):
            return
        if isinstance(item, Venv) and item.opt_in and os.environ.get(item.opt_in) != "1":
            return
        started = time.monotonic()
        log(f"building {item.name} ...")
        try:
            ensure(item)
        except Unavailable as exc:
            failures[item.name] = str(exc)
            log(f"FAILED {item.name} after {time.monotonic() - started:.0f} s: {exc}")
        else:
            log(f"built {item.name} in {time.monotonic() - started:.0f} s: {item.path}")

    venvs = [i for i in items if isinstance(i, Venv)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(one, venvs))
    for item in items:
        if isinstance(item, Fixture):
            one(item)
    return failures


def main() -> int:
    # Run as ``python -m`` this file is ``__main__``, a second copy of the
    # module whose Venv/Fixture classes are not the ones env_*.py use.
    from tests.support import envs

    failures = envs.build_all(envs.registered())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
