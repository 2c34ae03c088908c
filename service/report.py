"""The interactive label-quality report: ``GET /`` and its static files.

A single page (``service/static/``: plain HTML, CSS and JavaScript modules, no
build step) that reads an npz or JSON dataset in the browser and shows what the
service's own endpoints answer for it: the confident joint as a heatmap, the
per-class health table, the categories, and the flagged examples. Everything it
loads comes from this service: the page's Content-Security-Policy allows no
other origin, so nothing is fetched from outside at run time.

The page and its files are public (they hold no data); the data go to the API
routes, with the ``Authorization: Bearer`` key a person types into the page
when the API wants one. ``LABELQ_REPORT_PAGE=false`` leaves these routes out.
"""

from __future__ import annotations

from importlib import resources

from litestar import Response, get
from litestar.handlers import HTTPRouteHandler

#: The files under ``service/static/`` served at ``/report/<name>``, with their media types.
ASSETS: dict[str, str] = {
    "report.css": "text/css",
    "report.js": "text/javascript",
    "npz.js": "text/javascript",
}
PAGE = "index.html"

#: Only this origin, for everything: scripts, styles, fetches. ``data:`` images for the empty favicon;
#: ``blob:`` is not needed (CSV downloads navigate to a blob URL, which no fetch directive governs).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # small files that change with the package: revalidate rather than serve a stale page
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return (resources.files("service") / "static" / name).read_bytes()


def route_handlers() -> list[HTTPRouteHandler]:
    """The page's routes: ``/`` and one per file in :data:`ASSETS`. The files are read once, here:
    they ship in the package. (litestar adds ``charset=utf-8`` to the ``text/*`` media types.)"""

    def handler(path: str, content: bytes, media: str, name: str) -> HTTPRouteHandler:
        @get(path, include_in_schema=False, sync_to_thread=False, name=name)
        def static_file() -> Response:
            return Response(content=content, media_type=media, headers=_HEADERS)

        return static_file

    handlers = [handler("/", _read(PAGE), "text/html", "report-page")]
    handlers += [handler(f"/report/{file}", _read(file), media, f"report-{file}") for file, media in ASSETS.items()]
    return handlers
