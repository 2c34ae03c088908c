"""The shared real sets (model outputs with human-verified label errors) as
regression inputs: identical to the reference on every method, and the
recall of human-verified errors, ours next to the reference's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import reference
from service import find_issues

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "labelerrors"
SETS = ["mnist", "cifar10"]
FILTERS = [
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
]


def load(name: str):
    folder = DATA / name
    if not folder.exists():
        pytest.skip(f"shared data not found at {folder}")
    P = np.load(folder / "pred_probs.npy", allow_pickle=False)
    labels = np.load(folder / "labels.npy", allow_pickle=False)
    review = json.loads((folder / "review.json").read_text())
    return labels, P, np.asarray(review["human_verified_errors"], dtype=np.int64)


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_real_set_matches_reference(name: str, dtype: str):
    labels, P, _ = load(name)
    P = P.astype(dtype)
    ref_noise = reference.noise(labels, P)
    for fb in FILTERS:
        ours = find_issues(labels, P, filter_by=fb)
        ref_mask = reference.mask(labels, P, filter_by=fb)
        np.testing.assert_array_equal(ours.is_label_issue, ref_mask, err_msg=f"{name} {dtype} {fb}")
        ref_rank = reference.ranking(ref_mask, labels, P, rank_by="self_confidence", adjust_pred_probs=False)
        np.testing.assert_array_equal(ours.ranked_issue_indices, ref_rank)
    assert ours.noise.estimated_num_label_issues == ref_noise["estimated_num_label_issues"]
    np.testing.assert_array_equal(ours.noise.confident_joint, ref_noise["confident_joint"])


def test_recall_of_human_verified_errors(capsys):
    rows = []
    for name in SETS:
        labels, P, verified = load(name)
        for fb in FILTERS:
            ours = find_issues(labels, P, filter_by=fb).is_label_issue
            ref = reference.mask(labels, P, filter_by=fb)
            rows.append((name, fb, int(ours[verified].sum()), int(ref[verified].sum()), len(verified), int(ours.sum())))
            assert ours[verified].sum() == ref[verified].sum()
    # The default method finds most verified errors on both sets.
    default = {r[0]: r for r in rows if r[1] == "prune_by_noise_rate"}
    assert default["mnist"][2] >= 5 and default["cifar10"][2] >= 20
    with capsys.disabled():
        print("\nrecall of human-verified label errors (flagged / verified)")
        print(f"{'set':8} {'filter_by':22} {'labelq':>8} {'cleanlab':>9} {'flagged':>8}")
        for name, fb, ours_n, ref_n, total, flagged in rows:
            print(f"{name:8} {fb:22} {ours_n:>4}/{total:<3} {ref_n:>5}/{total:<3} {flagged:>8}")
