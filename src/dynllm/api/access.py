"""Who may call what: API keys, admin keys, and admin routes kept to loopback.

Every HTTP request passes ``Access.check`` in the front, before any handler.
Routes fall in three classes, decided by path alone:

    public     /health, /v2/health/live, /v2/health/ready,  never need a key
               /, /ui and /ui/NAME (the dashboard's files)
    admin      /admin/..., /metrics, XandRouting's           an admin key; with none
               /v1/models/{inventory,loaded,stats,unload,   configured, loopback clients only
               unload-all,download[/ID],verify-repo}
    inference  everything else (the /v1 and /v2 APIs,        a key when any key is configured
               /docs, /openapi.json)

Before keys, two browser defences: while dynllm listens on loopback only, a
request whose ``Host`` is not a loopback name or address (nor in
``allowed_hosts``) gets 421, so a web page cannot reach it by DNS rebinding;
an admin POST with a body must carry a JSON content type (415), so a cross-origin
"simple" request (``text/plain``, no preflight) cannot change anything; and
an admin request a browser sent from another origin is refused (403) whatever
``cors_origins`` says.  The model routes check their own content types
(``api.dispatch``); CORS preflights pass here without a key (browsers never
send one on them) and are answered by the front (``api.cors``).

A key travels as ``Authorization: Bearer KEY`` or ``x-api-key: KEY``.  Keys
are compared in constant time against every configured key, and never
appear in a log line or an error body.  The client's key is never forwarded
to a backend (see ``proxy.request_headers``).
"""

from __future__ import annotations

import hmac
import ipaddress
from enum import Enum

from starlette.types import Scope

from dynllm.api.bodies import header
from dynllm.api.cors import is_cross_origin, is_preflight
from dynllm.config import Config
from dynllm.errors import (
    DynllmError,
    Forbidden,
    MisdirectedRequest,
    Unauthorized,
    UnsupportedMediaType,
)

PUBLIC_PATHS = frozenset({"/", "/health", "/v2/health/live", "/v2/health/ready"})
# The dashboard's page and files: no data in them (it comes from admin routes,
# with the key the user types), and a browser's navigation sends no key.
UI_PREFIX = "/ui"
ADMIN_PREFIX = "/admin"
# Prometheus metrics: model names, traffic and VRAM are the admin's business;
# XandRouting's management routes under /v1/models (files on disk, downloads,
# unloading) too.
ADMIN_PATHS = frozenset(
    {
        "/metrics",
        "/v1/models/inventory",
        "/v1/models/loaded",
        "/v1/models/stats",
        "/v1/models/unload",
        "/v1/models/unload-all",
        "/v1/models/download",
        "/v1/models/verify-repo",
    }
)
DOWNLOAD_JOB_PREFIX = "/v1/models/download/"
REMOTE_ADMIN_HINT = (
    "Admin routes answer only clients on this machine while no admin key is set; "
    "set admin_api_keys in the config (or DYNLLM_ADMIN_API_KEYS) to manage dynllm remotely"
)

CROSS_ORIGIN_ADMIN = "Admin routes do not answer requests from other web pages (cross-origin)"


class RouteClass(Enum):
    PUBLIC = "public"
    ADMIN = "admin"
    INFERENCE = "inference"


def classify(path: str) -> RouteClass:
    if path in PUBLIC_PATHS or is_ui_file(path):
        return RouteClass.PUBLIC
    if (
        path == ADMIN_PREFIX
        or path.startswith((ADMIN_PREFIX + "/", DOWNLOAD_JOB_PREFIX))
        or path in ADMIN_PATHS
    ):
        return RouteClass.ADMIN
    return RouteClass.INFERENCE


def is_ui_file(path: str) -> bool:
    """``/ui`` or ``/ui/NAME``: no deeper path is public, so no spelling of
    ``/ui/../admin`` could ever reach another route as public."""
    if path == UI_PREFIX:
        return True
    name = path.removeprefix(UI_PREFIX + "/")
    return name != path and "/" not in name and ".." not in name


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")


def presented_key(scope: Scope) -> bytes | None:
    """The key a request carries, from ``Authorization: Bearer`` or ``x-api-key``."""
    for name, value in scope["headers"]:
        name = name.lower()
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return bytes(token.strip())
        elif name == b"x-api-key" and value.strip():
            return bytes(value.strip())
    return None


def host_name(scope: Scope) -> str | None:
    """The request's Host without its port (IPv6 brackets removed), lower case."""
    for name, value in scope["headers"]:
        if name.lower() == b"host":
            host = str(value.decode("latin-1")).strip().lower()
            if host.startswith("["):
                return host[1:].split("]", 1)[0]
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return None


def is_json(content_type: bytes | None) -> bool:
    kind = (content_type or b"").split(b";", 1)[0].strip().lower()
    return kind == b"application/json" or (
        kind.startswith(b"application/") and kind.endswith(b"+json")
    )


def _bodyless(scope: Scope) -> bool:
    """A POST without any body or content type (``curl -X POST .../unload-all``):
    it carries nothing a cross-origin form could have chosen, and a browser
    sending it from another page is refused by the cross-origin check first."""
    if header(scope, b"content-type") is not None or header(scope, b"transfer-encoding"):
        return False
    length = header(scope, b"content-length")
    return length is None or length.strip() == b"0"


def _matches(key: bytes, keys: tuple[bytes, ...]) -> bool:
    # Every key is compared (no early exit), each in constant time.
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key, candidate)
    return found


class Access:
    def __init__(self, config: Config) -> None:
        self.admin_keys = tuple(k.encode() for k in config.admin_api_keys)
        self.keys = tuple(k.encode() for k in config.api_keys) + self.admin_keys
        self.enabled = bool(self.keys)
        self.check_host = is_loopback(config.server.host)
        self.allowed_hosts = frozenset(h.lower() for h in config.allowed_hosts)

    def check(self, scope: Scope) -> DynllmError | None:
        """None if the request may go on, else the error to answer with."""
        if self.check_host:
            host = host_name(scope)
            if host is not None and not (is_loopback(host) or host in self.allowed_hosts):
                return MisdirectedRequest(
                    f"dynllm listens on this machine only and does not answer for the host "
                    f"'{host}'; add it to allowed_hosts if it is meant to"
                )
        kind = classify(scope["path"])
        if kind is RouteClass.ADMIN and is_cross_origin(scope):
            return Forbidden(CROSS_ORIGIN_ADMIN)
        if kind is not RouteClass.ADMIN and is_preflight(scope):
            return None  # browsers send no key on a preflight; the front answers it
        if (
            kind is RouteClass.ADMIN
            and scope["method"] == "POST"
            and not is_json(header(scope, b"content-type"))
            and not _bodyless(scope)
        ):
            return UnsupportedMediaType("Admin requests need 'Content-Type: application/json'")
        if kind is RouteClass.PUBLIC or (kind is RouteClass.INFERENCE and not self.enabled):
            return None
        if self.enabled:
            key = presented_key(scope)
            if key is None:
                return Unauthorized(
                    "This dynllm needs an API key: send 'Authorization: Bearer KEY' "
                    "or 'x-api-key: KEY'"
                )
            if not _matches(key, self.keys):
                return Unauthorized("The API key is not valid")
            if kind is RouteClass.INFERENCE:
                return None
            if self.admin_keys:
                if _matches(key, self.admin_keys):
                    return None
                return Forbidden("This route needs an admin key (admin_api_keys)")
        # An admin route and no admin key configured: this machine only.
        client = scope.get("client")
        if client is not None and is_loopback(str(client[0])):
            return None
        return Forbidden(REMOTE_ADMIN_HINT)
