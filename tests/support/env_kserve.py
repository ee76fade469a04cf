"""A real KServe v2 server (``kserve.ModelServer``) for the ``command`` backend's
KServe tests; the model it serves is ``tests/support/kserve_model_server.py``."""

from __future__ import annotations

from pathlib import Path

from tests.support import envs

KSERVE = envs.Venv("kserve", steps=(("install", "kserve==0.21.0", "numpy==2.4.6"),))

ALL: list[envs.Buildable] = [KSERVE]

MODEL_SERVER = Path(__file__).parent / "kserve_model_server.py"


def kserve_python() -> Path:
    """The kserve venv's python; skips the test loudly if the venv is missing."""
    envs.require(KSERVE)
    return KSERVE.python


def server_argv(port: int | str, name: str) -> list[str]:
    """argv of the tiny classification ModelServer (``port`` may be ``"{port}"``)."""
    return [str(kserve_python()), str(MODEL_SERVER), "--http_port", str(port), "--model_name", name]
