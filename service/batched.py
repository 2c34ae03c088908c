"""Exact batched confident learning: datasets larger than one request.

:func:`service.find_issues` needs the whole dataset at once. This module
computes the same result batch by batch, in map steps (one batch of rows ->
a small partial) and merges (partials -> one partial) that are associative
and commutative, so any engine (the HTTP client in :mod:`service.client`,
Dask, a loop) can tree-reduce them in any order::

    ctx = batched.start(class_counts, n_examples, dtype, **options)
    # pass 1: per-class sums for the thresholds
    parts = [batched.map_sums(labels[a:b], P[a:b], a, ctx) for a, b in ranges]
    ctx = batched.finalize(batched.merge(parts), ctx)
    # pass 2: the confident joint            (map_joint, merge, finalize)
    # pass 3: candidates for the cut-offs    (map_candidates, merge, finalize)
    #         (only for the prune_* and low_* methods: ctx["passes"] lists them)
    # last:   per batch flags and scores     (apply)
    result = batched.assemble([batched.apply(...) for ...], ctx)

Everything that crosses a step is a flat dict of numpy arrays and Python
scalars (a *partial* or the *context*), so it travels as JSON or npz.

Exactness. The thresholds are class means that numpy sums pairwise: the sum
of a class's values is a fixed tree over their positions in the class (split
at ``n // 2`` rounded down to a multiple of 8, leaves of up to 128 values,
float16 in chunks of 8192). A batch holds a contiguous run of each class's
positions (the client passes where each class's run starts), so it returns
the sums of the tree nodes it covers whole and the raw values of the two
leaves it covers in part; merging combines sibling nodes as numpy would.
Everything else is per row (validation, argmax, scores), a sum of counts
(the confident joint), or a selection of the ``m`` smallest keys per cell
with ties by global index (pruning, ``low_*``), which merges by keeping the
``m`` smallest. The result equals one request's, bit for bit.

Not batched: the per-example ``category`` (it needs the out-of-distribution
percentile of every class, an order statistic with no small partial) and
``thresholds.method = "percentile"`` for the same reason; asking for the
latter is a 422.
"""

from __future__ import annotations

import bisect
from typing import Any

import numba
import numpy as np

from service import core
from service import kernels as kn
from service.errors import InputError

PROTOCOL = 1
#: The map steps in order, and which filter methods need the candidates pass.
PASSES = ("sums", "joint", "candidates")
_NEEDS_CANDIDATES = core.PRUNE_METHODS + ("low_normalized_margin", "low_self_confidence")
_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
_LEAF = kn._PW_BLOCKSIZE
_CHUNK = kn._REDUCE_BUFSIZE
_PARTIAL = object()  # a tree node that is partly known


#: Arrays a batch npz holds besides labels and pred_probs.
NPZ_EXTRA = ("context", "row_offset", "class_offsets")


class BatchError(InputError):
    """A partial or context that does not fit (another K, another pass,
    overlapping or missing rows, a count that cannot be)."""


# --------------------------------------------------------------------------
# The context: what every step needs to know about the whole dataset
# --------------------------------------------------------------------------


def start(class_counts: Any, n_examples: int, dtype: str, **options: Any) -> dict[str, Any]:
    """The context of a batched run: the class sizes (the client counts the
    labels, which it has), the number of examples, the probabilities' dtype
    and the options of :func:`service.find_issues`."""
    opts = core.make_options(**options)
    if opts.thresholds is not None and opts.thresholds.method != "mean":
        raise InputError("batched runs support only the 'mean' thresholds method", "options.thresholds.method")
    counts = _int_array(class_counts, "class_counts", ndim=1)
    K = counts.shape[0]
    if K < 2:
        raise BatchError(f"must have at least two classes; got {K}", "class_counts")
    if (counts < 0).any():
        raise BatchError("must be non-negative", "class_counts")
    if not core._is_int(n_examples) or n_examples < 1 or int(counts.sum()) != n_examples:
        raise BatchError(
            f"n_examples ({n_examples!r}) must be >= 1 and equal the sum of class_counts ({int(counts.sum())})",
            "n_examples",
        )
    if dtype not in _DTYPES:
        raise BatchError(f"must be one of {', '.join(_DTYPES)}; got {dtype!r}", "dtype")
    if opts.num_to_remove_per_class is not None and len(opts.num_to_remove_per_class) != K:
        raise InputError(
            f"must have one entry per class (K = {K}); got {len(opts.num_to_remove_per_class)}",
            "options.num_to_remove_per_class",
        )
    passes = list(PASSES if opts.filter_by in _NEEDS_CANDIDATES else PASSES[:2])
    return {
        "protocol": PROTOCOL,
        "n_examples": int(n_examples),
        "n_classes": K,
        "dtype": dtype,
        "class_counts": counts,
        "options": options_dict(opts),
        "passes": passes,
        "done": [],
    }


def check_context(ctx: dict[str, Any]) -> dict[str, Any]:
    """Check a context that came over the wire (shapes and ranges of what its
    finished passes left); returns it. A context is not signed: the checks
    catch a context from another run or a corrupted one, not a forged one."""
    try:
        K = int(ctx["n_classes"])
        counts = np.asarray(ctx["class_counts"])
        if counts.shape != (K,) or K < 2 or counts.dtype.kind not in "iu" or (counts < 0).any():
            raise BatchError(f"must be K = {K} non-negative integers", "context.class_counts")
        if int(ctx["n_examples"]) != int(counts.sum()) or int(ctx["n_examples"]) < 1:
            raise BatchError("must be the sum of class_counts", "context.n_examples")
        if ctx["dtype"] not in _DTYPES:
            raise BatchError(f"must be one of {', '.join(_DTYPES)}", "context.dtype")
        o = core.make_options(**ctx["options"])
        if o.num_to_remove_per_class is not None and len(o.num_to_remove_per_class) != K:
            raise BatchError(f"must have K = {K} entries", "options.num_to_remove_per_class")
        passes = list(PASSES if o.filter_by in _NEEDS_CANDIDATES else PASSES[:2])
        if list(ctx["passes"]) != passes:
            raise BatchError(f"must be {passes} for filter_by={o.filter_by!r}", "context.passes")
        done = list(ctx["done"])
        if done != passes[: len(done)]:
            raise BatchError(f"must be a prefix of {passes}", "context.done")
        C = K * K + K + 1
        need = {
            "sums": {"thresholds": (K,), "thresholds_cmp": (K,), "thresholds_dtype": None},
            "joint": {
                "confident_joint": (K, K), "joint": (K, K), "noise_matrix": (K, K),
                "inverse_noise_matrix": (K, K), "py": (K,), "estimated_num_label_issues": None, "limits": (C,),
                "all_rows": (K * K,),
            },
            "candidates": {"cut_key": (C,), "cut_index": (C,)},
        }
        for kind in done:
            for name, shape in need[kind].items():
                if ctx.get(name) is None:
                    raise BatchError(f"is missing after the {kind!r} pass", f"context.{name}")
                if shape is not None:
                    a = np.asarray(ctx[name])
                    if a.shape != shape or a.dtype.kind not in "biuf" or not np.isfinite(a).all():
                        raise BatchError(f"must be finite numbers of shape {shape}", f"context.{name}")
        if "sums" in done and ctx["thresholds_dtype"] not in _DTYPES:
            raise BatchError(f"must be one of {', '.join(_DTYPES)}", "context.thresholds_dtype")
        if "joint" in done and (np.asarray(ctx["limits"]) < 0).any():
            raise BatchError("must be non-negative", "context.limits")
    except KeyError as exc:
        raise BatchError("is missing", f"context.{exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise BatchError(f"is not a context: {exc}", "context") from None
    return ctx


def _get(part: dict[str, Any], name: str) -> Any:
    if part.get(name) is None:
        raise BatchError(f"a {part.get('pass')!r} partial needs {name!r}", name)
    return part[name]


def options_dict(o: core.Options) -> dict[str, Any]:
    """The options as plain values (what the context carries)."""
    return {
        "filter_by": o.filter_by,
        "rank_by": o.rank_by,
        "frac_noise": float(o.frac_noise),
        "num_to_remove_per_class": None if o.num_to_remove_per_class is None else list(o.num_to_remove_per_class),
        "min_examples_per_class": int(o.min_examples_per_class),
        "adjust_pred_probs": bool(o.adjust_pred_probs),
        "prob_tolerance": float(o.prob_tolerance),
    }


def _options(ctx: dict[str, Any]) -> core.Options:
    return core.make_options(**ctx["options"])


def _need(ctx: dict[str, Any], step: str) -> None:
    """Refuse a step whose earlier passes the context has not finished."""
    order = list(ctx["passes"]) + ["apply"]
    if step not in order:
        raise BatchError(f"the {step!r} pass is not needed for filter_by={ctx['options']['filter_by']!r}", "pass")
    missing = [p for p in order[: order.index(step)] if p not in ctx["done"]]
    if missing:
        raise BatchError(f"the {step!r} step needs the finalized {', '.join(missing)} pass first", "context.done")
    if step in ctx["done"]:
        raise BatchError(f"the {step!r} pass is already finalized in this context", "context.done")


def _int_array(x: Any, field: str, ndim: int) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != ndim or (a.size and a.dtype.kind not in "iu"):
        raise BatchError(f"must be a {ndim}-D array of integers", field)
    return a.astype(np.int64)


# --------------------------------------------------------------------------
# One batch: checked like a request, with global row numbers
# --------------------------------------------------------------------------


class _Batch:
    def __init__(self, labels: Any, pred_probs: Any, row_offset: int, ctx: dict[str, Any], o: core.Options):
        self.labels, self.P, dtype = core.check_inputs(labels, pred_probs)
        N, K = self.P.shape
        if K != ctx["n_classes"]:
            raise BatchError(f"has {K} columns but the run has {ctx['n_classes']} classes", "pred_probs")
        if dtype.name != ctx["dtype"]:
            raise BatchError(f"is {dtype.name} but the run is {ctx['dtype']}", "pred_probs")
        if not core._is_int(row_offset) or not 0 <= row_offset <= ctx["n_examples"] - N:
            raise BatchError(
                f"must be an integer with row_offset + {N} rows <= n_examples ({ctx['n_examples']}); got {row_offset!r}",
                "row_offset",
            )
        self.offset = int(row_offset)
        self.dtype = dtype
        self.prec = core._PREC[dtype]
        self.B = core._as_bits(self.P)
        self.chunks = core._n_chunks(N)
        self.want_entropy = o.rank_by == "confidence_weighted_entropy"
        ubits = kn.value_bits([1.0 + float(o.prob_tolerance)], dtype, -1)[0]
        problem, *stats = kn.row_stats(
            self.P, self.B, self.labels, float(o.prob_tolerance), ubits, self.prec, self.want_entropy, self.chunks
        )
        code, row, col, value = problem
        core.raise_for_problem((code, row + self.offset if row >= 0 else row, col, value), float(o.prob_tolerance))
        self.argmax, self.label_is_max, self.selfconf, self.other, self.entropy = stats
        if self.want_entropy and (self.selfconf.max() > 1.0 or self.other.max() > 1.0):
            row = int(np.flatnonzero(np.maximum(self.selfconf, self.other) > 1.0)[0]) + self.offset
            raise InputError(
                f"row {row} has a value above 1, which rank_by='confidence_weighted_entropy' does not accept",
                f"pred_probs[{row}]",
            )
        self.counts, self.starts, self.order = kn.class_index(self.labels, K)
        seen = ctx.get("class_counts")
        if seen is not None and (self.counts > np.asarray(seen)).any():
            k = int(np.flatnonzero(self.counts > np.asarray(seen))[0])
            raise BatchError(
                f"the batch has {int(self.counts[k])} examples of class {k} but class_counts says {int(seen[k])}",
                "class_counts",
            )

    @property
    def rows(self) -> np.ndarray:
        return np.array([[self.offset, self.offset + self.P.shape[0]]], np.int64)

    def unadjusted(self, method: int) -> np.ndarray:
        if method == kn.SELF_CONFIDENCE:
            return self.selfconf
        if method == kn.NORMALIZED_MARGIN:
            return kn.normalized_margin(self.selfconf, self.other, self.prec)
        return self.entropy


def _with_threads(fn: Any) -> Any:
    """Run a step under the process's kernel lock and thread setting, as a request."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with core._KERNEL_LOCK:
            if core._threads is not None:
                numba.set_num_threads(core._threads)
            return fn(*args, **kwargs)

    run.__name__, run.__doc__, run.__wrapped__ = fn.__name__, fn.__doc__, fn
    return run


def _header(kind: str, ctx: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "pass": kind, "n_classes": ctx["n_classes"], "rows": rows}


# --------------------------------------------------------------------------
# Pass 1: per-class sums (the thresholds)
# --------------------------------------------------------------------------


def _acc_prec(dtype: str) -> int:
    return kn.PREC64 if dtype == "float64" else kn.PREC32


def _roots(n: int, chunked: bool) -> list[tuple[int, int]]:
    """The top of numpy's summation of n values: one pairwise tree, or trees
    over buffer-sized chunks added in order (a float16 mean)."""
    if chunked and n > _CHUNK:
        return [(lo, min(_CHUNK, n - lo)) for lo in range(0, n, _CHUNK)]
    return [(0, n)]


def _children(lo: int, n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    n2 = n // 2
    n2 -= n2 % 8
    return (lo, n2), (lo + n2, n - n2)


@_with_threads
def map_sums(labels: Any, pred_probs: Any, row_offset: int, class_offsets: Any, ctx: dict[str, Any]) -> dict[str, Any]:
    """Pass 1 over one batch. ``class_offsets[k]``: how many examples of class
    k come before this batch (the client counts them from the labels)."""
    _need(ctx, "sums")
    o = _options(ctx)
    b = _Batch(labels, pred_probs, row_offset, ctx, o)
    K = ctx["n_classes"]
    offsets = _int_array(class_offsets, "class_offsets", ndim=1)
    n_all = np.asarray(ctx["class_counts"])
    if offsets.shape[0] != K:
        raise BatchError(f"must have one entry per class (K = {K}); got {offsets.shape[0]}", "class_offsets")
    bad = (offsets < 0) | (offsets + b.counts > n_all)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise BatchError(
            f"class {k}: offset {int(offsets[k])} + {int(b.counts[k])} examples in the batch exceeds its "
            f"{int(n_all[k])} examples",
            f"class_offsets[{k}]",
        )
    prec, chunked = _acc_prec(ctx["dtype"]), ctx["dtype"] == "float16"
    nodes: list[tuple[int, int, int, float]] = []
    frags: list[tuple[int, int, float]] = []
    for k in np.flatnonzero(b.counts):
        v = b.selfconf[b.order[b.starts[k] : b.starts[k + 1]]]
        a, e = int(offsets[k]), int(offsets[k]) + v.shape[0]
        stack = _roots(int(n_all[k]), chunked)
        while stack:
            lo, n = stack.pop()
            if lo >= e or lo + n <= a:
                continue
            if a <= lo and lo + n <= e:
                nodes.append((k, lo, n, kn._pairwise(v, lo - a, n, prec)))
            elif n <= _LEAF:
                for p in range(max(a, lo), min(e, lo + n)):
                    frags.append((k, p, float(v[p - a])))
            else:
                stack.extend(_children(lo, n))
    part = _header("sums", ctx, b.rows)
    part.update(_sum_arrays(nodes, frags))
    return part


def _sum_arrays(nodes: list, frags: list) -> dict[str, np.ndarray]:
    nd = np.array(nodes, dtype=np.float64).reshape(-1, 4)
    fr = np.array(frags, dtype=np.float64).reshape(-1, 3)
    return {
        "node_class": nd[:, 0].astype(np.int64),
        "node_lo": nd[:, 1].astype(np.int64),
        "node_len": nd[:, 2].astype(np.int64),
        "node_sum": nd[:, 3].copy(),
        "frag_class": fr[:, 0].astype(np.int64),
        "frag_pos": fr[:, 1].astype(np.int64),
        "frag_value": fr[:, 2].copy(),
    }


class _SumTree:
    """One class's known pieces of its sum: whole nodes and loose leaf values."""

    def __init__(self, n: int, prec: int, chunked: bool):
        self.n, self.prec, self.chunked = n, prec, chunked
        self.nodes: dict[tuple[int, int], float] = {}
        self.frags: dict[int, float] = {}

    def add_node(self, lo: int, n: int, value: float, k: int) -> None:
        if not self._is_node(lo, n):
            raise BatchError(f"class {k}: ({lo}, {n}) is not a node of the sum of {self.n} values", "node_lo")
        if (lo, n) in self.nodes:
            raise BatchError(f"class {k}: the values at {lo}..{lo + n - 1} come twice (overlapping batches)", "rows")
        self.nodes[(lo, n)] = value

    def add_frag(self, p: int, value: float, k: int) -> None:
        if not 0 <= p < self.n:
            raise BatchError(f"class {k}: position {p} is outside its {self.n} values", "frag_pos")
        if p in self.frags:
            raise BatchError(f"class {k}: the value at {p} comes twice (overlapping batches)", "rows")
        self.frags[p] = value

    def _is_node(self, lo: int, n: int) -> bool:
        for r in _roots(self.n, self.chunked):
            node = r
            while node[0] <= lo < node[0] + node[1]:
                if node == (lo, n):
                    return True
                if node[1] <= _LEAF:
                    return False
                left, right = _children(*node)
                node = left if lo < right[0] else right
        return False

    def reduce(self, k: int) -> None:
        """Combine what is complete, as numpy adds it; check nothing overlaps."""
        starts = sorted([lo for lo, _ in self.nodes] + list(self.frags))
        for x, y in zip(starts, starts[1:]):
            if x == y:
                raise BatchError(f"class {k}: the value at {x} comes twice (overlapping batches)", "rows")
        old_nodes, self.nodes = self.nodes, {}
        old_frags, self.frags = self.frags, {}

        def walk(lo: int, n: int) -> Any:
            i = bisect.bisect_left(starts, lo)
            if i == len(starts) or starts[i] >= lo + n:
                return None
            if (lo, n) in old_nodes:
                if i + 1 < len(starts) and starts[i + 1] < lo + n:
                    raise BatchError(f"class {k}: values at {lo}..{lo + n - 1} come twice (overlapping batches)", "rows")
                return old_nodes[(lo, n)]
            if n <= _LEAF:
                vals = [old_frags.get(p) for p in range(lo, lo + n)]
                if any(v is None for v in vals):
                    self.frags.update({p: old_frags[p] for p in range(lo, lo + n) if p in old_frags})
                    return _PARTIAL
                return kn._pairwise(np.array(vals, np.float64), 0, n, self.prec)
            parts = [walk(*c) for c in _children(lo, n)]
            if all(isinstance(v, float) for v in parts):
                return kn._rnd(parts[0] + parts[1], self.prec)
            for c, v in zip(_children(lo, n), parts):
                if isinstance(v, float):
                    self.nodes[c] = v
            return _PARTIAL

        for r in _roots(self.n, self.chunked):
            v = walk(*r)
            if isinstance(v, float):
                self.nodes[r] = v

    def total(self, k: int) -> float:
        acc = 0.0
        roots = _roots(self.n, self.chunked)
        for r in roots:
            if r not in self.nodes:
                raise BatchError(f"class {k}: the sums do not cover all its {self.n} examples (missing batches)", "rows")
            acc = self.nodes[r] if len(roots) == 1 else kn._rnd(acc + self.nodes[r], self.prec)
        return acc


def _merge_sums(parts: list[dict[str, Any]], ctx_like: dict[str, Any]) -> dict[str, Any]:
    trees = _sum_trees(parts, ctx_like)
    nodes, frags = [], []
    for k, t in trees.items():
        nodes += [(k, lo, n, v) for (lo, n), v in t.nodes.items()]
        frags += [(k, p, v) for p, v in t.frags.items()]
    out = _sum_arrays(nodes, frags)
    return out


def _sum_trees(parts: list[dict[str, Any]], ctx: dict[str, Any]) -> dict[int, _SumTree]:
    n_all = np.asarray(ctx["class_counts"])
    K = n_all.shape[0]
    prec, chunked = _acc_prec(ctx["dtype"]), ctx["dtype"] == "float16"
    trees: dict[int, _SumTree] = {}

    def tree(k: int) -> _SumTree:
        if not 0 <= k < K:
            raise BatchError(f"class {k} is not in [0, {K})", "node_class")
        if k not in trees:
            trees[k] = _SumTree(int(n_all[k]), prec, chunked)
        return trees[k]

    for part in parts:
        cls, lo, ln, val = (
            _int_array(_get(part, "node_class"), "node_class", 1),
            _int_array(_get(part, "node_lo"), "node_lo", 1),
            _int_array(_get(part, "node_len"), "node_len", 1),
            _float_array(_get(part, "node_sum"), "node_sum"),
        )
        if not cls.shape == lo.shape == ln.shape == val.shape:
            raise BatchError("node_class, node_lo, node_len and node_sum must have the same length", "node_sum")
        for k, a, n, v in zip(cls.tolist(), lo.tolist(), ln.tolist(), val.tolist()):
            tree(k).add_node(a, n, v, k)
        fc, fp, fv = (
            _int_array(_get(part, "frag_class"), "frag_class", 1),
            _int_array(_get(part, "frag_pos"), "frag_pos", 1),
            _float_array(_get(part, "frag_value"), "frag_value"),
        )
        if not fc.shape == fp.shape == fv.shape:
            raise BatchError("frag_class, frag_pos and frag_value must have the same length", "frag_value")
        for k, p, v in zip(fc.tolist(), fp.tolist(), fv.tolist()):
            tree(k).add_frag(p, v, k)
    for k, t in trees.items():
        t.reduce(k)
    return trees


def _float_array(x: Any, field: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64) if not isinstance(x, np.ndarray) else x.astype(np.float64)
    if a.ndim != 1 or not np.isfinite(a).all():
        raise BatchError("must be a 1-D array of finite numbers", field)
    return a


# --------------------------------------------------------------------------
# Pass 2: the confident joint
# --------------------------------------------------------------------------


def _threshold_bits(ctx: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(ctx["dtype"])
    tcmp = np.asarray(ctx["thresholds_cmp"], np.float64)
    return kn.value_bits(tcmp, dtype, +1)


@_with_threads
def map_joint(labels: Any, pred_probs: Any, row_offset: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Pass 2 over one batch: the raw confident-joint counts, the class sizes
    seen, how many confident off-diagonal examples are issues, and per cell
    how many rows have a positive margin (which lets pass 3 look at those only)."""
    _need(ctx, "joint")
    o = _options(ctx)
    b = _Batch(labels, pred_probs, row_offset, ctx, o)
    offdiag, cj_raw = kn.confident_pass(b.B, b.labels, _threshold_bits(ctx), b.argmax, b.chunks)
    part = _header("joint", ctx, b.rows)
    part.update(
        {
            "confident_joint_raw": cj_raw,
            "seen": b.counts,
            "issues": int((offdiag & ~b.label_is_max).sum()),
            "positive": _positive_tally(b.B, b.labels, b.other > b.selfconf, b.P.shape[1]),
        }
    )
    return part


# --------------------------------------------------------------------------
# Pass 3: the m smallest keys per cell (pruning and low_* methods)
# --------------------------------------------------------------------------
# Cells: noise-rate cell (true j, given k) is j * K + k; prune-by-class cell
# of class k is K*K + k; the low_* cell is K*K + K. ``limits[c]`` is how many
# examples cell c selects (0: none). A noise-rate cell selects by the margin
# ``P[i, j] - P[i, k]``, largest first (key: its negative). When the whole
# dataset has at least ``limits[c]`` positive margins in the cell, all the
# selected rows have one, and only rows whose label is not their maximum can:
# those cells are read from such rows alone. The others (``all_rows``, rare)
# read every row of the class, as the one-request kernel does.


@numba.njit(cache=True, nogil=True)
def _positive_tally(B, labels, nonmax, K):
    """Per cell (j, k): the rows labeled k with ``P[i, j] > P[i, k]`` (bit patterns)."""
    t = np.zeros((K, K), np.int64)
    for i in range(B.shape[0]):
        if nonmax[i]:
            k = labels[i]
            bk = B[i, k]
            for j in range(K):
                if B[i, j] > bk:
                    t[j, k] += 1
    return t


@numba.njit(cache=True, nogil=True)
def _margin_candidates(P, B, labels, nonmax, limits, all_rows, prec):
    """(cell, key, row) of every noise-rate cell entry this batch offers:
    positive margins of the rows whose label is not their maximum for the
    ordinary cells, every row of the class for the ``all_rows`` cells. Keys
    are ``-(P[i, j] - P[i, k])`` in the input's precision (the kernel's own
    arithmetic)."""
    N, K = B.shape
    any_all = np.zeros(K, np.bool_)
    for c in range(K * K):
        if all_rows[c] and limits[c] > 0:
            any_all[c % K] = True
    n = 0
    for i in range(N):
        k = labels[i]
        if not (nonmax[i] or any_all[k]):
            continue
        bk = B[i, k]
        for j in range(K):
            c = j * K + k
            if limits[c] > 0 and (all_rows[c] or (nonmax[i] and B[i, j] > bk)):
                n += 1
    cell = np.empty(n, np.int64)
    key = np.empty(n, np.float64)
    row = np.empty(n, np.int64)
    t = 0
    for i in range(N):
        k = labels[i]
        if not (nonmax[i] or any_all[k]):
            continue
        bk = B[i, k]
        pk = kn._ld(P[i, k])
        for j in range(K):
            c = j * K + k
            if limits[c] > 0 and (all_rows[c] or (nonmax[i] and B[i, j] > bk)):
                cell[t] = c
                key[t] = -kn._rnd(kn._ld(P[i, j]) - pk, prec)
                row[t] = i
                t += 1
    return cell, key, row


@numba.njit(cache=True, nogil=True)
def _keep_smallest(cell, key, index, limits):
    """Mask of the entries that are among the ``limits[cell]`` smallest
    (key, index) pairs of their cell. O(n): entries are grouped by cell
    with a counting sort, and each cell's cut-off found by selection."""
    C = limits.shape[0]
    n = cell.shape[0]
    count = np.zeros(C + 1, np.int64)
    for t in range(n):
        count[cell[t] + 1] += 1
    for c in range(C):
        count[c + 1] += count[c]
    fill = count[:C].copy()
    order = np.empty(n, np.int64)
    for t in range(n):
        c = cell[t]
        order[fill[c]] = t
        fill[c] += 1
    keep = np.zeros(n, np.bool_)
    for c in range(C):
        a, b, m = count[c], count[c + 1], limits[c]
        if m <= 0:
            continue
        if b - a <= m:
            for t in range(a, b):
                keep[order[t]] = True
            continue
        ks = np.empty(b - a, np.float64)
        for t in range(a, b):
            ks[t - a] = key[order[t]]
        cut = np.partition(ks, m - 1)[m - 1]
        ties = 0
        for t in range(a, b):
            e = order[t]
            if key[e] < cut:
                keep[e] = True
                m -= 1
            elif key[e] == cut:
                ties += 1
        tied = np.empty(ties, np.int64)
        ties = 0
        for t in range(a, b):
            e = order[t]
            if key[e] == cut:
                tied[ties] = index[e]
                ties += 1
        last = np.sort(tied)[m - 1]  # equal keys: the smallest indices
        for t in range(a, b):
            e = order[t]
            if key[e] == cut and index[e] <= last:
                keep[e] = True
    return keep


def _limits(ctx: dict[str, Any], pcm: np.ndarray | None, estimated: int, o: core.Options) -> np.ndarray:
    K = ctx["n_classes"]
    n_all = np.asarray(ctx["class_counts"])
    limits = np.zeros(K * K + K + 1, np.int64)
    fb = o.filter_by
    if fb in core.PRUNE_METHODS:
        live = (n_all > o.min_examples_per_class) & (n_all > 1)
        if fb in ("prune_by_noise_rate", "both"):
            m = pcm.copy()
            np.fill_diagonal(m, 0)
            m[:, ~live] = 0
            limits[: K * K] = np.maximum(m, 0).reshape(-1)
        if fb in ("prune_by_class", "both"):
            limits[K * K : K * K + K] = np.where(live, np.maximum(n_all - np.diagonal(pcm), 0), 0)
    elif fb.startswith("low_"):
        limits[-1] = estimated
    return limits


def _cell_entries(b: _Batch, ctx: dict[str, Any], o: core.Options) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cell, key, batch row) of every entry this batch offers to any cell."""
    K = ctx["n_classes"]
    limits = np.asarray(ctx["limits"], np.int64)
    all_rows = np.asarray(ctx["all_rows"], np.bool_)
    parts = [_margin_candidates(b.P, b.B, b.labels, b.other > b.selfconf, limits, all_rows, b.prec)]
    live = limits[K * K + b.labels] > 0
    rows = np.flatnonzero(live)
    parts.append((K * K + b.labels[rows], b.selfconf[rows], rows))
    if limits[-1]:
        fb = o.filter_by
        rows = np.arange(b.P.shape[0])
        parts.append((np.full(rows.shape[0], K * K + K), b.unadjusted(core._RANK_CODE[fb[len("low_") :]]), rows))
    return tuple(_cat([p[i] for p in parts], dt) for i, dt in enumerate((np.int64, np.float64, np.int64)))


@_with_threads
def map_candidates(labels: Any, pred_probs: Any, row_offset: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Pass 3 over one batch: per cell, its ``limits[cell]`` smallest keys
    (ties by index) with their global row numbers."""
    _need(ctx, "candidates")
    o = _options(ctx)
    b = _Batch(labels, pred_probs, row_offset, ctx, o)
    cell, key, row = _cell_entries(b, ctx, o)
    part = _header("candidates", ctx, b.rows)
    part.update(_select(cell, key, row + b.offset, np.asarray(ctx["limits"])))
    return part


def _cat(xs: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)


def _select(cell: np.ndarray, key: np.ndarray, index: np.ndarray, limits: np.ndarray) -> dict[str, np.ndarray]:
    """Per cell, the ``limits[cell]`` smallest (key, index) pairs, sorted."""
    keep = _keep_smallest(cell, key, index, np.asarray(limits, np.int64))
    cell, key, index = cell[keep], key[keep], index[keep]
    order = np.lexsort((index, key, cell))
    return {"cell": cell[order], "key": key[order], "index": index[order]}


# --------------------------------------------------------------------------
# Merge and finalize (any order, any grouping)
# --------------------------------------------------------------------------


def merge(parts: list[dict[str, Any]], ctx: dict[str, Any]) -> dict[str, Any]:
    """One partial from several of the same pass (associative, commutative)."""
    if not parts:
        raise BatchError("needs at least one partial", "partials")
    kind = _check_parts(parts, ctx)
    out = _header(kind, ctx, _union_rows([_get(p, "rows") for p in parts], ctx["n_examples"]))
    if kind == "sums":
        out.update(_merge_sums(parts, ctx))
    elif kind == "joint":
        K = ctx["n_classes"]
        cj = np.zeros((K, K), np.int64)
        seen = np.zeros(K, np.int64)
        positive = np.zeros((K, K), np.int64)
        for p in parts:
            c = _int_array(_get(p, "confident_joint_raw"), "confident_joint_raw", 2)
            sn = _int_array(_get(p, "seen"), "seen", 1)
            if c.shape != (K, K) or sn.shape != (K,):
                raise BatchError(f"must be K x K and K counts (K = {K})", "confident_joint_raw")
            pos = _int_array(_get(p, "positive"), "positive", 2)
            if pos.shape != (K, K) or (pos < 0).any():
                raise BatchError(f"must be K x K non-negative counts (K = {K})", "positive")
            cj += c
            seen += sn
            positive += pos
        if (cj < 0).any() or (seen < 0).any() or (cj.sum(axis=1) > seen).any():
            raise BatchError("counts are negative or exceed the examples seen (a tampered partial)", "confident_joint_raw")
        issues = sum(int(_get(p, "issues")) for p in parts)
        if not 0 <= issues <= int(cj.sum() - np.trace(cj)):
            raise BatchError("the issue count does not fit the confident joint (a tampered partial)", "issues")
        if (positive.sum(axis=0) > seen * (K - 1)).any():
            raise BatchError("more positive margins than rows can have (a tampered partial)", "positive")
        out.update({"confident_joint_raw": cj, "seen": seen, "issues": issues, "positive": positive})
    else:
        limits = np.asarray(ctx["limits"])
        cells, keys, index = [], [], []
        for p in parts:
            c = _int_array(_get(p, "cell"), "cell", 1)
            kk = _float_array(_get(p, "key"), "key")
            ix = _int_array(_get(p, "index"), "index", 1)
            if not c.shape == kk.shape == ix.shape:
                raise BatchError("cell, key and index must have the same length", "cell")
            if c.size and (c.min() < 0 or c.max() >= limits.shape[0]):
                raise BatchError("a cell is out of range (a tampered partial)", "cell")
            if not _within(ix, _int_array(_get(p, "rows"), "rows", 2).reshape(-1, 2)):
                raise BatchError("a row index is outside the partial's rows (a tampered partial)", "index")
            cells.append(c), keys.append(kk), index.append(ix)
        out.update(_select(_cat(cells, np.int64), _cat(keys, np.float64), _cat(index, np.int64), limits))
    return out


def _within(index: np.ndarray, rows: np.ndarray) -> bool:
    """Every index lies in one of the [start, end) ranges (which the merge
    checks are disjoint, so no row comes from two partials)."""
    if not index.size:
        return True
    r = rows[np.argsort(rows[:, 0])]
    at = np.searchsorted(r[:, 0], index, side="right") - 1
    return bool((at >= 0).all() and (index < r[np.maximum(at, 0), 1]).all())


def _check_parts(parts: list[dict[str, Any]], ctx: dict[str, Any]) -> str:
    kinds = {p.get("pass") for p in parts}
    if len(kinds) != 1 or next(iter(kinds)) not in PASSES:
        raise BatchError(f"partials must all come from one pass of {', '.join(PASSES)}; got {sorted(map(str, kinds))}", "pass")
    for p in parts:
        if p.get("protocol") != PROTOCOL:
            raise BatchError(f"protocol {p.get('protocol')!r} is not {PROTOCOL}", "protocol")
        if p.get("n_classes") != ctx["n_classes"]:
            raise BatchError(f"a partial for K = {p.get('n_classes')} in a run with K = {ctx['n_classes']}", "n_classes")
    kind = next(iter(kinds))
    if kind not in ctx["passes"] or kind in ctx["done"]:
        raise BatchError(f"the context does not expect {kind!r} partials now", "pass")
    return kind


def _union_rows(rows: list[Any], n: int) -> np.ndarray:
    """The union of row intervals; overlapping intervals are an error."""
    r = np.concatenate([_int_array(x, "rows", 2).reshape(-1, 2) for x in rows])
    r = r[np.argsort(r[:, 0], kind="stable")]
    if (r[:, 0] < 0).any() or (r[:, 1] > n).any() or (r[:, 0] >= r[:, 1]).any() or (r[1:, 0] < r[:-1, 1]).any():
        raise BatchError("row ranges overlap or fall outside the dataset (a batch sent twice?)", "rows")
    joined = [list(r[0])]
    for a, b in r[1:].tolist():
        if a == joined[-1][1]:
            joined[-1][1] = b
        else:
            joined.append([a, b])
    return np.array(joined, np.int64)


def finalize(part: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """The next context from the merged partial of a whole pass (it must cover every row)."""
    kind = _check_parts([part], ctx)
    _need(ctx, kind)
    rows = _union_rows([part["rows"]], ctx["n_examples"])
    if rows.tolist() != [[0, ctx["n_examples"]]]:
        raise BatchError(f"the partial covers rows {rows.tolist()}, not all {ctx['n_examples']} (missing batches)", "rows")
    new = dict(ctx)
    new["done"] = list(ctx["done"]) + [kind]
    o = _options(ctx)
    dtype = np.dtype(ctx["dtype"])
    counts = np.asarray(ctx["class_counts"], np.int64)
    K = ctx["n_classes"]
    if kind == "sums":
        trees = _sum_trees([part], ctx)
        means = np.full(K, np.nan)
        for k in np.flatnonzero(counts):
            if k not in trees:
                raise BatchError(f"class {k}: no sums (missing batches)", "rows")
            s = trees[k].total(int(k))
            n = int(counts[k])
            means[k] = kn._round_f16(s / n) if dtype == np.float16 else kn._rnd(s / n, core._PREC[dtype])
        t, tprec, tcmp = core.finish_thresholds(means, counts, dtype)
        new.update({"thresholds": t, "thresholds_cmp": tcmp, "thresholds_dtype": _prec_name(tprec)})
    elif kind == "joint":
        merged = merge([part], ctx)
        if not np.array_equal(merged["seen"], counts):
            raise BatchError("the examples seen per class differ from class_counts", "seen")
        estimated = int(merged["issues"])
        t = np.asarray(ctx["thresholds"], np.float64)
        noise = core.noise_estimates(merged["confident_joint_raw"].copy(), counts, t, np.full(K, np.nan), estimated)
        pcm = core.prune_counts(noise.confident_joint, counts, o) if o.filter_by in core.PRUNE_METHODS else None
        new.update(
            {
                "confident_joint": noise.confident_joint,
                "joint": noise.joint,
                "noise_matrix": noise.noise_matrix,
                "inverse_noise_matrix": noise.inverse_noise_matrix,
                "py": noise.py,
                "estimated_num_label_issues": estimated,
                "limits": (limits := _limits(ctx, pcm, estimated, o)),
                "all_rows": limits[: K * K] > merged["positive"].reshape(-1),
            }
        )
    else:
        limits = np.asarray(ctx["limits"])
        sel = merge([part], ctx)
        C = limits.shape[0]
        have = np.bincount(sel["cell"], minlength=C)
        cut_key = np.zeros(C)
        cut_index = np.full(C, -1, np.int64)
        last = np.flatnonzero(np.r_[sel["cell"][1:] != sel["cell"][:-1], True]) if sel["cell"].size else []
        cut_key[sel["cell"][last]] = sel["key"][last]
        cut_index[sel["cell"][last]] = sel["index"][last]
        # Fewer candidates than the limit: the cell had fewer rows; all are selected.
        short = (have < limits) & (limits > 0)
        cut_key[short], cut_index[short] = np.finfo(np.float64).max, ctx["n_examples"]
        new.update({"cut_key": cut_key, "cut_index": cut_index})
    return new


def _prec_name(prec: int) -> str:
    return {kn.PREC16: "float16", kn.PREC32: "float32", kn.PREC64: "float64"}[prec]


# --------------------------------------------------------------------------
# The last step: each batch's flags and scores
# --------------------------------------------------------------------------


def _at_or_below(key: np.ndarray, index: np.ndarray, cut_key: float, cut_index: int) -> np.ndarray:
    return (key < cut_key) | ((key == cut_key) & (index <= cut_index))


@_with_threads
def apply(labels: Any, pred_probs: Any, row_offset: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """The batch's part of the result: ``is_label_issue``, ``label_quality_score``,
    ``suggested_label`` (per row) and ``issue_index``/``issue_score`` (its
    flagged rows, global numbers)."""
    _need(ctx, "apply")
    o = _options(ctx)
    b = _Batch(labels, pred_probs, row_offset, ctx, o)
    N, K = b.P.shape
    fb = o.filter_by
    tprec = {"float16": kn.PREC16, "float32": kn.PREC32, "float64": kn.PREC64}[ctx["thresholds_dtype"]]
    thresholds = np.asarray(ctx["thresholds"], np.float64)
    if fb in core.PRUNE_METHODS or fb.startswith("low_"):
        cut_key, cut_index = np.asarray(ctx["cut_key"]), np.asarray(ctx["cut_index"])
        if fb.startswith("low_"):
            mask = np.zeros(N, np.bool_)
        else:
            mask = ~b.label_is_max
        cell, key, row = _cell_entries(b, ctx, o)
        hit = _at_or_below(key, row + b.offset, cut_key[cell], cut_index[cell])
        sel_rate = np.zeros(N, np.bool_)
        sel_rate[row[hit & (cell < K * K)]] = True
        sel_class = np.zeros(N, np.bool_)
        sel_class[row[hit & (cell >= K * K) & (cell < K * K + K)]] = True
        if fb.startswith("low_"):
            mask[row[hit & (cell == K * K + K)]] = True
        if fb in ("prune_by_noise_rate", "both"):
            mask &= sel_rate
        if fb in ("prune_by_class", "both"):
            mask &= sel_class
    elif fb == "confident_learning":
        offdiag, _ = kn.confident_pass(b.B, b.labels, _threshold_bits(ctx), b.argmax, b.chunks)
        mask = offdiag & ~b.label_is_max
    else:  # predicted_neq_given
        mask = kn.predicted_neq_given(b.argmax, b.labels) & ~b.label_is_max
    method = core._RANK_CODE[o.rank_by]
    if o.adjust_pred_probs:
        scores = kn.adjusted_scores(b.P, b.labels, method, thresholds, tprec, b.chunks)
    else:
        scores = b.unadjusted(method)
    flagged = np.flatnonzero(mask)
    return {
        "protocol": PROTOCOL,
        "pass": "apply",
        "n_classes": K,
        "rows": b.rows,
        "is_label_issue": mask,
        "label_quality_score": scores,
        "suggested_label": b.argmax,
        "issue_index": flagged + b.offset,
        "issue_score": scores[flagged],
    }


def assemble(pieces: list[dict[str, Any]], ctx: dict[str, Any]) -> core.FindIssuesResult:
    """The whole result from every batch's :func:`apply` output (any order)."""
    pieces = sorted(pieces, key=lambda p: int(np.asarray(p["rows"])[0, 0]))
    rows = _union_rows([p["rows"] for p in pieces], ctx["n_examples"])
    if rows.tolist() != [[0, ctx["n_examples"]]]:
        raise BatchError(f"the batches cover rows {rows.tolist()}, not all {ctx['n_examples']}", "rows")
    idx = np.concatenate([np.asarray(p["issue_index"], np.int64) for p in pieces])
    sc = np.concatenate([np.asarray(p["issue_score"], np.float64) for p in pieces])
    return result_from(ctx, pieces, idx[np.argsort(sc, kind="stable")])


def result_from(ctx: dict[str, Any], pieces: list[dict[str, Any]], ranked: np.ndarray) -> core.FindIssuesResult:
    """A :class:`~service.core.FindIssuesResult` from the context and the
    per-row arrays (concatenated in row order); no categories."""
    K = ctx["n_classes"]

    def joined(name: str, dtype: Any) -> np.ndarray:
        if len(pieces) == 1:  # as given (a memory-mapped output stays one)
            return pieces[0][name]
        return np.concatenate([np.asarray(p[name], dtype) for p in pieces])

    mask = joined("is_label_issue", np.bool_)
    return core.FindIssuesResult(
        n_examples=ctx["n_examples"],
        n_classes=K,
        num_label_issues=int(mask.sum()),
        is_label_issue=mask,
        label_quality_score=joined("label_quality_score", np.float64),
        suggested_label=joined("suggested_label", np.int64),
        ranked_issue_indices=ranked,
        category=None,
        category_counts=None,
        noise=core.NoiseEstimates(
            thresholds=np.asarray(ctx["thresholds"], np.float64),
            ood_thresholds=None,
            confident_joint=np.asarray(ctx["confident_joint"], np.int64),
            joint=np.asarray(ctx["joint"], np.float64),
            noise_matrix=np.asarray(ctx["noise_matrix"], np.float64),
            inverse_noise_matrix=np.asarray(ctx["inverse_noise_matrix"], np.float64),
            py=np.asarray(ctx["py"], np.float64),
            estimated_num_label_issues=int(ctx["estimated_num_label_issues"]),
        ),
    )


def run(labels: np.ndarray, pred_probs: np.ndarray, batch_size: int, **options: Any) -> core.FindIssuesResult:
    """All passes in process over row batches of ``batch_size`` (for tests
    and as the reference driver the client and the Dask adapter follow)."""
    labels = np.asarray(labels)
    N, K = pred_probs.shape
    counts = np.bincount(labels, minlength=K)
    ctx = start(counts, N, pred_probs.dtype.name, **options)
    bounds = [(a, min(N, a + batch_size)) for a in range(0, N, batch_size)]
    for kind in ctx["passes"]:
        parts = []
        for a, b in bounds:
            if kind == "sums":
                offsets = np.bincount(labels[:a], minlength=K)
                parts.append(map_sums(labels[a:b], pred_probs[a:b], a, offsets, ctx))
            elif kind == "joint":
                parts.append(map_joint(labels[a:b], pred_probs[a:b], a, ctx))
            else:
                parts.append(map_candidates(labels[a:b], pred_probs[a:b], a, ctx))
        ctx = finalize(merge(parts, ctx), ctx)
    return assemble([apply(labels[a:b], pred_probs[a:b], a, ctx) for a, b in bounds], ctx)
