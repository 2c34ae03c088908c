"""Optional API-key authentication (``Authorization: Bearer <key>``).

When keys are configured (``LABELQ_API_KEYS``, ``LABELQ_API_KEYS_FILE``),
:class:`BearerAuthMiddleware` runs app-wide, after routing and before any
handler: every route requires a valid key except those in :data:`OPEN_PATHS`
(the probes and the metrics, which orchestrators and Prometheus call without
credentials) and :data:`PAGE_PATHS` (the report page and its static files,
which hold no data: the page sends the key a person types into it with its
API calls, and a browser could not send one to load the page itself). Routes
added later are protected by default; opening one means adding its path
template here.

Keys are kept only as SHA-256 digests and a presented token is compared with
every one of them with :func:`hmac.compare_digest` (same-length digests, no
early exit), so the time taken says nothing about the keys. Neither keys nor
the ``Authorization`` header are ever logged (the access log has fixed fields,
see :mod:`service.logs`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from service import report
from service.errors import Unauthorized

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.types import ASGIApp, Receive, Scope, Send

#: Route templates open without a key: the probes and the metrics.
OPEN_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})
#: The report page and its static files, open too (no data in them; see the module's docstring).
PAGE_PATHS = frozenset({"/", *(f"/report/{name}" for name in report.ASSETS)})
#: The name of the security scheme in the OpenAPI schema.
SCHEME = "bearerAuth"
REALM = 'Bearer realm="labelq"'


class ApiKeys:
    """A set of API keys, checked in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(k) for k in keys)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._digests)} keys>)"

    def check(self, token: str) -> bool:
        given = _digest(token)
        ok = False
        for digest in self._digests:  # every key, whatever matched before
            ok |= hmac.compare_digest(digest, given)
        return ok


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def bearer_token(scope: Scope) -> str | None:
    """The token of the request's ``Authorization: Bearer <token>`` header (scheme case-insensitive), or None."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def is_open(path_template: str) -> bool:
    """Whether a route (by its path template) is served without a key."""
    return path_template in OPEN_PATHS or path_template in PAGE_PATHS


class BearerAuthMiddleware:
    """Litestar middleware (app-wide): 401 problem+json with ``WWW-Authenticate: Bearer``
    for a request without a valid key to any route but :data:`OPEN_PATHS` and :data:`PAGE_PATHS`."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not is_open(scope.get("path_template", "")):
            token = bearer_token(scope)
            if token is None:
                raise Unauthorized(
                    "this service requires an API key: send `Authorization: Bearer <key>`",
                    "Authorization",
                    headers={"WWW-Authenticate": REALM},
                )
            if not self.keys.check(token):
                raise Unauthorized(
                    "the API key is not valid",
                    "Authorization",
                    headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
                )
        await self.app(scope, receive, send)


def document(app: Litestar) -> None:
    """Declare the bearer scheme in the app's OpenAPI schema: required by
    every operation but the open ones, each of which also documents a 401."""
    from litestar.openapi.spec import Components, OpenAPIMediaType, OpenAPIResponse, Reference, SecurityScheme

    schema = app.openapi_schema
    if schema.components is None:  # pragma: no cover - the app always has components
        schema.components = Components()
    schema.components.security_schemes = {
        **(schema.components.security_schemes or {}),
        SCHEME: SecurityScheme(
            type="http",
            scheme="bearer",
            description="An API key of the service (LABELQ_API_KEYS, LABELQ_API_KEYS_FILE).",
        ),
    }
    schema.security = [{SCHEME: []}]
    unauthorized = OpenAPIResponse(
        description="No API key, or not a valid one (`WWW-Authenticate: Bearer`).",
        content={"application/problem+json": OpenAPIMediaType(schema=Reference(ref="#/components/schemas/Problem"))},
    )
    for path, item in (schema.paths or {}).items():
        for method in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
            operation: Any = getattr(item, method, None)
            if operation is None:
                continue
            if is_open(path):
                operation.security = []
            else:
                operation.responses = {**(operation.responses or {}), "401": unauthorized}
