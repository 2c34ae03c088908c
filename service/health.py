"""Dataset health and out-of-distribution scores: the in-process API of
``POST /dataset-health`` and ``POST /out-of-distribution``::

    from service import dataset_health, out_of_distribution

    health = dataset_health(labels, pred_probs, class_names=["cat", "dog", "fox"])
    health.overall_label_health_score          # float in [0, 1]
    health.classes_by_label_quality.class_index  # worst class first
    health.overlapping_classes.joint_probability

    ood = out_of_distribution(pred_probs, labels, method="entropy")
    ood.ood_score                              # float64 (N,), lower is more atypical

Results equal cleanlab 2.9.0's ``cleanlab.dataset.health_summary`` (without
its printing) and ``cleanlab.outlier.OutOfDistribution`` (``fit_score`` with
``pred_probs``) for the same inputs and parameters. Where the reference sorts
with ties (classes of equal label quality, pairs of equal joint
probability), equal values keep index order: what the reference returns
with a stable sort. Inputs, validation and errors are those of
:func:`service.find_issues`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numba
import numpy as np

from service import core
from service import kernels as kn
from service.errors import InputError

OODMethod = Literal["entropy", "least_confidence", "gen"]
OOD_METHODS: tuple[str, ...] = OODMethod.__args__  # type: ignore[attr-defined]
_OOD_CODE = {"entropy": kn.OOD_ENTROPY, "least_confidence": kn.OOD_LEAST_CONFIDENCE, "gen": kn.OOD_GEN}


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclass
class ClassLabelQuality:
    """cleanlab's ``rank_classes_by_label_quality`` as columns (K each), one
    entry per class, worst label quality first (equal scores in class order)."""

    class_index: np.ndarray  # int64
    class_name: list[str] | None  # with the class_names option
    label_issues: np.ndarray  # int64: count(given = k, true != k)
    inverse_label_issues: np.ndarray  # int64: count(given != k, true = k)
    label_noise: np.ndarray  # float64: P(true != k | given = k)
    inverse_label_noise: np.ndarray  # float64: P(given != k | true = k)
    label_quality_score: np.ndarray  # float64: P(true = k | given = k)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class OverlappingClasses:
    """cleanlab's ``find_overlapping_classes`` as columns, one entry per pair
    of classes, highest joint probability first (equal values in row-major
    pair order)."""

    class_index_a: np.ndarray  # int64
    class_index_b: np.ndarray  # int64
    class_name_a: list[str] | None
    class_name_b: list[str] | None
    num_overlapping_examples: np.ndarray  # int64
    joint_probability: np.ndarray  # float64

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DatasetHealthResult:
    """What :func:`dataset_health` returns; field names match the HTTP response."""

    n_examples: int
    n_classes: int
    overall_label_health_score: float
    num_label_issues: int
    classes_by_label_quality: ClassLabelQuality
    overlapping_classes: OverlappingClasses
    joint: np.ndarray  # (K, K) float64, rows given label, columns true label
    timings: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A dict of numpy arrays, lists and numbers, in the HTTP response's layout."""
        return {
            "n_examples": self.n_examples,
            "n_classes": self.n_classes,
            "overall_label_health_score": self.overall_label_health_score,
            "num_label_issues": self.num_label_issues,
            "classes_by_label_quality": self.classes_by_label_quality.to_dict(),
            "overlapping_classes": self.overlapping_classes.to_dict(),
            "joint": self.joint,
        }


@dataclass
class OutOfDistributionResult:
    """What :func:`out_of_distribution` returns; field names match the HTTP response."""

    n_examples: int
    n_classes: int
    method: str
    ood_score: np.ndarray  # float64 (N,), lower is more atypical
    confident_thresholds: np.ndarray | None  # float64 (K,) used to adjust; None without adjust_pred_probs
    timings: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A dict of numpy arrays and numbers, in the HTTP response's layout."""
        return {
            "n_examples": self.n_examples,
            "n_classes": self.n_classes,
            "method": self.method,
            "ood_score": self.ood_score,
            "confident_thresholds": self.confident_thresholds,
        }


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _check_tolerance(value: Any) -> float:
    if not core._is_number(value) or not 0.0 < float(value) <= 0.1:
        raise InputError(f"must be a number in (0, 0.1]; got {value!r}", "options.prob_tolerance")
    return float(value)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"must be true or false; got {value!r}", f"options.{name}")
    return bool(value)


def _check_class_names(names: Any, k: int) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, (str, bytes)) or not hasattr(names, "__len__"):
        raise InputError("must be a list of strings, one per class", "options.class_names")
    names = list(names)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise InputError(f"must be a string; got {name!r}", f"options.class_names[{i}]")
    if len(names) != k:
        raise InputError(f"must have one name per class (K = {k}); got {len(names)}", "options.class_names")
    return names


def _check_ood_options(method: Any, adjust_pred_probs: Any, M: Any, gamma: Any) -> None:
    if method not in OOD_METHODS:
        raise InputError(f"must be one of {', '.join(OOD_METHODS)}; got {method!r}", "options.method")
    _check_bool(adjust_pred_probs, "adjust_pred_probs")
    if not core._is_int(M) or M < 1:
        raise InputError(f"must be an integer >= 1; got {M!r}", "options.M")
    if not core._is_number(gamma) or not (0.0 < float(gamma) < math.inf):
        raise InputError(f"must be a finite number > 0; got {gamma!r}", "options.gamma")


def _check_confident_thresholds(values: Any, k: int) -> tuple[np.ndarray, np.dtype]:
    """(thresholds as float64, their dtype): a float array keeps its dtype, as
    the reference computes ``pred_probs - thresholds`` in the promoted dtype;
    anything else is float64."""
    where = "options.confident_thresholds"
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise InputError("must be a list of numbers, one per class", where)
    dtype = values.dtype if isinstance(values, np.ndarray) and values.dtype in core._PREC else np.dtype(np.float64)
    values = list(values)
    if len(values) != k:
        raise InputError(f"must have one threshold per class (K = {k}); got {len(values)}", where)
    for i, v in enumerate(values):
        if not core._is_number(v) or not 0.0 <= float(v) < math.inf:
            raise InputError(f"must be a finite number >= 0; got {v!r}", f"{where}[{i}]")
    return np.asarray(values, dtype=np.float64), dtype


def _locked(compute: Any, t0: float, *args: Any) -> Any:
    """Run kernels as :func:`service.find_issues` does: one request at a time,
    on the set thread count; the result's timings count from ``t0`` (the start
    of validation): validate, queue (the wait for the kernel lock), kernel."""
    t1 = time.perf_counter()
    with core._KERNEL_LOCK:
        t_lock = time.perf_counter()
        if core._threads is not None:
            numba.set_num_threads(core._threads)
        result = compute(*args)
    result.timings = {"validate": t1 - t0, "queue": t_lock - t1, "kernel": time.perf_counter() - t_lock}
    return result


def _first_pass(labels: np.ndarray, P: np.ndarray, dtype: np.dtype, tolerance: float) -> tuple:
    """find_issues' first pass: validate every value and row, and collect
    (argmax, label_is_max, selfconf, other)."""
    chunks = core._n_chunks(P.shape[0])
    ubits = kn.value_bits([1.0 + tolerance], dtype, -1)[0]
    problem, argmax, label_is_max, selfconf, other, _ = kn.row_stats(
        P, core._as_bits(P), labels, tolerance, ubits, core._PREC[dtype], False, chunks
    )
    core.raise_for_problem(problem, tolerance)
    return argmax, label_is_max, selfconf, other


# --------------------------------------------------------------------------
# Dataset health
# --------------------------------------------------------------------------


def dataset_health(
    labels: Any,
    pred_probs: Any,
    *,
    class_names: Any = None,
    asymmetric: bool = False,
    prob_tolerance: float = 1e-3,
) -> DatasetHealthResult:
    """The reference's ``cleanlab.dataset.health_summary``, without printing.

    Args:
        labels: int array-like (N,), the given labels in [0, K).
        pred_probs: float16/32/64 array (N, K), out-of-sample predicted probabilities.
        class_names: K strings naming the classes in the per-class and pair tables.
        asymmetric: report both (a, b) and (b, a) with ``joint[a, b]`` each,
            instead of each pair once with ``joint[a, b] + joint[b, a]``.
        prob_tolerance: how far a row's sum may be from 1 (and a value above 1).

    Raises:
        InputError: invalid data or options; ``.field`` names the culprit.
    """
    tolerance = _check_tolerance(prob_tolerance)
    asymmetric = _check_bool(asymmetric, "asymmetric")
    t0 = time.perf_counter()
    labels_arr, P, dtype = core.check_inputs(labels, pred_probs)
    names = _check_class_names(class_names, P.shape[1])
    return _locked(_health, t0, labels_arr, P, dtype, tolerance, names, asymmetric)


def _health(
    labels: np.ndarray, P: np.ndarray, dtype: np.dtype, tolerance: float, names: list[str] | None, asymmetric: bool
) -> DatasetHealthResult:
    N, K = P.shape
    argmax, label_is_max, selfconf, _ = _first_pass(labels, P, dtype, tolerance)
    # The calibrated confident joint and the off-diagonal issue count, as find_issues computes them.
    counts, starts, order = kn.class_index(labels, K)
    _, _, tcmp = core._thresholds(selfconf, dtype, counts, starts, order)
    offdiag, cj_raw = kn.confident_pass(
        core._as_bits(P), labels, kn.value_bits(tcmp, dtype, +1), argmax, core._n_chunks(N)
    )
    np.fill_diagonal(cj_raw, np.maximum(np.diagonal(cj_raw), 1))
    cj = kn.calibrate_confident_joint(cj_raw, counts)
    joint = cj / max(float(cj.sum()), kn.TINY_VALUE)
    num_issues = int((offdiag & ~label_is_max).sum())

    order_k, issues, inverse_issues, noise, inverse_noise, quality = kn.class_label_quality(joint, N)
    a, b, overlap, probability = kn.overlapping_pairs(joint, N, asymmetric)

    def named(index: np.ndarray) -> list[str] | None:
        return None if names is None else [names[i] for i in index]

    return DatasetHealthResult(
        n_examples=N,
        n_classes=K,
        overall_label_health_score=1.0 - num_issues / N,
        num_label_issues=num_issues,
        classes_by_label_quality=ClassLabelQuality(
            class_index=order_k,
            class_name=named(order_k),
            label_issues=issues,
            inverse_label_issues=inverse_issues,
            label_noise=noise,
            inverse_label_noise=inverse_noise,
            label_quality_score=quality,
        ),
        overlapping_classes=OverlappingClasses(
            class_index_a=a,
            class_index_b=b,
            class_name_a=named(a),
            class_name_b=named(b),
            num_overlapping_examples=overlap,
            joint_probability=probability,
        ),
        joint=joint,
    )


# --------------------------------------------------------------------------
# Out-of-distribution scores
# --------------------------------------------------------------------------


def out_of_distribution(
    pred_probs: Any,
    labels: Any = None,
    *,
    method: str = "entropy",
    adjust_pred_probs: bool = True,
    M: int = 100,
    gamma: float = 0.1,
    confident_thresholds: Any = None,
    prob_tolerance: float = 1e-3,
) -> OutOfDistributionResult:
    """Per-example out-of-distribution scores from predicted probabilities:
    the reference's ``OutOfDistribution(params).fit_score(pred_probs=..., labels=...)``.

    Args:
        pred_probs: float16/32/64 array (N, K), predicted probabilities.
        labels: int array-like (N,) in [0, K). Needed only to compute the
            class thresholds for ``adjust_pred_probs`` (the mean of
            ``P[labels == k, k]``); otherwise checked and unused.
        method: ``"entropy"`` (1 - normalized entropy), ``"least_confidence"``
            (the largest probability) or ``"gen"`` (the GEN score over the
            ``M`` largest softmax values with exponent ``gamma``).
        adjust_pred_probs: first subtract the class thresholds from each row,
            shift by the largest threshold and renormalise.
        M: GEN only, an integer >= 1: how many of the largest values enter the score.
        gamma: GEN only, a number > 0: the exponent.
        confident_thresholds: K numbers >= 0 to adjust with, instead of
            computing them from ``labels`` (e.g. a training set's, returned by an
            earlier call). The adjustment runs in the precision numpy would
            give ``pred_probs - confident_thresholds``: a float array's own
            dtype counts, a list is float64.
        prob_tolerance: how far a row's sum may be from 1 (and a value above 1).

    Raises:
        InputError: invalid data or options; ``.field`` names the culprit.
    """
    tolerance = _check_tolerance(prob_tolerance)
    _check_ood_options(method, adjust_pred_probs, M, gamma)
    t0 = time.perf_counter()
    if labels is None:
        if adjust_pred_probs and confident_thresholds is None:
            raise InputError(
                "labels are required with adjust_pred_probs (the default) unless confident_thresholds are given",
                "labels",
            )
        _, P, dtype = core.check_inputs(np.zeros(np.shape(pred_probs)[:1], np.int64), pred_probs)
        labels_arr = None
    else:
        labels_arr, P, dtype = core.check_inputs(labels, pred_probs)
    given = None if confident_thresholds is None else _check_confident_thresholds(confident_thresholds, P.shape[1])
    adjust = bool(adjust_pred_probs)
    return _locked(_ood, t0, P, labels_arr, dtype, tolerance, method, adjust, int(M), float(gamma), given)


def _ood(
    P: np.ndarray,
    labels: np.ndarray | None,
    dtype: np.dtype,
    tolerance: float,
    method: str,
    adjust: bool,
    M: int,
    gamma: float,
    given: tuple[np.ndarray, np.dtype] | None,
) -> OutOfDistributionResult:
    N, K = P.shape
    # Without labels the first pass only validates (label 0 stands in).
    _, _, selfconf, other = _first_pass(np.zeros(N, np.int64) if labels is None else labels, P, dtype, tolerance)
    if method == "entropy" and not adjust and (selfconf.max() > 1.0 or other.max() > 1.0):
        # The reference refuses values above 1 for the entropy (undefined there); adjusted rows never have them.
        row = int(np.flatnonzero(np.maximum(selfconf, other) > 1.0)[0])
        raise InputError(
            f"row {row} has a value above 1, which method='entropy' without adjust_pred_probs does not accept "
            "(as in the reference); values within prob_tolerance above 1 are fine otherwise",
            f"pred_probs[{row}]",
        )
    thresholds, tprec = np.zeros(K), kn.PREC64
    if adjust and given is not None:
        thresholds, tprec = given[0], core._PREC[np.result_type(dtype, given[1])]
    elif adjust:
        if labels is None:
            raise InputError("adjust_pred_probs needs labels (or confident_thresholds)", "labels")
        counts, starts, order = kn.class_index(labels, K)
        thresholds, tprec, _ = core._thresholds(selfconf, dtype, counts, starts, order)
    precision = tprec if adjust else core._PREC[dtype]
    f16 = kn.f16_tables(gamma) if method == "gen" and precision == kn.PREC16 else np.zeros((2, 1))
    scores = kn.ood_scores(
        P, _OOD_CODE[method], adjust, thresholds, tprec, core._PREC[dtype], M, gamma, f16, core._n_chunks(N)
    )
    return OutOfDistributionResult(
        n_examples=N,
        n_classes=K,
        method=method,
        ood_score=scores,
        confident_thresholds=thresholds if adjust else None,
    )
