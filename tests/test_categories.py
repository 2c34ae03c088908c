"""Percentile thresholds and per-example categories on /find-issues.

Hand-made inputs whose answer is known, property tests (hypothesis) of the
categories against the reference's confident joint, conformance of the
percentile thresholds with the reference run on the same thresholds
(``cleanlab.count.compute_confident_joint(thresholds=...)`` and
``find_label_issues(confident_joint=...)``), and the option's validation
in-process, in JSON and in the npz query string.
"""

from __future__ import annotations

import io
import json
import warnings

import datasets
import numpy as np
import pytest
import reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient

from service import CATEGORIES, InputError, find_issues
from service.app import create_app
from service.settings import Settings

OK, LABEL_ISSUE, OOD, UNCONFIDENT = range(4)
PERCENTILE = {"method": "percentile", "class_percentile": 50, "ood_percentile": 15}


def test_category_codes():
    assert CATEGORIES == ("ok", "label_issue", "out_of_distribution", "unconfident")


# ---------------------------------------------------------------- hand-made


def separated(extra_rows, extra_labels):
    """Three well-separated classes, 20 examples each with self-confidence
    0.80, 0.81, ..., 0.99 (the rest split evenly), then the extra rows."""
    rows, labels = [], []
    for k in range(3):
        for v in np.arange(80, 100) / 100:
            row = np.full(3, (1 - v) / 2)
            row[k] = v
            rows.append(row)
            labels.append(k)
    extra = np.array(extra_rows, dtype=np.float64).reshape(-1, 3)
    return np.array(labels + extra_labels), np.vstack([np.array(rows), extra])


def test_hand_made_categories():
    extra = [[1 / 3, 1 / 3, 1 / 3], [0.05, 0.9, 0.05], [0.1, 0.05, 0.85], [0.02, 0.97, 0.01]]
    labels, P = separated(extra, [0, 0, 2, 1])
    a, b, c, d = range(60, 64)
    for th in (None, PERCENTILE):
        r = find_issues(labels, P, thresholds=th)
        # Equal probabilities: below every class's 15th-percentile threshold.
        assert r.category[a] == OOD
        # Labeled 0, confidently class 1.
        assert r.category[b] == LABEL_ISSUE
        # Labeled 2 at 0.85: below class 2's threshold (mean 0.893 / median 0.895) but not below its
        # out-of-distribution threshold (15th percentile: 0.83).
        assert r.noise.ood_thresholds[2] == pytest.approx(0.83)
        assert r.category[c] == UNCONFIDENT
        # Labeled 1, confidently 1.
        assert r.category[d] == OK
        np.testing.assert_array_equal(r.category_counts, np.bincount(r.category, minlength=4))


def test_percentile_extremes():
    labels, P = separated([[1 / 3, 1 / 3, 1 / 3]], [0])
    # The 0th percentile is the class minimum: every example is confident for its own label.
    r = find_issues(labels, P, thresholds={"method": "percentile", "class_percentile": 0})
    np.testing.assert_array_equal(r.noise.thresholds, [1 / 3, 0.80, 0.80])
    assert r.category_counts[OOD] == r.category_counts[UNCONFIDENT] == 0
    # The 100th is the class maximum: only the most confident example of each class is counted.
    r = find_issues(labels, P, thresholds={"method": "percentile", "class_percentile": 100, "ood_percentile": 0})
    np.testing.assert_array_equal(r.noise.thresholds, [0.99, 0.99, 0.99])
    assert r.category_counts[OK] == 3 and r.category_counts[LABEL_ISSUE] == 0
    # ood_percentile 0: out of distribution only below every class's minimum (1/3 for class 0, 0.8 else).
    assert r.category_counts[OOD] == 0
    # The default (mean) agrees with filter_by='confident_learning' where the label is not the maximum.
    r = find_issues(labels, P, filter_by="confident_learning")
    assert set(np.flatnonzero(r.is_label_issue)) <= set(np.flatnonzero(r.category == LABEL_ISSUE))


def test_a_class_with_no_examples():
    """Class 2 has no labels: both its thresholds are 2.0, nothing is confident
    for it, and it does not stop a row from being out of distribution."""
    labels, P = separated([], [])
    keep = labels < 2
    labels, P = labels[keep], P[keep]
    labels = np.append(labels, 0)
    P = np.vstack([P, [0.05, 0.05, 0.9]])
    for th in (None, PERCENTILE):
        r = find_issues(labels, P, thresholds=th)
        assert r.noise.thresholds[2] == r.noise.ood_thresholds[2] == 2.0
        assert r.category[-1] == OOD


def test_counted_rows_win_over_out_of_distribution():
    """With class thresholds below the out-of-distribution ones, a counted
    row stays ok / label_issue even when below every OOD threshold."""
    labels, P = separated([], [])
    r = find_issues(labels, P, thresholds={"method": "percentile", "class_percentile": 10, "ood_percentile": 90})
    low = P[np.arange(len(labels)), labels] < 0.9  # counted (above the 10th percentile), below the 90th
    counted = P[np.arange(len(labels)), labels] >= r.noise.thresholds[labels] - 1e-6
    assert (low & counted).any()
    assert (r.category[low & counted] == OK).all()


def test_default_outputs_are_unchanged_by_ood_percentile():
    labels, P = datasets.make(datasets.Spec(seed=61, n=500, k=4))
    a = find_issues(labels, P).to_dict()
    b = find_issues(labels, P, thresholds={"ood_percentile": 60}).to_dict()
    for name in ("is_label_issue", "label_quality_score", "ranked_issue_indices"):
        np.testing.assert_array_equal(a[name], b[name])
    for name in ("thresholds", "confident_joint", "joint", "noise_matrix", "inverse_noise_matrix", "py"):
        np.testing.assert_array_equal(a["noise"][name], b["noise"][name])
    np.testing.assert_array_equal(a["category"] <= LABEL_ISSUE, b["category"] <= LABEL_ISSUE)
    np.testing.assert_array_equal(a["category"][a["category"] <= 1], b["category"][b["category"] <= 1])
    assert b["category_counts"][OOD] > a["category_counts"][OOD]


# ---------------------------------------------------------------- properties


def percentile_thresholds(labels, P, q):
    """What the reference would use: ``np.percentile`` per class, 2 for a
    class with no examples, clipped like its mean thresholds."""
    t = [np.percentile(P[labels == k, k], q) if (labels == k).any() else 2 for k in range(P.shape[1])]
    return np.clip(t, 2e-6, None)


def reference_confident_joint(labels, P, thresholds=None):
    from cleanlab import count

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return count.compute_confident_joint(
            labels, P, thresholds=thresholds, calibrate=False, return_indices_of_off_diagonals=True
        )


@st.composite
def problems(draw):
    n = draw(st.integers(1, 60))
    k = draw(st.integers(2, 6))
    dtype = draw(st.sampled_from([np.float64, np.float32, np.float16]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):  # ties: multiples of 1/8
        P = rng.integers(0, 9, (n, k)).astype(np.float64) + 1e-9
        P = np.round(P / P.sum(1, keepdims=True) * 8) / 8
        P[np.arange(n), P.argmax(1)] += 1 - P.sum(1)
        P[(P < 0).any(1)] = 1.0 / k
    else:
        P = rng.dirichlet(np.full(k, draw(st.sampled_from([0.2, 1.0, 5.0]))), n)
    present = rng.permutation(k)[: draw(st.integers(1, k))]  # some classes may have no examples
    labels = rng.choice(present, n)
    method = draw(st.sampled_from(["mean", "percentile"]))
    th = {"method": method, "ood_percentile": draw(st.floats(0, 100))}
    if method == "percentile":
        th["class_percentile"] = draw(st.floats(0, 100))
    return labels.astype(np.int64), P.astype(dtype), th


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_categories_partition_and_follow_the_confident_joint(problem):
    labels, P, th = problem
    r = find_issues(labels, P, thresholds=th, prob_tolerance=0.01)
    N, K = P.shape
    # A partition: one category each, counted once.
    assert r.category.shape == (N,) and set(np.unique(r.category)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(r.category_counts, np.bincount(r.category, minlength=4))
    assert r.category_counts.sum() == N

    # ok / label_issue are exactly the rows of the uncalibrated confident joint, on / off its diagonal.
    t = None if th["method"] == "mean" else percentile_thresholds(labels, P, th["class_percentile"])
    if t is not None:
        np.testing.assert_array_equal(r.noise.thresholds, np.asarray(t, np.float64))
    cj, off = reference_confident_joint(labels, P, t)
    np.testing.assert_array_equal(np.flatnonzero(r.category == LABEL_ISSUE), off)
    ok_per_class = np.bincount(labels[r.category == OK], minlength=K)
    np.testing.assert_array_equal(np.maximum(ok_per_class, 1), np.diagonal(cj))
    counted_per_class = np.bincount(labels[r.category <= LABEL_ISSUE], minlength=K)
    np.testing.assert_array_equal(counted_per_class + (ok_per_class == 0), cj.sum(axis=1))

    # Out-of-distribution thresholds are the reference-style percentiles, and the rule holds.
    np.testing.assert_array_equal(
        r.noise.ood_thresholds, np.asarray(percentile_thresholds(labels, P, th["ood_percentile"]), np.float64)
    )
    P64 = P.astype(np.float64)
    ood = r.noise.ood_thresholds
    assert (P64[r.category == OOD] < ood).all()
    unconfident = P64[r.category == UNCONFIDENT]
    assert (unconfident >= ood - 1e-5).any(axis=1).all()


@settings(max_examples=40, deadline=None)
@given(problems())
def test_default_thresholds_give_the_reference_confident_joint(problem):
    labels, P, _ = problem
    r = find_issues(labels, P, prob_tolerance=0.01)
    cj, off = reference_confident_joint(labels, P)
    np.testing.assert_array_equal(np.flatnonzero(r.category == LABEL_ISSUE), off)
    ok_per_class = np.bincount(labels[r.category == OK], minlength=P.shape[1])
    np.testing.assert_array_equal(np.maximum(ok_per_class, 1), np.diagonal(cj))


# ---------------------------------------------------------------- conformance of the percentile method

PCT_SPECS = [s for s in datasets.specs()[1::6] if s.n <= 5000]


def reference_with_thresholds(labels, P, t):
    """Everything /find-issues reports, from the reference given thresholds ``t``."""
    from cleanlab import count, rank
    from cleanlab import filter as clf
    from cleanlab.filter import _reduce_issues
    from cleanlab.internal.label_quality_utils import _subtract_confident_thresholds

    with reference.stable_sorts(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cj_raw, idx = count.compute_confident_joint(
            labels, P, thresholds=t, calibrate=False, return_indices_of_off_diagonals=True
        )
        cj = count.calibrate_confident_joint(cj_raw, labels)
        py, nm, inm = count.estimate_latent(cj, labels, converge_latent_estimates=True)
        off = np.zeros(len(labels), bool)
        off[idx] = True
        issues = off & ~_reduce_issues(P, labels)
        masks = {
            fb: clf.find_label_issues(labels, P, filter_by=fb, confident_joint=cj, n_jobs=1)
            for fb in ("prune_by_noise_rate", "prune_by_class", "both")
        }
        masks["confident_learning"] = issues
        for fb in ("low_self_confidence", "low_normalized_margin"):
            scores = rank.get_label_quality_scores(labels, P, method=fb[4:], adjust_pred_probs=False)
            masks[fb] = np.zeros(len(labels), bool)
            masks[fb][np.argsort(scores)[: issues.sum()]] = True
        adjusted = _subtract_confident_thresholds(None, P, confident_thresholds=t)
        adjusted_scores = rank.get_self_confidence_for_each_label(labels, adjusted)
    return {"cj": cj, "py": py, "nm": nm, "inm": inm, "estimated": int(issues.sum()), "masks": masks,
            "adjusted_scores": adjusted_scores}


@pytest.mark.parametrize("spec", PCT_SPECS, ids=[s.id for s in PCT_SPECS])
def test_percentile_thresholds_match_reference(spec):
    labels, P = datasets.make(spec)
    tol = 1e-9 if P.dtype == np.float64 else 1e-6
    q = float(np.round(np.random.default_rng(spec.seed).uniform(0, 100), 2))
    th = {"method": "percentile", "class_percentile": q}
    t = percentile_thresholds(labels, P, q)
    ref = reference_with_thresholds(labels, P, t)
    for fb, mask in ref["masks"].items():
        r = find_issues(labels, P, filter_by=fb, thresholds=th)
        np.testing.assert_array_equal(r.is_label_issue, mask, err_msg=fb)
    np.testing.assert_array_equal(r.noise.thresholds, np.asarray(t, np.float64))
    np.testing.assert_array_equal(r.noise.confident_joint, ref["cj"])
    assert r.noise.estimated_num_label_issues == ref["estimated"]
    for name, key in (("py", "py"), ("noise_matrix", "nm"), ("inverse_noise_matrix", "inm")):
        np.testing.assert_allclose(getattr(r.noise, name), ref[key], rtol=tol, atol=1e-300, err_msg=name)
    r = find_issues(labels, P, thresholds=th, adjust_pred_probs=True)
    np.testing.assert_allclose(r.label_quality_score, ref["adjusted_scores"], rtol=tol, atol=1e-12)


# ---------------------------------------------------------------- validation and the wire

BAD_THRESHOLDS = [
    ({"method": "median"}, "options.thresholds.method"),
    ({"method": "percentile", "class_percentile": 101}, "options.thresholds.class_percentile"),
    ({"method": "percentile", "class_percentile": -1}, "options.thresholds.class_percentile"),
    ({"method": "percentile", "class_percentile": float("nan")}, "options.thresholds.class_percentile"),
    ({"ood_percentile": 100.5}, "options.thresholds.ood_percentile"),
    ({"ood_percentile": True}, "options.thresholds.ood_percentile"),
    ({"class_percentile": 50}, "options.thresholds.class_percentile"),  # only with method percentile
    ({"percentile": 50}, "options.thresholds.percentile"),
    ("percentile", "options.thresholds"),
]


@pytest.mark.parametrize("th, field", BAD_THRESHOLDS, ids=[f for _, f in BAD_THRESHOLDS])
def test_in_process_bad_thresholds(th, field):
    with pytest.raises(InputError) as exc:
        find_issues([0, 1], np.array([[0.9, 0.1], [0.2, 0.8]]), thresholds=th)
    assert exc.value.field == field


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False))) as c:
        yield c


L2, P2 = [0, 1, 1, 0], [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]


# msgspec checks types and names first (an unknown field is named by its object); core checks ranges.
JSON_BAD_THRESHOLDS = [(t, f) for t, f in BAD_THRESHOLDS if t != {"percentile": 50}] + [
    ({"percentile": 50}, "options.thresholds"),
    ({"ood_percentile": "15"}, "options.thresholds.ood_percentile"),
]


@pytest.mark.parametrize("th, field", JSON_BAD_THRESHOLDS, ids=[str(t) for t, _ in JSON_BAD_THRESHOLDS])
def test_json_bad_thresholds(client, th, field):
    payload = {"labels": L2, "pred_probs": P2, "options": {"thresholds": th}}
    content = json.dumps(payload).replace("NaN", "1e999")  # an overflowing literal is valid JSON (inf)
    r = client.post("/find-issues", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


@pytest.mark.parametrize(
    "query, field",
    [
        ("?thresholds=median", "options.thresholds.method"),
        ("?thresholds=percentile&class_percentile=abc", "options.thresholds.class_percentile"),
        ("?thresholds=percentile&class_percentile=120", "options.thresholds.class_percentile"),
        ("?class_percentile=50", "options.thresholds.class_percentile"),
        ("?ood_percentile=5&ood_percentile=6", "options.thresholds.ood_percentile"),
    ],
)
def test_npz_bad_thresholds(client, query, field):
    buf = io.BytesIO()
    np.savez(buf, labels=np.array(L2), pred_probs=np.array(P2))
    r = client.post(f"/find-issues{query}", content=buf.getvalue(), headers={"content-type": "application/x-npz"})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


def test_wire_forms_equal_in_process(client):
    labels, P = datasets.make(datasets.Spec(seed=62, n=400, k=5, dtype="float32"))
    want = find_issues(labels, P, filter_by="both", thresholds=PERCENTILE)
    buf = io.BytesIO()
    np.savez(buf, labels=labels, pred_probs=P)
    r = client.post(
        "/find-issues?filter_by=both&thresholds=percentile&class_percentile=50&ood_percentile=15",
        content=buf.getvalue(),
        headers={"content-type": "application/x-npz", "accept": "application/x-npz"},
    )
    assert r.status_code == 200, r.text
    z = np.load(io.BytesIO(r.content), allow_pickle=False)
    np.testing.assert_array_equal(z["category"], want.category)
    assert z["category"].dtype == np.int8
    np.testing.assert_array_equal(z["category_counts"], want.category_counts)
    np.testing.assert_array_equal(z["thresholds"], want.noise.thresholds)
    np.testing.assert_array_equal(z["ood_thresholds"], want.noise.ood_thresholds)
    np.testing.assert_array_equal(z["is_label_issue"], want.is_label_issue)

    P64 = P.astype(np.float64)  # JSON carries float64
    want = find_issues(labels, P64, thresholds=PERCENTILE)
    r = client.post("/find-issues", json={"labels": labels.tolist(), "pred_probs": P64.tolist(),
                                          "options": {"thresholds": PERCENTILE}})
    got = r.json()
    assert got["category"] == want.category.tolist()
    assert got["category_counts"] == want.category_counts.tolist()
    assert got["noise"]["ood_thresholds"] == want.noise.ood_thresholds.tolist()


# ---------------------------------------------------------------- the selection behind the percentiles


def quickselect_killer(n: int, k: int) -> np.ndarray:
    """Values that make median-of-three quickselect for rank k take ~n/4 rounds
    (McIlroy's adversary run against the same algorithm as the kernel's)."""
    gas, val, solid, candidate = n, [n] * n, [0], [0]

    def less(x, y):
        if val[x] == gas and val[y] == gas:
            val[x if x == candidate[0] else y] = solid[0]
            solid[0] += 1
        if val[x] == gas:
            candidate[0] = x
        elif val[y] == gas:
            candidate[0] = y
        return val[x] < val[y]

    a, lo, hi = list(range(n)), 0, n - 1
    while hi > lo:
        mid = (lo + hi) // 2
        for p, q in ((mid, lo), (hi, lo), (hi, mid)):
            if less(a[p], a[q]):
                a[p], a[q] = a[q], a[p]
        pivot, i, j = a[mid], lo, hi
        while i <= j:
            while less(a[i], pivot):
                i += 1
            while less(pivot, a[j]):
                j -= 1
            if i <= j:
                a[i], a[j], i, j = a[j], a[i], i + 1, j - 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    for i in range(n):
        if val[i] == gas:
            val[i] = solid[0]
            solid[0] += 1
    return np.array(val, dtype=np.float64)


def test_selection_survives_adversarial_input():
    from service import kernels as kn

    n = 800
    values = quickselect_killer(n, n // 2) / n
    x = values.copy()
    assert kn._select_in_place(x, n // 2) == np.sort(values)[n // 2]  # past 64 rounds: merge-sorted
    assert (x[: n // 2] <= x[n // 2]).all() and (x[n // 2 + 1 :] >= x[n // 2]).all()
    order, starts = np.arange(n), np.array([0, n])
    got = kn.class_percentiles(values, order, starts, 50.0, kn.PREC64)
    assert got[0] == np.percentile(values, 50.0)
    rng = np.random.default_rng(5)
    for data in (rng.random(301), np.round(rng.random(301) * 4) / 4, np.ones(7), np.arange(9.0)[::-1]):
        for k in (0, 3, len(data) // 2, len(data) - 1):
            x = data.copy()
            assert kn._select_in_place(x, k) == np.sort(data)[k]
