"""The OpenVINO Model Server stand-in: its environment, the tiny IR models it
serves, and helpers for the tests that start it.

Real ``ovms`` has no package that installs here (Docker images and release
tarballs only), so ``tests/support/ovms_standin.py`` plays it with
openvino-genai doing real inference.  Two environments:

* ``ovms-standin``: openvino + openvino-genai + openvino-tokenizers (no
  torch, ~330 MB) and aiohttp for the HTTP side.
* ``ov-export``: torch (the CPU wheel on disk) and optimum-intel, only to
  build the IR fixtures once; ``tests/support/build_ov_fixtures.py`` runs
  inside it.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

from tests.support import envs, tiny_hf

OV = ("openvino==2026.4.1", "openvino-genai==2026.4.1.0", "openvino-tokenizers==2026.4.1.0")

STANDIN_VENV = envs.Venv(
    "ovms-standin",
    steps=(("install", *OV, "soundfile==0.14.0", "pillow==13.0.0", "aiohttp==3.14.5"),),
)

# The recipe of BACKENDS.md ("Checked again on 2026-12-01"): torchvision fails
# to import next to this torch and newer diffusers breaks the transformers
# that optimum-intel 2.2 pins.
EXPORT_VENV = envs.Venv(
    "ov-export",
    steps=(
        ("install", "torch==2.13.0", "optimum-intel[openvino]==2.2.0", *OV),
        ("uninstall", "-y", "torchvision"),
        (
            "install",
            "sentencepiece==0.2.3",
            "huggingface-hub>=1.5,<1.22",
            "diffusers==0.39.0",
            "protobuf",
        ),
    ),
)

SUPPORT = Path(__file__).parent
BUILDER = SUPPORT / "build_ov_fixtures.py"
STANDIN = SUPPORT / "ovms_standin.py"

# Model kinds the builder writes, each a subfolder of the fixture.
KINDS = ("llm", "embedding", "rerank", "whisper", "speecht5", "image", "classifier")


def _build_ir(out_dir: Path) -> None:
    EXPORT_VENV.run(BUILDER, out_dir, timeout=1800)
    missing = [k for k in KINDS if not (out_dir / k).is_dir()]
    if missing:
        raise envs.Unavailable(f"ovms-ir: the builder did not write {missing}")


# An edit to build_ov_fixtures.py or tiny_hf.py rebuilds the models.
IR_FIXTURE = envs.Fixture(
    "ovms-ir", tiny_hf.fixture_version(BUILDER), build=_build_ir, needs=(EXPORT_VENV,)
)

ALL: list[envs.Buildable] = [STANDIN_VENV, EXPORT_VENV, IR_FIXTURE]


def ovms_binary(tmp: Path) -> Path:
    """An executable ``ovms`` in ``tmp`` that runs the stand-in with its venv's
    python; skips the test loudly when the venv could not be built.

    Still a wrapper, though the venv's console scripts work: the stand-in is a
    script of this repository, not a console script of the venv, and dynllm's
    ``backend.ovms_binary`` names one executable.  ``exec`` keeps one process,
    so dynllm's pid is the server's."""
    envs.require(STANDIN_VENV)
    tmp.mkdir(parents=True, exist_ok=True)
    wrapper = tmp / "ovms"
    wrapper.write_text(f'#!/bin/sh\nexec "{STANDIN_VENV.python}" "{STANDIN}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return wrapper


def ir_model(kind: str) -> Path:
    """The IR folder of one tiny model (``KINDS``); skips loudly when unbuilt."""
    if kind not in KINDS:
        raise ValueError(f"unknown IR fixture kind {kind!r}; one of {KINDS}")
    return envs.require(IR_FIXTURE) / kind


def standin_env() -> dict[str, str]:
    """The environment to start the stand-in with: few threads (2 shared cores)."""
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    return env


# The IR classifier takes one FP32 input of shape [1, 4] named "input".
CLASSIFIER_VALUES = struct.pack("<4f", 0.5, -1.0, 2.0, 0.25)


def classifier_binary_header(values: bytes = CLASSIFIER_VALUES) -> bytes:
    """The JSON part of a KServe binary-extension request for the classifier,
    asking for its output as raw bytes too."""
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "parameters": {"binary_data_size": len(values)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()


def binary_headers(header: bytes) -> dict[str, str]:
    return {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
