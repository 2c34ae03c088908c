"""The oracle: cleanlab 2.9.0 run on the same inputs, in the service's layout.

Test-only. ``stable=True`` runs cleanlab with ``numpy.argsort`` made stable,
which is the tie-breaking rule the service documents (equal values in index
order); with ``stable=False`` cleanlab runs untouched, and its order for tied
values is whatever the CPU's sort does.
"""

from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import numpy as np

_argsort = np.argsort


def _stable_argsort(a, axis=-1, kind=None, order=None, **kw):
    return _argsort(a, axis=axis, kind="stable", order=order)


@contextlib.contextmanager
def stable_sorts(stable: bool = True):
    if not stable:
        yield
        return
    with mock.patch.object(np, "argsort", _stable_argsort):
        yield


def noise(labels, P, *, stable=True):
    from cleanlab import count

    with stable_sorts(stable), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        py, nm, inm, cj = count.estimate_py_and_noise_matrices_from_probabilities(labels, P)
        return {
            "thresholds": np.asarray(count.get_confident_thresholds(labels, P), dtype=np.float64),
            "confident_joint": count.compute_confident_joint(labels, P),
            "joint": count.estimate_joint(labels, P),
            "noise_matrix": nm,
            "inverse_noise_matrix": inm,
            "py": py,
            "estimated_num_label_issues": int(count.num_label_issues(labels, P)),
            "_cj_from_latent": cj,
        }


def mask(labels, P, *, filter_by, frac_noise=1.0, num_to_remove_per_class=None, min_examples_per_class=1, stable=True):
    from cleanlab import filter as clf

    with stable_sorts(stable), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return clf.find_label_issues(
            labels,
            P,
            filter_by=filter_by,
            frac_noise=frac_noise,
            num_to_remove_per_class=num_to_remove_per_class,
            min_examples_per_class=min_examples_per_class,
            n_jobs=1,
        )


def scores(labels, P, *, rank_by, adjust_pred_probs, stable=True):
    from cleanlab import rank

    with stable_sorts(stable), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rank.get_label_quality_scores(labels, P, method=rank_by, adjust_pred_probs=adjust_pred_probs)


def ranking(issue_mask, labels, P, *, rank_by, adjust_pred_probs, stable=True):
    from cleanlab import rank

    with stable_sorts(stable), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rank.order_label_issues(
            issue_mask, labels, P, rank_by=rank_by, rank_by_kwargs={"adjust_pred_probs": adjust_pred_probs}
        )


@contextlib.contextmanager
def stable_frame_sorts(stable: bool = True):
    """Stable sorts, also in pandas: ``DataFrame.sort_values`` sorts with its
    own default (quicksort) through ``ndarray.argsort``, which ``stable_sorts``
    cannot reach."""
    import pandas as pd

    if not stable:
        yield
        return
    original = pd.DataFrame.sort_values

    def sort_values(self, *args, **kwargs):
        kwargs["kind"] = "stable"
        return original(self, *args, **kwargs)

    with stable_sorts(), mock.patch.object(pd.DataFrame, "sort_values", sort_values):
        yield


def health_summary(labels, P, *, asymmetric=False, class_names=None, stable=True):
    """``cleanlab.dataset.health_summary`` without printing, its tables as dicts of arrays."""
    from cleanlab.dataset import health_summary as summary

    with stable_frame_sorts(stable), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = summary(labels, P, asymmetric=asymmetric, class_names=class_names, verbose=False)
    return {
        "overall_label_health_score": out["overall_label_health_score"],
        "joint": out["joint"],
        "classes_by_label_quality": {k: v.to_numpy() for k, v in out["classes_by_label_quality"].items()},
        "overlapping_classes": {k: v.to_numpy() for k, v in out["overlapping_classes"].items()},
    }


def ood_scores(P, labels=None, **params):
    """``OutOfDistribution(params).fit_score(pred_probs=P, labels=labels)``, quietly."""
    from cleanlab.outlier import OutOfDistribution

    with warnings.catch_warnings(), mock.patch("builtins.print"):
        warnings.simplefilter("ignore")
        return OutOfDistribution(params).fit_score(pred_probs=P, labels=labels, verbose=False)
