"""Property tests of the in-process API: any valid input gives a valid output.

Hypothesis draws datasets (float16/32/64, N 1..200, K 2..12, with ties, one-hot
and uniform rows, zeros, missing classes) and every option, and checks what
must hold whatever the numbers are. The invariants were read off the code
(service/core.py, service/kernels.py) and cleanlab's definitions:

- ``is_label_issue``: bool (N,); ``num_label_issues`` is its count;
  ``ranked_issue_indices`` is a permutation of the flagged indices, by
  non-decreasing score, equal scores in index order.
- ``label_quality_score``: finite and in [0, 1] when every value is in [0, 1].
  ``confidence_weighted_entropy`` is log(1 + q) / max(q, 1e-6) with q >= 0
  (normalised entropy over self-confidence), computed in float64: at most 1
  up to the rounding of 1 + q (relative 1e-10 for q >= 1e-6).
  ``self_confidence`` equals ``pred_probs[i, labels[i]]``;
  ``normalized_margin`` is ``(p_label - max_other + 1) / 2``.
- ``suggested_label`` is ``argmax`` (first maximum) of the input as given.
- ``confident_joint``: non-negative integers whose row sums are the label
  counts (rows scaled to the counts, rounded keeping row totals; a class with
  no examples has a zero row); ``joint`` is it over its total.
- ``noise_matrix`` and ``inverse_noise_matrix``: in [0, 1], each column sums
  to 1 or is all zeros (a class the calibrated confident joint gives no
  examples to: the README's "columns sum to 1" has this exception);
  ``py`` in (0, 1], sums to 1; ``thresholds``: per-class mean
  self-confidence (clipped below at 2e-6 in its dtype), 2.0 for classes with no examples.
- ``estimated_num_label_issues`` in [0, N]; ``confident_learning`` flags
  exactly that many, ``low_*`` exactly min(that, N); every other method never
  flags an example whose label is the first row maximum once 1e-6 is added
  to it (in the input's precision).
- The inputs are not modified, and the answer is deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service import find_issues
from service.core import FILTER_BY, PRUNE_METHODS, RANK_BY

DTYPES = [np.float16, np.float32, np.float64]
SETTINGS = settings(
    max_examples=300,
    deadline=None,  # the first call may load or compile the kernels
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def datasets(draw, max_n: int = 200, max_k: int = 12):
    """(labels int64 (N,), pred_probs (N, K) of a float dtype, the prob_tolerance the rows need)."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(2, max_k))
    # Non-negative weights, normalised per row. Few distinct values make ties;
    # zeros make one-hot and sparse rows.
    weight = st.one_of(
        st.sampled_from([0.0, 0.0, 1.0, 2.0, 3.0, 1e-3]),
        st.floats(0.0, 1.0, allow_subnormal=False),
    )
    W = draw(hnp.arrays(np.float64, (n, k), elements=weight))
    dead = W.sum(axis=1) == 0
    W[dead] = 1.0  # an all-zero row becomes uniform
    P = (W / W.sum(axis=1, keepdims=True)).astype(dtype)
    # Class labels: any of the K classes, or only a few (missing classes).
    n_used = draw(st.integers(1, k))
    classes = draw(st.permutations(range(k)))[:n_used]
    labels = np.array(draw(st.lists(st.sampled_from(classes), min_size=n, max_size=n)), dtype=np.int64)
    # The tolerance the rows need once cast (float16 rounding moves a row's sum by up to ~K * 2.5e-4).
    off = float(np.abs(P.astype(np.float64).sum(axis=1) - 1.0).max())
    assume(off < 0.09)
    return labels, P, off


@st.composite
def options(draw, k: int, n: int, needed_tolerance: float):
    filter_by = draw(st.sampled_from(FILTER_BY))
    rank_by = draw(st.sampled_from(RANK_BY))
    opts: dict = {"filter_by": filter_by, "rank_by": rank_by}
    if rank_by != "confidence_weighted_entropy":
        opts["adjust_pred_probs"] = draw(st.booleans())
    if filter_by in PRUNE_METHODS:
        opts["frac_noise"] = draw(st.one_of(st.just(1.0), st.just(0.0), st.floats(0.0, 1.0)))
        if draw(st.booleans()):
            opts["num_to_remove_per_class"] = tuple(draw(st.lists(st.integers(0, n), min_size=k, max_size=k)))
    opts["min_examples_per_class"] = draw(st.integers(0, 10))
    low = max(1e-3, needed_tolerance * 1.5 + 1e-6)
    opts["prob_tolerance"] = draw(st.one_of(st.just(low), st.floats(low, 0.1))) if low < 0.1 else 0.1
    return opts


def check_result(labels: np.ndarray, P: np.ndarray, opts: dict, r) -> None:
    N, K = P.shape
    P64 = P.astype(np.float64)
    counts = np.bincount(labels, minlength=K)
    present = counts > 0

    assert (r.n_examples, r.n_classes) == (N, K)
    # Flags and ranking.
    mask = r.is_label_issue
    assert mask.dtype == np.bool_ and mask.shape == (N,)
    assert r.num_label_issues == int(mask.sum()) == r.ranked_issue_indices.shape[0]
    ranked = np.asarray(r.ranked_issue_indices)
    assert np.issubdtype(ranked.dtype, np.integer)
    np.testing.assert_array_equal(np.sort(ranked), np.flatnonzero(mask))  # a permutation of the flagged
    s = r.label_quality_score[ranked]
    assert np.all(s[:-1] <= s[1:]), "ranked by non-decreasing score"
    ties = s[:-1] == s[1:]
    assert np.all(ranked[:-1][ties] < ranked[1:][ties]), "equal scores in index order"

    # Scores.
    scores = r.label_quality_score
    assert scores.dtype == np.float64 and scores.shape == (N,)
    assert np.all(np.isfinite(scores))
    assert scores.min() >= 0.0
    assert scores.max() <= 1.0 + 1e-9, scores.max()
    if not opts.get("adjust_pred_probs"):
        sc = P64[np.arange(N), labels]
        if opts["rank_by"] == "self_confidence":
            np.testing.assert_array_equal(scores, sc)
        elif opts["rank_by"] == "normalized_margin":
            other = np.where(np.arange(K) == labels[:, None], -np.inf, P64).max(axis=1)
            np.testing.assert_allclose(scores, (sc - other + 1.0) / 2.0, rtol=0, atol=2e-3 if P.dtype == np.float16
                                       else 1e-6)

    # Suggested labels: the first maximum of the input as given.
    np.testing.assert_array_equal(r.suggested_label, np.argmax(P, axis=1))

    # Noise estimates.
    n = r.noise
    cj = n.confident_joint
    assert cj.shape == (K, K) and np.issubdtype(cj.dtype, np.integer)
    assert cj.min() >= 0
    np.testing.assert_array_equal(cj.sum(axis=1), counts)
    assert cj.sum() == N
    np.testing.assert_allclose(n.joint, cj / cj.sum(), rtol=1e-12, atol=0)
    for name in ("noise_matrix", "inverse_noise_matrix"):
        M = getattr(n, name)
        assert M.shape == (K, K) and np.all(np.isfinite(M)), name
        assert M.min() >= 0.0 and M.max() <= 1.0 + 1e-12, name
        # A column sums to 1, or is all zeros: a class that the calibrated
        # confident joint gives no examples to (possible even for a class with
        # a label: its one diagonal count can round away), as in the reference.
        colsum = M.sum(axis=0)
        zero = colsum == 0.0
        assert not zero.all(), (name, M)
        np.testing.assert_allclose(colsum[~zero], 1.0, rtol=0, atol=1e-9, err_msg=name)
    assert n.py.shape == (K,) and np.all(n.py > 0) and np.all(n.py <= 1.0)
    np.testing.assert_allclose(n.py.sum(), 1.0, rtol=0, atol=1e-9)
    t = n.thresholds
    assert t.shape == (K,)
    if not present.all():
        np.testing.assert_array_equal(t[~present], 2.0)
    # clipped below at 2e-6 in the thresholds' dtype (float32(2e-6) < 2e-6)
    assert np.all(t[present] >= 1.99e-6) and np.all(t[present] <= 1.0), t
    est = n.estimated_num_label_issues
    assert 0 <= est <= N

    # What each method may flag.
    fb = opts["filter_by"]
    if fb == "confident_learning":
        assert r.num_label_issues == est
    elif fb in ("low_self_confidence", "low_normalized_margin"):
        assert r.num_label_issues == min(est, N)
    else:
        # Never flagged: an example whose given label is still the first row
        # maximum once 1e-6 is added to it in the input's precision (the
        # reference's rule; in float16 the lift rounds away, so a tie with an
        # earlier column can be flagged).
        lifted = P[np.arange(N), labels] + 1e-6  # stays in the input's dtype (NEP 50)
        Q = P.copy()
        Q[np.arange(N), labels] = lifted
        label_is_max = np.argmax(Q, axis=1) == labels
        assert not np.any(mask & label_is_max), np.flatnonzero(mask & label_is_max)
        assert np.all(r.suggested_label[mask] != labels[mask])
    if fb == "predicted_neq_given":
        assert np.all(np.argmax(P, axis=1)[mask] != labels[mask])


@SETTINGS
@given(data=st.data())
def test_any_valid_input_gives_a_valid_output(data):
    labels, P, off = data.draw(datasets())
    opts = data.draw(options(P.shape[1], P.shape[0], off))
    labels_before, P_before = labels.copy(), P.copy()
    r = find_issues(labels, P, **opts)
    check_result(labels, P, opts, r)
    # The inputs are untouched, and the same call gives the same answer.
    np.testing.assert_array_equal(labels, labels_before)
    np.testing.assert_array_equal(P, P_before)
    again = find_issues(labels, P, **opts)
    np.testing.assert_array_equal(again.is_label_issue, r.is_label_issue)
    np.testing.assert_array_equal(again.ranked_issue_indices, r.ranked_issue_indices)
    np.testing.assert_array_equal(again.label_quality_score, r.label_quality_score)
    np.testing.assert_array_equal(again.noise.inverse_noise_matrix, r.noise.inverse_noise_matrix)


@settings(SETTINGS, max_examples=100)
@given(data=st.data(), layout=st.sampled_from(["F", "strided"]))
def test_memory_layout_does_not_change_the_answer(data, layout):
    """Fortran-ordered or strided matrices are normalised once: same answer as C order."""
    labels, P, off = data.draw(datasets(max_n=60))
    opts = data.draw(options(P.shape[1], P.shape[0], off))
    if layout == "F":
        Q = np.asfortranarray(P)
    else:
        big = np.zeros((P.shape[0], 2 * P.shape[1]), dtype=P.dtype)
        big[:, ::2] = P
        Q = big[:, ::2]
    a, b = find_issues(labels, P, **opts), find_issues(labels, Q, **opts)
    np.testing.assert_array_equal(a.ranked_issue_indices, b.ranked_issue_indices)
    np.testing.assert_array_equal(a.label_quality_score, b.label_quality_score)
    np.testing.assert_array_equal(a.noise.confident_joint, b.noise.confident_joint)


@settings(SETTINGS, max_examples=100)
@given(data=st.data())
def test_prune_methods_with_no_noise_fraction(data):
    """frac_noise = 0 keeps every example of the prune_* methods and both."""
    labels, P, off = data.draw(datasets(max_n=100))
    fb = data.draw(st.sampled_from(PRUNE_METHODS))
    r = find_issues(labels, P, filter_by=fb, frac_noise=0.0, prob_tolerance=max(1e-3, min(0.1, off * 1.5 + 1e-6)))
    assert r.num_label_issues == 0


# ---------------------------------------------------------------- values above 1 within the tolerance


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_above_one_within_tolerance_is_used_as_given(dtype):
    """A value in (1, 1 + prob_tolerance] is accepted and used as given (as
    cleanlab does for self-confidence): the self-confidence score is then that
    value, above 1. The README's "scores in [0, 1]" holds for values in [0, 1]."""
    P = np.array([[1.0005, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]], dtype=dtype)
    r = find_issues([0, 1, 0, 1], P, prob_tolerance=1e-3)
    assert r.label_quality_score[0] == float(P[0, 0]) > 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_score_refuses_a_value_above_one(dtype):
    """Values within prob_tolerance above 1 are valid, but not for this score
    (the reference raises): a 422 naming the row, not a negative score."""
    from service import InputError

    P = np.array([[1.0005, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]], dtype=dtype)
    with pytest.raises(InputError) as exc:
        find_issues([0, 1, 0, 1], P, rank_by="confidence_weighted_entropy", prob_tolerance=1e-3)
    assert exc.value.field == "pred_probs[0]"
