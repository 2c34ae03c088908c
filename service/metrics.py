"""Prometheus metrics: definitions, the request middleware, and multiprocess mode.

Every app gets its own :class:`Metrics` on a fresh ``CollectorRegistry`` (tests
create as many as they like). With several worker processes ``labelq serve``
sets ``PROMETHEUS_MULTIPROC_DIR`` (see :func:`multiprocess_dir`) before the
workers start, prometheus-client then keeps every value in a per-process file
there, and a scrape of any worker merges all of them: counters and histograms
add up across workers, gauges are merged by the mode given with each.

:class:`RequestObserver` wraps the whole ASGI app, so it sees every request
with its final status (404/405 from routing and unhandled errors included):
it counts and times requests by route *template*, keeps the in-flight gauge,
measures body bytes, echoes the request id and writes the request's log line.
The /find-issues worker reports what only it knows with :func:`observe_result`.

Label cardinality is bounded by construction: routes are templates (unmatched
paths are one value), HTTP methods outside the standard ones are ``other``,
``filter_by`` values are validated before they are observed, and dataset tags
fold into ``other`` (see :class:`DatasetTags`).
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numba
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service import __version__, logs
from service.settings import DATASET_TAG

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DATASET_HEADER = "x-labelq-dataset"
UNMATCHED = "unmatched"  # the route label of requests no route matched (404s)
NO_DATASET, OTHER_DATASET = "none", "other"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# No `_created` series: multiprocess mode cannot provide them, so a scrape looks
# the same with one worker or several (process-wide switch of prometheus-client).
disable_created_metrics()

# Sub-millisecond (health, metrics, small JSON) to tens of seconds (10^8 cells).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
KERNEL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BODY_BUCKETS = tuple(float(4**i) for i in range(5, 16))  # 1 KiB to 1 GiB, x4
EXAMPLES_BUCKETS = (10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8)
CLASSES_BUCKETS = (2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 10000)
RATIO_BUCKETS = (0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1)


def multiprocess_enabled() -> bool:
    """True when prometheus-client keeps values in files (``PROMETHEUS_MULTIPROC_DIR``
    was set before it was imported)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False)) and bool(os.environ.get(MULTIPROC_ENV))


class DatasetTags:
    """Fold ``X-Labelq-Dataset`` values into a bounded set of label values.

    With an allow-list, only its tags are kept. Without one, the first
    ``limit`` distinct well-formed tags this process sees are kept. Everything
    else is ``other``; no header is ``none``. (With several workers each
    admits its own first ``limit``: set an allow-list for an exact set.)
    """

    def __init__(self, allowed: Iterable[str] = (), limit: int = 20) -> None:
        self.allowed = frozenset(allowed)
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        value = (value or "").strip()
        if not value:
            return NO_DATASET
        if value in self.allowed:
            return value
        if self.allowed or value in (NO_DATASET, OTHER_DATASET) or not DATASET_TAG.fullmatch(value):
            return OTHER_DATASET
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER_DATASET


class Metrics:
    """labelq's metrics, registered on ``registry`` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None, dataset_tags: DatasetTags | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.dataset_tags = dataset_tags or DatasetTags()
        self.requests = Counter(
            "labelq_requests_total",
            "HTTP requests, by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "labelq_request_duration_seconds",
            "Time from request start to the end of the response.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_body = Histogram(
            "labelq_request_body_bytes",
            "Request body bytes received (POST, PUT, PATCH).",
            ["route"],
            buckets=BODY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "labelq_requests_in_flight", "Requests being handled now.", registry=r, multiprocess_mode="livesum"
        )
        self.examples = Histogram(
            "labelq_examples_per_request",
            "N, the examples in a /find-issues request answered 200.",
            ["dataset"],
            buckets=EXAMPLES_BUCKETS,
            registry=r,
        )
        self.classes = Histogram(
            "labelq_classes_per_request",
            "K, the classes in a /find-issues request answered 200.",
            ["dataset"],
            buckets=CLASSES_BUCKETS,
            registry=r,
        )
        self.kernel = Histogram(
            "labelq_kernel_duration_seconds",
            "Time in the kernels per /find-issues request (includes waiting for the process's kernel lock).",
            ["filter_by"],
            buckets=KERNEL_BUCKETS,
            registry=r,
        )
        self.flagged_ratio = Histogram(
            "labelq_flagged_ratio",
            "Fraction of a request's examples flagged as label issues.",
            ["dataset", "filter_by"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.warmup_complete = Gauge(
            "labelq_warmup_complete",
            "1 once the kernels are compiled or loaded (the minimum over live workers).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.warmup_duration = Gauge(
            "labelq_warmup_duration_seconds",
            "How long the warm-up took (the maximum over live workers).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info = Gauge(
            "labelq_build_info",
            "Always 1; the labels give the versions.",
            ["version", "numba", "numpy", "python"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info.labels(__version__, numba.__version__, np.__version__, platform.python_version()).set(1)

    def warmed_up(self, seconds: float) -> None:
        self.warmup_duration.set(seconds)
        self.warmup_complete.set(1)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) of a scrape, in the format ``accept`` asks for
        (Prometheus text by default, OpenMetrics on request). In multiprocess
        mode: every worker's values, merged."""
        encode, content_type = choose_encoder(accept or "")
        if multiprocess_enabled():
            path = os.environ[MULTIPROC_ENV]
            mark_dead_workers(path)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=path)
            return encode(registry), content_type
        return encode(self.registry), content_type

    def process_exiting(self) -> None:
        """Drop this process's live gauges from the merged view (multiprocess mode)."""
        if multiprocess_enabled():
            mark_process_dead(os.getpid(), os.environ[MULTIPROC_ENV])


# --------------------------------------------------------------------------
# Per-request observation
# --------------------------------------------------------------------------


@dataclass
class _Request:
    metrics: Metrics
    dataset_header: str | None
    fields: dict[str, Any] = field(default_factory=dict)


_current: ContextVar[_Request | None] = ContextVar("labelq_request", default=None)


def observe_result(*, filter_by: str, n: int, k: int, flagged: int, kernel_seconds: float) -> None:
    """Record a /find-issues result for the current request (its metrics, its
    log line). Callable from the request's worker thread; a no-op outside a
    request."""
    req = _current.get()
    if req is None:
        return
    m = req.metrics
    ds = m.dataset_tags(req.dataset_header)  # only results admit new tags, not failed or other requests
    m.examples.labels(ds).observe(n)
    m.classes.labels(ds).observe(k)
    m.kernel.labels(filter_by).observe(kernel_seconds)
    m.flagged_ratio.labels(ds, filter_by).observe(flagged / n if n else 0.0)
    req.fields.update(n=n, k=k, filter_by=filter_by, flagged=flagged, dataset=ds)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class RequestObserver:
    """ASGI middleware around the whole app: request metrics, request id, log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        rid = logs.new_request_id(_header(scope, logs.REQUEST_ID_HEADER.encode()))
        req = _Request(m, _header(scope, DATASET_HEADER.encode()))
        status = 500  # unless a response starts
        body_bytes = 0

        async def counting_receive() -> Any:
            nonlocal body_bytes
            message = await receive()
            if message["type"] == "http.request":
                body_bytes += len(message.get("body", b""))
            return message

        async def tagging_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid.encode())]
            await send(message)

        rid_token = logs.request_id.set(rid)
        req_token = _current.set(req)
        m.in_flight.inc()
        t0 = time.perf_counter()
        try:
            await self.app(scope, counting_receive, tagging_send)  # type: ignore[arg-type]
        finally:
            duration = time.perf_counter() - t0
            m.in_flight.dec()
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = scope.get("path_template") or UNMATCHED  # set by litestar's router on a match
            m.requests.labels(route, method, str(status)).inc()
            m.request_duration.labels(route, method).observe(duration)
            if method in _BODY_METHODS:
                m.request_body.labels(route).observe(body_bytes)
            logs.log_request(
                method=method,
                route=route,
                status=status,
                duration_s=round(duration, 6),
                body_bytes=body_bytes,
                **req.fields,
            )
            _current.reset(req_token)
            logs.request_id.reset(rid_token)


# --------------------------------------------------------------------------
# Multiprocess mode (labelq serve --workers N)
# --------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_dead_workers(path: str) -> None:
    """Drop the live gauges of worker processes that are gone (crashed or
    replaced), so in-flight and warm-up gauges count live workers only.
    Counters and histograms of dead workers stay: totals never go down."""
    pids = set()
    for f in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        tail = os.path.basename(f)[: -len(".db")].rsplit("_", 1)[-1]
        if tail.isdigit():
            pids.add(int(tail))
    for pid in pids:
        if not _pid_alive(pid):
            mark_process_dead(pid, path)


@contextmanager
def multiprocess_dir() -> Iterator[str]:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` for worker processes started inside.

    An existing directory given in the environment is emptied of metric files
    (values of a previous run must not be added to this one's); otherwise a
    temporary directory is made, and removed on exit.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for f in glob.glob(os.path.join(given, "*.db")):
            os.remove(f)
        yield given
        return
    path = tempfile.mkdtemp(prefix="labelq-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)
