"""A client for datasets larger than one request (``pip install labelq[client]``).

It runs the batched protocol (:mod:`service.batched`) over HTTP against one or
more labelq base URLs (a Kubernetes Service name is one URL) and returns the
same :class:`~service.core.FindIssuesResult` as one ``POST /find-issues``
over the whole dataset (without the per-example ``category``)::

    from service.client import BatchedClient

    P = np.load("pred_probs.npy", mmap_mode="r")          # N x K, on disk
    labels = np.load("labels.npy", mmap_mode="r")
    with BatchedClient(["http://labelq:8000"], batch_size=200_000) as client:
        result = client.find_issues(labels, P, filter_by="prune_by_noise_rate")

Inputs: numpy arrays or memory-mapped ``.npy`` files, or ``batches``: a
callable returning a fresh iterator of ``(labels, pred_probs)`` row batches
(it is called once per pass). Batches go out concurrently (``concurrency``
in flight, spread over the URLs), as npz; idempotent calls are retried on
connection errors and 503 (after ``Retry-After``), on the next URL. Memory
stays bounded by the batch size times the calls in flight, plus the per-row
outputs, which go to memory-mapped files with ``out_dir``.
"""

from __future__ import annotations

import io
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import httpx
import numpy as np
import orjson

from service import batched, core

NPZ = "application/x-npz"
Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


class ServiceError(RuntimeError):
    """The service refused a call (4xx, or 5xx after the retries): its problem detail."""

    def __init__(self, status: int, problem: dict[str, Any] | str):
        self.status, self.problem = status, problem
        detail = problem.get("detail") if isinstance(problem, dict) else problem
        field = problem.get("field") if isinstance(problem, dict) else None
        super().__init__(f"{status}: {detail}" + (f" (field {field})" if field else ""))


class BatchedClient:
    """Runs the batched protocol against ``urls``.

    Args:
        urls: base URLs of labelq replicas (one string or several).
        batch_size: rows per batch.
        concurrency: calls in flight at once (default: 2 per URL).
        retries: attempts per call on connection errors and 503.
        timeout: seconds per call.
        progress: print a line per pass to stderr (or a callable(pass, done, total)).
        headers: extra headers (e.g. ``{"Authorization": "Bearer ..."}``).
    """

    def __init__(
        self,
        urls: str | list[str],
        batch_size: int = 100_000,
        concurrency: int | None = None,
        retries: int = 8,
        timeout: float = 600.0,
        progress: bool | Callable[[str, int, int], None] = False,
        headers: dict[str, str] | None = None,
    ):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("give at least one base URL")
        self.batch_size = int(batch_size)
        self.concurrency = concurrency or 2 * len(self.urls)
        self.retries = retries
        self._http = httpx.Client(timeout=timeout, headers=headers)
        self._next = itertools.cycle(range(len(self.urls)))
        self._lock = threading.Lock()
        self._progress = progress
        #: Calls sent again so far (after a connection error or a 503).
        self.retried = 0

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BatchedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls

    def _post(self, path: str, *, json: Any = None, content: bytes | None = None, accept_npz: bool = False) -> Any:
        headers = {"Content-Type": NPZ if content is not None else "application/json"}
        if accept_npz:
            headers["Accept"] = NPZ
        body = content if content is not None else orjson.dumps(json, option=orjson.OPT_SERIALIZE_NUMPY)
        headers["Content-Length"] = str(len(body))
        delay = 0.2
        for attempt in range(self.retries + 1):
            with self._lock:
                url = self.urls[next(self._next)]
            try:
                r = self._http.post(url.rstrip("/") + path, content=_pieces(body), headers=headers)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts: try again (next URL)
                if attempt == self.retries:
                    raise ServiceError(0, f"{url}{path}: {exc!r}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                self._count_retry()
                continue
            if r.status_code == 503 and attempt < self.retries:
                self._count_retry()
                time.sleep(_retry_after(r, delay))
                delay = min(delay * 2, 5.0)
                continue
            if r.status_code != 200:
                try:
                    raise ServiceError(r.status_code, r.json())
                except ValueError:
                    raise ServiceError(r.status_code, r.text) from None
            if r.headers.get("content-type", "").startswith(NPZ):
                with np.load(io.BytesIO(r.content), allow_pickle=False) as z:
                    return {name: z[name] for name in z.files}
            return orjson.loads(r.content)
        raise AssertionError("unreachable")  # pragma: no cover

    def _count_retry(self) -> None:
        with self._lock:
            self.retried += 1

    # ------------------------------------------------------------------ the run

    def find_issues(
        self,
        labels: Any = None,
        pred_probs: Any = None,
        *,
        batches: Batches | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> core.FindIssuesResult:
        """Find label issues over a dataset of any size: arrays (``labels``,
        ``pred_probs``, memory-mapped or not) or ``batches``. ``out_dir``:
        write the per-row outputs there as ``.npy`` files, returned memory-mapped."""
        source = _source(labels, pred_probs, batches, self.batch_size)
        counts, n, K, dtype = _count(source)
        ctx = self._post(
            "/batched/start",
            json={"class_counts": counts.tolist(), "n_examples": n, "dtype": dtype, "options": options},
        )
        for kind in ctx["passes"]:
            ctx = self._pass(kind, source, ctx, K)
        return self._apply(source, ctx, n, out_dir)

    def _pass(self, kind: str, source: Batches, ctx: dict[str, Any], K: int) -> dict[str, Any]:
        pending: list[dict[str, Any]] = []
        before = np.zeros(K, np.int64)

        def calls() -> Iterator[tuple[Callable[[], Any], int]]:
            offset = 0
            for y, P in source():
                extra = {"class_offsets": before.copy()} if kind == "sums" else {}
                if kind == "sums":
                    before[:] += np.bincount(np.asarray(y), minlength=K)
                body = _batch_npz(y, P, offset, ctx, **extra)
                yield (lambda body=body: self._post(f"/batched/{kind}", content=body, accept_npz=True)), len(y)
                offset += len(y)

        for part in self._run_all(kind, calls()):
            pending.append(_scalars(part))
            if len(pending) >= 8:  # merged here as they come (the merges are cheap): few partials held
                pending = [batched.merge(pending, ctx)]
        return self._post("/batched/finalize", json={"context": ctx, "partials": [batched.merge(pending, ctx)]})

    def _apply(self, source: Batches, ctx: dict[str, Any], n: int, out_dir: Any) -> core.FindIssuesResult:
        flags, scores, suggested = _outputs(n, out_dir)
        issue_index, issue_score = [], []

        def calls() -> Iterator[tuple[Callable[[], Any], int]]:
            offset = 0
            for y, P in source():
                body = _batch_npz(y, P, offset, ctx)
                yield (lambda body=body: self._post("/batched/apply", content=body, accept_npz=True)), len(y)
                offset += len(y)

        for piece in self._run_all("apply", calls()):
            a, b = (int(x) for x in np.asarray(piece["rows"]).reshape(-1, 2)[0])
            flags[a:b] = piece["is_label_issue"]
            scores[a:b] = piece["label_quality_score"]
            suggested[a:b] = piece["suggested_label"]
            issue_index.append(np.asarray(piece["issue_index"], np.int64))
            issue_score.append(np.asarray(piece["issue_score"], np.float64))
        idx = np.concatenate(issue_index) if issue_index else np.zeros(0, np.int64)
        sc = np.concatenate(issue_score) if issue_score else np.zeros(0)
        ranked = idx[np.lexsort((idx, sc))]  # lowest score first, equal scores in index order
        for arr in (flags, scores, suggested):
            if isinstance(arr, np.memmap):
                arr.flush()
        one = {"is_label_issue": flags, "label_quality_score": scores, "suggested_label": suggested}
        return batched.result_from(ctx, [one], ranked)

    def _run_all(self, kind: str, calls: Iterator[tuple[Callable[[], Any], int]]) -> Iterator[Any]:
        """Run the calls with at most ``concurrency`` in flight (bodies are built
        lazily, so memory stays bounded); yield results as they finish."""
        done_rows = 0
        with ThreadPoolExecutor(self.concurrency) as pool:
            running: dict[Future[Any], int] = {}
            for call, rows in calls:
                running[pool.submit(call)] = rows
                if len(running) >= self.concurrency:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for f in finished:
                        done_rows += running.pop(f)
                        yield f.result()
                    self._report(kind, done_rows)
            for f in list(running):
                done_rows += running.pop(f)
                yield f.result()
        self._report(kind, done_rows, final=True)

    def _report(self, kind: str, rows: int, final: bool = False) -> None:
        if callable(self._progress):
            self._progress(kind, rows, final)
        elif self._progress and final:
            print(f"labelq: {kind} pass done, {rows} rows", file=sys.stderr, flush=True)


def _pieces(body: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    """The body in 1 MiB pieces: httpcore sends one bytes object by slicing
    off what each send() took, which copies the rest every time (quadratic:
    seconds for a 400 MB body)."""
    view = memoryview(body)
    for i in range(0, len(body), size):
        yield bytes(view[i : i + size])


def _scalars(part: dict[str, Any]) -> dict[str, Any]:
    """A partial read from an npz: its 0-d arrays as Python scalars."""
    return {k: (v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v) for k, v in part.items()}


def _retry_after(r: httpx.Response, default: float) -> float:
    try:
        return min(float(r.headers.get("retry-after", default)), 30.0)
    except ValueError:
        return default


def _batch_npz(labels: Any, P: Any, offset: int, ctx: dict[str, Any], **extra: Any) -> bytes:
    buf = io.BytesIO()
    arrays = {
        "labels": np.ascontiguousarray(labels),
        "pred_probs": np.ascontiguousarray(P),
        "row_offset": np.int64(offset),
        "context": np.frombuffer(orjson.dumps(ctx, option=orjson.OPT_SERIALIZE_NUMPY), np.uint8),
        **{k: np.asarray(v) for k, v in extra.items()},
    }
    np.savez(buf, **arrays)
    return buf.getvalue()


def _source(labels: Any, pred_probs: Any, batches: Batches | None, size: int) -> Batches:
    if batches is not None:
        if labels is not None or pred_probs is not None:
            raise ValueError("give either labels and pred_probs, or batches")
        return batches
    if labels is None or pred_probs is None:
        raise ValueError("give labels and pred_probs (arrays or memory-mapped), or batches")
    if len(labels) != len(pred_probs):
        raise ValueError(f"labels has {len(labels)} entries but pred_probs has {len(pred_probs)} rows")

    def gen() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for a in range(0, len(labels), size):
            yield np.asarray(labels[a : a + size]), np.asarray(pred_probs[a : a + size])

    return gen


def _count(source: Batches) -> tuple[np.ndarray, int, int, str]:
    """Class counts, N, K and dtype, from one pass over the labels."""
    counts = np.zeros(0, np.int64)
    n, K, dtype = 0, None, None
    for y, P in source():
        y = np.asarray(y)
        K = P.shape[1] if K is None else K
        if y.size and (y.min() < 0 or y.max() >= K):
            bad = int(np.flatnonzero((y < 0) | (y >= K))[0])
            raise ValueError(f"labels[{n + bad}] = {int(y[bad])} is not a class index in [0, {K})")
        dtype = P.dtype.name if dtype is None else dtype
        counts = np.bincount(y, minlength=K) + (counts if counts.size else 0)
        n += len(y)
    if K is None:
        raise ValueError("no batches: the dataset is empty")
    return counts, n, K, dtype


def _outputs(n: int, out_dir: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if out_dir is None:
        return np.zeros(n, np.bool_), np.zeros(n), np.zeros(n, np.int64)
    os.makedirs(out_dir, exist_ok=True)
    open_mm = np.lib.format.open_memmap
    return (
        open_mm(os.path.join(out_dir, "is_label_issue.npy"), "w+", np.bool_, (n,)),
        open_mm(os.path.join(out_dir, "label_quality_score.npy"), "w+", np.float64, (n,)),
        open_mm(os.path.join(out_dir, "suggested_label.npy"), "w+", np.int64, (n,)),
    )
