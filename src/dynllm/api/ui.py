"""The dashboard: static files under ``dynllm/ui``, served at ``/ui``.

The page holds no data: it asks the admin routes for everything, with the
admin key the user types (kept in the tab's sessionStorage, sent as
``Authorization: Bearer``).  So ``/ui`` itself is public (``api.access``): a
browser's navigation cannot carry a Bearer header.

Only the files found in the folder when the app is built can be served, by
exact name: a request path is looked up in that table and never joined to a
file-system path, so ``/ui/../config.yaml`` or ``/ui/%2e%2e/x`` finds nothing
(404).  The files are read once, here (they are a few kilobytes), so serving
them costs no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import RedirectResponse, Response

UI_PATH = "/ui"
INDEX = "index.html"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

# The page runs only its own script and talks only to this origin: an
# injected <script> or a request to another host (say, carrying the admin key
# away) is refused by the browser, and no other site may frame the page.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Always revalidate: after an upgrade the browser must not mix an old
    # app.js with a new page.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str


def read_assets() -> dict[str, Asset]:
    """Every file of the ``dynllm.ui`` folder whose kind is known, by name."""
    assets = {}
    for entry in resources.files("dynllm").joinpath("ui").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            assets[entry.name] = Asset(entry.read_bytes(), CONTENT_TYPES[suffix])
    return assets


def install(app: FastAPI) -> None:
    assets = read_assets()
    router = APIRouter(include_in_schema=False)

    def answer(name: str) -> Response:
        asset = assets.get(name)
        if asset is None:
            raise HTTPException(404)  # "Unknown route", like any other path
        return Response(asset.body, media_type=asset.content_type, headers=HEADERS)

    @router.get("/")
    async def root() -> RedirectResponse:
        # The address people type first: it used to be a 404.
        return RedirectResponse(UI_PATH, status_code=307)

    @router.get(UI_PATH)
    async def page() -> Response:
        return answer(INDEX)

    @router.get(UI_PATH + "/{name}")
    async def asset(name: str) -> Response:
        return answer(name)

    app.include_router(router)
