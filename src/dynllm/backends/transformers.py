"""Hugging Face ``transformers serve`` with the model preloaded (positional argument).

Checked against transformers 5.23.0 (``transformers serve --help`` and the
server itself):

- ``transformers serve MODEL --host H --port P`` loads MODEL before the port
  opens; ``GET /health`` then answers ``200 {"status":"ok"}`` (503 only if a
  continuous-batching worker died).  ``--device`` and ``--dtype`` exist and
  default to ``auto``.  ``--model-timeout`` exists but the server ignores it
  when a model is preloaded (it never unloads a pinned model; dynllm does).
- JSON requests must name exactly the positional string or no model at all
  ("Server is pinned to ..." 400 otherwise); replies name it ``MODEL@main``
  (``MODEL@rev`` when the positional carries a revision).
- ``/v1/audio/transcriptions`` does not check the pin: it loads whatever its
  multipart ``model`` field names (a hub download, or a 500 when offline).
  Only the positional string reaches the preloaded model, so dynllm rewrites
  the form field too.
- ``/v1/responses`` streams unless the body says ``"stream": false``
  (OpenAI's default is not to stream).
- The CLI asks PyPI for a newer release at startup (up to 2 s, once a day)
  unless ``HF_HUB_DISABLE_UPDATE_CHECK`` is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from dynllm.backends.base import Adapter, Launch
from dynllm.config import BackendName, ModelConfig
from dynllm.registry import ApiFamily

# dynllm scrubs HF_* from the inherited environment; these defaults apply
# unless the model's own ``env`` sets them.
DEFAULT_ENV: Mapping[str, str] = {"HF_HUB_DISABLE_UPDATE_CHECK": "1"}


def served_name(model: ModelConfig, path: Path) -> str:
    """The positional model argument; also the only ``model`` value the server accepts."""
    return f"{path}@{model.revision}" if model.revision else str(path)


class Transformers(Adapter):
    name = BackendName.TRANSFORMERS
    # probe_path: the default /health; the port only opens once the model is loaded
    routes: ClassVar = {
        ApiFamily.CHAT: "/v1/chat/completions",
        ApiFamily.COMPLETIONS: "/v1/completions",
        ApiFamily.RESPONSES: "/v1/responses",
        ApiFamily.TRANSCRIPTION: "/v1/audio/transcriptions",
    }
    # uvicorn: "[Errno 98] error while attempting to bind on address (...): address
    # already in use"; the base class's marker matches it.

    def argv(self, launch: Launch) -> list[str]:
        m = launch.model
        args = [
            launch.binary, "serve", served_name(m, launch.model_path),
            "--host", launch.host,
            "--port", str(launch.port),
        ]  # fmt: skip
        for flag, value in (
            ("--device", m.device),
            ("--dtype", m.dtype),
            ("--attn-implementation", m.attn_implementation),
            ("--model-timeout", m.model_timeout),
        ):
            if value is not None:
                args += [flag, str(value)]
        if m.quantization and m.quantization != "none":
            args += ["--quantization", m.quantization]
        if m.trust_remote_code:
            args.append("--trust-remote-code")
        if m.continuous_batching:
            args.append("--continuous-batching")
        if m.compile_model:
            args.append("--compile")
        return args + list(m.extra_args)

    def env(self, base: Mapping[str, str], model: ModelConfig, marker: str) -> dict[str, str]:
        env = super().env(base, model, marker)
        for key, value in DEFAULT_ENV.items():
            env.setdefault(key, value)
        return env

    # 5.23 streams /v1/responses unless told otherwise; OpenAI's default is not to.
    json_defaults: ClassVar = {ApiFamily.RESPONSES: {"stream": False}}

    def rewrite_model(self, model: ModelConfig, launch_path: Path) -> str | None:
        # The server is pinned to its positional model and rejects any other name
        # (JSON); its transcription route would try to load any other name (multipart).
        return served_name(model, launch_path)
