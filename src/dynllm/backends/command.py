"""Any OpenAI- or KServe-compatible server, started from the model's own ``command``.

The argv is the model's ``command`` (then its ``extra_args``) with these
placeholders replaced wherever they occur inside an argument:

    {port}        the port dynllm leased for this backend
    {host}        the address to bind (always loopback)
    {model_path}  the model's ``path``, resolved like every other backend's
    {name}        the model's canonical name

Replacement is plain substring replacement, not ``str.format``: an argument
that carries other braces (a JSON option, a regex) is passed through as is
instead of raising or being mangled.

Requests go to the OpenAI path of each family the model type serves, unless
``upstream_paths`` names another (keyed by the family's value, e.g.
``audio.speech``).  KServe v2 is addressed per model: its entry is the prefix
that replaces ``/v2/models/{client's name}`` in the request URL, the model's
own name by default.  ``{name}`` is replaced in ``upstream_paths`` and in
``health_path`` too (``health_path: /v2/models/{name}/ready``).
"""

from __future__ import annotations

import os
from pathlib import Path

from dynllm.backends.base import Adapter, Launch
from dynllm.config import BackendName, ModelConfig
from dynllm.registry import SERVES, ApiFamily

OPENAI_PATHS: dict[str, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
    "embeddings": "/v1/embeddings",
    "rerank": "/v1/rerank",
    "audio.transcriptions": "/v1/audio/transcriptions",
    "audio.translations": "/v1/audio/translations",
    "audio.speech": "/v1/audio/speech",
    "images.generations": "/v1/images/generations",
}
"""Where an OpenAI-compatible server answers each family, keyed like
``upstream_paths`` (the family's value); KServe is per model."""

KSERVE_PREFIX = "/v2/models/"


def substitute(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


class Command(Adapter):
    name = BackendName.COMMAND

    def argv(self, launch: Launch) -> list[str]:
        m = launch.model
        if not m.command:
            # config validation should reject this first; this guards direct callers
            raise ValueError(
                f"model '{m.name}': backend 'command' needs a non-empty 'command' "
                "(the argv that starts the server, with {port} and {host})"
            )
        args = [*m.command, *m.extra_args]
        if not m.path and any("{model_path}" in arg for arg in args):
            raise ValueError(
                f"model '{m.name}': the command uses {{model_path}} but 'path' is empty"
            )
        values = {
            "port": str(launch.port),
            "host": launch.host,
            "model_path": str(launch.model_path),
            "name": m.name,
        }
        argv = [substitute(arg, values) for arg in args]
        argv[0] = os.path.expanduser(argv[0])  # as missing_binary checks it; exec does not
        return argv

    def probe(self, model: ModelConfig) -> str:
        return substitute(model.health_path, {"name": self.in_url(model.name)})

    def upstream_path(self, model: ModelConfig, family: ApiFamily) -> str | None:
        if family not in SERVES[model.model_type]:
            return None
        override = model.upstream_paths.get(family.value)
        if override is not None:
            return substitute(override, {"name": self.in_url(model.name)})
        if family is ApiFamily.KSERVE:
            return KSERVE_PREFIX + self.in_url(model.name)
        return OPENAI_PATHS.get(family.value)

    def rewrite_model(self, model: ModelConfig, launch_path: Path) -> str | None:
        # An arbitrary server's notion of its model name is unknown: forward
        # bodies untouched (a server that insists on a name gets it in its argv).
        return None
