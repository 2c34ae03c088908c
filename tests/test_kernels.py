"""Unit tests of the numba kernels (``service.kernels``) against slow references.

Every reference here is written to be obviously correct rather than fast:
loops over rows, Python ``sorted`` with an explicit ``(key, index)`` tie
break, and numpy (``np.sum``, ``np.mean``, float32 / float16 arithmetic) where
a kernel claims to mirror numpy bit for bit. Inputs are small seeded random
datasets with ties (probabilities quantised to multiples of 1/8 or 1/10),
classes with no examples and classes with a single example, in float64,
float32 and float16 (which the kernels take as ``P16.view(np.uint16)``).

Kernels that do K x K algebra (calibration, noise estimates, keep-at-least-n)
are checked against invariants that can be stated exactly rather than
against a re-derivation of their formulas.

Kernels that take extra precomputed arguments (bit-pattern views, threshold
bit patterns) are called through small ``run_*`` helpers that prepare them
the way ``service.core`` does; only those helpers know the call signatures.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service import kernels as kn

DTYPES = [np.float64, np.float32, np.float16]
PREC = {np.dtype(np.float64): kn.PREC64, np.dtype(np.float32): kn.PREC32, np.dtype(np.float16): kn.PREC16}
CHUNKS = (1, 3, 7)
INT64_MIN = np.iinfo(np.int64).min


# --------------------------------------------------------------------------
# Input generators
# --------------------------------------------------------------------------


def kview(P: np.ndarray) -> np.ndarray:
    """What the kernels take: float16 as its bit patterns."""
    return P.view(np.uint16) if P.dtype == np.float16 else P


def as_bits(KP: np.ndarray) -> np.ndarray:
    """The kernel matrix viewed as integers of its width (float16 already is)."""
    if KP.dtype == np.uint16:
        return KP
    return KP.view(np.int32 if KP.dtype == np.float32 else np.int64)


def run_row_stats(P: np.ndarray, labels: np.ndarray, tolerance: float, want_entropy: bool, n_chunks: int):
    """kn.row_stats called as service.core calls it."""
    KP = kview(P)
    ubits = kn.value_bits([1.0 + tolerance], P.dtype, -1)[0]
    return kn.row_stats(KP, as_bits(KP), labels, tolerance, ubits, PREC[P.dtype], want_entropy, n_chunks)


def run_confident_pass(P: np.ndarray, labels: np.ndarray, tcmp: np.ndarray, argmax: np.ndarray, n_chunks: int):
    """kn.confident_pass called as service.core calls it (``tcmp`` as float64)."""
    KP = kview(P)
    return kn.confident_pass(as_bits(KP), labels, kn.value_bits(tcmp, P.dtype, +1), argmax, n_chunks)


def run_prune_by_noise_rate(P, order, starts, nonmax, pcm, min_examples_per_class):
    """kn.prune_by_noise_rate called as service.core calls it."""
    KP = kview(P)
    return kn.prune_by_noise_rate(KP, as_bits(KP), order, starts, nonmax, pcm, min_examples_per_class, PREC[P.dtype])


def random_probs(rng: np.random.Generator, N: int, K: int, dtype) -> np.ndarray:
    kind = int(rng.integers(5))
    if kind == 0:  # smooth
        P = rng.dirichlet(np.full(K, rng.uniform(0.2, 2.0)), size=N)
    elif kind == 1:  # multiples of 1/8: many exact ties, exact in every dtype
        P = rng.multinomial(8, np.full(K, 1.0 / K), size=N) / 8.0
    elif kind == 2:  # multiples of 1/10: ties, inexact in every dtype
        P = rng.multinomial(10, rng.dirichlet(np.ones(K)), size=N) / 10.0
    elif kind == 3:  # peaked, with some exactly uniform rows
        P = rng.random((N, K)) ** 6
        P /= P.sum(axis=1, keepdims=True)
        P[rng.random(N) < 0.2] = 1.0 / K
    else:  # near one-hot, with tiny values (float16 subnormals)
        P = rng.random((N, K)) * 1e-5
        P[np.arange(N), rng.integers(0, K, N)] = 1.0
        P /= P.sum(axis=1, keepdims=True)
    return np.ascontiguousarray(P.astype(dtype))


def random_labels(rng: np.random.Generator, P: np.ndarray) -> np.ndarray:
    """Labels that are mostly the row argmax, some random; often with a class
    that has no examples and a class with exactly one."""
    N, K = P.shape
    labels = np.argmax(P.astype(np.float64), axis=1)
    flip = rng.random(N) < rng.uniform(0.05, 0.5)
    labels[flip] = rng.integers(0, K, int(flip.sum()))
    if K > 2 and rng.random() < 0.5:  # empty classes
        gone = rng.choice(K, size=int(rng.integers(1, K - 1)), replace=False)
        keep = np.setdiff1d(np.arange(K), gone)
        bad = np.isin(labels, gone)
        labels[bad] = rng.choice(keep, int(bad.sum()))
    if N > 1 and rng.random() < 0.5:  # a singleton class
        c = int(rng.integers(K))
        others = [k for k in range(K) if k != c]
        sel = labels == c
        labels[sel] = rng.choice(others, int(sel.sum()))
        labels[int(rng.integers(N))] = c
    return labels.astype(np.int64)


def random_cases(seed: int, count: int, dtype, max_n: int = 300):
    """(rng, P, labels) for ``count`` random shapes: N in [1, max_n], K in [2, 12]."""
    rng = np.random.default_rng(seed)
    for t in range(count):
        if t % 4 == 0:
            N = int(rng.integers(1, 8))
        else:
            N = int(rng.integers(1, max_n + 1))
        K = int(rng.integers(2, 13))
        P = random_probs(rng, N, K, dtype)
        yield rng, P, random_labels(rng, P)


def ref_class_index(labels: np.ndarray, K: int):
    counts = np.array([sum(1 for y in labels if y == k) for k in range(K)], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    order = np.array([i for k in range(K) for i in range(len(labels)) if labels[i] == k], dtype=np.int64)
    return counts, starts, order


def bits(x) -> int:
    """float64 bit pattern (distinguishes -0.0 from 0.0)."""
    return int(np.array(float(x), dtype=np.float64).view(np.int64))


def assert_same_float(actual, expected, what=""):
    a, e = float(actual), float(expected)
    if math.isnan(e):
        assert math.isnan(a), f"{what}: expected nan, got {a!r}"
    else:
        assert bits(a) == bits(e), f"{what}: expected {e!r}, got {a!r}"


# --------------------------------------------------------------------------
# class_index
# --------------------------------------------------------------------------


def test_class_index_matches_reference():
    rng = np.random.default_rng(1)
    for _ in range(150):
        N = int(rng.integers(0, 300))
        K = int(rng.integers(1, 13))
        labels = rng.integers(0, K, N).astype(np.int64)
        if K > 1 and N:
            labels[labels == rng.integers(K)] = 0  # an empty class
        counts, starts, order = kn.class_index(labels, K)
        rc, rs, ro = ref_class_index(labels, K)
        np.testing.assert_array_equal(counts, rc)
        np.testing.assert_array_equal(starts, rs)
        np.testing.assert_array_equal(order, ro)
        assert starts.shape == (K + 1,) and order.shape == (N,)


@pytest.mark.parametrize(("N", "K"), [(131_072, 5), (1_000_003, 100), (300_000, 7000), (2_000_000, 2)])
def test_class_index_in_parallel_chunks(N, K):
    """From 2 x 65536 rows up the counting sort runs in chunks: the order
    within each class must still be ascending (numpy's stable argsort)."""
    rng = np.random.default_rng(N)
    labels = rng.integers(0, K, N)
    labels[: N // 3] = 0  # one class spread over several chunks, and a run of it
    counts, starts, order = kn.class_index(labels, K)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=K))
    np.testing.assert_array_equal(starts, np.concatenate([[0], np.cumsum(counts)]))
    np.testing.assert_array_equal(order, np.argsort(labels, kind="stable"))


# --------------------------------------------------------------------------
# numpy's summation: _pairwise, _sum_like_numpy
# --------------------------------------------------------------------------

SUM_LENGTHS = sorted(
    set(range(40))
    | {63, 64, 65, 127, 128, 129, 130, 135, 136, 137, 255, 256, 257, 1000, 1023, 1024, 1025}
    | {4095, 4096, 4097, 8191, 8192, 8193, 8200, 12345, 16383, 16384, 16385, 16400, 20000}
)


def _sum_inputs(rng, n):
    """A few arrays of length n whose sums are sensitive to the order of addition."""
    yield rng.random(n)
    yield rng.standard_normal(n) * 10.0 ** rng.integers(-3, 6, n)
    yield np.round(rng.random(n) * 8) / 8 + rng.random(n) * 1e-9


@pytest.mark.parametrize("n", SUM_LENGTHS)
def test_sum_like_numpy_float64(n):
    rng = np.random.default_rng(n)
    for x in _sum_inputs(rng, n):
        x = np.ascontiguousarray(x, dtype=np.float64)
        expected = np.sum(x)
        assert_same_float(kn._sum_like_numpy(x, kn.PREC64, False), expected, f"float64 n={n}")
        assert_same_float(kn._pairwise(x, 0, n, kn.PREC64), expected, f"float64 n={n}")


@pytest.mark.parametrize("n", SUM_LENGTHS)
def test_sum_like_numpy_float32(n):
    rng = np.random.default_rng(10_000 + n)
    for x in _sum_inputs(rng, n):
        x32 = x.astype(np.float32)
        expected = np.sum(x32)
        assert expected.dtype == np.float32
        assert_same_float(kn._sum_like_numpy(x32.astype(np.float64), kn.PREC32, False), expected, f"float32 n={n}")


@pytest.mark.parametrize("n", SUM_LENGTHS)
def test_sum_like_numpy_float16_in_float32(n):
    """float16 summed with dtype=float32: numpy casts in buffers of 8192 and
    adds the buffers' pairwise sums one after another."""
    rng = np.random.default_rng(20_000 + n)
    for x in _sum_inputs(rng, n):
        x16 = np.clip(x, -60_000, 60_000).astype(np.float16)
        expected = np.sum(x16, dtype=np.float32)
        got = kn._sum_like_numpy(x16.astype(np.float64), kn.PREC32, True)
        assert_same_float(got, expected, f"float16 n={n}")


def test_pairwise_with_offset():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(3000)
    x32 = x.astype(np.float32).astype(np.float64)
    for _ in range(200):
        lo = int(rng.integers(0, 3000))
        n = int(rng.integers(0, 3000 - lo + 1))
        assert_same_float(kn._pairwise(x, lo, n, kn.PREC64), np.sum(x[lo : lo + n]), f"lo={lo} n={n}")
        assert_same_float(
            kn._pairwise(x32, lo, n, kn.PREC32), np.sum(x32[lo : lo + n].astype(np.float32)), f"lo={lo} n={n}"
        )


def test_sum_order_matters_for_these_inputs():
    """Guard against a vacuous sum test: for these inputs a plain left-to-right
    sum differs from numpy's pairwise sum, so the comparisons above can fail."""
    rng = np.random.default_rng(20_000 + 8193)
    x16 = rng.random(8193).astype(np.float16)
    seq = np.float32(0)
    for v in x16.astype(np.float32):
        seq = np.float32(seq + v)
    assert seq != np.sum(x16, dtype=np.float32)
    x = np.random.default_rng(3).standard_normal(1000)
    seq64 = 0.0
    for v in x.tolist():
        seq64 += v
    assert seq64 != np.sum(x)


# --------------------------------------------------------------------------
# _round_f16
# --------------------------------------------------------------------------

_F16_FINITE = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)  # all >= 0 finite halves
_F16_MIDPOINTS = (_F16_FINITE[:-1] + _F16_FINITE[1:]) / 2  # exact in float64


def _check_round_f16(x: float):
    with np.errstate(over="ignore"):
        expected = float(np.float16(x))
    got = kn._round_f16(float(x))
    if math.isnan(expected):
        assert math.isnan(got), x
    else:
        assert bits(got) == bits(expected), f"_round_f16({x!r}) = {got!r}, numpy gives {expected!r}"


def test_round_f16_exhaustive_midpoints_and_neighbours():
    """Every float16 value, every midpoint between neighbours (ties to even),
    and the float64 values just either side of each midpoint, both signs."""
    xs = np.concatenate(
        [
            _F16_FINITE,
            _F16_MIDPOINTS,
            np.nextafter(_F16_MIDPOINTS, 0.0),
            np.nextafter(_F16_MIDPOINTS, np.inf),
            [65504.0, 65519.99999999999, 65520.0, 65520.00000000001, 65536.0, 1e300, np.inf, np.nan, 0.0],
            [2.0**-25, np.nextafter(2.0**-25, 1), np.nextafter(2.0**-25, 0), 2.0**-26, 3 * 2.0**-26, 2.0**-14],
            [np.nextafter(2.0**-14, 0), 2.0**-14 - 2.0**-25, 5e-324, 1e-310],
        ]
    )
    xs = np.concatenate([xs, -xs])
    with np.errstate(over="ignore"):
        expected = xs.astype(np.float16).astype(np.float64)
    got = np.array([kn._round_f16(float(x)) for x in xs])
    same = (got.view(np.int64) == expected.view(np.int64)) | (np.isnan(got) & np.isnan(expected))
    bad = np.flatnonzero(~same)
    assert bad.size == 0, [(xs[i], got[i], expected[i]) for i in bad[:5]]


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(min_value=-70000.0, max_value=70000.0),
        st.floats(min_value=-1e-4, max_value=1e-4),
        st.floats(min_value=-(2.0**-14), max_value=2.0**-14),
        st.integers(min_value=0, max_value=len(_F16_MIDPOINTS) - 1).map(lambda i: float(_F16_MIDPOINTS[i])),
        st.integers(min_value=-(2**31), max_value=2**31).map(lambda i: i * 2.0**-30),
    )
)
@example(65519.99999999999)
@example(65520.0)
@example(-65520.0)
@example(-0.0)
def test_round_f16_hypothesis(x):
    _check_round_f16(x)


# --------------------------------------------------------------------------
# class_means
# --------------------------------------------------------------------------


def _check_class_means(P: np.ndarray, labels: np.ndarray, K: int):
    _, starts, order = ref_class_index(labels, K)
    selfconf = P[np.arange(len(labels)), labels].astype(np.float64)  # exact
    got = kn.class_means(selfconf, order, starts, PREC[P.dtype])
    assert got.shape == (K,) and got.dtype == np.float64
    for k in range(K):
        col = P[labels == k, k]
        if col.size == 0:
            assert math.isnan(got[k]), f"class {k} is empty: expected nan, got {got[k]!r}"
            continue
        expected = np.mean(col)
        assert expected.dtype == P.dtype
        assert_same_float(got[k], expected, f"{P.dtype} class {k} (n={col.size})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_class_means_random(dtype):
    for _, P, labels in random_cases(100 + PREC[np.dtype(dtype)], 60, dtype):
        _check_class_means(P, labels, P.shape[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [(10_000, 8193, 200, 1, 0), (8192, 129, 128, 7, 0, 16_500)])
def test_class_means_large_classes(dtype, sizes):
    """Classes above numpy's pairwise block (128) and reduce buffer (8192)."""
    rng = np.random.default_rng(sum(sizes))
    K = len(sizes)
    labels = np.repeat(np.arange(K), sizes)
    rng.shuffle(labels)
    P = random_probs(rng, labels.size, K, np.float64)
    P = np.ascontiguousarray((0.25 + 0.75 * P * rng.random(P.shape)).astype(dtype))
    _check_class_means(P, labels.astype(np.int64), K)


# --------------------------------------------------------------------------
# row_stats (pass 1: row facts) and confident_pass (pass 2)
# --------------------------------------------------------------------------


def ref_row_facts(P: np.ndarray, labels: np.ndarray):
    """argmax, label_is_max, self-confidence and best other probability per row."""
    N, K = P.shape
    P64 = P.astype(np.float64)
    eps = P.dtype.type(kn.FLOATING_POINT_COMPARISON)  # 1e-6 rounded to the input's dtype
    argmax = np.zeros(N, np.int64)
    label_is_max = np.zeros(N, bool)
    selfconf = np.zeros(N)
    other = np.zeros(N)
    for i in range(N):
        y = int(labels[i])
        row = [float(v) for v in P64[i]]
        best = max(row)
        argmax[i] = min(j for j in range(K) if row[j] == best)
        selfconf[i] = row[y]
        other[i] = max(row[j] for j in range(K) if j != y)
        lifted = P[i].copy()
        lifted[y] = lifted[y] + eps  # numpy arithmetic in the input dtype
        assert lifted.dtype == P.dtype
        label_is_max[i] = int(np.argmax(lifted)) == y
    return argmax, label_is_max, selfconf, other


def ref_confident_joint(P: np.ndarray, labels: np.ndarray, tcmp: np.ndarray):
    """offdiag and the raw confident joint (rows given label, columns guess)."""
    N, K = P.shape
    P64 = P.astype(np.float64)
    offdiag = np.zeros(N, bool)
    cj = np.zeros((K, K), np.int64)
    for i in range(N):
        y = int(labels[i])
        row = [float(v) for v in P64[i]]
        am = min(j for j in range(K) if row[j] == max(row))
        confident = [j for j in range(K) if row[j] >= tcmp[j]]
        if confident:
            guess = am if len(confident) > 1 else confident[0]
            cj[y, guess] += 1
            offdiag[i] = guess != y
    return offdiag, cj


def ref_entropy_scores(P: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """cleanlab's confidence-weighted entropy, written with numpy/scipy in the input's dtype."""
    from scipy.special import xlogy

    K = P.shape[1]
    sc = np.clip(P[np.arange(len(labels)), labels], kn.CLIPPING_LOWER_BOUND, None)
    ent = -np.sum(xlogy(P, P), axis=1) / np.log(K)
    q = ent / sc
    return (np.log(q + 1) / np.clip(q, kn.CLIPPING_LOWER_BOUND, None)).astype(np.float64)


def random_tcmp(rng, P: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Comparison thresholds: sometimes exactly equal to probabilities in P
    (to exercise >=), sometimes the per-class means, sometimes a missing class's 2.0."""
    N, K = P.shape
    P64 = P.astype(np.float64)
    t = np.empty(K)
    for k in range(K):
        r = rng.random()
        if r < 0.3:
            t[k] = P64[rng.integers(N), k]
        elif r < 0.6:
            sel = labels == k
            t[k] = P64[sel, k].mean() - 1e-6 if sel.any() else kn.MISSING_CLASS_THRESHOLD - 1e-6
        elif r < 0.7:
            t[k] = kn.MISSING_CLASS_THRESHOLD - 1e-6
        else:
            t[k] = rng.random()
    return t


ROW_TOL = 0.1  # the largest prob_tolerance; float16 rows of 12 classes can be 3e-3 off


def _check_row_facts(P, labels, expected, want_entropy=False):
    for n_chunks in CHUNKS:
        problem, argmax, label_is_max, selfconf, other, entropy = run_row_stats(
            P, labels, ROW_TOL, want_entropy, n_chunks
        )
        assert problem[0] == kn.CHECK_OK, problem
        got = (argmax, label_is_max, selfconf, other)
        for name, g, e in zip(("argmax", "label_is_max", "selfconf", "other"), got, expected):
            np.testing.assert_array_equal(g, e, err_msg=f"{name}, n_chunks={n_chunks}, shape={P.shape}")
        if not want_entropy:
            assert entropy.shape == (0,)
    return entropy


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_stats_row_facts(dtype):
    n_not_max = n_max = 0
    for _, P, labels in random_cases(200 + PREC[np.dtype(dtype)], 50, dtype):
        expected = ref_row_facts(P, labels)
        _check_row_facts(P, labels, expected)
        n_not_max += int((~expected[1]).sum())
        n_max += int(expected[1].sum())
    assert n_not_max > 0 and n_max > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_stats_entropy(dtype):
    """confidence-weighted entropy: float64 terms for float64 and float16 input
    (scipy's xlogy has no float16 loop), float32 terms and sums for float32."""
    for _, P, labels in random_cases(250 + PREC[np.dtype(dtype)], 30, dtype):
        entropy = _check_row_facts(P, labels, ref_row_facts(P, labels), want_entropy=True)
        expected = ref_entropy_scores(P, labels)
        assert entropy.shape == expected.shape
        np.testing.assert_allclose(entropy, expected, rtol=1e-12, atol=0, err_msg=f"shape={P.shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_stats_label_lift_ties(dtype):
    """Rows where the given label is below the max by exactly 1e-6 (or less), or tied with it."""
    dt = np.dtype(dtype)
    eps = float(dt.type(1e-6))
    rows, labels = [], []
    for base in (0.5, 0.25, 0.125, 1 / 3, 0.3, 0.45):
        b = float(dt.type(base))
        for delta in (0.0, eps / 2, eps, 2 * eps, float(np.spacing(dt.type(b)))):
            for y, other in ((0, 1), (1, 0), (2, 1), (1, 2)):
                r = np.zeros(3)
                r[other] = b
                r[y] = float(dt.type(b - delta))
                r[3 - y - other] = 1.0 - r[y] - r[other]
                rows.append(r)
                labels.append(y)
    P = np.ascontiguousarray(np.array(rows).astype(dt))
    labels = np.array(labels, np.int64)
    expected = ref_row_facts(P, labels)
    assert expected[1].any() and not expected[1].all()
    _check_row_facts(P, labels, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_confident_pass_matches_reference(dtype):
    n_seen = {"offdiag": 0, "multi_confident": 0, "single_confident": 0}
    for rng, P, labels in random_cases(300 + PREC[np.dtype(dtype)], 50, dtype):
        tcmp = random_tcmp(rng, P, labels)
        argmax = ref_row_facts(P, labels)[0]
        expected = ref_confident_joint(P, labels, tcmp)
        for n_chunks in CHUNKS:
            offdiag, cj = run_confident_pass(P, labels, tcmp, argmax, n_chunks)
            np.testing.assert_array_equal(offdiag, expected[0], err_msg=f"offdiag n_chunks={n_chunks} shape={P.shape}")
            np.testing.assert_array_equal(cj, expected[1], err_msg=f"cj n_chunks={n_chunks} shape={P.shape}")
        nconf = (P.astype(np.float64) >= tcmp).sum(axis=1)
        n_seen["offdiag"] += int(expected[0].sum())
        n_seen["multi_confident"] += int((nconf > 1).sum())
        n_seen["single_confident"] += int((nconf == 1).sum())
    assert all(v > 0 for v in n_seen.values()), n_seen  # the interesting branches were exercised


# --------------------------------------------------------------------------
# row_stats: validation
# --------------------------------------------------------------------------


def ref_check_probs(P, tolerance):
    """First problem: (code, row, col, value, ambiguous). The kernel may sum a
    row in any order, so a row sum within 1e-12 of the tolerance is ambiguous."""
    P64 = P.astype(np.float64)
    N, K = P.shape
    for i in range(N):
        for j in range(K):
            v = float(P64[i, j])
            if not math.isfinite(v):
                return kn.CHECK_NOT_FINITE, i, j, v, False
            if v < 0.0:
                return kn.CHECK_NEGATIVE, i, j, v, False
            if v > 1.0 + tolerance:
                return kn.CHECK_ABOVE_ONE, i, j, v, False
        s = math.fsum(P64[i].tolist())
        if abs(abs(s - 1.0) - tolerance) < 1e-12:
            return kn.CHECK_ROW_SUM, i, -1, s, True
        if abs(s - 1.0) > tolerance:
            return kn.CHECK_ROW_SUM, i, -1, s, False
    return kn.CHECK_OK, -1, -1, 0.0, False


def _check_problem(P, tol, n_chunks, expected):
    labels = np.zeros(P.shape[0], np.int64)
    problem = tuple(run_row_stats(P, labels, tol, False, n_chunks)[0])
    code, row, col, value = problem
    assert (code, row, col) == expected[:3], (P.dtype, P.shape, tol, n_chunks, problem, expected)
    if code == kn.CHECK_ROW_SUM:
        assert abs(value - expected[3]) <= 1e-12 * max(1.0, abs(expected[3])), (value, expected[3])
    elif code != kn.CHECK_OK:
        assert_same_float(value, expected[3], "value")


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_stats_problem_matches_reference(dtype):
    codes_seen = set()
    ambiguous = 0
    for rng, P, _ in random_cases(900 + PREC[np.dtype(dtype)], 120, dtype):
        N, K = P.shape
        P = P.copy()
        for _ in range(int(rng.integers(0, 4))):  # inject 0..3 problems
            i, j = int(rng.integers(N)), int(rng.integers(K))
            P[i, j] = rng.choice([np.nan, np.inf, -np.inf, -0.25, -1e-4, 1.5, 1.0 + 2e-3, 0.999, 0.0, 0.5])
        tol = float(rng.choice([1e-3, 1e-2, 1e-6, 0.1]))
        expected = ref_check_probs(P, tol)
        if expected[4]:
            ambiguous += 1
            continue
        codes_seen.add(expected[0])
        for n_chunks in CHUNKS:
            _check_problem(P, tol, n_chunks, expected)
    assert ambiguous < 5
    assert codes_seen == {kn.CHECK_OK, kn.CHECK_NOT_FINITE, kn.CHECK_NEGATIVE, kn.CHECK_ABOVE_ONE, kn.CHECK_ROW_SUM}


def test_row_stats_problem_is_first_row():
    P = np.full((20, 2), 0.5)
    P[15, 0] = np.nan
    P[4, 1] = 0.7  # row sum 1.2
    P[9, 1] = -0.5
    for n_chunks in (1, 2, 3, 7, 20):
        _check_problem(P, 1e-3, n_chunks, (kn.CHECK_ROW_SUM, 4, -1, 1.2))
    P[4, 1] = 0.5
    for n_chunks in (1, 2, 3, 7, 20):
        _check_problem(P, 1e-3, n_chunks, (kn.CHECK_NEGATIVE, 9, 1, -0.5))
    P[9, 1] = 0.5
    for n_chunks in (1, 2, 3, 7, 20):
        _check_problem(P, 1e-3, n_chunks, (kn.CHECK_NOT_FINITE, 15, 0, np.nan))
    P[15, 0] = 0.5
    for n_chunks in (1, 2, 3, 7, 20):
        _check_problem(P, 1e-3, n_chunks, (kn.CHECK_OK, -1, -1, 0.0))


def test_row_stats_problem_precedence_within_a_row():
    """Within a row: the first bad value wins; a row-sum problem only without one."""
    tol = 1e-3
    cases = [
        ([0.5, np.nan, -1.0, 0.5], (kn.CHECK_NOT_FINITE, 0, 1)),
        ([0.5, -1.0, np.nan, 0.5], (kn.CHECK_NEGATIVE, 0, 1)),
        ([2.0, -1.0, 0.0, 0.0], (kn.CHECK_ABOVE_ONE, 0, 0)),
        ([1.0 + 2 * tol, -2 * tol, 0.0, 0.0], (kn.CHECK_ABOVE_ONE, 0, 0)),  # sums to 1, still invalid
        ([1.0 + tol / 2, 0.0, 0.0, 0.0], (kn.CHECK_OK, -1, -1)),
        ([0.25, 0.25, 0.25, 0.25 + 2 * tol], (kn.CHECK_ROW_SUM, 0, -1)),
    ]
    for dtype in DTYPES:
        for row, (code, r, c) in cases:
            P = np.array([row], dtype=dtype)
            expected = ref_check_probs(P, tol)
            assert expected[:3] == (code, r, c) and not expected[4]
            for n_chunks in (1, 3):
                _check_problem(P, tol, n_chunks, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_stats_rejects_negative_zero(dtype):
    """Documented choice: -0.0 is reported as negative (CHECK_NEGATIVE). The
    row passes compare bit patterns, which order like the values only for
    +0 and above; softmax output never holds -0.0, so we refuse it rather
    than pay for canonicalising every value."""
    P = np.array([[0.5, 0.5, 0.0], [0.25, -0.0, 0.75], [0.5, 0.5, 0.0]], dtype=dtype)
    labels = np.array([0, 1, 2], np.int64)
    problem = kn.row_stats(
        P.view(np.uint16) if P.dtype == np.float16 else P,
        P.view({2: np.uint16, 4: np.int32, 8: np.int64}[P.dtype.itemsize]),
        labels,
        1e-3,
        kn.value_bits([1.001], P.dtype, -1)[0],
        {8: kn.PREC64, 4: kn.PREC32, 2: kn.PREC16}[P.dtype.itemsize],
        False,
        1,
    )[0]
    assert tuple(problem[:3]) == (kn.CHECK_NEGATIVE, 1, 1)


# --------------------------------------------------------------------------
# value_bits: float comparisons as integer comparisons
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_bits_orders_like_floats(dtype):
    """For x >= +0 of the dtype: x >= v iff bits(x) >= value_bits(v, +1) and
    x <= v iff bits(x) <= value_bits(v, -1), for float64 v >= 0 on, between
    and beyond the dtype's values."""
    dt = np.dtype(dtype)
    rng = np.random.default_rng(PREC[dt])
    xs = np.concatenate(
        [
            [0.0, 1.0, 0.5, 1e-6, 2e-6, 1.0 + 1e-3, 2.0, float(np.finfo(dt).max), float(np.finfo(dt).tiny)],
            rng.random(300),
            rng.random(100) * 1e-5,
            np.round(rng.random(100) * 8) / 8,
        ]
    ).astype(dt)
    with np.errstate(over="ignore"):
        xs = np.concatenate([xs, np.nextafter(xs, dt.type(np.inf)), np.nextafter(xs, dt.type(0))])
    xs = np.append(xs, dt.type(np.inf))
    xs = np.ascontiguousarray(xs[xs >= 0])
    xb = as_bits(kview(xs))
    vs = np.concatenate(
        [
            xs[np.isfinite(xs)].astype(np.float64),  # exactly representable
            rng.random(200),
            rng.random(100) * 1e-6,
            [0.0, 1e-6, 2.0 - 1e-6, 1.0 + 1e-3, 1.0 + 1e-6, 1.1, 65519.0, 65520.0, 1e6, 1e300],
        ]
    )
    with np.errstate(over="ignore"):
        vs = np.concatenate([vs, np.nextafter(vs, np.inf), np.nextafter(vs, 0.0)])
        up = kn.value_bits(vs, dt, +1)
        down = kn.value_bits(vs, dt, -1)
    assert up.dtype == xb.dtype and down.dtype == xb.dtype and up.shape == vs.shape
    x64 = xs.astype(np.float64)
    for v, u, d in zip(vs, up, down):
        np.testing.assert_array_equal(xb >= u, x64 >= v, err_msg=f"x >= {v!r}")
        np.testing.assert_array_equal(xb <= d, x64 <= v, err_msg=f"x <= {v!r}")


# --------------------------------------------------------------------------
# round_preserving_sum
# --------------------------------------------------------------------------


def ref_round_preserving_sum(floats) -> np.ndarray:
    floats = np.asarray(floats, dtype=np.float64)
    n = len(floats)
    ints = np.round(floats)
    orig_sum = np.round(np.sum(floats))
    int_sum = np.round(np.sum(ints))
    for _ in range(10_000):
        if not abs(int_sum - orig_sum) > kn.FLOATING_POINT_COMPARISON:
            return ints.astype(np.int64)
        diff = np.round(orig_sum - int_sum)
        increment = -1 if diff < 0 else 1
        changes = min(int(abs(diff)), n)
        order = np.argsort(floats - ints, kind="stable")
        chosen = order[::-1][:changes] if increment == 1 else order[:changes]
        for i in chosen:
            ints[i] += increment
        int_sum = np.round(np.sum(ints))
    raise AssertionError("reference did not converge")


_ROUNDING_VALUES = st.one_of(
    st.floats(min_value=0.0, max_value=1000.0),
    st.floats(min_value=-50.0, max_value=50.0),
    st.integers(min_value=0, max_value=400).map(lambda i: i / 4),  # exact .25/.5/.75: ties
    st.integers(min_value=0, max_value=100).map(lambda i: i / 10),
    st.integers(min_value=0, max_value=30).map(lambda i: i / 3),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_ROUNDING_VALUES, min_size=0, max_size=40))
@example([0.5, 0.5, 0.5, 0.5])
@example([1.5, 2.5, 0.5, 0.5])
@example([0.3, 0.3, 0.3, 0.1])
@example([0.25, 0.25, 0.25, 0.25])
@example([1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3])
@example([2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
def test_round_preserving_sum_hypothesis(values):
    floats = np.array(values, dtype=np.float64)
    got = kn.round_preserving_sum(floats.copy())
    expected = ref_round_preserving_sum(floats)
    np.testing.assert_array_equal(got, expected, err_msg=repr(values))
    if len(values):
        assert got.sum() == np.round(np.sum(floats))


def test_round_preserving_sum_tie_breaking():
    """Equal remainders: increments go to the highest indices, decrements to
    the lowest (a stable sort, reversed for increments)."""
    np.testing.assert_array_equal(kn.round_preserving_sum(np.array([0.4, 0.4, 0.4, 0.4, 0.4])), [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(kn.round_preserving_sum(np.array([0.6, 0.6, 0.6, 0.6, 0.6])), [0, 0, 1, 1, 1])
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(1, 15))
        floats = rng.integers(0, 12, n) / rng.choice([3.0, 4.0, 6.0, 8.0, 10.0])
        np.testing.assert_array_equal(kn.round_preserving_sum(floats.copy()), ref_round_preserving_sum(floats))


def test_round_preserving_sum_nan():
    """A NaN makes the total NaN: nothing is adjusted, and the NaN cell becomes
    numpy's float -> int64 cast of NaN (INT64_MIN on x86)."""
    floats = np.array([1.2, np.nan, 3.7, 0.5])
    with np.errstate(invalid="ignore"):
        expected = np.round(floats).astype(np.int64)
    assert expected[1] == INT64_MIN, "numpy's NaN cast is platform-specific; this test assumes x86"
    np.testing.assert_array_equal(kn.round_preserving_sum(floats.copy()), expected)


# --------------------------------------------------------------------------
# calibrate_confident_joint, estimate_latent, keep_at_least_n_per_class
# --------------------------------------------------------------------------


def pipeline_confident_joint(rng, P: np.ndarray, labels: np.ndarray):
    """The raw confident joint (diagonal clipped to >= 1) and the label counts,
    as service.core builds them (with the reference row pass)."""
    K = P.shape[1]
    counts = np.bincount(labels, minlength=K).astype(np.int64)
    cj = ref_confident_joint(P, labels, random_tcmp(rng, P, labels))[1]
    np.fill_diagonal(cj, np.maximum(np.diagonal(cj), 1))
    return cj, counts


def _joint_cases(seed: int, count: int):
    for t, dtype in zip(range(count), [np.float64, np.float32, np.float16] * count):
        yield from random_cases(seed + t, 1, dtype)


def test_calibrate_confident_joint_invariants():
    n_proportional = 0
    for rng, P, labels in _joint_cases(300, 120):
        cj, counts = pipeline_confident_joint(rng, P, labels)
        cal = kn.calibrate_confident_joint(cj.copy(), counts)
        assert cal.dtype == np.int64 and cal.shape == cj.shape
        # Row totals are the label counts (empty classes: a zero row).
        np.testing.assert_array_equal(cal.sum(axis=1), counts)
        assert (cal >= 0).all()
        # Cells that are zero stay zero; each cell is within 1 of its exact scaled value.
        assert not (cal[cj == 0]).any()
        exact = cj / cj.sum(axis=1, keepdims=True) * counts[:, None]
        assert np.abs(cal - exact).max() < 1 + 1e-9
        # Rows that already total their label count are unchanged.
        same = cj.sum(axis=1) == counts
        np.testing.assert_array_equal(cal[same], cj[same])
        n_proportional += int(same.any() and not same.all())
    assert n_proportional > 0


def test_calibrate_confident_joint_random_matrices():
    rng = np.random.default_rng(31)
    for _ in range(300):
        K = int(rng.integers(2, 13))
        cj = rng.integers(0, 50, (K, K)) * (rng.random((K, K)) < 0.6)
        np.fill_diagonal(cj, rng.integers(1, 200, K))
        counts = rng.integers(0, 300, K).astype(np.int64)
        counts[0] = max(counts[0], 1)
        cal = kn.calibrate_confident_joint(cj.astype(np.int64), counts)
        np.testing.assert_array_equal(cal.sum(axis=1), counts)
        assert (cal >= 0).all() and not cal[cj == 0].any()
        exact = cj / cj.sum(axis=1, keepdims=True) * counts[:, None]
        assert np.abs(cal - exact).max() < 1 + 1e-9


def _check_latent(py, nm, inm, counts):
    K = counts.shape[0]
    assert py.shape == (K,) and nm.shape == (K, K) and inm.shape == (K, K)
    for M in (nm, inm):
        assert np.isfinite(M).all()
        assert (M >= 0).all() and (M <= 1 + 1e-12).all()
    # P(true | given = j): a distribution for every class with examples; a
    # class with no examples has an all-zero column (the reference divides by
    # max(0, TINY_VALUE)).
    nonempty = counts > 0
    np.testing.assert_allclose(inm.sum(axis=0)[nonempty], 1.0, rtol=0, atol=1e-12)
    assert not inm[:, ~nonempty].any()
    # P(given | true = j): a distribution, or all zero when nothing is estimated
    # to truly be class j (clip_noise_rates divides a zero column by TINY_VALUE).
    col = nm.sum(axis=0)
    zero = ~nm.any(axis=0)
    np.testing.assert_allclose(col[~zero], 1.0, rtol=0, atol=1e-12)
    assert np.isfinite(py).all()
    assert abs(py.sum() - 1.0) <= 1e-12
    # clipped to >= 1e-5, then divided by the clipped total (at most 1 + K * 1e-5)
    assert (py >= 1e-5 / (1.0 + K * 1e-5) * (1 - 1e-12)).all()
    assert (py <= 1.0).all()


def test_estimate_latent_invariants():
    n_empty = n_full = 0
    for rng, P, labels in _joint_cases(400, 120):
        cj, counts = pipeline_confident_joint(rng, P, labels)
        cal = kn.calibrate_confident_joint(cj, counts)
        py, nm, inm = kn.estimate_latent(cal, counts, 1)
        _check_latent(py, nm, inm, counts)
        if (counts > 0).all() and (np.diagonal(cal) > 0).all():
            np.testing.assert_allclose(nm.sum(axis=0), 1.0, rtol=0, atol=1e-12)
            n_full += 1
        n_empty += int((counts == 0).any())
    assert n_empty > 0 and n_full > 0


@pytest.mark.parametrize("K", [2, 7, 33, 300])
def test_estimate_latent_does_not_depend_on_the_blocks(K):
    """The K x K steps run in parallel blocks at large K: every block count
    gives bit-identical matrices (each entry and column sum in the same order)."""
    rng = np.random.default_rng(K)
    counts = rng.integers(0 if K > 2 else 1, 500, K).astype(np.int64)
    cj = rng.integers(0, 40, (K, K)).astype(np.int64) * (rng.random((K, K)) < 0.3)
    np.fill_diagonal(cj, np.maximum(counts // 2, 1))
    serial = kn.estimate_latent(cj, counts, 1)
    for nt in (2, 3, 8):
        for a, b in zip(kn.estimate_latent(cj, counts, nt), serial, strict=True):
            np.testing.assert_array_equal(a, b)


def test_estimate_latent_without_noise_is_identity():
    """A diagonal confident joint: no noise, and the priors are the label frequencies."""
    rng = np.random.default_rng(41)
    for _ in range(100):
        K = int(rng.integers(2, 13))
        counts = rng.integers(1, 1000, K).astype(np.int64)
        cj = np.diag(counts).astype(np.int64)
        py, nm, inm = kn.estimate_latent(cj, counts, 1)
        np.testing.assert_array_equal(nm, np.eye(K))
        np.testing.assert_array_equal(inm, np.eye(K))
        ps = np.clip(counts / counts.sum(), 1e-5, 1.0)
        np.testing.assert_allclose(py, ps / ps.sum(), rtol=1e-12, atol=0)
        _check_latent(py, nm, inm, counts)


def test_keep_at_least_n_per_class_invariants():
    rng = np.random.default_rng(51)
    for t in range(400):
        K = int(rng.integers(2, 13))
        pcm = (rng.integers(0, 40, (K, K)) * (rng.random((K, K)) < 0.5)).astype(np.int64)
        np.fill_diagonal(pcm, rng.integers(0, 30, K))
        n = int(rng.choice([0, 1, 2, 5, 20, 50]))
        frac = float(rng.choice([1.0, 0.0, 0.5, 0.3, float(rng.random())]))
        out = kn.keep_at_least_n_per_class(pcm.copy(), n, frac)
        assert out.dtype == np.int64 and out.shape == (K, K)
        diag = np.diagonal(out)
        assert (diag >= n).all() and (diag >= np.diagonal(pcm)).all()
        off = ~np.eye(K, dtype=bool)
        assert (out[off] >= 0).all() and (out[off] <= pcm[off]).all()
        if frac == 0.0:
            assert not out[off].any()
        if frac == 1.0:
            np.testing.assert_array_equal(diag, np.maximum(np.diagonal(pcm), n))
            if n == 0:
                np.testing.assert_array_equal(out, pcm)
        # Keeping more per class never prunes more off the diagonal.
        if n > 0:
            out0 = kn.keep_at_least_n_per_class(pcm.copy(), 0, frac)
            assert (out[off] <= out0[off]).all()
        # frac_noise scales the off-diagonal counts (then truncates) and the
        # diagonal takes up what they lose: compared with frac_noise = 1, each
        # off-diagonal cell is between floor(frac * c) and frac * (c + 1), and
        # each column keeps its total (up to one truncation per cell).
        full = kn.keep_at_least_n_per_class(pcm.copy(), n, 1.0)
        assert (out[off] >= np.floor(frac * full[off])).all()
        assert (out[off] <= frac * (full[off] + 1)).all()
        assert (np.abs(out.sum(axis=0) - full.sum(axis=0)) < K).all()
        if n == 0:  # no class needs topping up: the counts are pcm's own
            np.testing.assert_array_equal(out[off], np.floor(pcm * frac)[off])
            moved = [math.fsum((pcm[:, j] - pcm[:, j] * frac)[np.arange(K) != j]) for j in range(K)]
            for j in range(K):
                x = pcm[j, j] + moved[j]
                assert math.floor(x - 1e-9) <= diag[j] <= math.floor(x + 1e-9), (j, x, diag[j])


# --------------------------------------------------------------------------
# prune_by_noise_rate, prune_by_class, smallest_scores, rank_flagged
# --------------------------------------------------------------------------


def ref_prune_by_noise_rate(P, labels, pcm, min_examples_per_class):
    N, K = P.shape
    mask = np.zeros(N, bool)
    for k in range(K):
        idx = [i for i in range(N) if labels[i] == k]
        n = len(idx)
        if n <= min_examples_per_class or n <= 1:
            continue
        for j in range(K):
            m = int(pcm[j, k])
            if j == k or m <= 0:
                continue
            margin = P[idx, j] - P[idx, k]  # numpy, in the input's dtype
            assert margin.dtype == P.dtype
            for t in sorted(range(n), key=lambda t: (-float(margin[t]), t))[:m]:
                mask[idx[t]] = True
    return mask


def ref_prune_by_class(P, labels, pcm, min_examples_per_class):
    N, K = P.shape
    mask = np.zeros(N, bool)
    for k in range(K):
        idx = [i for i in range(N) if labels[i] == k]
        n = len(idx)
        if n <= min_examples_per_class or n <= 1:
            continue
        m = n - int(pcm[k, k])
        if m < 1:
            continue
        for t in sorted(range(n), key=lambda t: (float(P[idx[t], k]), t))[:m]:
            mask[idx[t]] = True
    return mask


def ref_nonmax(P, labels) -> np.ndarray:
    """Rows where some other class has a strictly larger probability than the label."""
    P64 = P.astype(np.float64)
    K = P.shape[1]
    return np.array([any(P64[i, j] > P64[i, y] for j in range(K) if j != y) for i, y in enumerate(labels)], bool)


def random_prune_counts(rng, labels, K):
    counts = np.bincount(labels, minlength=K)
    pcm = np.zeros((K, K), np.int64)
    for j in range(K):
        for k in range(K):
            r = rng.random()
            if r < 0.3:
                pcm[j, k] = 0
            elif r < 0.35 and j != k:
                pcm[j, k] = INT64_MIN  # apply_num_to_remove_per_class's NaN cell: prunes nothing
            else:
                pcm[j, k] = rng.integers(0, counts[k] + 3)
    return pcm


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_by_noise_rate_matches_reference(dtype):
    """Including cells with fewer positive margins than examples to prune (the
    kernel then selects among the whole class) and with at least as many."""
    flagged = 0
    cells = {"enough_positive": 0, "too_few_positive": 0}
    for rng, P, labels in random_cases(500 + PREC[np.dtype(dtype)], 60, dtype):
        K = P.shape[1]
        counts, starts, order = ref_class_index(labels, K)
        pcm = random_prune_counts(rng, labels, K)
        mex = int(rng.choice([0, 1, 2, 5]))
        expected = ref_prune_by_noise_rate(P, labels, pcm, mex)
        got = run_prune_by_noise_rate(P, order, starts, ref_nonmax(P, labels), pcm, mex)
        np.testing.assert_array_equal(got, expected, err_msg=f"shape={P.shape} min_examples={mex}")
        flagged += int(expected.sum())
        P64 = P.astype(np.float64)
        for k in range(K):
            if counts[k] <= max(mex, 1):
                continue
            for j in range(K):
                if j != k and pcm[j, k] > 0:
                    positive = int((P64[labels == k, j] > P64[labels == k, k]).sum())
                    cells["enough_positive" if positive >= pcm[j, k] else "too_few_positive"] += 1
    assert flagged > 0 and min(cells.values()) > 0, cells


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_by_noise_rate_many_positive_margins(dtype):
    """Near-uniform rows whose label is among the smallest values: positive
    margins for most classes, many more than the class has rows (the kernel
    then collects them one cell at a time). Ties from quantised rows."""
    rng = np.random.default_rng(1000 + PREC[np.dtype(dtype)])
    heavy = 0
    for _ in range(25):
        N, K = int(rng.integers(2, 120)), int(rng.integers(6, 13))
        P = 1.0 / K + rng.choice([0.0, 1e-3, 2e-3, -1e-3], size=(N, K)) * rng.random((N, 1))
        P /= P.sum(axis=1, keepdims=True)
        P = np.ascontiguousarray(P.astype(dtype))
        P64 = P.astype(np.float64)
        labels = np.argmin(P64, axis=1).astype(np.int64)
        labels[rng.random(N) < 0.2] = rng.integers(0, K)
        counts, starts, order = ref_class_index(labels, K)
        pcm = np.zeros((K, K), np.int64)
        for k in range(K):  # prune at most the class's size: mostly fewer than its positive margins
            pcm[:, k] = rng.integers(0, counts[k] + 2, K) * (rng.random(K) < 0.9)
        for k in range(K):
            rows = labels == k
            pos = [int((P64[rows, j] > P64[rows, k]).sum()) if j != k and pcm[j, k] > 0 else 0 for j in range(K)]
            if counts[k] > 1 and sum(pos) > 4 * counts[k]:
                heavy += sum(1 for j in range(K) if pcm[j, k] > 0 and pos[j] >= pcm[j, k])
        expected = ref_prune_by_noise_rate(P, labels, pcm, 1)
        got = run_prune_by_noise_rate(P, order, starts, ref_nonmax(P, labels), pcm, 1)
        np.testing.assert_array_equal(got, expected, err_msg=f"shape={P.shape}")
    assert heavy > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_prune_by_noise_rate_margin_precision(dtype):
    """Margins that differ in float64 but are equal once rounded to the input
    precision are ties, taken in index order (not in float64 order)."""
    dt = np.dtype(dtype)
    N, m = 20, 6
    tiny = np.arange(N, 0, -1) * (2.0**-24 if dt == np.float16 else 5e-10)  # decreasing, exact in dt
    P = np.ascontiguousarray(np.stack([tiny, np.full(N, 0.5)], axis=1).astype(dt))
    assert len(set(P[:, 0].tolist())) == N
    margin = P[:, 1] - P[:, 0]
    assert (margin == dt.type(0.5)).all()  # all tied in the input precision ...
    assert (np.diff(P[:, 1].astype(np.float64) - P[:, 0].astype(np.float64)) > 0).all()  # ... not in float64
    labels = np.zeros(N, np.int64)
    _, starts, order = ref_class_index(labels, 2)
    pcm = np.array([[0, 0], [m, 0]], np.int64)
    expected = np.arange(N) < m
    np.testing.assert_array_equal(ref_prune_by_noise_rate(P, labels, pcm, 1), expected)
    got = run_prune_by_noise_rate(P, order, starts, ref_nonmax(P, labels), pcm, 1)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_by_class_matches_reference(dtype):
    flagged = 0
    for rng, P, labels in random_cases(600 + PREC[np.dtype(dtype)], 60, dtype):
        K = P.shape[1]
        _, starts, order = ref_class_index(labels, K)
        pcm = random_prune_counts(rng, labels, K)
        np.fill_diagonal(pcm, np.maximum(np.diagonal(pcm), 0))
        mex = int(rng.choice([0, 1, 2, 5]))
        expected = ref_prune_by_class(P, labels, pcm, mex)
        got = kn.prune_by_class(ref_self_confidence(P, labels).astype(np.float64), order, starts, pcm, mex)
        np.testing.assert_array_equal(got, expected, err_msg=f"shape={P.shape} min_examples={mex}")
        flagged += int(expected.sum())
    assert flagged > 0


def test_prune_skips_small_classes():
    """A class with one example (or <= min_examples_per_class) is never pruned."""
    P = np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.9, 0.1]])
    labels = np.array([0, 0, 0, 1], np.int64)
    _, starts, order = ref_class_index(labels, 2)
    pcm = np.array([[0, 5], [5, 0]], np.int64)
    for mex, expected in ((0, [1, 1, 1, 0]), (2, [1, 1, 1, 0]), (3, [0, 0, 0, 0])):
        nonmax = ref_nonmax(P, labels)
        np.testing.assert_array_equal(run_prune_by_noise_rate(P, order, starts, nonmax, pcm, mex), expected)
        np.testing.assert_array_equal(kn.prune_by_class(P[np.arange(4), labels], order, starts, pcm, mex), expected)


def test_smallest_scores_matches_reference():
    rng = np.random.default_rng(71)
    for _ in range(400):
        n = int(rng.integers(0, 200))
        q = int(rng.choice([2, 5, 1000, 10**9]))
        scores = rng.integers(0, q, n) / q
        m = int(rng.integers(-1, n + 3))
        expected = np.zeros(n, bool)
        for i in sorted(range(n), key=lambda i: (scores[i], i))[: max(m, 0)]:
            expected[i] = True
        np.testing.assert_array_equal(kn.smallest_scores(scores, m), expected, err_msg=f"n={n} m={m}")


def test_rank_flagged_matches_reference():
    rng = np.random.default_rng(81)
    for _ in range(400):
        n = int(rng.integers(0, 200))
        q = int(rng.choice([2, 5, 1000, 10**9]))
        scores = rng.integers(0, q, n) / q
        mask = rng.random(n) < rng.random()
        expected = sorted((i for i in range(n) if mask[i]), key=lambda i: (scores[i], i))
        got = kn.rank_flagged(mask, scores)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, np.array(expected, np.int64))


# --------------------------------------------------------------------------
# Label quality scores: normalized_margin, adjusted_scores
# --------------------------------------------------------------------------


def ref_self_confidence(P, labels):
    return P[np.arange(len(labels)), labels]


def ref_max_other(P, labels):
    idx = np.arange(len(labels))
    others = P.copy()
    others[idx, labels] = -np.inf
    return others.max(axis=1)


def ref_normalized_margin(P, labels):
    out = (ref_self_confidence(P, labels) - ref_max_other(P, labels) + 1) / 2  # numpy, in P's dtype
    assert out.dtype == P.dtype
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalized_margin(dtype):
    for _, P, labels in random_cases(700 + PREC[np.dtype(dtype)], 60, dtype):
        selfconf = ref_self_confidence(P, labels).astype(np.float64)
        other = ref_max_other(P, labels).astype(np.float64)
        got = kn.normalized_margin(selfconf, other, PREC[P.dtype])
        expected = ref_normalized_margin(P, labels).astype(np.float64)
        assert got.dtype == np.float64 and got.shape == labels.shape
        if P.dtype == np.float64:
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
        else:
            np.testing.assert_array_equal(got, expected)


def test_normalized_margin_rounding_matters():
    """Guard: for float16 input, computing the margin in float64 and rounding
    once gives a different answer for some of these rows, so the exact
    comparison above can fail."""
    differs = 0
    for _, P, labels in random_cases(716, 60, np.float16):
        sc = ref_self_confidence(P, labels).astype(np.float64)
        mo = ref_max_other(P, labels).astype(np.float64)
        once = ((sc - mo + 1) / 2).astype(np.float16)
        differs += int((once != ref_normalized_margin(P, labels)).sum())
    assert differs > 0


def random_thresholds(rng, P, labels):
    """(thresholds as float64, their dtype) the way service.core builds them:
    in P's dtype when every class has examples, else float64 with 2.0 for
    the missing classes; clipped to >= 2e-6."""
    K = P.shape[1]
    counts = np.bincount(labels, minlength=K)
    if (counts > 0).all() and rng.random() < 0.8:
        t = np.array([np.mean(P[labels == k, k]) for k in range(K)], dtype=P.dtype)
    else:
        t = np.array([np.mean(P[labels == k, k]) if counts[k] else 2.0 for k in range(K)], dtype=np.float64)
        if rng.random() < 0.3:
            t[rng.integers(K)] = 0.0
    t = np.clip(t, kn.CONFIDENT_THRESHOLDS_LOWER_BOUND, None)
    return t


@pytest.mark.parametrize("dtype", DTYPES)
def test_adjusted_scores(dtype):
    """adjust_pred_probs: (p - t + max(t)) / row sum, in numpy with the
    promotion of P's dtype and the thresholds' dtype."""
    n_low_precision = 0
    for rng, P, labels in random_cases(800 + PREC[np.dtype(dtype)], 40, dtype):
        t = random_thresholds(rng, P, labels)
        adj = P - t + t.max()
        adj = adj / adj.sum(axis=1, keepdims=True)
        assert adj.dtype == np.result_type(P.dtype, t.dtype)
        tprec = PREC[t.dtype]
        n_low_precision += tprec != kn.PREC64
        for method, ref in ((kn.SELF_CONFIDENCE, ref_self_confidence), (kn.NORMALIZED_MARGIN, ref_normalized_margin)):
            expected = ref(adj, labels).astype(np.float64)
            for n_chunks in (1, 7):
                got = kn.adjusted_scores(kview(P), labels, method, t.astype(np.float64), tprec, n_chunks)
                if adj.dtype == np.float64:
                    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0, err_msg=f"{method} {P.shape}")
                else:
                    np.testing.assert_array_equal(got, expected, err_msg=f"{method} {P.shape} {adj.dtype}")
    assert dtype == np.float64 or n_low_precision > 0


def test_predicted_neq_given():
    rng = np.random.default_rng(91)
    for _ in range(50):
        n = int(rng.integers(0, 300))
        labels = rng.integers(0, 4, n).astype(np.int64)
        argmax = rng.integers(0, 4, n).astype(np.int64)
        np.testing.assert_array_equal(kn.predicted_neq_given(argmax, labels), argmax != labels)


# --------------------------------------------------------------------------
# scan_rows: pass 1 and pass 2 fused (service.core's default path)
# --------------------------------------------------------------------------


def run_scan_rows(P, labels, tolerance, want_entropy, tcmp, ocmp, n_chunks):
    """kn.scan_rows called as service.core calls it."""
    KP = kview(P)
    ubits = kn.value_bits([1.0 + tolerance], P.dtype, -1)[0]
    tb, ob = kn.value_bits(tcmp, P.dtype, +1), kn.value_bits(ocmp, P.dtype, +1)
    return kn.scan_rows(KP, as_bits(KP), labels, tolerance, ubits, PREC[P.dtype], want_entropy, tb, ob, n_chunks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scan_rows_is_the_two_passes(dtype):
    """The fused pass returns exactly what row_stats followed by
    confident_pass_categories return, and the same first problem."""
    problems = 0
    for rng, P, labels in random_cases(4200 + PREC[np.dtype(dtype)], 80, dtype):
        P = P.copy()
        if rng.random() < 0.3:
            P[rng.integers(P.shape[0]), rng.integers(P.shape[1])] = rng.choice([np.nan, -0.0, 1.5, -0.1])
        tol = float(rng.choice([1e-3, 1e-6, 0.05]))
        want_entropy = bool(rng.random() < 0.3)
        tcmp = random_thresholds(rng, P, labels) - kn.FLOATING_POINT_COMPARISON
        ocmp = np.clip(tcmp * rng.random(), 0, None)
        for n_chunks in CHUNKS:
            fused = run_scan_rows(P, labels, tol, want_entropy, tcmp, ocmp, n_chunks)
            first = run_row_stats(P, labels, tol, want_entropy, n_chunks)
            assert tuple(fused[0]) == tuple(first[0]) or (
                math.isnan(fused[0][3]) and tuple(fused[0])[:3] == tuple(first[0])[:3]
            )
            if first[0][0] != kn.CHECK_OK:
                problems += 1
                continue
            for a, b in zip(fused[1:6], first[1:], strict=True):
                np.testing.assert_array_equal(a, b)
            second = kn.confident_pass_categories(
                as_bits(kview(P)), labels, kn.value_bits(tcmp, P.dtype, +1), kn.value_bits(ocmp, P.dtype, +1),
                first[1], n_chunks,
            )
            for a, b in zip(fused[6:], second, strict=True):
                np.testing.assert_array_equal(a, b)
    assert problems > 10


@pytest.mark.parametrize("tol", [1e-3, 1e-6, 0.0, 0.2])
def test_float32_row_sums_near_the_bounds_decide_as_float64(tol):
    """row_stats sums float32 rows in float32 and re-sums in float64 only near
    1 +- tolerance: a row whose exact sum is a hair inside or outside the
    bound must be judged by its exact sum, as the float64 rule does."""
    rng = np.random.default_rng(77)
    K = 300
    for sign in (+1, -1):
        for delta in (-1e-6, -1e-7, -2e-8, 2e-8, 1e-7, 1e-6):
            P = rng.random((64, K)).astype(np.float32)
            P /= P.sum(axis=1, keepdims=True)
            P = P.astype(np.float32)
            target = 1.0 + sign * (tol + delta)
            for i in range(P.shape[0]):  # move column 0 so that the float64 sum lands near the target
                rest = math.fsum(P[i, 1:].astype(np.float64).tolist())
                P[i, 0] = np.float32(target - rest)
            sums = [math.fsum(r.tolist()) for r in P.astype(np.float64)]
            expected_bad = [abs(s - 1.0) > tol for s in sums]
            if any(abs(abs(s - 1.0) - tol) < 1e-12 for s in sums) or (P < 0).any():
                continue
            labels = rng.integers(0, K, 64)
            problem = run_row_stats(P, labels, tol, False, 3)[0]
            first_bad = next((i for i, b in enumerate(expected_bad) if b), -1)
            if first_bad < 0:
                assert problem[0] == kn.CHECK_OK, (sign, delta, problem)
            else:
                assert (problem[0], problem[1]) == (kn.CHECK_ROW_SUM, first_bad), (sign, delta, problem)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.sampled_from([0.0, -0.0, 1.0, 0.5, np.nan, -np.nan]),
        ),
        max_size=60,
    ),
    st.integers(0, 3000),
    st.integers(0, 2**32 - 1),
)
def test_argsort_stable_is_numpys_stable_argsort(head, n, seed):
    """The radix argsort (used from 2048 values up) orders as numpy's stable
    argsort: -0.0 equal to 0.0, NaNs last, ties in index order."""
    rng = np.random.default_rng(seed)
    pool = np.array(head + [0.25, 0.5, 1.0, 0.0, -0.0], np.float64)
    values = np.concatenate([pool[rng.integers(0, len(pool), n)], rng.random(n // 2)])
    np.testing.assert_array_equal(kn.argsort_stable(values), np.argsort(values, kind="stable"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_find_issues_reports_the_first_problem_whichever_column(dtype):
    """service.core computes the thresholds from the labels' values before
    the one checking pass, and falls back to the checking pass alone when a
    label's value is itself invalid: either way the error names the first
    bad value in row order, as a check of every value would."""
    from service import find_issues
    from service.errors import InputError

    rng = np.random.default_rng(11)
    N, K = 500, 6
    for trial in range(40):
        P = rng.dirichlet(np.ones(K), N).astype(dtype)
        labels = rng.integers(0, K, N)
        bad = sorted(rng.choice(N, size=int(rng.integers(1, 4)), replace=False))
        for i in bad:
            on_label = rng.random() < 0.5
            j = int(labels[i]) if on_label else int((labels[i] + 1 + rng.integers(K - 1)) % K)
            P[i, j] = rng.choice([np.nan, -0.25, 1.75, np.inf])
        with pytest.raises(InputError) as e:
            find_issues(labels, P)
        assert e.value.field.startswith(f"pred_probs[{bad[0]}]"), (trial, e.value.field, bad)
