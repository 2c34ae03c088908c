"""The HTTP layer: a thin litestar app over :mod:`service.core`.

``create_app(settings)`` builds the app. Handlers decode the body, call the
in-process API in a worker thread (the kernels are CPU-bound and must not
block the event loop), and encode the result once with orjson. Every error
becomes an RFC 9457 problem (``application/problem+json``) naming the field.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import numpy as np
import orjson
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    Operation,
    Reference,
    RequestBody,
)

from service import __version__, core, health, metrics, npz, report
from service import auth, batched, jsonkeys, limits
from service.errors import InputError, LabelqError, PayloadTooLarge, UnsupportedMediaType
from service.schemas import (
    DatasetHealthRequest,
    FindIssuesRequest,
    OutOfDistributionRequest,
    openapi_components,
)
from service.settings import Settings, available_cpus

log = logging.getLogger("labelq")

JSON = "application/json"
NPZ = npz.MEDIA_TYPE
PROBLEM_JSON = "application/problem+json"


# --------------------------------------------------------------------------
# Errors -> RFC 9457 problems
# --------------------------------------------------------------------------


def problem(status: int, title: str, detail: str, field: str | None = None, type_: str = "about:blank") -> Response:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    if field is not None:
        body["field"] = field
    return Response(content=orjson.dumps(body), status_code=status, media_type=PROBLEM_JSON)


def _labelq_error(_: Request, exc: LabelqError) -> Response:
    response = problem(exc.status, exc.title, exc.detail, exc.field, exc.type)
    response.headers.update(exc.headers)  # Retry-After, WWW-Authenticate
    return response


def _http_error(_: Request, exc: HTTPException) -> Response:
    title = {404: "Not found", 405: "Method not allowed", 413: "Payload too large"}.get(exc.status_code, "Error")
    field = "body" if exc.status_code == 413 else None
    response = problem(exc.status_code, title, str(exc.detail), field)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def _unexpected_error(_: Request, exc: Exception) -> Response:
    log.exception("unexpected error", exc_info=exc)
    return problem(500, "Internal error", "an unexpected error occurred; it has been logged")


# --------------------------------------------------------------------------
# Request decoding
# --------------------------------------------------------------------------


class BadRequest(LabelqError):
    status = 400
    title = "Malformed request body"
    type = "https://labelq.invalid/problems/malformed-body"


def _msgspec_field(message: str) -> str | None:
    """'... - at `$.pred_probs[3][1]`' -> 'pred_probs[3][1]'."""
    marker = "- at `$"
    if marker not in message:
        return None
    path = message.rsplit(marker, 1)[1].rstrip("`")
    return path.lstrip(".") or None


def decode_json_request(
    body: bytes, request_type: type[msgspec.Struct] = FindIssuesRequest
) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """JSON body -> (labels int64, pred_probs float64, options); labels None
    where the request type makes them optional and they are absent."""
    if not body:
        raise BadRequest("the request body is empty; send a JSON object with labels and pred_probs", "body")
    limits.admit_json(body)
    duplicate = jsonkeys.find_duplicate_key(body)
    if duplicate is not None:
        raise InputError("is given more than once in the JSON object", duplicate)
    try:
        req: Any = msgspec.json.decode(body, type=request_type)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        raise InputError(msg, _msgspec_field(msg)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", "body") from None
    rows = req.pred_probs
    if not rows:
        raise InputError("must have at least one row (N >= 1)", "pred_probs")
    k = len(rows[0])
    try:
        P = np.array(rows, dtype=np.float64)
    except ValueError:
        P = None
    if P is None or P.ndim != 2:
        bad = next(i for i, r in enumerate(rows) if len(r) != k)
        raise InputError(
            f"rows must all have the same length: row 0 has {k} values, row {bad} has {len(rows[bad])}",
            f"pred_probs[{bad}]",
        )
    try:
        labels = None if req.labels is None else np.array(req.labels, dtype=np.int64)
    except OverflowError:
        bad = next(i for i, v in enumerate(req.labels) if not -(2**63) <= v < 2**63)
        raise InputError(f"labels[{bad}] = {req.labels[bad]} is not a class index", f"labels[{bad}]") from None
    options: dict[str, Any] = {}
    if req.options is not None:
        options = {f: getattr(req.options, f) for f in req.options.__struct_fields__}
        if options.get("num_to_remove_per_class") is not None:
            options["num_to_remove_per_class"] = tuple(options["num_to_remove_per_class"])
        if options.get("thresholds") is not None:
            options["thresholds"] = msgspec.structs.asdict(options["thresholds"])
    return labels, P, options


def _bool(v: str) -> bool:
    return {"true": True, "1": True, "false": False, "0": False}[v.strip().lower()]


_OPTION_PARSERS: dict[str, Any] = {
    "filter_by": str,
    "rank_by": str,
    "frac_noise": float,
    "num_to_remove_per_class": lambda v: tuple(int(x) for x in v.split(",")) if v.strip() else (),
    "min_examples_per_class": int,
    "adjust_pred_probs": _bool,
    "prob_tolerance": float,
    # the `thresholds` object, flattened: thresholds=percentile&class_percentile=50&ood_percentile=15
    "thresholds": str,
    "class_percentile": float,
    "ood_percentile": float,
}
_THRESHOLDS_QUERY = {"thresholds": "method", "class_percentile": "class_percentile", "ood_percentile": "ood_percentile"}
_DATASET_HEALTH_PARSERS: dict[str, Any] = {
    "class_names": lambda v: v.split(","),
    "asymmetric": _bool,
    "prob_tolerance": float,
}
_OUT_OF_DISTRIBUTION_PARSERS: dict[str, Any] = {
    "method": str,
    "adjust_pred_probs": _bool,
    "M": int,
    "gamma": float,
    "confident_thresholds": lambda v: [float(x) for x in v.split(",")] if v.strip() else [],
    "prob_tolerance": float,
}


def _query_field(name: str) -> str:
    if name in _THRESHOLDS_QUERY:
        return f"options.thresholds.{_THRESHOLDS_QUERY[name]}"
    return f"options.{name}"


def options_from_query(params: list[tuple[str, str]], parsers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Options given as query parameters (with a binary body): same names as
    the JSON ``options``; lists comma-separated; the ``thresholds`` object of
    find-issues as ``thresholds`` (its method), ``class_percentile`` and
    ``ood_percentile``."""
    parsers = _OPTION_PARSERS if parsers is None else parsers
    options: dict[str, Any] = {}
    for name, raw in params:
        if name not in parsers:
            raise InputError(f"unknown option {name!r}; known: {', '.join(parsers)}", f"options.{name}")
        if name in options:
            raise InputError("is given more than once", _query_field(name))
        try:
            options[name] = parsers[name](raw)
        except (ValueError, KeyError):
            raise InputError(f"cannot read {raw!r} as a value of this option", _query_field(name)) from None
    thresholds = {_THRESHOLDS_QUERY[q]: options.pop(q) for q in _THRESHOLDS_QUERY if q in options}
    if thresholds:
        options["thresholds"] = thresholds
    return options


def decode_npz_request(
    body: bytes,
    query: list[tuple[str, str]],
    max_cells: int,
    parsers: dict[str, Any] | None = None,
    optional: tuple[str, ...] = (),
) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    arrays = npz.read_request(body, max_cells, optional, admit=lambda shapes: limits.admit_npz(len(body), shapes))
    return arrays.get("labels"), arrays["pred_probs"], options_from_query(query, parsers)


def _check_cells(P: np.ndarray, max_cells: int) -> None:
    if P.size > max_cells:
        raise PayloadTooLarge(
            f"pred_probs has {P.shape[0]} x {P.shape[1]} = {P.size} elements; the limit is {max_cells} "
            "(LABELQ_MAX_CELLS)",
            "pred_probs",
        )


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


# --------------------------------------------------------------------------
# OpenAPI documentation of the raw-body handler
# --------------------------------------------------------------------------


def _ref(name: str) -> Reference:
    return Reference(ref=f"#/components/schemas/{name}")


_FIND_ISSUES_QUERY = (
    "`num_to_remove_per_class` comma-separated; the `thresholds` object as `thresholds` (its method), "
    "`class_percentile` and `ood_percentile`"
)


def _documented(
    request: str | None,
    responses: dict[int, tuple[str, str, str]],
    query_note: str = _FIND_ISSUES_QUERY,
    npz_note: str = "the `noise` fields at top level; scalars as 0-d arrays",
    arrays: str = "`labels` and `pred_probs`",
) -> type[Operation]:
    """An Operation class that documents a request body and responses by
    schema name (the handler reads its body itself, so litestar cannot)."""

    @dataclass
    class DocumentedOperation(Operation):
        def __post_init__(self) -> None:
            if request is not None:
                self.request_body = RequestBody(
                    required=True,
                    description=f"JSON, or an npz ({NPZ}) with arrays {arrays} and the options "
                    f"as query parameters of the same names ({query_note}).",
                    content={
                        JSON: OpenAPIMediaType(schema=_ref(request)),
                        NPZ: OpenAPIMediaType(schema={"type": "string", "format": "binary"}),
                    },
                )
            self.responses = {
                str(code): OpenAPIResponse(description=desc, content={media: OpenAPIMediaType(schema=_ref(name))})
                for code, (desc, media, name) in responses.items()
            }
            if request is not None and "200" in self.responses:
                self.responses["200"].description += (
                    f" With `Accept: {NPZ}`: one npz holding every field under the same name "
                    f"({npz_note})."
                )
                self.responses["200"].content[NPZ] = OpenAPIMediaType(schema={"type": "string", "format": "binary"})  # type: ignore[index]

    return DocumentedOperation


_PROBLEMS = {
    400: ("Malformed body (not JSON, or not a readable npz).", PROBLEM_JSON, "Problem"),
    413: ("Body, or N x K, larger than the configured limits.", PROBLEM_JSON, "Problem"),
    415: ("Content-Type is neither application/json nor application/x-npz, or a Content-Encoding is set.",
          PROBLEM_JSON, "Problem"),
    422: ("Invalid data or options; `field` names the culprit.", PROBLEM_JSON, "Problem"),
    503: ("Overloaded: the memory budget is in use, or the kernels could not start within the request timeout. "
          "`Retry-After` says when to retry.", PROBLEM_JSON, "Problem"),
}


# --------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------


class State:
    """Process-wide readiness: warmed up, and not draining (shutting down)."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.draining = threading.Event()


def _wants_npz(request: Request) -> bool:
    return npz.MEDIA_TYPE in request.headers.get("accept", "").lower()


@post(
    "/find-issues",
    operation_id="findIssues",
    summary="Find label issues",
    description=(
        "Flag probably mislabeled examples, score every example and estimate the label noise, "
        "exactly as cleanlab 2.9.0 `find_label_issues` does for the same inputs and options."
    ),
    tags=["label issues"],
    status_code=200,
    operation_class=_documented(
        "FindIssuesRequest", {200: ("Issues, scores and noise estimates.", JSON, "FindIssuesResponse"), **_PROBLEMS}
    ),
)
async def find_issues(request: Request) -> Response:
    return await _serve(request, _FIND_ISSUES)


@dataclass(frozen=True)
class _Endpoint:
    """What differs between the dataset endpoints: the JSON body's struct,
    the query options of an npz body, the npz arrays that may be absent, the
    in-process function (labels, P, **options), and what to record of a result."""

    request_type: type[msgspec.Struct]
    parsers: dict[str, Any]
    optional_arrays: tuple[str, ...]
    compute: Callable[..., Any]
    pairwise: bool = True  # K x K working memory (see limits.compute_bytes)
    observe: Callable[[dict[str, Any], Any], None] | None = None  # (options, result): metrics


def _observe_find_issues(options: dict[str, Any], result: core.FindIssuesResult) -> None:
    metrics.observe_result(
        filter_by=options.get("filter_by") or core.Options.filter_by, n=result.n_examples, k=result.n_classes,
        flagged=result.num_label_issues, kernel_seconds=result.timings["kernel"],
    )


_FIND_ISSUES = _Endpoint(
    FindIssuesRequest, _OPTION_PARSERS, (), lambda labels, P, **o: core.find_issues(labels, P, **o),
    observe=_observe_find_issues,
)
_DATASET_HEALTH = _Endpoint(
    DatasetHealthRequest, _DATASET_HEALTH_PARSERS, (), lambda labels, P, **o: health.dataset_health(labels, P, **o)
)
_OUT_OF_DISTRIBUTION = _Endpoint(
    OutOfDistributionRequest,
    _OUT_OF_DISTRIBUTION_PARSERS,
    ("labels",),
    lambda labels, P, **o: health.out_of_distribution(P, labels, **o),
    pairwise=False,
)


def _endpoint_sync(
    endpoint: _Endpoint, body: bytes, media: str, query: list[tuple[str, str]], want_npz: bool, max_cells: int
) -> tuple[bytes, str]:
    """Decode, compute, encode once; returns the body and the Server-Timing header."""
    t0 = time.perf_counter()
    if media == npz.MEDIA_TYPE:
        labels, P, options = decode_npz_request(body, query, max_cells, endpoint.parsers, endpoint.optional_arrays)
    else:
        if query:
            raise InputError("with a JSON body, options go in the body's `options`, not the query", "query")
        labels, P, options = decode_json_request(body, endpoint.request_type)
        _check_cells(P, max_cells)
    t1 = time.perf_counter()
    limits.admit_compute(len(body), [labels, P], endpoint.pairwise)
    result = endpoint.compute(labels, P, **options)
    t2 = time.perf_counter()
    if endpoint.observe is not None:
        endpoint.observe(options, result)
    if want_npz:
        out = npz.write_response(result.to_dict())
    else:
        out = orjson.dumps(result.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY)
    t3 = time.perf_counter()
    timing = {"decode": t1 - t0, **result.timings, "encode": t3 - t2}
    server_timing = ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in timing.items())
    return out, server_timing


async def _serve(request: Request, endpoint: _Endpoint) -> Response:
    media = _media_type(request)
    if media not in (JSON, npz.MEDIA_TYPE):
        raise UnsupportedMediaType(
            f"Content-Type must be {JSON} or {npz.MEDIA_TYPE}; got {request.headers.get('content-type') or 'none'}",
            "Content-Type",
        )
    settings: Settings = request.app.state.settings
    body = await request.body()
    want_npz = _wants_npz(request)
    query = list(request.query_params.multi_items())
    content, server_timing = await anyio.to_thread.run_sync(
        _endpoint_sync, endpoint, body, media, query, want_npz, settings.max_cells
    )
    return Response(
        content=content, media_type=npz.MEDIA_TYPE if want_npz else JSON, headers={"Server-Timing": server_timing}
    )


@post(
    "/dataset-health",
    operation_id="datasetHealth",
    summary="Dataset health summary",
    description=(
        "How healthy the labels are overall, which classes are noisiest and which pairs of classes the labels "
        "confuse, exactly as cleanlab 2.9.0 `health_summary` computes them (without printing)."
    ),
    tags=["dataset health"],
    status_code=200,
    operation_class=_documented(
        "DatasetHealthRequest",
        {200: ("The health summary.", JSON, "DatasetHealthResponse"), **_PROBLEMS},
        query_note="`class_names` comma-separated",
        npz_note="the fields of `classes_by_label_quality` and `overlapping_classes` at top level, "
        "names as string arrays, null fields left out; scalars as 0-d arrays",
    ),
)
async def dataset_health(request: Request) -> Response:
    return await _serve(request, _DATASET_HEALTH)


@post(
    "/out-of-distribution",
    operation_id="outOfDistribution",
    summary="Out-of-distribution scores",
    description=(
        "Per-example scores of how typical each example is of the dataset, from the predicted probabilities, "
        "exactly as cleanlab 2.9.0 `OutOfDistribution` (`fit_score` with `pred_probs`) computes them."
    ),
    tags=["out of distribution"],
    status_code=200,
    operation_class=_documented(
        "OutOfDistributionRequest",
        {200: ("The scores.", JSON, "OutOfDistributionResponse"), **_PROBLEMS},
        query_note="`confident_thresholds` comma-separated",
        npz_note="null fields left out; scalars as 0-d arrays",
        arrays="`pred_probs` and, where needed, `labels`",
    ),
)
async def out_of_distribution(request: Request) -> Response:
    return await _serve(request, _OUT_OF_DISTRIBUTION)


@get(
    "/health/live",
    operation_id="live",
    summary="Liveness: the process answers",
    tags=["health"],
    operation_class=_documented(None, {200: ("Alive.", JSON, "Health")}),
)
async def live() -> Response:
    return Response(content=b'{"status":"ok"}', media_type=JSON)


@get(
    "/health/ready",
    operation_id="ready",
    summary="Readiness: kernels compiled or loaded, ready for traffic",
    tags=["health"],
    operation_class=_documented(
        None, {200: ("Ready.", JSON, "Health"), 503: ("Not ready yet, or shutting down.", JSON, "Health")}
    ),
)
async def ready(request: Request) -> Response:
    state: State = request.app.state.labelq
    if state.draining.is_set():
        return Response(content=b'{"status":"draining"}', media_type=JSON, status_code=503)
    if state.ready.is_set():
        return Response(content=b'{"status":"ok"}', media_type=JSON)
    return Response(content=b'{"status":"starting"}', media_type=JSON, status_code=503)


@get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics (text format; OpenMetrics when asked for). Not in the
    OpenAPI schema: it is for Prometheus, in Prometheus's format."""
    content, content_type = request.app.state.metrics.exposition(request.headers.get("accept"))
    # litestar appends the charset to text/* itself
    return Response(content=content, media_type=content_type.replace("; charset=utf-8", ""))


# --------------------------------------------------------------------------
# Warm-up and the app factory
# --------------------------------------------------------------------------


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel specialisation."""
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(3), 24)
    labels = np.arange(24) % 3
    # Arrays read from an npz body are read-only: numba compiles those separately.
    labels_ro = labels.copy()
    labels_ro.flags.writeable = False
    for dtype in (np.float64, np.float32, np.float16):
        Pd = P.astype(dtype)
        Pd_ro = Pd.copy()
        Pd_ro.flags.writeable = False
        for fb in core.FILTER_BY:
            core.find_issues(labels, Pd, filter_by=fb, prob_tolerance=0.01)
            core.find_issues(labels_ro, Pd_ro, filter_by=fb, prob_tolerance=0.01)
            batched.run(labels_ro, Pd_ro, 10, filter_by=fb, prob_tolerance=0.01)
        for rb in core.RANK_BY:
            core.find_issues(labels, Pd, rank_by=rb, prob_tolerance=0.01)
        core.find_issues(labels, Pd, adjust_pred_probs=True, prob_tolerance=0.01)
        core.find_issues(labels, Pd, num_to_remove_per_class=(1, 1, 1), prob_tolerance=0.01)
        core.find_issues(labels, Pd, thresholds={"method": "percentile"}, prob_tolerance=0.01)
        health.dataset_health(labels, Pd, prob_tolerance=0.01)
        for method in health.OOD_METHODS:
            for adjust in (True, False):
                health.out_of_distribution(Pd, labels, method=method, adjust_pred_probs=adjust, prob_tolerance=0.01)


def _on_shutdown_signal(callback: Any) -> None:
    """Call ``callback`` (then the server's own handler) on SIGTERM/SIGINT, so
    /health/ready turns 503 as soon as draining starts. Signal handlers exist
    only in the main thread (uvicorn's worker); elsewhere (test clients) this
    does nothing. uvicorn restores its previous handlers when it stops."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            callback()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the app. Settings default to the environment's (``LABELQ_*``)."""
    from service import batched_http  # it uses this module's error and documentation helpers

    settings = settings or Settings.from_env()
    state = State()
    app_metrics = metrics.Metrics(dataset_tags=metrics.DatasetTags(settings.dataset_tags, settings.dataset_tag_limit))
    app_limits = limits.Limits(
        settings.max_inflight_bytes or limits.auto_budget(settings.workers),
        settings.request_timeout_seconds,
        core.set_threads(settings.threads or available_cpus()),
        app_metrics.registry,
    )
    limits.install_kernel_gate()
    api_keys = auth.ApiKeys(settings.bearer_keys())

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        def _warm() -> None:
            t0 = time.perf_counter()
            if settings.warmup:
                warm_up()
            app_metrics.warmed_up(time.perf_counter() - t0)
            state.ready.set()
            log.info("ready after %.1f s of warm-up", time.perf_counter() - t0)

        thread = threading.Thread(target=_warm, name="labelq-warmup", daemon=True)
        thread.start()
        loop = asyncio.get_running_loop()

        def _drain() -> None:  # in a signal handler: set a flag, log from the loop
            state.draining.set()
            loop.call_soon_threadsafe(log.info, "shutdown signal: draining, /health/ready answers 503")

        _on_shutdown_signal(_drain)
        try:
            yield
        finally:
            app_metrics.process_exiting()

    app = Litestar(
        route_handlers=[
            find_issues, dataset_health, out_of_distribution, live, ready, metrics_endpoint,
            *(report.route_handlers() if settings.report_page else []),
            *batched_http.route_handlers(),
        ],
        lifespan=[lifespan],
        # App-wide, in this order: authentication, then admission (Content-Encoding, memory, deadline).
        middleware=[
            *([DefineMiddleware(auth.BearerAuthMiddleware, keys=api_keys)] if api_keys else []),
            DefineMiddleware(limits.AdmissionMiddleware, limits=app_limits, max_body_bytes=settings.max_body_bytes),
        ],
        request_max_body_size=settings.max_body_bytes,
        exception_handlers={
            LabelqError: _labelq_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        openapi_config=OpenAPIConfig(
            title="labelq",
            version=__version__,
            description="Find label errors in classification datasets with confident learning.",
            path="/schema",
        ),
    )
    # Handlers read their bodies themselves, so litestar cannot derive these
    # schemas; register the msgspec structs' JSON schemas by name.
    app.openapi_schema.components.schemas.update(openapi_components())  # type: ignore[union-attr,arg-type]
    if api_keys:
        auth.document(app)
    app.state.labelq = state
    app.state.settings = settings
    app.state.metrics = app_metrics
    app.state.limits = app_limits
    # Around everything (routing and exception handling included), so 404s,
    # 405s and errors are counted and logged with their final status.
    app.asgi_handler = metrics.RequestObserver(app.asgi_handler, app_metrics)
    return app
