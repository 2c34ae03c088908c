"""The batched protocol over dask arrays (``pip install labelq[dask]``).

The map steps of :mod:`service.batched` run where the blocks live (on the
Dask workers), partials are tree-reduced with :func:`service.batched.merge`,
and the result equals one :func:`service.find_issues` over the whole
dataset (without the per-example ``category``)::

    import dask.array as da
    from service.dask_adapter import find_issues

    P = da.from_zarr("pred_probs.zarr")          # N x K, chunked by rows
    labels = da.from_zarr("labels.zarr")          # N, chunked like P's rows
    result = find_issues(labels, P, filter_by="both")   # uses the current Dask client

``pred_probs`` must be chunked by rows only (one chunk across the K
columns; it is rechunked so otherwise) and ``labels`` is rechunked to match.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np

from service import batched, core

#: How many partials one merge takes in the tree reduction.
FAN_IN = 8


def find_issues(labels: da.Array, pred_probs: da.Array, **options: Any) -> core.FindIssuesResult:
    """Find label issues over dask arrays; options as :func:`service.find_issues`."""
    pred_probs = da.asarray(pred_probs)
    labels = da.asarray(labels)
    if pred_probs.ndim != 2 or labels.ndim != 1 or labels.shape[0] != pred_probs.shape[0]:
        raise ValueError(f"need labels (N,) and pred_probs (N, K); got {labels.shape} and {pred_probs.shape}")
    N, K = pred_probs.shape
    if len(pred_probs.chunks[1]) != 1:
        pred_probs = pred_probs.rechunk({1: K})
    labels = labels.rechunk((pred_probs.chunks[0],))
    rows = np.cumsum((0,) + pred_probs.chunks[0])
    ys = labels.to_delayed().ravel().tolist()
    Ps = pred_probs.to_delayed().ravel().tolist()

    # Class counts per block, hence the totals and where each block's classes start.
    per_block = np.array(dask.compute(*[dask.delayed(_bincount)(y, K) for y in ys]), np.int64).reshape(-1, K)
    offsets = np.vstack([np.zeros((1, K), np.int64), np.cumsum(per_block, axis=0)[:-1]])
    ctx = batched.start(per_block.sum(axis=0), N, pred_probs.dtype.name, **options)

    for kind in ctx["passes"]:
        if kind == "sums":
            parts = [
                dask.delayed(batched.map_sums)(y, P, int(rows[b]), offsets[b], ctx)
                for b, (y, P) in enumerate(zip(ys, Ps))
            ]
        else:
            step = batched.map_joint if kind == "joint" else batched.map_candidates
            parts = [dask.delayed(step)(y, P, int(rows[b]), ctx) for b, (y, P) in enumerate(zip(ys, Ps))]
        while len(parts) > 1:
            parts = [dask.delayed(batched.merge)(parts[i : i + FAN_IN], ctx) for i in range(0, len(parts), FAN_IN)]
        ctx = batched.finalize(parts[0].compute(), ctx)
    pieces = dask.compute(*[dask.delayed(batched.apply)(y, P, int(rows[b]), ctx) for b, (y, P) in enumerate(zip(ys, Ps))])
    return batched.assemble(list(pieces), ctx)


def _bincount(y: np.ndarray, K: int) -> np.ndarray:
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= K):
        raise ValueError(f"labels must be class indices in [0, {K})")
    return np.bincount(y, minlength=K)
