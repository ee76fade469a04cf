"""What every backend adapter provides.  Pure command construction, no I/O."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

from dynllm.config import BackendName, ModelConfig
from dynllm.ports import BACKEND_HOST
from dynllm.registry import ApiFamily

# Inherited variables that silently change a backend's behaviour (a stray
# LLAMA_ARG_PORT or HF_HUB_OFFLINE on the service would win over our flags
# or break a load).  A model's own ``env`` may set them again on purpose.
_SCRUBBED = re.compile(r"^(LLAMA_ARG_.*|LLAMA_API_KEY|API_KEY|VLLM_.*|HF_.*|OVMS_.*)$")

MARKER_ENV = "DYNLLM_INSTANCE"
MODEL_ENV = "DYNLLM_MODEL"


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one backend process."""

    binary: str
    model: ModelConfig
    model_path: Path
    port: int
    host: str = BACKEND_HOST
    mmproj_path: Path | None = None


class Adapter:
    """One backend kind.  Subclasses say how to launch it and where its routes live."""

    name: ClassVar[BackendName]
    probe_path: ClassVar[str] = "/health"
    routes: ClassVar[Mapping[ApiFamily, str]] = {}
    json_defaults: ClassVar[Mapping[ApiFamily, Mapping[str, Any]]] = {}
    """Body fields added when a request leaves them out, where the backend's
    default differs from OpenAI's (transformers serve streams /v1/responses
    unless told ``"stream": false``)."""
    # Substrings of stderr that mean "the port was taken before I could bind it".
    bind_failure_markers: ClassVar[tuple[str, ...]] = ("address already in use",)

    def argv(self, launch: Launch) -> list[str]:
        raise NotImplementedError

    @staticmethod
    def in_url(name: str) -> str:
        """A model name as a URL path part: '%', '?', '#' and the like escaped
        (a '?' would start the query, a '#' cut the path), '/' kept."""
        return quote(name, safe="/")

    def probe(self, model: ModelConfig) -> str:
        """Path that answers 200 only once requests will succeed."""
        return self.probe_path

    def upstream_path(self, model: ModelConfig, family: ApiFamily) -> str | None:
        return self.routes.get(family)

    def type_hint(self, model: ModelConfig) -> str:
        """Extra words for the config error when this backend cannot serve the
        model's type (e.g. which key would make it able to)."""
        return ""

    def rewrite_model(self, model: ModelConfig, launch_path: Path) -> str | None:
        """The ``model`` value the backend insists on, or None to forward bodies untouched."""
        return None

    def env(self, base: Mapping[str, str], model: ModelConfig, marker: str) -> dict[str, str]:
        env = {k: v for k, v in base.items() if not _SCRUBBED.match(k)}
        env.update(model.env)
        env[MARKER_ENV] = marker
        env[MODEL_ENV] = model.name
        return env

    def is_bind_failure(self, stderr_tail: list[str]) -> bool:
        text = "\n".join(stderr_tail).lower()
        return any(marker in text for marker in self.bind_failure_markers)


def rewrite_json_model(
    body: bytes,
    parsed: dict[str, Any],
    value: str | None,
    defaults: Mapping[str, Any] | None = None,
    drop: frozenset[str] = frozenset(),
) -> bytes:
    """``body`` with ``model`` set to ``value`` (None: kept), ``defaults``
    filled in where absent and the ``drop`` fields removed (dynllm's own
    request settings); the original bytes when nothing changes."""
    changes = {k: v for k, v in (defaults or {}).items() if k not in parsed}
    if value is not None and parsed.get("model") != value:
        changes["model"] = value
    dropped = drop.intersection(parsed)
    if not changes and not dropped:
        return body
    kept = {k: v for k, v in parsed.items() if k not in dropped} if dropped else parsed
    return json.dumps({**kept, **changes}).encode()
