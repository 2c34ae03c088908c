"""Numba kernels for confident learning.

Pure numerics: nothing here knows about HTTP, settings or validation. Callers
(`service.core`) validate and normalise input once, so every kernel sees:

- ``P``: the predicted probabilities, shape (N, K), C-contiguous, as
  ``float64``, ``float32`` or ``uint16`` (a float16 matrix viewed as its bit
  patterns: numba has no float16 arithmetic, so float16 values are decoded
  through a lookup table and rounded back with :func:`_round_f16`).
- ``labels``: ``int64``, shape (N,), every value in [0, K).

Exactness. The reference package computes in the input's dtype (float32
margins, float32 pairwise sums, ...). To return bit-identical decisions we
compute every value in float64 and round it to the reference's working
precision after each operation where the reference rounds (``_rnd``), and we
reproduce numpy's pairwise summation order (``_pairwise``). Sums of at most
two float32/float16 operands are exact in float64, so a float64 operation
followed by one rounding equals the float32 (or float16) operation.

Ties. Wherever the reference orders values with numpy's default (unstable)
``argsort``, we order as a *stable* sort would: equal values keep index
order. This makes results deterministic; the reference's own order for tied
values depends on the CPU's sort implementation.

Precision codes (``prec``): 64, 32 or 16 for float64, float32 and float16.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

PREC64, PREC32, PREC16 = 64, 32, 16

# Reference constants (cleanlab.internal.constants), written out here.
FLOATING_POINT_COMPARISON = 1e-6
CLIPPING_LOWER_BOUND = 1e-6
CONFIDENT_THRESHOLDS_LOWER_BOUND = 2e-6
TINY_VALUE = 1e-100
MISSING_CLASS_THRESHOLD = 2.0
NOISE_RATE_MAX = 0.9999

# numpy's pairwise summation: block size and the buffer size in which a
# casting reduction (float16 summed as float32) is split.
_PW_BLOCKSIZE = 128
_REDUCE_BUFSIZE = 8192

_F16_TO_F64 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64)

# error_model="numpy": float division by zero gives inf/nan like numpy instead of raising.
_JIT = dict(cache=True, nogil=True, error_model="numpy")


def _ld(x):  # pragma: no cover - replaced by the overload inside numba
    raise NotImplementedError


@overload(_ld, inline="always")
def _ld_overload(x):
    """Load one stored probability as float64 (exact)."""
    if isinstance(x, types.Float):
        return lambda x: np.float64(x)
    if isinstance(x, types.Integer) and x.bitwidth == 16 and not x.signed:
        lut = _F16_TO_F64

        def load_f16(x):
            return lut[x]

        return load_f16
    return None


@njit(inline="always", **_JIT)
def _round_f16(x):
    """Round a float64 to the nearest float16 value (ties to even), as float64."""
    ax = abs(x)
    if ax == 0.0 or not ax < np.inf:
        return x
    if ax >= 65520.0:
        return math.copysign(np.inf, x)
    _, e = math.frexp(ax)
    q = 2.0**-24 if e < -13 else math.ldexp(1.0, e - 11)
    return math.copysign(np.rint(ax / q) * q, x)


@njit(inline="always", **_JIT)
def _rnd(x, prec):
    """Round a float64 result to the working precision ``prec``.

    float16 goes through float32 first, as numpy's float16 loops compute in
    float32 and round the result to float16.
    """
    if prec == PREC64:
        return x
    y = np.float64(np.float32(x))
    if prec == PREC32:
        return y
    return _round_f16(y)


@njit(inline="always", **_JIT)
def _pairwise_block(a, lo, n, prec):
    """numpy's pairwise-sum leaf (n <= 128): eight accumulators, then the rest."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res = _rnd(res + a[i], prec)
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    end = n - n % 8
    while i < end:
        b = lo + i
        r0 = _rnd(r0 + a[b], prec)
        r1 = _rnd(r1 + a[b + 1], prec)
        r2 = _rnd(r2 + a[b + 2], prec)
        r3 = _rnd(r3 + a[b + 3], prec)
        r4 = _rnd(r4 + a[b + 4], prec)
        r5 = _rnd(r5 + a[b + 5], prec)
        r6 = _rnd(r6 + a[b + 6], prec)
        r7 = _rnd(r7 + a[b + 7], prec)
        i += 8
    res = _rnd(
        _rnd(_rnd(r0 + r1, prec) + _rnd(r2 + r3, prec), prec) + _rnd(_rnd(r4 + r5, prec) + _rnd(r6 + r7, prec), prec),
        prec,
    )
    while i < n:
        res = _rnd(res + a[lo + i], prec)
        i += 1
    return res


@njit(**_JIT)
def _pairwise(a, lo, n, prec):
    """numpy's pairwise sum of ``a[lo:lo+n]`` with accumulators of precision ``prec``.

    numpy recurses: a block of more than 128 is split at ``n//2`` rounded down
    to a multiple of 8 and the two halves' sums are added. We walk the same
    tree with an explicit stack (numba's cache does not load recursive
    functions reliably).
    """
    if n <= _PW_BLOCKSIZE:
        return _pairwise_block(a, lo, n, prec)
    s_lo = np.empty(64, np.int64)
    s_n = np.empty(64, np.int64)
    s_state = np.empty(64, np.int64)
    s_left = np.empty(64, np.float64)
    s_lo[0], s_n[0], s_state[0] = lo, n, 0
    sp = 1
    ret = 0.0
    while sp > 0:
        t = sp - 1
        nt = s_n[t]
        if nt <= _PW_BLOCKSIZE:
            ret = _pairwise_block(a, s_lo[t], nt, prec)
            sp -= 1
            continue
        n2 = nt // 2
        n2 -= n2 % 8
        if s_state[t] == 0:
            s_state[t] = 1
            s_lo[sp], s_n[sp], s_state[sp] = s_lo[t], n2, 0
            sp += 1
        elif s_state[t] == 1:
            s_left[t] = ret
            s_state[t] = 2
            s_lo[sp], s_n[sp], s_state[sp] = s_lo[t] + n2, nt - n2, 0
            sp += 1
        else:
            ret = _rnd(s_left[t] + ret, prec)
            sp -= 1
    return ret


@njit(**_JIT)
def _sum_like_numpy(a, prec, chunked):
    """``np.sum`` of a contiguous 1-D array: pairwise, and split in buffer-sized
    chunks added one after another when numpy casts while reducing (float16
    summed in float32)."""
    n = a.shape[0]
    if not chunked or n <= _REDUCE_BUFSIZE:
        return _pairwise(a, 0, n, prec)
    acc = 0.0
    for lo in range(0, n, _REDUCE_BUFSIZE):
        acc = _rnd(acc + _pairwise(a, lo, min(_REDUCE_BUFSIZE, n - lo), prec), prec)
    return acc


@njit(**_JIT)
def _select_smallest(keys, m):
    """Mask of the ``m`` smallest ``keys``; equal keys are taken in position
    order (what a stable argsort followed by ``[:m]`` selects). O(n)."""
    n = keys.shape[0]
    out = np.zeros(n, np.bool_)
    if m <= 0:
        return out
    if m >= n:
        out[:] = True
        return out
    cut = np.partition(keys, m - 1)[m - 1]
    below = 0
    for i in range(n):
        if keys[i] < cut:
            out[i] = True
            below += 1
    room = m - below
    for i in range(n):
        if room == 0:
            break
        if keys[i] == cut:
            out[i] = True
            room -= 1
    return out


# --------------------------------------------------------------------------
# Class index, thresholds
# --------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def class_index(labels, K):
    """Group example indices by given label.

    Returns ``(counts, starts, order)``: ``order[starts[k]:starts[k+1]]`` are
    the indices labeled ``k`` in ascending order. Shapes (K,), (K+1,), (N,).
    A counting sort over row chunks in parallel: each chunk counts its
    labels, then writes its indices after those of the chunks before it.
    """
    N = labels.shape[0]
    n_chunks = max(1, min(16, N // 65536))
    size = (N + n_chunks - 1) // n_chunks
    per_chunk = np.zeros((n_chunks, K), np.int64)
    for c in prange(n_chunks):
        for i in range(c * size, min(N, (c + 1) * size)):
            per_chunk[c, labels[i]] += 1
    counts = np.zeros(K, np.int64)
    for c in range(n_chunks):
        for k in range(K):
            counts[k] += per_chunk[c, k]
    starts = np.zeros(K + 1, np.int64)
    for k in range(K):
        starts[k + 1] = starts[k] + counts[k]
    # per_chunk becomes each chunk's next write position per class
    for k in range(K):
        at = starts[k]
        for c in range(n_chunks):
            m = per_chunk[c, k]
            per_chunk[c, k] = at
            at += m
    order = np.empty(N, np.int64)
    for c in prange(n_chunks):
        fill = per_chunk[c]
        for i in range(c * size, min(N, (c + 1) * size)):
            k = labels[i]
            order[fill[k]] = i
            fill[k] += 1
    return counts, starts, order


@njit(parallel=True, **_JIT)
def class_means(values, order, starts, prec):
    """Mean of ``values[labels == k]`` per class, as ``np.mean`` computes it on
    the gathered array (``values[i]`` is ``P[i, labels[i]]``, exact).

    float64: float64 pairwise sum. float32: float32 pairwise sum, the
    division rounded to float32. float16: float32 pairwise sum in chunks of
    numpy's buffer size, the division rounded to float16. Classes with no
    examples get NaN (callers substitute the reference's value).
    """
    K = starts.shape[0] - 1
    out = np.full(K, np.nan)
    acc_prec = PREC64 if prec == PREC64 else PREC32
    for k in prange(K):
        n = starts[k + 1] - starts[k]
        if n == 0:
            continue
        vals = np.empty(n, np.float64)
        for t in range(n):
            vals[t] = values[order[starts[k] + t]]
        s = _sum_like_numpy(vals, acc_prec, prec == PREC16)
        if prec == PREC16:
            out[k] = _round_f16(s / n)
        else:
            out[k] = _rnd(s / n, prec)
    return out


# --------------------------------------------------------------------------
# Pass 1 over the rows: validation and everything that needs no thresholds
# --------------------------------------------------------------------------

CHECK_OK, CHECK_NOT_FINITE, CHECK_NEGATIVE, CHECK_ABOVE_ONE, CHECK_ROW_SUM = 0, 1, 2, 3, 4


@njit(inline="always", **_JIT)
def _entropy_score(row, K, sc, prec, log_k):
    """cleanlab's confidence-weighted entropy score of one row (``row`` is
    overwritten). scipy's xlogy computes float32 input in float32 (float32
    log) and float16 input in float64."""
    ent = _normalized_entropy(row, row, K, prec, log_k)
    q = ent / max(sc, _rnd(CLIPPING_LOWER_BOUND, prec))
    return math.log(q + 1.0) / max(q, CLIPPING_LOWER_BOUND)


# Pass 1 and 2 read each row with small loops that LLVM vectorises: integer
# reductions, and a float sum allowed to reassociate (it is only compared with
# 1 +- tolerance). Maxima and threshold comparisons use the values' bit
# patterns: for non-negative IEEE floats (checked first) integer order is
# numeric order, and integer compares vectorise without fast-math. The loops
# keep every lane the width of the data (numba widens int32 arithmetic to
# int64, which halves the lanes or stops vectorisation): hence ``_zero`` and
# ``_lane`` instead of literals and plain loop indices.


def _zero(b):  # pragma: no cover - replaced by the overload inside numba
    raise NotImplementedError


@overload(_zero, inline="always")
def _zero_overload(b):
    """A zero of the array's own element type."""
    dt = b.dtype
    return lambda b: dt(0)


def _lane(b, j):  # pragma: no cover - replaced by the overload inside numba
    raise NotImplementedError


@overload(_lane, inline="always")
def _lane_overload(b, j):
    """A column index as an integer of the row's lane width (at least 32 bits)."""
    if b.dtype.bitwidth >= 64:
        return lambda b, j: np.int64(j)
    return lambda b, j: np.int32(j)


@intrinsic
def _bitcast_float(typingctx, v):
    """The float whose bit pattern is the integer ``v`` (int32 or int64)."""
    if v == types.int32:
        rt = types.float32
    elif v == types.int64:
        rt = types.float64
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(rt))

    return rt(v), codegen


def _from_bits(v):  # pragma: no cover - replaced by the overload inside numba
    raise NotImplementedError


@overload(_from_bits, inline="always")
def _from_bits_overload(v):
    """A bit pattern (an element of ``B``) as an element of ``P``, for ``_ld``."""
    if isinstance(v, types.Integer) and v.bitwidth == 16:
        return lambda v: v  # float16 is stored as its bits
    return lambda v: _bitcast_float(v)


@njit(fastmath={"reassoc", "nsz", "arcp"}, **_JIT)
def _row_sum(r):
    """The row's sum in float64 (any order)."""
    s = 0.0
    for j in range(r.shape[0]):
        s += _ld(r[j])
    return s


@njit(fastmath={"reassoc", "nsz", "arcp"}, **_JIT)
def _row_sum_native(r):
    """The row's sum in the row's own float type (any order): twice the lanes
    of :func:`_row_sum` for float32. Not inlined, so that its fast-math
    flags hold (an inlined function takes its caller's)."""
    s = _zero(r)
    for j in range(r.shape[0]):
        s += r[j]
    return s


@njit(inline="always", **_JIT)
def _scan_row(b, y):
    """Smallest and largest bit pattern of a row, and the largest outside
    column ``y`` (+0 if none; for values >= +0 these are the values' order)."""
    z = _zero(b)
    lo = b[0]
    hi = b[0]
    o = z
    yy = _lane(b, y)
    for j in range(b.shape[0]):
        v = b[j]
        lo = min(lo, v)
        hi = max(hi, v)
        w = v if _lane(b, j) != yy else z
        o = max(o, w)
    return lo, hi, o


@njit(inline="always", **_JIT)
def _scan_row_confident(b, y, tb, ob):
    """:func:`_scan_row`, :func:`_first_last_at_least` (``tb``) and
    :func:`_any_at_least` (``ob``) in one loop, every reduction in the row's
    lane width."""
    K = b.shape[0]
    z = _zero(b)
    lo = b[0]
    hi = b[0]
    o = z
    f = _lane(b, K)
    last = _lane(b, -1)
    a = _lane(b, 0)
    yy = _lane(b, y)
    for j in range(K):
        v = b[j]
        jj = _lane(b, j)
        lo = min(lo, v)
        hi = max(hi, v)
        o = max(o, v if jj != yy else z)
        ge = v >= tb[j]
        f = min(f, jj if ge else _lane(b, K))
        last = max(last, jj if ge else _lane(b, -1))
        a = max(a, _lane(b, 1) if v >= ob[j] else _lane(b, 0))
    return lo, hi, o, f, last, a > 0


@njit(inline="always", **_JIT)
def _first_index(b, v, skip):
    """First column of a row (other than ``skip``) whose bit pattern is ``v``;
    a min-reduction so that it vectorises. The row's length if none."""
    K = b.shape[0]
    f = _lane(b, K)
    sk = _lane(b, skip)
    for j in range(K):
        jj = _lane(b, j)
        f = min(f, jj if (b[j] == v and jj != sk) else _lane(b, K))
    return np.int64(f)


@njit(**_JIT)
def _first_problem(r, upper):
    """The first invalid value of a row: (code, column, value)."""
    for j in range(r.shape[0]):
        v = _ld(r[j])
        if not np.isfinite(v):
            return CHECK_NOT_FINITE, j, v
        if v < 0.0 or (v == 0.0 and math.copysign(1.0, v) < 0.0):
            return CHECK_NEGATIVE, j, v
        if v > upper:
            return CHECK_ABOVE_ONE, j, v
    return CHECK_OK, -1, 0.0


@njit(inline="always", **_JIT)
def _row_facts(r, b, y, lo, hi, ob, tolerance, band, ubits, eps, prec):
    """Pass 1 for one row, given its :func:`_scan_row`: ``(ok, row_sum,
    argmax, label_is_max, selfconf, other)``; ``ok`` False when a value or the
    sum is invalid (then only the float64 ``row_sum`` is meaningful)."""
    s = np.float64(_row_sum_native(r))
    if lo < 0 or hi > ubits or not abs(s - 1.0) <= tolerance - band:
        s = _row_sum(r)  # near the bounds: the float64 sum decides
        if lo < 0 or hi > ubits or abs(s - 1.0) > tolerance:
            return False, s, 0, False, 0.0, 0.0
    by = b[y]
    sc = _ld(r[y])
    if ob < by:
        # The label holds the row's only maximum: nothing to search.
        return True, s, y, True, sc, _ld(_from_bits(ob))
    oj = _first_index(b, ob, y)
    oth = _ld(r[oj])
    # cleanlab adds 1e-6 to the given label's probability and asks whether
    # np.argmax (first maximum) then lands on it; oj is the first column other
    # than y holding the other maximum.
    lifted = _rnd(sc + eps, prec)
    lim = oth < lifted or (oth == lifted and oj > y)
    return True, s, (oj if ob > by else min(oj, y)), lim, sc, oth


@njit(**_JIT)
def _sum_band(K, upper, prec):
    """A float32 sum (in any order) of K values >= 0 is within K * 2**-24 times
    their sum of the exact sum; a row whose float32 sum lies within 4 times
    that of a bound is summed again in float64, which decides as before."""
    return K * 2.0**-22 * (1.0 + upper) if prec == PREC32 else 0.0


@njit(**_JIT)
def _row_outputs(N, want_entropy):
    """Pass 1's per-row outputs: argmax, label_is_max, selfconf, other, entropy."""
    return (
        np.empty(N, np.int64),
        np.empty(N, np.bool_),
        np.empty(N, np.float64),
        np.empty(N, np.float64),
        np.empty(N if want_entropy else 0, np.float64),
    )


@njit(**_JIT)
def _problem_slots(n_chunks):
    """Per chunk, its first problem: code, row, column, value."""
    return (np.zeros(n_chunks, np.int64), np.zeros(n_chunks, np.int64), np.zeros(n_chunks, np.int64),
            np.zeros(n_chunks, np.float64))


@njit(**_JIT)
def _first_reported(codes, rows, cols, vals):
    """The first chunk's problem (chunks are in row order), or CHECK_OK."""
    for c in range(codes.shape[0]):
        if codes[c] != CHECK_OK:
            return (codes[c], rows[c], cols[c], vals[c])
    return (CHECK_OK, -1, -1, 0.0)


@njit(inline="always", **_JIT)
def _report(r, i, row_sum, upper):
    """The problem of invalid row ``i``: its first bad value, else its sum."""
    code, col, v = _first_problem(r, upper)
    if code == CHECK_OK:
        return CHECK_ROW_SUM, i, -1, row_sum
    return code, i, col, v


@njit(inline="always", **_JIT)
def _entropy_of(r, buf, sc, prec, log_k):
    """The confidence-weighted entropy score of row ``r`` (``buf``: K floats of room)."""
    for t in range(r.shape[0]):
        buf[t] = _ld(r[t])
    return _entropy_score(buf, r.shape[0], sc, prec, log_k)


@njit(parallel=True, **_JIT)
def row_stats(P, B, labels, tolerance, ubits, prec, want_entropy, n_chunks):
    """One parallel pass: check every value and row, and collect per-row facts.

    ``B`` is ``P`` viewed as integers of the same width (P itself for float16);
    ``ubits`` is the bit pattern of the largest value <= 1 + ``tolerance``
    (``value_bits``).

    Returns ``(problem, argmax, label_is_max, selfconf, other, entropy)``:
        problem: ``(code, row, col, value)`` of the first invalid value or row
            (CHECK_OK if none); values must be finite and in [0, 1 + tolerance],
            rows must sum to 1 within ``tolerance`` (``col`` -1, ``value`` the sum).
            When a problem is found the other outputs are meaningless.
        argmax: int64 (N,), first index of the row maximum.
        label_is_max: bool (N,), the given label is the argmax once ``1e-6``
            (in the input's precision) is added to it.
        selfconf: float64 (N,), ``P[i, labels[i]]``.
        other: float64 (N,), the largest probability of any other class.
        entropy: float64 (N,) confidence-weighted entropy scores if
            ``want_entropy``, else empty.
    """
    N, K = P.shape
    argmax, label_is_max, selfconf, other, entropy = _row_outputs(N, want_entropy)
    codes, rows, cols, vals = _problem_slots(n_chunks)
    eps = _rnd(FLOATING_POINT_COMPARISON, prec)
    upper = 1.0 + tolerance
    log_k = math.log(K)
    band = _sum_band(K, upper, prec)
    size = (N + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        buf = np.empty(K if want_entropy else 0, np.float64)
        for i in range(c * size, min(N, (c + 1) * size)):
            r = P[i]
            b = B[i]
            y = labels[i]
            lo, hi, ob = _scan_row(b, y)
            ok, s, am, lim, sc, oth = _row_facts(r, b, y, lo, hi, ob, tolerance, band, ubits, eps, prec)
            if not ok:
                codes[c], rows[c], cols[c], vals[c] = _report(r, i, s, upper)
                break
            argmax[i], label_is_max[i], selfconf[i], other[i] = am, lim, sc, oth
            if want_entropy:
                entropy[i] = _entropy_of(r, buf, sc, prec, log_k)
    problem = _first_reported(codes, rows, cols, vals)
    return problem, argmax, label_is_max, selfconf, other, entropy


# --------------------------------------------------------------------------
# Pass 2: the confident joint (needs the thresholds)
# --------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _first_last_at_least(b, tb):
    """First and last column where ``b[j] >= tb[j]`` (``(K, -1)`` if none):
    how many classes a row is confident for, 0, 1 or more, and the one.
    Min and max reductions in the row's lane width, so that they vectorise."""
    K = b.shape[0]
    f = _lane(b, K)
    last = _lane(b, -1)
    for j in range(K):
        ge = b[j] >= tb[j]
        f = min(f, _lane(b, j) if ge else _lane(b, K))
        last = max(last, _lane(b, j) if ge else _lane(b, -1))
    return f, last


@njit(inline="always", **_JIT)
def _any_at_least(b, tb):
    """Whether ``b[j] >= tb[j]`` anywhere in the row (a max reduction)."""
    a = _lane(b, 0)
    for j in range(b.shape[0]):
        a = max(a, _lane(b, 1) if b[j] >= tb[j] else _lane(b, 0))
    return a > 0


@njit(parallel=True, **_JIT)
def confident_pass(B, labels, tbits, argmax, n_chunks):
    """The (uncalibrated) confident joint, in one parallel pass.

    A row is *confident* for class j when ``P[i, j] >= thresholds[j] - 1e-6``;
    ``tbits[j]`` is that comparison on bit patterns (``B``, the matrix viewed
    as integers; see ``threshold_bits``). The true-label guess is the row
    argmax when the row is confident for several classes, else the one class.
    Returns ``(offdiag, cj)``: bool (N,) confident and guess != given label;
    int64 (K, K) counts, rows given label, columns guess, the diagonal not yet
    clipped.
    """
    N, K = B.shape
    offdiag = np.zeros(N, np.bool_)
    guess = np.full(N, -1, np.int32)
    size = (N + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        for i in range(c * size, min(N, (c + 1) * size)):
            f, last = _first_last_at_least(B[i], tbits)
            if f < K:
                g = argmax[i] if last > f else f
                guess[i] = g
                offdiag[i] = g != labels[i]
    return offdiag, _count_pairs(labels, guess, K)


@njit(**_JIT)
def _count_pairs(labels, guess, K):
    """The confident joint from each row's guess (-1: counted nowhere); one
    serial O(N) pass, so parallel chunks need no K x K buffers of their own."""
    cj = np.zeros((K, K), np.int64)
    for i in range(labels.shape[0]):
        g = guess[i]
        if g >= 0:
            cj[labels[i], g] += 1
    return cj


# --------------------------------------------------------------------------
# K x K algebra: calibration, rounding, noise matrices
# --------------------------------------------------------------------------


@njit(**_JIT)
def _row_sums(M):
    K = M.shape[0]
    out = np.empty(K, np.float64)
    for i in range(K):
        out[i] = _pairwise(M[i], 0, M.shape[1], PREC64)
    return out


@njit(**_JIT)
def _col_sums(M):
    """``M.sum(axis=0)``: numpy adds rows one after another."""
    out = np.zeros(M.shape[1], np.float64)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            out[j] = out[j] + M[i, j]
    return out


@njit(**_JIT)
def _col_sums_pairwise(M):
    """``M.sum(axis=0)`` of a Fortran-ordered matrix: pairwise down each column."""
    K = M.shape[0]
    out = np.empty(M.shape[1], np.float64)
    col = np.empty(K, np.float64)
    for j in range(M.shape[1]):
        for i in range(K):
            col[i] = M[i, j]
        out[j] = _pairwise(col, 0, K, PREC64)
    return out


@njit(**_JIT)
def _total_column_major(M):
    """``np.sum(M)`` of a Fortran-ordered matrix: pairwise in memory order."""
    return _pairwise(M.T.copy().ravel(), 0, M.size, PREC64)


@njit(**_JIT)
def round_preserving_sum(floats):
    """Round to integers keeping the (rounded) total: largest remainders get
    the increments, smallest the decrements; ties as a stable sort orders them."""
    n = floats.shape[0]
    ints = np.rint(floats)
    orig_sum = np.rint(_pairwise(floats, 0, n, PREC64))
    int_sum = np.rint(_pairwise(ints, 0, n, PREC64))
    while abs(int_sum - orig_sum) > FLOATING_POINT_COMPARISON:
        diff = np.rint(orig_sum - int_sum)
        increment = -1 if diff < 0.0 else 1
        changes = min(int(abs(diff)), n)
        order = np.argsort(floats - ints, kind="mergesort")
        for t in range(changes):
            i = order[n - 1 - t] if increment == 1 else order[t]
            ints[i] += increment
        int_sum = np.rint(_pairwise(ints, 0, n, PREC64))
    out = np.empty(n, np.int64)
    for i in range(n):
        # numpy's float -> int cast turns NaN and inf into INT64_MIN on x86; a
        # NaN total (see apply_num_to_remove_per_class) skips the loop above.
        out[i] = np.int64(ints[i]) if np.isfinite(ints[i]) else np.iinfo(np.int64).min
    return out


@njit(**_JIT)
def round_preserving_row_totals(M):
    out = np.empty(M.shape, np.int64)
    for i in range(M.shape[0]):
        out[i] = round_preserving_sum(M[i].copy())
    return out


@njit(**_JIT)
def calibrate_confident_joint(cj, label_counts):
    """Scale rows of the confident joint to the label counts, then the total
    to N; round to integers keeping row totals. (K, K) int64 -> int64."""
    K = cj.shape[0]
    cjf = cj.astype(np.float64)
    rows = _row_sums(cjf)
    cal = np.empty((K, K), np.float64)
    for i in range(K):
        d = max(rows[i], TINY_VALUE)
        for j in range(K):
            cal[i, j] = cjf[i, j] / d * label_counts[i]
    # The reference builds this matrix as a transpose (Fortran order), and
    # numpy sums it in memory order.
    total = max(_total_column_major(cal), TINY_VALUE)
    n = float(label_counts.sum())
    for i in range(K):
        for j in range(K):
            cal[i, j] = cal[i, j] / total * n
    return round_preserving_row_totals(cal)


@njit(inline="always", **_JIT)
def _clip_rows(M, out, lo, hi):
    for i in range(lo, hi):
        for j in range(M.shape[1]):
            out[i, j] = M[i, j] if i == j else min(max(M[i, j], 0.0), NOISE_RATE_MAX)


@njit(inline="always", **_JIT)
def _add_rows_into(out, cols, lo, hi):
    """``cols[lo:hi] += out[:, lo:hi].sum(axis=0)``, rows added one after
    another as numpy adds them."""
    for i in range(out.shape[0]):
        for j in range(lo, hi):
            cols[j] = cols[j] + out[i, j]


@njit(inline="always", **_JIT)
def _divide_rows(out, cols, lo, hi):
    for i in range(lo, hi):
        for j in range(out.shape[1]):
            out[i, j] = out[i, j] / max(cols[j], TINY_VALUE)


@njit(parallel=True, **_JIT)
def _clip_noise_rates(M, nt):
    """Clip off-diagonal entries to [0, 0.9999], keep the diagonal, then
    normalise columns to sum to one. In ``nt`` parallel blocks of rows (of
    columns for the sums); 1 runs serially. Every entry and every column sum
    is computed in the same order whatever ``nt``."""
    K = M.shape[0]
    out = np.empty((K, K), np.float64)
    cols = np.zeros(K, np.float64)
    if nt == 1:
        _clip_rows(M, out, 0, K)
        _add_rows_into(out, cols, 0, K)
        _divide_rows(out, cols, 0, K)
        return out
    size = (K + nt - 1) // nt
    for c in prange(nt):
        _clip_rows(M, out, c * size, min(K, (c + 1) * size))
    for c in prange(nt):
        _add_rows_into(out, cols, c * size, min(K, (c + 1) * size))
    for c in prange(nt):
        _divide_rows(out, cols, c * size, min(K, (c + 1) * size))
    return out


@njit(**_JIT)
def _clip_values(x, low, high, new_sum):
    K = x.shape[0]
    y = np.empty(K, np.float64)
    for k in range(K):
        y[k] = min(max(x[k], low), high)
    s = max(_pairwise(y, 0, K, PREC64), TINY_VALUE)
    for k in range(K):
        y[k] = y[k] * new_sum / s
    return y


@njit(**_JIT)
def _py_cnt(ps, nm, inm):
    K = ps.shape[0]
    py = np.empty(K, np.float64)
    for k in range(K):
        py[k] = inm[k, k] / max(nm[k, k], TINY_VALUE) * ps[k]
    return _clip_values(py, CLIPPING_LOWER_BOUND, 1.0, 1.0)


_TILE = 32


@njit(inline="always", **_JIT)
def _transposed_tiles(src, a, b, out, t_lo, t_hi):
    K = src.shape[0]
    for t in range(t_lo, t_hi):
        i0 = t * _TILE
        for j0 in range(0, K, _TILE):
            for i in range(i0, min(i0 + _TILE, K)):
                for j in range(j0, min(j0 + _TILE, K)):
                    out[i, j] = src[j, i] * a[i] / max(b[j], TINY_VALUE)


@njit(parallel=True, **_JIT)
def _transposed_step(src, a, b, nt):
    """``out[i, j] = src[j, i] * a[i] / max(b[j], TINY_VALUE)``, reading
    ``src`` tile by tile (``_TILE`` x ``_TILE``, which keeps both matrices in
    cache at large K), in ``nt`` parallel blocks of tile rows (1: serially)."""
    K = src.shape[0]
    out = np.empty((K, K), np.float64)
    tiles = (K + _TILE - 1) // _TILE
    if nt == 1:
        _transposed_tiles(src, a, b, out, 0, tiles)
        return out
    per = (tiles + nt - 1) // nt
    for c in prange(nt):
        _transposed_tiles(src, a, b, out, c * per, min(tiles, (c + 1) * per))
    return out


@njit(**_JIT)
def estimate_latent(cj, label_counts, nt):
    """Class priors ``py``, noise matrix P(given | true) and inverse noise
    matrix P(true | given) from a (calibrated) confident joint, with the
    reference's default convergence (3 x 5 iterations, ``py_method='cnt'``).
    ``nt``: parallel blocks for the K x K steps (1 for small K, where
    starting threads costs more than it saves); results do not depend on it.
    """
    K = cj.shape[0]
    N = float(label_counts.sum())
    ps = label_counts / N
    cjf = cj.astype(np.float64)
    given_counts = _row_sums(cjf)
    true_counts = _col_sums(cjf)
    nm = np.empty((K, K), np.float64)
    inm = np.empty((K, K), np.float64)
    for i in range(K):
        for j in range(K):
            nm[i, j] = cjf[i, j] / max(true_counts[j], TINY_VALUE)
            inm[i, j] = cjf[j, i] / max(given_counts[j], TINY_VALUE)
    py = _py_cnt(ps, nm, inm)
    nm = _clip_noise_rates(nm, nt)
    inm = _clip_noise_rates(inm, nt)
    for _ in range(3):
        for _ in range(5):
            # joint[j, i] = nm[j, i] * py[i];  inverse[i, j] = joint[j, i] / ps[j]
            inm = _clip_noise_rates(_transposed_step(nm, py, ps, nt), nt)
            py = _py_cnt(ps, nm, inm)
        # joint[i, j] = inverse[j, i] * ps[i];  noise[i, j] = joint[i, j] / py[j]
        nm = _clip_noise_rates(_transposed_step(inm, ps, py, nt), nt)
    py = _clip_values(py, 1e-5, 1.0, 1.0)
    nm = _clip_noise_rates(nm, nt)
    inm = _clip_noise_rates(inm, nt)
    return py, nm, inm


@njit(**_JIT)
def keep_at_least_n_per_class(pcm, n, frac_noise):
    """The number of examples to prune per cell (transposed confident joint:
    rows true label, columns given label), keeping at least ``n`` per class on
    the diagonal and scaling the noise by ``frac_noise``."""
    K = pcm.shape[0]
    diag = np.empty(K, np.int64)
    new_diag = np.empty(K, np.int64)
    per_col = np.empty(K, np.float64)
    for j in range(K):
        diag[j] = pcm[j, j]
        new_diag[j] = max(pcm[j, j], n)
        nz = 0
        for i in range(K):
            if pcm[i, j] != 0:
                nz += 1
        per_col[j] = max(nz - 1.0, 1.0)
    m = np.empty((K, K), np.float64)
    for i in range(K):
        for j in range(K):
            v = pcm[i, j] - (new_diag[j] - diag[j]) / per_col[j]
            m[i, j] = 0.0 if v < 0 else v
    for j in range(K):
        m[j, j] = new_diag[j]
    # Reduce off-diagonal counts by frac_noise; the diagonal takes up the rest.
    red = m * frac_noise
    for j in range(K):
        red[j, j] = m[j, j]
    lost = _col_sums_pairwise(m - red)  # the reference's matrix is a transpose (Fortran order)
    for j in range(K):
        red[j, j] = m[j, j] + lost[j]
    out = np.empty((K, K), np.int64)
    for i in range(K):
        for j in range(K):
            out[i, j] = np.int64(red[i, j])  # truncation, as astype(int)
    return out


@njit(**_JIT)
def apply_num_to_remove_per_class(pcm, num_to_remove, label_counts):
    """Rescale the prune counts so that ``num_to_remove[k]`` examples are
    removed from class k.

    Where the scaling is undefined (0/0 for a class with no estimated noise)
    the reference computes NaN, and the NaN becomes INT64_MIN when cast: that
    cell prunes nothing. We reproduce that, so such a cell prunes nothing."""
    K = pcm.shape[0]
    rows = _row_sums(pcm.astype(np.float64))
    psy = np.empty((K, K), np.float64)
    for i in range(K):
        for j in range(K):
            psy[i, j] = pcm[i, j] / rows[j]
    noise = _row_sums(psy)
    for i in range(K):
        noise[i] = noise[i] - psy[i, i]
    tmp = np.empty((K, K), np.float64)
    for i in range(K):
        for j in range(K):
            tmp[i, j] = psy[i, j] * num_to_remove[i] / noise[i]
    for i in range(K):
        tmp[i, i] = label_counts[i] - num_to_remove[i]
    return round_preserving_row_totals(tmp)


# --------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------


@njit(**_JIT)
def _compact(keys, rows, base, count, m, scratch):
    """Keep, in place and in order, the ``m`` smallest of ``keys[base:base +
    count]`` (equal keys: the earliest, which are the lowest row numbers);
    returns the m-th smallest key, the cut-off for later candidates.
    ``scratch``: room for ``count`` keys (no allocation per call)."""
    s = scratch[:count]
    s[:] = keys[base : base + count]
    cut = _select_in_place(s, m - 1)
    below = 0
    for t in range(base, base + count):
        below += keys[t] < cut
    room = m - below
    w = base
    for t in range(base, base + count):
        v = keys[t]
        if v < cut or (v == cut and room > 0):
            if v == cut:
                room -= 1
            keys[w] = v
            rows[w] = rows[t]
            w += 1
    return cut


@njit(inline="always", **_JIT)
def _take_row(row_keys, cut, keys, rows, base, fill, want, scratch, i):
    """Offer row ``i``'s keys to every cell: a key below the cell's cut-off
    goes into its buffer (compacted to the ``want`` smallest when full)."""
    for j in range(row_keys.shape[0]):
        key = row_keys[j]
        if key < cut[j]:  # rare once the cells' buffers have filled
            if fill[j] == base[j + 1] - base[j]:
                cut[j] = _compact(keys, rows, base[j], fill[j], want[j], scratch)
                fill[j] = want[j]
                if key >= cut[j]:
                    continue
            keys[base[j] + fill[j]] = key
            rows[base[j] + fill[j]] = i
            fill[j] += 1


_PREFETCH_AHEAD = 4


@intrinsic
def _prefetch_row(typingctx, arr, i):
    """Hint the CPU to bring row ``i`` of a 2-D C-contiguous array into cache
    (llvm.prefetch of each 64-byte line; no effect on results)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 2 and arr.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        shape = cgutils.unpack_tuple(builder, ary.shape)
        row = context.cast(builder, args[1], signature.args[1], types.intp)
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer2(
            context, builder, data=ary.data, shape=shape, strides=cgutils.unpack_tuple(builder, ary.strides),
            layout=aryty.layout, inds=[row, zero],
        )
        i8p = ir.IntType(8).as_pointer()
        start = builder.bitcast(ptr, i8p)
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8"
        )
        itemsize = context.get_abi_sizeof(context.get_data_type(aryty.dtype))
        nbytes = builder.mul(shape[1], context.get_constant(types.intp, itemsize))
        step = context.get_constant(types.intp, 64)
        with cgutils.for_range_slice(builder, zero, nbytes, step) as (off, _):
            # read, keep in all cache levels, data cache
            builder.call(fn, [builder.gep(start, [off]), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, i), codegen


@njit(parallel=True, **_JIT)
def prune_by_noise_rate(P, B, order, starts, nonmax, pcm, min_examples_per_class, prec):
    """For each given class k and true class j != k, flag the ``pcm[j, k]``
    examples labeled k with the largest margin ``P[:, j] - P[:, k]`` (in the
    input's precision; equal margins in index order).

    Without sorting whole classes: a positive margin needs ``P[i, j] >
    P[i, k]``, so only rows whose label is not their maximum (``nonmax``) can
    have one. Those rows are read once, in index order (comparing bit
    patterns ``B``, which order like the values); each cell keeps its
    positive margins in a buffer of ``2 m + 16`` that, when full, is cut back
    to its ``m`` smallest keys, and later keys at or above that cut-off are
    not kept (a tie loses to the earlier row). A cell with fewer positive
    margins than rows to prune (rare) is selected among all rows of the class.
    Memory per class O(sum of m + K).
    """
    K = starts.shape[0] - 1
    N = order.shape[0]
    mask = np.zeros(N, np.bool_)
    for k in prange(K):
        lo = starts[k]
        n = starts[k + 1] - lo
        # The reference skips small classes, and never applies a class mask of length one.
        if n <= min_examples_per_class or n <= 1:
            continue
        want = np.zeros(K, np.int64)
        base = np.zeros(K + 1, np.int64)
        for j in range(K):
            m = pcm[j, k] if j != k else 0
            want[j] = max(m, 0)
            base[j + 1] = base[j] + (2 * m + 16 if m > 0 else 0)
        keys = np.empty(base[K], np.float64)
        rows = np.empty(base[K], np.int64)
        scratch = np.empty(2 * want.max() + 16, np.float64)
        fill = np.zeros(K, np.int64)
        positive = np.zeros(K, np.int32)
        # Only negative keys (positive margins) qualify: each cell's cut-off
        # starts at 0 if it prunes, at -inf (nothing qualifies) if not. Keys and
        # cut-offs are float32 for float32 input (exact: the reference's margins
        # are float32), so that the row loops run in float32 lanes.
        cut32 = np.empty(K, np.float32)
        cut64 = np.empty(K, np.float64)
        for j in range(K):
            cut64[j] = 0.0 if want[j] > 0 else -np.inf
            cut32[j] = cut64[j]
        rk32 = np.empty(K, np.float32)
        rk64 = np.empty(K, np.float64)
        todo = np.empty(n, np.int64)
        nt = 0
        for t in range(n):
            i = order[lo + t]
            if nonmax[i]:
                todo[nt] = i
                nt += 1
        for t in range(nt):
            i = todo[t]
            if t + _PREFETCH_AHEAD < nt:
                # The rows of a class lie scattered: ask for a later one now,
                # so that it is in cache by its turn.
                _prefetch_row(B, todo[t + _PREFETCH_AHEAD])
            b = B[i]
            r = P[i]
            bk = b[k]
            for j in range(K):
                positive[j] += np.int32(b[j] > bk)
            # Branch-free over the row (it vectorises): minus the margin.
            if prec == PREC32:
                pk32 = r[k]
                for j in range(K):
                    rk32[j] = -(r[j] - pk32)
                _take_row(rk32, cut32, keys, rows, base, fill, want, scratch, i)
            else:
                pk = _ld(r[k])
                if prec == PREC64:
                    for j in range(K):
                        rk64[j] = -(_ld(r[j]) - pk)
                else:
                    for j in range(K):
                        rk64[j] = -_rnd(_ld(r[j]) - pk, prec)
                _take_row(rk64, cut64, keys, rows, base, fill, want, scratch, i)
        for j in range(K):
            m = want[j]
            if m == 0:
                continue
            if positive[j] >= m:
                a = base[j]
                sel = _select_smallest(keys[a : a + fill[j]], m)
                for t in range(fill[j]):
                    if sel[t]:
                        mask[rows[a + t]] = True
            else:
                all_keys = np.empty(n, np.float64)
                for t in range(n):
                    i = order[lo + t]
                    all_keys[t] = -_rnd(_ld(P[i, j]) - _ld(P[i, k]), prec)
                sel = _select_smallest(all_keys, m)
                for t in range(n):
                    if sel[t]:
                        mask[order[lo + t]] = True
    return mask


@njit(parallel=True, **_JIT)
def prune_by_class(selfconf, order, starts, pcm, min_examples_per_class):
    """For each class k, flag the ``n_k - pcm[k, k]`` examples labeled k with
    the smallest self-confidence (equal values in index order)."""
    K = starts.shape[0] - 1
    N = order.shape[0]
    mask = np.zeros(N, np.bool_)
    for k in prange(K):
        lo = starts[k]
        n = starts[k + 1] - lo
        if n <= min_examples_per_class or n <= 1:
            continue
        m = n - pcm[k, k]
        if m < 1:
            continue
        keys = np.empty(n, np.float64)
        for t in range(n):
            keys[t] = selfconf[order[lo + t]]
        sel = _select_smallest(keys, m)
        for t in range(n):
            if sel[t]:
                mask[order[lo + t]] = True
    return mask


@njit(**_JIT)
def smallest_scores(scores, m):
    """Mask of the ``m`` lowest scores, equal scores in index order."""
    return _select_smallest(scores, m)


@njit(**_JIT)
def _sort_key(x):
    """A uint64 whose unsigned order is the float64 order of ``x`` as numpy
    sorts it: -0.0 equals +0.0, and every NaN sorts last (and equal)."""
    if np.isnan(x):
        return np.uint64(0xFFF8000000000000)
    v = np.array([x + 0.0]).view(np.int64)[0]  # x + 0.0 turns -0.0 into +0.0
    if v < 0:
        return np.uint64(~v)
    return np.uint64(v) | np.uint64(0x8000000000000000)


@njit(**_JIT)
def argsort_stable(values):
    """``np.argsort(values, kind="stable")`` for float64, as a least-significant-
    digit radix sort (8 passes of 8 bits; passes where every key has the same
    digit are skipped): O(n), and for 100k scores several times faster than
    numba's merge sort. Small inputs use the merge sort."""
    n = values.shape[0]
    if n < 2048:
        return np.argsort(values, kind="mergesort")
    keys = np.empty(n, np.uint64)
    for t in range(n):
        keys[t] = _sort_key(values[t])
    counts = np.zeros((8, 256), np.int64)
    for t in range(n):
        k = keys[t]
        for d in range(8):
            counts[d, (k >> np.uint64(8 * d)) & np.uint64(255)] += 1
    idx = np.arange(n)
    keys2 = np.empty(n, np.uint64)
    idx2 = np.empty(n, np.int64)
    pos = np.empty(256, np.int64)
    for d in range(8):
        if counts[d].max() == n:
            continue  # one digit value for all: this pass keeps the order
        acc = 0
        for v in range(256):
            pos[v] = acc
            acc += counts[d, v]
        shift = np.uint64(8 * d)
        for t in range(n):
            k = keys[t]
            v = (k >> shift) & np.uint64(255)
            p = pos[v]
            pos[v] = p + 1
            keys2[p] = k
            idx2[p] = idx[t]
        keys, keys2 = keys2, keys
        idx, idx2 = idx2, idx
    return idx


@njit(**_JIT)
def rank_flagged(mask, scores):
    """Indices of flagged examples, lowest score first (stable)."""
    idx = np.nonzero(mask)[0]
    s = np.empty(idx.shape[0], np.float64)
    for t in range(idx.shape[0]):
        s[t] = scores[idx[t]]
    return idx[argsort_stable(s)]


# --------------------------------------------------------------------------
# Label quality scores
# --------------------------------------------------------------------------

SELF_CONFIDENCE, NORMALIZED_MARGIN, CONFIDENCE_WEIGHTED_ENTROPY = 0, 1, 2


@njit(parallel=True, **_JIT)
def normalized_margin(selfconf, other, prec):
    """``(p_label - max_other + 1) / 2``, each operation in the input's precision."""
    N = selfconf.shape[0]
    out = np.empty(N, np.float64)
    for i in prange(N):
        out[i] = _rnd(_rnd(_rnd(selfconf[i] - other[i], prec) + 1.0, prec) / 2.0, prec)
    return out


@njit(parallel=True, **_JIT)
def adjusted_scores(P, labels, method, thresholds, tprec, n_chunks):
    """Scores after cleanlab's ``adjust_pred_probs``: each row replaced by
    ``(p - t + max(t)) / sum(...)``, computed in the thresholds' precision
    ``tprec``. ``method``: SELF_CONFIDENCE or NORMALIZED_MARGIN."""
    N, K = P.shape
    out = np.empty(N, np.float64)
    tmax = thresholds.max()
    # float16 row sums accumulate in float32 and are rounded to float16 at the end.
    acc_prec = PREC32 if tprec == PREC16 else tprec
    size = (N + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        row = np.empty(K, np.float64)
        for i in range(c * size, min(N, (c + 1) * size)):
            y = labels[i]
            for j in range(K):
                row[j] = _rnd(_rnd(_ld(P[i, j]) - thresholds[j], tprec) + tmax, tprec)
            s = _rnd(_pairwise(row, 0, K, acc_prec), tprec)
            sc = _rnd(row[y] / s, tprec)
            if method == SELF_CONFIDENCE:
                out[i] = sc
            else:
                other = -np.inf
                for j in range(K):
                    if j != y:
                        v = _rnd(row[j] / s, tprec)
                        if v > other:
                            other = v
                out[i] = _rnd(_rnd(_rnd(sc - other, tprec) + 1.0, tprec) / 2.0, tprec)
    return out


@njit(parallel=True, **_JIT)
def predicted_neq_given(argmax, labels):
    N = labels.shape[0]
    out = np.empty(N, np.bool_)
    for i in prange(N):
        out[i] = argmax[i] != labels[i]
    return out


def value_bits(values, dtype, direction):
    """Bit patterns (as the integer view's dtype) of the float ``dtype`` values
    nearest to ``values`` on one side: ``direction`` +1 gives the smallest
    representable value >= each value, -1 the largest <= it. For values in
    [+0, inf], ``x >= v  <=>  bits(x) >= bits(up(v))`` and ``x <= v  <=>
    bits(x) <= bits(down(v))``."""
    values = np.asarray(values, dtype=np.float64)
    t = values.astype(dtype)
    off = t.astype(np.float64) < values if direction > 0 else t.astype(np.float64) > values
    t[off] = np.nextafter(t[off], np.inf if direction > 0 else -np.inf).astype(dtype)
    t = np.maximum(t, dtype.type(0))  # -0.0 -> +0.0
    ints = {2: np.uint16, 4: np.int32, 8: np.int64}[np.dtype(dtype).itemsize]
    return np.ascontiguousarray(t).view(ints)


# --------------------------------------------------------------------------
# Dataset health, out-of-distribution scores, percentile thresholds
# --------------------------------------------------------------------------

# cleanlab.internal.constants.EPSILON: the floor of the denominators in the
# reference's class-level noise rates.
EPSILON = 1e-6

CATEGORY_OK, CATEGORY_LABEL_ISSUE, CATEGORY_OUT_OF_DISTRIBUTION, CATEGORY_UNCONFIDENT = 0, 1, 2, 3
OOD_ENTROPY, OOD_LEAST_CONFIDENCE, OOD_GEN = 0, 1, 2

_F16_ALL = np.arange(65536, dtype=np.uint16).view(np.float16)


def f16_tables(gamma: float) -> np.ndarray:
    """numpy's own float16 ``exp(x)`` and ``x ** gamma`` for every float16
    ``x`` (indexed by bit pattern; ``gamma`` a Python float, cast to float16
    as the reference's ``probs ** gamma`` casts it). numpy's float16 loops
    are not always correctly rounded, and a float16 result has no slack to
    hide a difference in, so the GEN score reads them from these tables.
    float64, shape (2, 65536)."""
    with np.errstate(all="ignore"):
        return np.stack([np.exp(_F16_ALL), _F16_ALL ** float(gamma)]).astype(np.float64)


@njit(inline="always", **_JIT)
def _cast(x, prec):
    """A Python float cast (once) to the working precision, as numpy casts a
    Python scalar operand to an array's dtype."""
    if prec == PREC64:
        return x
    if prec == PREC32:
        return np.float64(np.float32(x))
    return _round_f16(x)


@njit(inline="always", **_JIT)
def _f16_bits(x):
    """Bit pattern of a non-negative finite float16 value held as float64."""
    if x < 2.0**-14:
        return np.int64(x * 2.0**24)
    m, e = math.frexp(x)
    return np.int64((e + 14) * 1024 + np.int64((m * 2.0 - 1.0) * 1024.0))


@njit(**_JIT)
def _select_in_place(a, k):
    """Reorder ``a`` so that ``a[k]`` is its k-th smallest value, nothing
    before it larger and nothing after it smaller (quickselect, median of
    three, Hoare partition); returns ``a[k]``. O(n) expected, no copy. Input
    crafted against median-of-three could make quickselect quadratic, so
    after 64 rounds the range left is merge-sorted instead: O(n log n) at
    worst (numba's own np.partition has no such bound)."""
    lo, hi = 0, a.shape[0] - 1
    rounds = 0
    while hi > lo:
        rounds += 1
        if rounds > 64:
            rest = a[lo : hi + 1].copy()
            a[lo : hi + 1] = rest[np.argsort(rest, kind="mergesort")]
            break
        mid = (lo + hi) // 2
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        pivot = a[mid]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:  # between the two parts: equal to the pivot
            break
    return a[k]


@njit(parallel=True, **_JIT)
def class_percentiles(values, order, starts, q, prec):
    """``np.percentile(values[labels == k], q)`` per class with numpy's
    default ('linear') method and ``q`` a Python number, computed as numpy
    does in the input's precision ``prec``.

    ``values``: float64 (N,), ``P[i, labels[i]]`` (exact values of the input
    dtype); ``order``/``starts``: from :func:`class_index`. numpy takes the
    order statistics at ``floor(v)`` and ``floor(v) + 1`` for ``v = (n - 1) *
    (q / 100)`` (the largest value when ``v >= n - 1``), and interpolates
    ``a + (b - a) * g`` for ``g < 0.5``, else ``b - (b - a) * (1 - g)``, every
    operation in the input's dtype (``g`` cast to it). Classes with no
    examples get NaN (callers substitute). float64 (K,).
    """
    K = starts.shape[0] - 1
    out = np.full(K, np.nan)
    frac = q / 100.0
    for k in prange(K):
        n = starts[k + 1] - starts[k]
        if n == 0:
            continue
        vals = np.empty(n, np.float64)
        for t in range(n):
            vals[t] = values[order[starts[k] + t]]
        v = (n - 1) * frac
        if v >= n - 1:
            out[k] = vals.max()
            continue
        lo = np.int64(math.floor(v))
        a = _select_in_place(vals, lo)
        b = vals[lo + 1 :].min()
        g = v - lo
        d = _rnd(b - a, prec)
        if g >= 0.5:
            out[k] = _rnd(b - _rnd(d * _cast(1.0 - g, prec), prec), prec)
        else:
            out[k] = _rnd(a + _rnd(d * _cast(g, prec), prec), prec)
    return out


@njit(inline="always", **_JIT)
def _confident_row(y, f, last, above_ood, am, K):
    """Pass 2 for one row, given its first and last confident column
    (:func:`_first_last_at_least`) and whether it reaches any class's OOD
    threshold (:func:`_any_at_least`): ``(guess, category)``. The guess (-1 if
    none) is the one class the row is confident for, or its argmax ``am`` when
    it is confident for several; see :func:`confident_pass_categories`."""
    if f < K:
        g = am if last > f else np.int64(f)
        return g, (CATEGORY_LABEL_ISSUE if g != y else CATEGORY_OK)
    if not above_ood:
        return -1, CATEGORY_OUT_OF_DISTRIBUTION
    return -1, CATEGORY_UNCONFIDENT


@njit(parallel=True, **_JIT)
def confident_pass_categories(B, labels, tbits, obits, argmax, n_chunks):
    """:func:`confident_pass`, and each example's category, in one parallel pass.

    ``tbits``: the class thresholds as ``confident_pass`` takes them;
    ``obits``: the out-of-distribution thresholds the same way (bit patterns
    of ``ood_thresholds - 1e-6`` rounded up). A row counted in the confident
    joint is CATEGORY_OK on its diagonal and CATEGORY_LABEL_ISSUE off it; a
    row counted nowhere is CATEGORY_OUT_OF_DISTRIBUTION when every value is
    below its class's out-of-distribution threshold (``P[i, j] < ood[j] -
    1e-6`` for all j), else CATEGORY_UNCONFIDENT.

    Returns ``(offdiag, cj, category, counts)``: ``offdiag`` and ``cj`` as
    ``confident_pass`` returns them; int8 (N,); int64 (4,) indexed by category.
    """
    N, K = B.shape
    offdiag = np.empty(N, np.bool_)
    category = np.empty(N, np.int8)
    guess = np.empty(N, np.int32)
    tally = np.zeros((n_chunks, 4), np.int64)
    size = (N + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        for i in range(c * size, min(N, (c + 1) * size)):
            y = labels[i]
            b = B[i]
            f, last = _first_last_at_least(b, tbits)
            above_ood = f < K or _any_at_least(b, obits)
            g, v = _confident_row(y, f, last, above_ood, argmax[i], K)
            guess[i] = g
            offdiag[i] = v == CATEGORY_LABEL_ISSUE
            category[i] = v
            tally[c, v] += 1
    counts = tally.sum(axis=0)
    return offdiag, _count_pairs(labels, guess, K), category, counts


@njit(parallel=True, **_JIT)
def label_values(P, labels):
    """``P[i, labels[i]]`` as float64 (unchecked values), for thresholds
    computed before the pass that checks them (:func:`scan_rows`)."""
    N = labels.shape[0]
    out = np.empty(N, np.float64)
    for i in prange(N):
        out[i] = _ld(P[i, labels[i]])
    return out


@njit(parallel=True, **_JIT)
def scan_rows(P, B, labels, tolerance, ubits, prec, want_entropy, tbits, obits, n_chunks):
    """:func:`row_stats` and :func:`confident_pass_categories` in one pass,
    for when the thresholds are known before it (they need only the labels'
    values, :func:`label_values`). Returns row_stats' six outputs followed by
    confident_pass_categories' four; when a problem is found the other
    outputs are meaningless."""
    N, K = P.shape
    argmax, label_is_max, selfconf, other, entropy = _row_outputs(N, want_entropy)
    offdiag = np.empty(N, np.bool_)
    category = np.empty(N, np.int8)
    guess = np.empty(N, np.int32)
    tally = np.zeros((n_chunks, 4), np.int64)
    codes, rows, cols, vals = _problem_slots(n_chunks)
    eps = _rnd(FLOATING_POINT_COMPARISON, prec)
    upper = 1.0 + tolerance
    log_k = math.log(K)
    band = _sum_band(K, upper, prec)
    size = (N + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        buf = np.empty(K if want_entropy else 0, np.float64)
        for i in range(c * size, min(N, (c + 1) * size)):
            r = P[i]
            b = B[i]
            y = labels[i]
            lo, hi, ob, f, last, above_ood = _scan_row_confident(b, y, tbits, obits)
            ok, s, am, lim, sc, oth = _row_facts(r, b, y, lo, hi, ob, tolerance, band, ubits, eps, prec)
            if not ok:
                codes[c], rows[c], cols[c], vals[c] = _report(r, i, s, upper)
                break
            argmax[i], label_is_max[i], selfconf[i], other[i] = am, lim, sc, oth
            if want_entropy:
                entropy[i] = _entropy_of(r, buf, sc, prec, log_k)
            g, v = _confident_row(y, f, last, above_ood, am, K)
            guess[i] = g
            offdiag[i] = v == CATEGORY_LABEL_ISSUE
            category[i] = v
            tally[c, v] += 1
    problem = _first_reported(codes, rows, cols, vals)
    counts = tally.sum(axis=0)
    cj = _count_pairs(labels, guess, K) if problem[0] == CHECK_OK else np.zeros((K, K), np.int64)
    return problem, argmax, label_is_max, selfconf, other, entropy, offdiag, cj, category, counts


@njit(**_JIT)
def class_label_quality(joint, n_examples):
    """cleanlab's ``rank_classes_by_label_quality`` from the joint (K, K)
    float64 (rows given label, columns true label) and N.

    Per class k: label issues ``round((row_k - joint[k, k]) * N)``, inverse
    label issues the same with column sums, label noise ``(row_k -
    joint[k, k]) / max(row_k, 1e-6)``, inverse label noise likewise with the
    column, label quality ``1 - label noise``; row sums pairwise and column
    sums row after row, as numpy sums them. Returns ``(order, issues,
    inverse_issues, noise, inverse_noise, quality)``, each (K,) and already
    in ``order``: classes by label quality ascending, equal scores in class
    order (a stable sort).
    """
    K = joint.shape[0]
    rows = _row_sums(joint)
    cols = _col_sums(joint)
    issues = np.empty(K, np.int64)
    inverse_issues = np.empty(K, np.int64)
    noise = np.empty(K, np.float64)
    inverse_noise = np.empty(K, np.float64)
    quality = np.empty(K, np.float64)
    for k in range(K):
        given = rows[k] - joint[k, k]
        true = cols[k] - joint[k, k]
        issues[k] = np.int64(np.rint(given * n_examples))
        inverse_issues[k] = np.int64(np.rint(true * n_examples))
        noise[k] = given / max(rows[k], EPSILON)
        inverse_noise[k] = true / max(cols[k], EPSILON)
        quality[k] = 1.0 - noise[k]
    order = np.argsort(quality, kind="mergesort")
    return order, issues[order], inverse_issues[order], noise[order], inverse_noise[order], quality[order]


@njit(**_JIT)
def overlapping_pairs(joint, n_examples, asymmetric):
    """cleanlab's ``find_overlapping_classes`` from the joint (K, K) float64.

    Symmetric: every pair a < b with ``joint[a, b] + joint[b, a]``;
    asymmetric: every ordered pair a != b with ``joint[a, b]``. Returns
    ``(a, b, num_overlapping, joint_probability)`` sorted by joint
    probability descending, equal values in row-major pair order (a stable
    sort); ``num_overlapping = round(p * N)``.
    """
    K = joint.shape[0]
    m = K * (K - 1) if asymmetric else K * (K - 1) // 2
    a = np.empty(m, np.int64)
    b = np.empty(m, np.int64)
    p = np.empty(m, np.float64)
    t = 0
    for i in range(K):
        for j in range(K):
            if asymmetric:
                if i == j:
                    continue
                v = joint[i, j]
            else:
                if j <= i:
                    continue
                v = joint[i, j] + joint[j, i]
            a[t], b[t], p[t] = i, j, v
            t += 1
    order = np.argsort(-p, kind="mergesort")
    num = np.empty(m, np.int64)
    for t in range(m):
        num[t] = np.int64(np.rint(p[order[t]] * n_examples))
    return a[order], b[order], num, p[order]


@njit(**_JIT)
def _normalized_entropy(row, buf, K, prec, log_k):
    """``-sum(xlogy(p, p)) / log(K)`` of one row as the reference computes it:
    scipy's xlogy runs float32 in float32 and float16 in float64, numpy sums
    pairwise in that precision, the division is float64."""
    eprec = PREC64 if prec == PREC16 else prec
    for j in range(K):
        v = row[j]
        if v == 0.0:
            buf[j] = 0.0
        elif eprec == PREC32:
            v32 = np.float32(v)
            buf[j] = np.float64(v32 * math.log(v32))
        else:
            buf[j] = v * math.log(v)
    return -_pairwise(buf, 0, K, eprec) / log_k


@njit(**_JIT)
def _gen_score(row, buf, K, M, gamma, prec, f16):
    """The GEN score ``1 - sum(q**gamma * (1 - q)**gamma) / M`` over the M
    largest ``q`` of ``softmax(row)``, every operation in precision ``prec``
    (``gamma`` already cast to it). float16 exp and powers come from numpy's
    own tables ``f16`` (:func:`f16_tables`); ``row`` is overwritten."""
    acc = PREC32 if prec == PREC16 else prec
    for j in range(K):
        if prec == PREC16:
            buf[j] = f16[0, _f16_bits(row[j])]
        else:
            buf[j] = _rnd(math.exp(row[j]), prec)
    s = _rnd(_pairwise(buf, 0, K, acc), prec)
    for j in range(K):
        row[j] = _rnd(buf[j] / s, prec)
    row.sort()
    m = min(M, K)
    for t in range(m):
        q = row[K - m + t]
        r = _rnd(1.0 - q, prec)
        if prec == PREC16:
            buf[t] = _rnd(f16[1, _f16_bits(q)] * f16[1, _f16_bits(r)], prec)
        else:
            buf[t] = _rnd(_rnd(q**gamma, prec) * _rnd(r**gamma, prec), prec)
    tot = _rnd(_pairwise(buf, 0, m, acc), prec)
    return _rnd(1.0 - _rnd(tot / _cast(np.float64(M), prec), prec), prec)


@njit(parallel=True, **_JIT)
def ood_scores(P, method, adjust, thresholds, tprec, prec, M, gamma, f16, n_chunks):
    """Out-of-distribution scores from predicted probabilities (cleanlab's
    ``OutOfDistribution`` with ``pred_probs``); lower is more atypical.

    ``P``: (N, K) as everywhere here. With ``adjust``, each row is first
    replaced by ``(p - t + max(t)) / sum(...)`` in the thresholds' precision
    ``tprec`` (``thresholds``: float64 (K,)), as for label quality scores;
    the scores are then computed in that precision, else in the input's
    ``prec``. ``method``:

    - OOD_ENTROPY: ``1 - normalized entropy``.
    - OOD_LEAST_CONFIDENCE: the row maximum.
    - OOD_GEN: ``1 - sum(q**gamma * (1 - q)**gamma) / M`` over the M largest
      ``q`` of ``softmax(row)`` (the reference applies softmax to the
      probabilities themselves). ``gamma`` is cast to the working precision;
      for float16, ``f16`` is :func:`f16_tables` ``(gamma)`` (else unused).

    Returns float64 (N,).
    """
    N, K = P.shape
    out = np.empty(N, np.float64)
    wp = tprec if adjust else prec
    acc = PREC32 if wp == PREC16 else wp
    tmax = thresholds.max() if adjust else 0.0
    log_k = math.log(K)
    g = _cast(gamma, wp)
    size = (N + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        row = np.empty(K, np.float64)
        buf = np.empty(K, np.float64)
        for i in range(c * size, min(N, (c + 1) * size)):
            if adjust:
                for j in range(K):
                    row[j] = _rnd(_rnd(_ld(P[i, j]) - thresholds[j], wp) + tmax, wp)
                s = _rnd(_pairwise(row, 0, K, acc), wp)
                for j in range(K):
                    row[j] = _rnd(row[j] / s, wp)
            else:
                for j in range(K):
                    row[j] = _ld(P[i, j])
            if method == OOD_ENTROPY:
                out[i] = 1.0 - _normalized_entropy(row, buf, K, wp, log_k)
            elif method == OOD_LEAST_CONFIDENCE:
                out[i] = row.max()
            else:
                out[i] = _gen_score(row, buf, K, M, g, wp, f16)
    return out
