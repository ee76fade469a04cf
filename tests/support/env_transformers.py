"""Hugging Face ``transformers serve`` (5.23) for the real-process tests: its
venv, a tiny chat model and a tiny Whisper model, and helpers that skip a test
loudly when any of them could not be built.

The models are built by ``build_hf_fixtures.py`` inside the venv (it needs
torch and transformers, which dynllm's own environment does not have).
"""

from __future__ import annotations

import io
import math
import wave
from pathlib import Path

from tests.support import envs, tiny_hf

BUILDER = Path(__file__).with_name("build_hf_fixtures.py")

VENV = envs.Venv(
    "transformers-serve",
    steps=(
        (
            "install",
            "torch==2.13.0",  # the CPU wheel in /opt/wheels (pip's find-links)
            "transformers[serving]==5.23.0",
            "python-multipart==0.0.34",  # /v1/audio/transcriptions reads multipart forms
            "soundfile==0.14.0",  # decodes the uploaded audio
            "soxr==1.1.0",  # resamples it to the feature extractor's rate
        ),
    ),
)


def _model(kind: str) -> envs.Fixture:
    def build(out: Path) -> None:
        VENV.run(BUILDER, kind, out, timeout=600)

    # An edit to the builder or to tiny_hf.py rebuilds the models.
    version = tiny_hf.fixture_version(BUILDER)
    return envs.Fixture(f"hf-tiny-{kind}", version, build, needs=(VENV,))


CHAT = _model("chat")
"""Qwen2-shaped, 2 layers of width 64; answers only words of the form " word"."""
WHISPER = _model("whisper")
"""Whisper-shaped, 1+1 layers of width 64, 80 mel bins; transcribes into words."""

ALL: list[envs.Buildable] = [VENV, CHAT, WHISPER]


def transformers_binary() -> str:
    """The venv's ``transformers`` command (``transformers serve ...``), or a loud skip."""
    envs.require(VENV)
    return str(VENV.bin("transformers"))


def chat_model_dir() -> Path:
    """The tiny chat model's directory, or a loud skip."""
    return envs.require(CHAT)


def whisper_model_dir() -> Path:
    """The tiny Whisper model's directory, or a loud skip."""
    return envs.require(WHISPER)


def hf_env(cache_dir: Path) -> dict[str, str]:
    """A model's ``env`` for these tests: offline, with an empty hub cache that
    exists (``/v1/models`` answers 500 when it does not), no update check."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache_dir),
        "HF_HOME": str(cache_dir / "home"),
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }


def tiny_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A mono 16-bit WAV: a 440 Hz tone with a little deterministic noise."""
    frames = bytearray()
    state = 12345
    for i in range(int(seconds * rate)):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF  # a tiny LCG: no numpy needed
        noise = (state / 0x7FFFFFFF - 0.5) * 0.1
        sample = 0.4 * math.sin(2 * math.pi * 440 * i / rate) + noise
        frames += int(sample * 32767).to_bytes(2, "little", signed=True)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(frames))
    return buffer.getvalue()
