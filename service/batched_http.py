"""HTTP routes of the batched protocol (:mod:`service.batched`): thin
handlers that decode, call one step, and encode.

    POST /batched/start                      class counts, N, dtype, options -> context
    POST /batched/{sums,joint,candidates}    one batch + context -> partial
    POST /batched/merge                      partials of one pass -> partial
    POST /batched/finalize                   partials of one whole pass -> next context
    POST /batched/apply                      one batch + final context -> its flags and scores

Every call is stateless: any replica answers any call. Batches travel as JSON
or npz (arrays ``labels``, ``pred_probs``, ``row_offset``, ``class_offsets``
for the sums pass, and ``context``: the context's JSON as uint8 bytes);
responses are JSON, or npz with ``Accept: application/x-npz``. Merges and
contexts are JSON (they are small: O(K^2) plus the issues).
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import numpy as np
import orjson
from litestar import Request, Response, post

from service import batched, limits, npz
from service.errors import InputError, UnsupportedMediaType
from service.schemas import (
    BatchContext,
    BatchMapRequest,
    BatchMergeRequest,
    BatchStartRequest,
)

JSON = "application/json"
TAGS = ["batched protocol"]
_STEPS = ("sums", "joint", "candidates", "apply")


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _decode(body: bytes, type_: type[msgspec.Struct]) -> Any:
    from service.app import BadRequest, _msgspec_field  # the app's JSON error conventions

    if not body:
        raise BadRequest("the request body is empty", "body")
    limits.admit_json(body)
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise InputError(str(exc), _msgspec_field(str(exc))) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", "body") from None


def _context(ctx: BatchContext | dict[str, Any]) -> dict[str, Any]:
    """A context from the wire as the plain dict the steps take, checked."""
    d = msgspec.to_builtins(ctx) if isinstance(ctx, msgspec.Struct) else ctx
    return batched.check_context(d)


def _encode(obj: dict[str, Any], want_npz: bool) -> Response:
    if want_npz:
        return Response(content=npz.write_response(obj), media_type=npz.MEDIA_TYPE)
    return Response(content=orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), media_type=JSON)


def _json_only(request: Request) -> None:
    if _media(request) != JSON:
        raise UnsupportedMediaType(
            f"Content-Type must be {JSON}; got {request.headers.get('content-type') or 'none'}", "Content-Type"
        )


def _map_sync(step: str, body: bytes, media: str, max_cells: int) -> dict[str, Any]:
    if media == npz.MEDIA_TYPE:
        arrays = npz.read_request(
            body, max_cells, extra=batched.NPZ_EXTRA, admit=lambda shapes: limits.admit_npz(len(body), shapes)
        )
        labels, P = arrays["labels"], arrays["pred_probs"]
        if "context" not in arrays or "row_offset" not in arrays:
            raise InputError("a batch npz needs arrays context (JSON as uint8) and row_offset", "context")
        try:
            ctx = msgspec.json.decode(arrays["context"].astype(np.uint8).tobytes(), type=BatchContext)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InputError(f"the context is not a valid context: {exc}", "context") from None
        if arrays["row_offset"].ndim != 0:
            raise InputError("must be a 0-d integer array", "row_offset")
        row_offset = int(arrays["row_offset"])
        class_offsets = arrays.get("class_offsets")
    else:
        req = _decode(body, BatchMapRequest)
        labels, row_offset, class_offsets, ctx = req.labels, req.row_offset, req.class_offsets, req.context
        P = _rows(req.pred_probs)
        if P.size > max_cells:
            raise InputError(f"pred_probs has {P.size} elements; the limit is {max_cells}", "pred_probs")
    context = _context(ctx)
    labels = np.asarray(labels)  # checked with the batch (integers in [0, K))
    limits.admit_compute(len(body), [labels, P])
    if step == "sums":
        if class_offsets is None:
            raise InputError("the sums pass needs class_offsets", "class_offsets")
        return batched.map_sums(labels, P, row_offset, class_offsets, context)
    if class_offsets is not None:
        raise InputError(f"only the sums pass takes class_offsets, not {step}", "class_offsets")
    return {"joint": batched.map_joint, "candidates": batched.map_candidates, "apply": batched.apply}[step](
        labels, P, row_offset, context
    )


def _rows(rows: list[list[float]]) -> np.ndarray:
    if not rows:
        raise InputError("must have at least one row (N >= 1)", "pred_probs")
    k = len(rows[0])
    bad = next((i for i, r in enumerate(rows) if len(r) != k), None)
    if bad is not None:
        raise InputError(
            f"rows must all have the same length: row 0 has {k} values, row {bad} has {len(rows[bad])}",
            f"pred_probs[{bad}]",
        )
    return np.array(rows, dtype=np.float64).reshape(len(rows), k)


def _map_handler(step: str) -> Any:
    async def handler(request: Request) -> Response:
        media = _media(request)
        if media not in (JSON, npz.MEDIA_TYPE):
            raise UnsupportedMediaType(
                f"Content-Type must be {JSON} or {npz.MEDIA_TYPE}; got {request.headers.get('content-type') or 'none'}",
                "Content-Type",
            )
        body = await request.body()
        settings = request.app.state.settings
        out = await anyio.to_thread.run_sync(_map_sync, step, body, media, settings.max_cells)
        return _encode(out, npz.MEDIA_TYPE in request.headers.get("accept", "").lower())

    handler.__name__ = f"batched_{step}"
    what = "its flags and scores" if step == "apply" else f"the `{step}` partial"
    return post(
        f"/batched/{step}",
        operation_id=f"batched{step.capitalize()}",
        summary=f"Batched protocol: {step} step over one batch",
        description=f"One batch of rows (`BatchMapRequest`, or an npz) and the context -> {what}. Stateless.",
        tags=TAGS,
        status_code=200,
        operation_class=_documentation(
            "BatchMapRequest", "BatchApplyResponse" if step == "apply" else "BatchPartial", binary=True
        ),
    )(handler)


def _documentation(request: str, response: str, binary: bool = False) -> Any:
    from service.app import _PROBLEMS, _documented

    return _documented(
        request,
        {200: ("The step's result.", JSON, response), **_PROBLEMS},
        query_note="none: batch npz bodies hold `row_offset`, `class_offsets` and `context` as arrays",
        arrays="`labels`, `pred_probs`, `row_offset` (0-d), `class_offsets` (sums only) and `context` (JSON, uint8)",
    ) if binary else _documented(request, {200: ("The step's result.", JSON, response), **_PROBLEMS})


@post(
    "/batched/start",
    operation_id="batchedStart",
    summary="Batched protocol: start a run",
    description="The class counts (from the labels), N, the dtype and the options -> the run's context.",
    tags=TAGS,
    status_code=200,
    operation_class=_documentation("BatchStartRequest", "BatchContext"),
)
async def batched_start(request: Request) -> Response:
    _json_only(request)
    req = _decode(await request.body(), BatchStartRequest)
    options = msgspec.to_builtins(req.options) if req.options is not None else {}
    ctx = batched.start(req.class_counts, req.n_examples, req.dtype, **options)
    return _encode(ctx, False)


def _merge_sync(body: bytes, finalize: bool) -> dict[str, Any]:
    req = _decode(body, BatchMergeRequest)
    ctx = _context(req.context)
    parts = [msgspec.to_builtins(p) for p in req.partials]
    merged = batched.merge(parts, ctx)
    return batched.finalize(merged, ctx) if finalize else merged


@post(
    "/batched/merge",
    operation_id="batchedMerge",
    summary="Batched protocol: merge partials",
    description="Partials of one pass (any rows, any order) -> one partial.",
    tags=TAGS,
    status_code=200,
    operation_class=_documentation("BatchMergeRequest", "BatchPartial"),
)
async def batched_merge(request: Request) -> Response:
    _json_only(request)
    body = await request.body()
    return _encode(await anyio.to_thread.run_sync(_merge_sync, body, False), False)


@post(
    "/batched/finalize",
    operation_id="batchedFinalize",
    summary="Batched protocol: finalize a pass",
    description="Partials that together cover every row of one pass -> the next context.",
    tags=TAGS,
    status_code=200,
    operation_class=_documentation("BatchMergeRequest", "BatchContext"),
)
async def batched_finalize(request: Request) -> Response:
    _json_only(request)
    body = await request.body()
    return _encode(await anyio.to_thread.run_sync(_merge_sync, body, True), False)


def route_handlers() -> list[Any]:
    return [batched_start, *(_map_handler(s) for s in _STEPS), batched_merge, batched_finalize]
