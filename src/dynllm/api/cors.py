"""Cross-origin requests from web pages (CORS), off unless ``cors_origins`` is set.

A web chat served from another origin (``https://chat.example``) may call the
model routes only when its origin is listed (or ``*`` is).  Then the front
answers its preflights and adds ``Access-Control-Allow-Origin`` to the
answers it gets.  Keys travel as ``Authorization`` headers, never as
cookies, so credentials are never allowed (``*`` stays safe).

Admin routes never answer cross-origin, listed origin or not: a request a
browser marks as coming from another site (``Sec-Fetch-Site``) or whose
``Origin`` is not the address it was sent to is refused before any handler
(``Access.check``), and their preflights get no CORS headers.

Requests without an ``Origin`` (curl, SDKs, the same page) pass untouched,
so the hot path pays one header scan and nothing per message.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import Message, Scope, Send

from dynllm.api.bodies import header

PREFLIGHT_MAX_AGE_SECONDS = 600
ALLOWED_METHODS = b"GET, POST, OPTIONS"
# What browsers may send besides the CORS-safelisted headers.
ALLOWED_HEADERS = b"authorization, content-type, x-api-key, openai-beta, openai-organization"
# Backend headers a page may read (Retry-After on 503s, rate limits).
EXPOSED_HEADERS = b"retry-after, x-request-id"


def _normal(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def is_preflight(scope: Scope) -> bool:
    return (
        scope["method"] == "OPTIONS"
        and header(scope, b"origin") is not None
        and header(scope, b"access-control-request-method") is not None
    )


def is_cross_origin(scope: Scope) -> bool:
    """Whether a browser sent this request from a page of another origin."""
    site = header(scope, b"sec-fetch-site")
    if site is not None and site.strip().lower() in (b"cross-site", b"same-site"):
        return True
    origin = header(scope, b"origin")
    if origin is None:
        return False  # not from a browser page, or a same-origin GET
    host = header(scope, b"host")
    _, _, authority = origin.decode("latin-1").partition("://")
    return host is None or _normal(authority) != _normal(host.decode("latin-1"))


class Cors:
    """The configured origins; ``None`` of this class means CORS is off."""

    def __init__(self, origins: Iterable[str]) -> None:
        listed = [_normal(o) for o in origins]
        self.any = "*" in listed
        self.origins = frozenset(o for o in listed if o != "*")

    @classmethod
    def from_config(cls, origins: list[str]) -> Cors | None:
        return cls(origins) if origins else None

    def allowed(self, origin: bytes) -> bool:
        return self.any or _normal(origin.decode("latin-1")) in self.origins

    def _allow_origin(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        value = b"*" if self.any else origin
        return [(b"access-control-allow-origin", value), (b"vary", b"Origin")]

    def preflight_headers(self, scope: Scope) -> list[tuple[bytes, bytes]] | None:
        """The answer headers to a preflight from a listed origin, else None."""
        origin = header(scope, b"origin")
        if origin is None or not self.allowed(origin):
            return None
        return [
            *self._allow_origin(origin),
            (b"access-control-allow-methods", ALLOWED_METHODS),
            (b"access-control-allow-headers", ALLOWED_HEADERS),
            (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_SECONDS).encode()),
        ]

    def wrap(self, scope: Scope, send: Send) -> Send:
        """``send`` that adds the CORS headers to the answer when the request
        comes from a listed origin; ``send`` itself otherwise."""
        origin = header(scope, b"origin")
        if origin is None or not self.allowed(origin):
            return send
        extra = [*self._allow_origin(origin), (b"access-control-expose-headers", EXPOSED_HEADERS)]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if not k.lower().startswith(b"access-control-")
                ]
                message = {**message, "headers": [*kept, *extra]}
            await send(message)

        return send_with_cors
