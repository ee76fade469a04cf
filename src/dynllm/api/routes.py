"""The forwarding routes as one table, and the matcher the front uses.

Each row says which methods it takes, where the model name is (a JSON body
field, a multipart form field, or a URL path segment), how the body travels
(parsed JSON, multipart spooled through, raw bytes, none), which API family
it belongs to, and which error shape its clients expect.  One dispatcher
(``api.dispatch``) serves every row.

Static paths are one dict lookup.  KServe v2 paths carry the model name (and
an optional version) inside the URL; they are parsed from the right, so a
model name may itself contain ``/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from urllib.parse import quote

from dynllm.errors import Shape
from dynllm.registry import ApiFamily


class ModelAt(Enum):
    JSON = auto()  # the body's "model" field
    FORM = auto()  # the multipart form's "model" field
    PATH = auto()  # /v2/models/{name}[/versions/{v}]...


class Body(Enum):
    JSON = auto()  # read whole, parsed once for "model"
    MULTIPART = auto()  # spooled to memory/disk while the "model" field is found
    RAW = auto()  # bytes as they came (KServe binary extension included)
    NONE = auto()


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    methods: frozenset[str]
    model_at: ModelAt
    body: Body
    family: ApiFamily
    shape: Shape = Shape.OPENAI
    suffix: str = ""
    """KServe only: what follows ``/v2/models/{name}[/versions/{v}]``."""

    @property
    def allow(self) -> str:
        return ", ".join(sorted(self.methods))


def _json(path: str, family: ApiFamily) -> Route:
    return Route(path, frozenset({"POST"}), ModelAt.JSON, Body.JSON, family)


POST, GET = frozenset({"POST"}), frozenset({"GET"})

ROUTES: tuple[Route, ...] = (
    _json("/v1/chat/completions", ApiFamily.CHAT),
    _json("/v1/completions", ApiFamily.COMPLETIONS),
    _json("/v1/responses", ApiFamily.RESPONSES),
    _json("/v1/embeddings", ApiFamily.EMBEDDINGS),
    _json("/v1/rerank", ApiFamily.RERANK),
    _json("/rerank", ApiFamily.RERANK),
    _json("/v1/audio/speech", ApiFamily.SPEECH),
    _json("/v1/images/generations", ApiFamily.IMAGES),
    Route("/v1/audio/transcriptions", POST, ModelAt.FORM, Body.MULTIPART, ApiFamily.TRANSCRIPTION),
    Route("/v1/audio/translations", POST, ModelAt.FORM, Body.MULTIPART, ApiFamily.TRANSLATION),
    # KServe v2 routes that reach a backend (loading it on demand).  The model
    # readiness route is answered by dynllm itself (api.kserve), never forwarded.
    Route("/v2/models/{name}", GET, ModelAt.PATH, Body.NONE, ApiFamily.KSERVE, Shape.KSERVE),
    Route(
        "/v2/models/{name}/infer",
        POST,
        ModelAt.PATH,
        Body.RAW,
        ApiFamily.KSERVE,
        Shape.KSERVE,
        suffix="/infer",
    ),
)
BY_PATH: dict[str, Route] = {r.path: r for r in ROUTES if r.model_at is not ModelAt.PATH}
KSERVE_PREFIX = "/v2/models/"
KSERVE_METADATA, KSERVE_INFER = (r for r in ROUTES if r.model_at is ModelAt.PATH)
READY_SUFFIX = "/ready"


@dataclass(frozen=True, slots=True)
class KServePath:
    """``/v2/models/{name}[/versions/{version}]{suffix}`` taken apart."""

    name: str
    version: str | None
    suffix: str  # "", "/ready" or "/infer"

    @property
    def model_part(self) -> str:
        """What follows the name in the backend's URL (the version, the suffix).

        The version came percent-decoded from the client's URL, so it is
        encoded again: a ``?`` or ``#`` in it made the rest a query or a
        fragment (``/versions/1%3F/infer`` reached the backend as
        ``/versions/1?/infer``), and a ``%2F`` a path separator."""
        if not self.version:
            return self.suffix
        return f"/versions/{quote(self.version, safe='', errors='surrogatepass')}{self.suffix}"


def parse_kserve(path: str) -> KServePath | None:
    """The parts of a KServe model URL, or None if ``path`` is not one."""
    if not path.startswith(KSERVE_PREFIX):
        return None
    rest = path[len(KSERVE_PREFIX) :]
    suffix = ""
    for candidate in ("/infer", READY_SUFFIX):
        if rest.endswith(candidate):
            rest, suffix = rest[: -len(candidate)], candidate
            break
    version = None
    head, sep, tail = rest.rpartition("/versions/")
    if sep and tail and "/" not in tail:
        rest, version = head, tail
    if not rest:
        return None
    return KServePath(rest, version, suffix)
