"""Structured logs: one JSON object per line, one line per request.

``log_config(level)`` is the logging configuration ``labelq serve`` hands to
uvicorn (its own loggers included, so every line on stderr is JSON; uvicorn's
access log is replaced by :func:`log_request`). The request id comes from the
client's ``X-Request-ID`` header when it is a sane token, else it is generated;
:mod:`service.metrics` echoes it in the response and sets :data:`request_id`
for the request's duration, so every line logged while handling a request
carries it. Request lines hold sizes and timings, never labels or
probabilities.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

ACCESS_LOGGER = "labelq.access"
REQUEST_ID_HEADER = "x-request-id"

#: The current request's id, set by the request middleware (None outside a request).
request_id: ContextVar[str | None] = ContextVar("labelq_request_id", default=None)

# What a client may send as its own request id: a token, no spaces or quotes.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")

# LogRecord's own attributes: everything else on a record is an `extra`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_SKIP_EXTRAS = frozenset({"color_message"})  # uvicorn's ANSI-coloured copy of the message


def new_request_id(incoming: str | None) -> str:
    """The client's id if it is a token of at most 128 characters, else a new one."""
    if incoming and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``pid``,
    ``message``, the current ``request_id``, any ``extra`` fields, and ``exc`` with the
    traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            out["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in _SKIP_EXTRAS:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def log_config(level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn's ``log_config``: JSON lines
    on stderr for labelq's and uvicorn's loggers, at ``level``."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "service.logs.JsonFormatter"}},
        "handlers": {"stderr": handler},
        "loggers": {
            "labelq": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


_access = logging.getLogger(ACCESS_LOGGER)


def log_request(**fields: Any) -> None:
    """The request's one line (``message`` "request"), with ``fields`` as keys:
    method, route, status, duration_s, body_bytes and, for /find-issues, n, k,
    filter_by, flagged and dataset."""
    _access.info("request", extra=fields)
