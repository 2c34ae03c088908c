"""The service's domain errors. The HTTP layer maps them to RFC 9457 problems."""

from __future__ import annotations


class LabelqError(Exception):
    """Base class of every error this package raises on purpose."""

    status = 500
    title = "Internal error"
    type = "about:blank"

    def __init__(self, detail: str, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        #: Response headers the problem comes with (``Retry-After``, ``WWW-Authenticate``).
        self.headers: dict[str, str] = dict(headers or {})


class InputError(LabelqError, ValueError):
    """The request's data or options are invalid: a 422 over HTTP."""

    status = 422
    title = "Invalid input"
    type = "https://labelq.invalid/problems/invalid-input"


class PayloadTooLarge(LabelqError):
    """The request is larger than the configured limits: a 413 over HTTP."""

    status = 413
    title = "Payload too large"
    type = "https://labelq.invalid/problems/payload-too-large"


class UnsupportedMediaType(LabelqError):
    """The request's Content-Type is not one we read: a 415 over HTTP."""

    status = 415
    title = "Unsupported media type"
    type = "https://labelq.invalid/problems/unsupported-media-type"


class Unauthorized(LabelqError):
    """No valid API key (when keys are configured): a 401 over HTTP."""

    status = 401
    title = "Unauthorized"
    type = "https://labelq.invalid/problems/unauthorized"


class Overloaded(LabelqError):
    """The process cannot take the request now (memory budget in use, or its
    kernels could not start in time): a 503 with ``Retry-After``."""

    status = 503
    title = "Service overloaded"
    type = "https://labelq.invalid/problems/overloaded"


class KernelTimeout(Overloaded):
    """The request's kernels could not start within the request timeout: a 503 with ``Retry-After``."""

    title = "Timed out waiting for the kernels"
    type = "https://labelq.invalid/problems/kernel-timeout"
