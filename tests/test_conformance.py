"""Conformance with the reference (cleanlab 2.9.0) on generated datasets.

For every dataset: every ``filter_by`` method (with the default and with
non-default numeric options), every ``rank_by`` x ``adjust_pred_probs``
combination, and the noise estimates. Flagged sets and rankings must be
identical; floats equal to 1e-9 relative (float64 input) or 1e-6
(float16/32 input).

The oracle runs with stable sorts (the tie rule we document). A second pass
runs cleanlab untouched: wherever its answer does not depend on how its
unstable sort orders ties, ours must equal it too.
"""

from __future__ import annotations

import numpy as np
import pytest

import datasets
import reference
from service import find_issues

SPECS = datasets.specs()
FILTERS = [
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
]
RANKS = [
    ("self_confidence", False),
    ("self_confidence", True),
    ("normalized_margin", False),
    ("normalized_margin", True),
    ("confidence_weighted_entropy", False),
]


def rtol(dtype) -> float:
    return 1e-9 if np.dtype(dtype) == np.float64 else 1e-6


def numeric_options(spec: datasets.Spec, labels: np.ndarray) -> list[dict]:
    """Non-default frac_noise / min_examples_per_class / num_to_remove_per_class."""
    rng = np.random.default_rng(spec.seed + 999)
    counts = np.bincount(labels, minlength=spec.k)
    opts = [
        {"frac_noise": float(np.round(rng.uniform(0.1, 0.9), 3))},
        {"min_examples_per_class": int(rng.choice([0, 2, 5, 50]))},
        {"frac_noise": 0.5, "min_examples_per_class": 0},
    ]
    ntr = [int(rng.integers(0, max(1, c // 4) + 1)) for c in counts]
    opts.append({"num_to_remove_per_class": ntr})
    return opts


def check_noise(ours, ref, tol):
    assert ours.estimated_num_label_issues == ref["estimated_num_label_issues"]
    np.testing.assert_array_equal(ours.confident_joint, ref["confident_joint"])
    np.testing.assert_array_equal(ours.confident_joint, ref["_cj_from_latent"])
    for name in ("thresholds", "joint", "noise_matrix", "inverse_noise_matrix", "py"):
        np.testing.assert_allclose(getattr(ours, name), ref[name], rtol=tol, atol=1e-300, err_msg=name)


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_matches_reference(spec: datasets.Spec):
    labels, P = datasets.make(spec)
    tol = rtol(P.dtype)
    ref_noise = reference.noise(labels, P)

    # Every filter_by, default options, ranked by the default score.
    for fb in FILTERS:
        ours = find_issues(labels, P, filter_by=fb)
        ref_mask = reference.mask(labels, P, filter_by=fb)
        np.testing.assert_array_equal(ours.is_label_issue, ref_mask, err_msg=f"filter_by={fb}")
        assert ours.num_label_issues == int(ref_mask.sum())
        np.testing.assert_array_equal(ours.suggested_label, P.argmax(axis=1))
        check_noise(ours.noise, ref_noise, tol)

        # Every rank_by x adjust_pred_probs on this method's flags.
        for rank_by, adjust in RANKS:
            o = find_issues(labels, P, filter_by=fb, rank_by=rank_by, adjust_pred_probs=adjust)
            np.testing.assert_array_equal(o.is_label_issue, ref_mask)
            ref_rank = reference.ranking(ref_mask, labels, P, rank_by=rank_by, adjust_pred_probs=adjust)
            np.testing.assert_array_equal(
                o.ranked_issue_indices, ref_rank, err_msg=f"ranking filter_by={fb} rank_by={rank_by} adjust={adjust}"
            )
            if fb == FILTERS[0]:
                ref_scores = reference.scores(labels, P, rank_by=rank_by, adjust_pred_probs=adjust)
                np.testing.assert_allclose(
                    o.label_quality_score, ref_scores, rtol=tol, atol=1e-12, err_msg=f"scores {rank_by} {adjust}"
                )

    # Numeric options on the pruning methods.
    for extra in numeric_options(spec, labels):
        for fb in ("prune_by_noise_rate", "prune_by_class", "both"):
            ours = find_issues(labels, P, filter_by=fb, **extra)
            ref_mask = reference.mask(labels, P, filter_by=fb, **extra)
            np.testing.assert_array_equal(ours.is_label_issue, ref_mask, err_msg=f"filter_by={fb} {extra}")


@pytest.mark.parametrize("spec", SPECS[::4], ids=[s.id for s in SPECS[::4]])
def test_matches_untouched_reference_where_ties_do_not_matter(spec: datasets.Spec):
    labels, P = datasets.make(spec)
    compared = 0
    for fb in FILTERS:
        stable = reference.mask(labels, P, filter_by=fb)
        plain = reference.mask(labels, P, filter_by=fb, stable=False)
        if not np.array_equal(stable, plain):
            continue  # the reference's own answer depends on its sort's tie order
        ours = find_issues(labels, P, filter_by=fb)
        np.testing.assert_array_equal(ours.is_label_issue, plain, err_msg=fb)
        r_stable = reference.ranking(plain, labels, P, rank_by="self_confidence", adjust_pred_probs=False)
        r_plain = reference.ranking(
            plain, labels, P, rank_by="self_confidence", adjust_pred_probs=False, stable=False
        )
        if np.array_equal(r_stable, r_plain):
            np.testing.assert_array_equal(ours.ranked_issue_indices, r_plain)
        compared += 1
    # Continuous float32/64 data rarely ties: most methods must have been compared.
    # (float16 has only 2^10 values per octave, so its ties are common.)
    if spec.dtype != "float16" and not (spec.quantize or spec.certain_frac or spec.uniform_frac):
        assert compared >= 5
