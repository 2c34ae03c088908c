"""The service's domain errors. The HTTP layer maps them to RFC 9457 problems."""

from __future__ import annotations


class LabelqError(Exception):
    """Base class of every error this package raises on purpose."""

    status = 500
    title = "Internal error"
    type = "about:blank"

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


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
