"""The in-process API: find label issues in a dataset from predicted probabilities.

This is what the HTTP service runs for ``POST /find-issues``; pipelines that
do not want a network hop call it directly::

    from service import find_issues

    result = find_issues(labels, pred_probs, filter_by="prune_by_noise_rate")
    result.is_label_issue        # bool (N,)
    result.ranked_issue_indices  # int64, worst first
    result.noise.inverse_noise_matrix

Inputs: ``labels`` int array (N,) with values in [0, K); ``pred_probs``
float16, float32 or float64 array (N, K), rows summing to 1 within
``prob_tolerance``. Results equal those of cleanlab 2.9.0
(``cleanlab.filter.find_label_issues``, ``cleanlab.rank.get_label_quality_scores``
and ``cleanlab.count``) for the same inputs and options, with one documented
difference: where cleanlab orders equal values with an unstable sort, we keep
them in index order (cleanlab's order for ties depends on the CPU).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numba
import numpy as np

from service import kernels as kn
from service.errors import InputError

FilterBy = Literal[
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
]
RankBy = Literal["self_confidence", "normalized_margin", "confidence_weighted_entropy"]

ThresholdMethod = Literal["mean", "percentile"]

FILTER_BY: tuple[str, ...] = FilterBy.__args__  # type: ignore[attr-defined]
RANK_BY: tuple[str, ...] = RankBy.__args__  # type: ignore[attr-defined]
THRESHOLD_METHODS: tuple[str, ...] = ThresholdMethod.__args__  # type: ignore[attr-defined]
# Per-example categories, by code (``FindIssuesResult.category``).
CATEGORIES = ("ok", "label_issue", "out_of_distribution", "unconfident")
PRUNE_METHODS = ("prune_by_noise_rate", "prune_by_class", "both")

_RANK_CODE = {
    "self_confidence": kn.SELF_CONFIDENCE,
    "normalized_margin": kn.NORMALIZED_MARGIN,
    "confidence_weighted_entropy": kn.CONFIDENCE_WEIGHTED_ENTROPY,
}
_PREC = {np.dtype(np.float64): kn.PREC64, np.dtype(np.float32): kn.PREC32, np.dtype(np.float16): kn.PREC16}

# numba's default threading layer must not be entered by two threads at once;
# kernels are parallel inside, so we run one request's kernels at a time.
_KERNEL_LOCK = threading.Lock()


@dataclass(frozen=True)
class Thresholds:
    """How the per-class thresholds are set (the ``thresholds`` option).

    method: ``"mean"``, the confident-learning rule (class k's threshold is
        the mean of ``P[labels == k, k]``), or ``"percentile"``: the
        ``class_percentile``-th percentile of those values (numpy's default,
        linear, percentile). Either replaces the other for the whole
        computation: confident joint, pruning, noise estimates, and the
        scores when ``adjust_pred_probs``.
    class_percentile: in [0, 100], percentile method only (default 50).
    ood_percentile: in [0, 100]: class k's out-of-distribution threshold is
        this percentile of ``P[labels == k, k]``, under either method. An
        example counted nowhere in the confident joint whose every
        probability is below its class's out-of-distribution threshold is
        ``out_of_distribution``.

    A class with no examples gets 2.0 for both thresholds, as the reference
    gives it under the mean rule: no example is confident for it, and it
    never keeps an example from being out of distribution.
    """

    method: str = "mean"
    class_percentile: float | None = None
    ood_percentile: float = 15.0


DEFAULT_CLASS_PERCENTILE = 50.0


@dataclass(frozen=True)
class Options:
    """Options of :func:`find_issues`, with the reference's defaults.

    filter_by: which examples to flag (cleanlab's ``filter_by``).
    rank_by: the label quality score reported and used for ranking.
    frac_noise: flag only this fraction of the estimated issues (prune_* methods).
    num_to_remove_per_class: per class, how many to flag (prune_* methods).
    min_examples_per_class: never prune a class below this many examples.
    adjust_pred_probs: subtract per-class thresholds before scoring.
    prob_tolerance: how far a row's sum may be from 1 (and a value above 1).
    thresholds: :class:`Thresholds`, or a dict of its fields; None is the
        default ``{"method": "mean"}``.
    """

    filter_by: str = "prune_by_noise_rate"
    rank_by: str = "self_confidence"
    frac_noise: float = 1.0
    num_to_remove_per_class: tuple[int, ...] | None = None
    min_examples_per_class: int = 1
    adjust_pred_probs: bool = False
    prob_tolerance: float = 1e-3
    thresholds: Thresholds | None = None


@dataclass
class NoiseEstimates:
    """Dataset-level estimates. Matrices are (K, K) float64 / int64."""

    thresholds: np.ndarray
    ood_thresholds: np.ndarray
    confident_joint: np.ndarray
    joint: np.ndarray
    noise_matrix: np.ndarray
    inverse_noise_matrix: np.ndarray
    py: np.ndarray
    estimated_num_label_issues: int


@dataclass
class FindIssuesResult:
    """What :func:`find_issues` returns; field names match the HTTP response."""

    n_examples: int
    n_classes: int
    num_label_issues: int
    is_label_issue: np.ndarray
    label_quality_score: np.ndarray
    suggested_label: np.ndarray
    ranked_issue_indices: np.ndarray
    noise: NoiseEstimates
    category: np.ndarray  # int8 codes into CATEGORIES
    category_counts: np.ndarray  # int64 (4,), indexed by category code
    timings: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A dict of numpy arrays and ints, in the HTTP response's layout."""
        n = self.noise
        return {
            "n_examples": self.n_examples,
            "n_classes": self.n_classes,
            "num_label_issues": self.num_label_issues,
            "is_label_issue": self.is_label_issue,
            "label_quality_score": self.label_quality_score,
            "suggested_label": self.suggested_label,
            "ranked_issue_indices": self.ranked_issue_indices,
            "category": self.category,
            "category_counts": self.category_counts,
            "noise": {
                "thresholds": n.thresholds,
                "ood_thresholds": n.ood_thresholds,
                "confident_joint": n.confident_joint,
                "joint": n.joint,
                "noise_matrix": n.noise_matrix,
                "inverse_noise_matrix": n.inverse_noise_matrix,
                "py": n.py,
                "estimated_num_label_issues": n.estimated_num_label_issues,
            },
        }


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def make_options(**kwargs: Any) -> Options:
    """Build and validate :class:`Options`; unknown names or bad values raise InputError."""
    known = Options.__dataclass_fields__
    for name in kwargs:
        if name not in known:
            raise InputError(f"unknown option {name!r}; known options: {', '.join(known)}", f"options.{name}")
    opts = Options(**{k: v for k, v in kwargs.items() if v is not None or k == "num_to_remove_per_class"})
    _check_options(opts)
    return replace(opts, thresholds=make_thresholds(opts.thresholds))


def make_thresholds(spec: Any) -> Thresholds:
    """Validate the ``thresholds`` option (None, a dict or a :class:`Thresholds`)
    and fill in its defaults; errors name ``options.thresholds.<field>``."""
    if spec is None:
        return Thresholds()
    if isinstance(spec, Thresholds):
        spec = {f: getattr(spec, f) for f in Thresholds.__dataclass_fields__}
    if not isinstance(spec, dict):
        raise InputError(
            f"must be an object with method, class_percentile, ood_percentile; got {spec!r}", "options.thresholds"
        )
    known = Thresholds.__dataclass_fields__
    for name in spec:
        if name not in known:
            raise InputError(f"unknown field {name!r}; known: {', '.join(known)}", f"options.thresholds.{name}")
    method = spec.get("method")
    method = "mean" if method is None else method
    if method not in THRESHOLD_METHODS:
        raise InputError(
            f"must be one of {', '.join(THRESHOLD_METHODS)}; got {method!r}", "options.thresholds.method"
        )
    out: dict[str, Any] = {"method": method}
    for name, default in (("class_percentile", DEFAULT_CLASS_PERCENTILE), ("ood_percentile", 15.0)):
        value = spec.get(name)
        where = f"options.thresholds.{name}"
        if value is None:
            out[name] = default if (name == "ood_percentile" or method == "percentile") else None
            continue
        if not _is_number(value) or not 0.0 <= float(value) <= 100.0:
            raise InputError(f"must be a number in [0, 100]; got {value!r}", where)
        if name == "class_percentile" and method != "percentile":
            raise InputError("only applies to method 'percentile'", where)
        out[name] = float(value)
    return Thresholds(**out)


_INT_LIMIT = 2**62  # integer options must fit the kernels' int64


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _check_options(o: Options) -> None:
    if o.filter_by not in FILTER_BY:
        raise InputError(f"must be one of {', '.join(FILTER_BY)}; got {o.filter_by!r}", "options.filter_by")
    if o.rank_by not in RANK_BY:
        raise InputError(f"must be one of {', '.join(RANK_BY)}; got {o.rank_by!r}", "options.rank_by")
    if not _is_number(o.frac_noise) or not 0.0 <= float(o.frac_noise) <= 1.0:
        raise InputError(f"must be a number in [0, 1]; got {o.frac_noise!r}", "options.frac_noise")
    if not _is_int(o.min_examples_per_class) or not 0 <= o.min_examples_per_class < _INT_LIMIT:
        raise InputError(
            f"must be an integer >= 0; got {o.min_examples_per_class!r}", "options.min_examples_per_class"
        )
    if not isinstance(o.adjust_pred_probs, (bool, np.bool_)):
        raise InputError(f"must be true or false; got {o.adjust_pred_probs!r}", "options.adjust_pred_probs")
    if not _is_number(o.prob_tolerance) or not 0.0 < float(o.prob_tolerance) <= 0.1:
        raise InputError(f"must be a number in (0, 0.1]; got {o.prob_tolerance!r}", "options.prob_tolerance")
    if o.adjust_pred_probs and o.rank_by == "confidence_weighted_entropy":
        raise InputError(
            "adjust_pred_probs is not supported with rank_by='confidence_weighted_entropy' (as in the reference)",
            "options.adjust_pred_probs",
        )
    if o.filter_by not in PRUNE_METHODS:
        if o.num_to_remove_per_class is not None:
            raise InputError(
                f"only applies to filter_by {', '.join(PRUNE_METHODS)}; got filter_by={o.filter_by!r}",
                "options.num_to_remove_per_class",
            )
        if float(o.frac_noise) != 1.0:
            raise InputError(
                f"only applies to filter_by {', '.join(PRUNE_METHODS)}; got filter_by={o.filter_by!r}",
                "options.frac_noise",
            )
    if o.num_to_remove_per_class is not None:
        ntr = o.num_to_remove_per_class
        if isinstance(ntr, (str, bytes)) or not hasattr(ntr, "__len__"):
            raise InputError("must be a list of integers, one per class", "options.num_to_remove_per_class")
        for k, v in enumerate(ntr):
            if not _is_int(v) or not 0 <= v < _INT_LIMIT:
                raise InputError(f"must be an integer >= 0; got {v!r}", f"options.num_to_remove_per_class[{k}]")


def _check_labels(labels: Any, n: int, k: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise InputError(f"must be a 1-D array of class indices; got shape {arr.shape}", "labels")
    if arr.dtype.kind not in "iu":
        raise InputError(f"must be integers; got dtype {arr.dtype}", "labels")
    if arr.shape[0] != n:
        raise InputError(f"has {arr.shape[0]} entries but pred_probs has {n} rows", "labels")
    if n and (arr.min() < 0 or arr.max() >= k):
        bad = int(np.flatnonzero((arr < 0) | (arr >= k))[0])
        raise InputError(f"labels[{bad}] = {int(arr[bad])} is not a class index in [0, {k})", f"labels[{bad}]")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_inputs(labels: Any, pred_probs: Any) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """Check shapes, dtypes and labels, and normalise the data once.

    Returns (labels int64, P, dtype): P is C-contiguous float64/float32, or a
    float16 matrix viewed as uint16; dtype is the probabilities' dtype. The
    values themselves are checked in the first pass over them
    (:func:`raise_for_problem`).
    """
    if not isinstance(pred_probs, np.ndarray):
        pred_probs = np.asarray(pred_probs)
    if pred_probs.ndim != 2:
        raise InputError(f"must be a 2-D array (N examples x K classes); got shape {pred_probs.shape}", "pred_probs")
    if pred_probs.dtype not in _PREC:
        raise InputError(f"must be float16, float32 or float64; got dtype {pred_probs.dtype}", "pred_probs")
    n, k = pred_probs.shape
    if n < 1:
        raise InputError("must have at least one row (N >= 1)", "pred_probs")
    if k < 2:
        raise InputError(f"must have at least two columns (K >= 2); got K = {k}", "pred_probs")
    dtype = pred_probs.dtype
    P = np.ascontiguousarray(pred_probs)
    if P.dtype == np.float16:
        P = P.view(np.uint16)
    return _check_labels(labels, n, k), P, dtype


def raise_for_problem(problem: tuple[int, int, int, float], tolerance: float) -> None:
    """Turn a kernel's first-problem report into an InputError naming the value."""
    code, row, col, value = problem
    if code == kn.CHECK_OK:
        return
    where = f"pred_probs[{row}][{col}]"
    if code == kn.CHECK_NOT_FINITE:
        raise InputError(f"{where} is {value}; values must be finite", where)
    if code == kn.CHECK_NEGATIVE:
        raise InputError(f"{where} = {value} is negative", where)
    if code == kn.CHECK_ABOVE_ONE:
        raise InputError(f"{where} = {value} is greater than 1", where)
    raise InputError(f"row {row} sums to {value:.9g}, not 1 within prob_tolerance={tolerance:g}", f"pred_probs[{row}]")


def _as_bits(P: np.ndarray) -> np.ndarray:
    """The matrix viewed as integers of its width (float16 already is)."""
    return P if P.dtype == np.uint16 else P.view(np.int32 if P.dtype == np.float32 else np.int64)


_threads: int | None = None


def set_threads(n: int) -> int:
    """Use ``n`` kernel threads per request (capped by numba's pool,
    ``NUMBA_NUM_THREADS``); returns the count set. numba's setting is
    per calling thread, so it is applied again before each computation."""
    global _threads
    _threads = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    return _threads


def _n_chunks(n: int) -> int:
    return max(1, min(n, 8 * numba.get_num_threads()))


# --------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------


def _thresholds(
    selfconf: np.ndarray,
    dtype: np.dtype,
    counts: np.ndarray,
    starts: np.ndarray,
    order: np.ndarray,
    percentile: float | None = None,
):
    """Per-class thresholds as the reference builds them: an array of the
    input's dtype when every class has examples, else float64 (a missing
    class gets 2.0). Returns (thresholds as float64, their precision code,
    the comparison values ``thresholds - 1e-6`` as float64).

    The class means (the reference's rule), or with ``percentile`` that
    percentile of each class's values (``np.percentile``, linear), in the
    same dtype and with the same floor and missing-class value."""
    if percentile is None:
        means = kn.class_means(selfconf, order, starts, _PREC[dtype])
    else:
        means = kn.class_percentiles(selfconf, order, starts, float(percentile), _PREC[dtype])
    return finish_thresholds(means, counts, dtype)


def finish_thresholds(means: np.ndarray, counts: np.ndarray, dtype: np.dtype):
    """Per-class statistics (NaN for a class with no examples) into thresholds:
    see :func:`_thresholds`, which this ends."""
    if (counts > 0).all():
        t = means.astype(dtype)
    else:
        t = np.where(counts > 0, means, kn.MISSING_CLASS_THRESHOLD).astype(np.float64)
    t = np.clip(t, kn.CONFIDENT_THRESHOLDS_LOWER_BOUND, None)
    tcmp = t - kn.FLOATING_POINT_COMPARISON
    return t.astype(np.float64), _PREC[t.dtype], tcmp.astype(np.float64)


def _ood_thresholds(selfconf, dtype, counts, starts, order, ood_percentile):
    """The out-of-distribution thresholds of the categories (float64, K), and
    their comparison bit patterns for the confident pass: an example is below
    class j's threshold when ``P[i, j] < ood[j] - 1e-6`` (the class
    thresholds' comparison, negated)."""
    ood, _, ocmp = _thresholds(selfconf, dtype, counts, starts, order, ood_percentile)
    return ood, kn.value_bits(ocmp, dtype, +1)


def find_issues(labels: Any, pred_probs: Any, **options: Any) -> FindIssuesResult:
    """Find label issues, score every example and estimate the label noise.

    Args:
        labels: int array-like (N,), the given labels in [0, K).
        pred_probs: float16/32/64 array (N, K), out-of-sample predicted probabilities.
        **options: see :class:`Options` (``filter_by``, ``rank_by``, ``frac_noise``,
            ``num_to_remove_per_class``, ``min_examples_per_class``,
            ``adjust_pred_probs``, ``prob_tolerance``, ``thresholds``).

    Raises:
        InputError: invalid data or options; ``.field`` names the culprit.
    """
    opts = make_options(**options)
    t0 = time.perf_counter()
    labels_arr, P, dtype = check_inputs(labels, pred_probs)
    t1 = time.perf_counter()
    with _KERNEL_LOCK:
        t_lock = time.perf_counter()
        if _threads is not None:
            numba.set_num_threads(_threads)
        result = _compute(labels_arr, P, dtype, opts)
    t2 = time.perf_counter()
    # "queue" is the wait for the process's kernel lock (another request's kernels).
    result.timings = {"validate": t1 - t0, "queue": t_lock - t1, "kernel": t2 - t_lock}
    return result


def _compute(labels: np.ndarray, P: np.ndarray, dtype: np.dtype, o: Options) -> FindIssuesResult:
    N, K = P.shape
    prec = _PREC[dtype]
    chunks = _n_chunks(N)
    if o.num_to_remove_per_class is not None and len(o.num_to_remove_per_class) != K:
        raise InputError(
            f"must have one entry per class (K = {K}); got {len(o.num_to_remove_per_class)}",
            "options.num_to_remove_per_class",
        )

    # One pass over pred_probs: validation, argmax, self-confidence, the best
    # other class, the confident joint and each example's category. The
    # thresholds it needs come first, from the labels' values alone.
    want_entropy = o.rank_by == "confidence_weighted_entropy"
    B = _as_bits(P)
    tolerance = float(o.prob_tolerance)
    ubits = kn.value_bits([1.0 + tolerance], dtype, -1)[0]
    counts, starts, order = kn.class_index(labels, K)
    th = o.thresholds or Thresholds()
    values = kn.label_values(P, labels)
    if not ((values >= 0.0) & (values <= 1.0 + tolerance)).all():
        # Some label's value is invalid: the checking pass alone, which says which.
        problem, *_ = kn.row_stats(P, B, labels, tolerance, ubits, prec, False, chunks)
        raise_for_problem(problem, tolerance)
    thresholds, tprec, tcmp = _thresholds(values, dtype, counts, starts, order, th.class_percentile)
    ood_thresholds, obits = _ood_thresholds(values, dtype, counts, starts, order, th.ood_percentile)
    scan = kn.scan_rows(
        P, B, labels, tolerance, ubits, prec, want_entropy, kn.value_bits(tcmp, dtype, +1), obits, chunks
    )
    problem, argmax, label_is_max, selfconf, other, entropy, offdiag, cj_raw, category, category_counts = scan
    raise_for_problem(problem, tolerance)
    if want_entropy and (selfconf.max() > 1.0 or other.max() > 1.0):
        # The reference refuses values above 1 for this score (its entropy is undefined there).
        row = int(np.flatnonzero(np.maximum(selfconf, other) > 1.0)[0])
        raise InputError(
            f"row {row} has a value above 1, which rank_by='confidence_weighted_entropy' does not accept "
            "(as in the reference); values within prob_tolerance above 1 are fine for the other scores",
            f"pred_probs[{row}]",
        )

    # num_label_issues(estimation_method="off_diagonal")
    cl_issues = offdiag & ~label_is_max
    estimated = int(cl_issues.sum())
    noise = noise_estimates(cj_raw, counts, thresholds, ood_thresholds, estimated)
    cj = noise.confident_joint

    def unadjusted(method: int) -> np.ndarray:
        if method == kn.SELF_CONFIDENCE:
            return selfconf
        if method == kn.NORMALIZED_MARGIN:
            return kn.normalized_margin(selfconf, other, prec)
        return entropy

    fb = o.filter_by
    if fb in PRUNE_METHODS:
        pcm = prune_counts(cj, counts, o)
        mask = np.ones(N, np.bool_)
        if fb in ("prune_by_class", "both"):
            mask &= kn.prune_by_class(selfconf, order, starts, pcm, o.min_examples_per_class)
        if fb in ("prune_by_noise_rate", "both"):
            nonmax = other > selfconf
            mask &= kn.prune_by_noise_rate(P, B, order, starts, nonmax, pcm, o.min_examples_per_class, prec)
        mask &= ~label_is_max
    elif fb == "confident_learning":
        mask = cl_issues
    elif fb == "predicted_neq_given":
        mask = kn.predicted_neq_given(argmax, labels) & ~label_is_max
    else:  # low_self_confidence, low_normalized_margin: unadjusted scores, lowest first
        mask = kn.smallest_scores(unadjusted(_RANK_CODE[fb[len("low_") :]]), estimated)

    method = _RANK_CODE[o.rank_by]
    if o.adjust_pred_probs:
        scores = kn.adjusted_scores(P, labels, method, thresholds, tprec, chunks)
    else:
        scores = unadjusted(method)
    ranked = kn.rank_flagged(mask, scores)
    return FindIssuesResult(
        n_examples=N,
        n_classes=K,
        num_label_issues=int(mask.sum()),
        is_label_issue=mask,
        label_quality_score=scores,
        suggested_label=argmax,
        ranked_issue_indices=ranked,
        category=category,
        category_counts=category_counts,
        noise=noise,
    )


def noise_estimates(
    cj_raw: np.ndarray, counts: np.ndarray, thresholds: np.ndarray, ood_thresholds: np.ndarray, estimated: int
) -> NoiseEstimates:
    """The dataset-level estimates from the raw confident-joint counts (its
    diagonal not yet clipped; modified in place) and the class sizes."""
    np.fill_diagonal(cj_raw, np.maximum(np.diagonal(cj_raw), 1))
    cj = kn.calibrate_confident_joint(cj_raw, counts)
    # K x K steps in parallel blocks from K = 256 up (below, starting threads costs more than it saves)
    blocks = 1 if cj.shape[0] < 256 else numba.get_num_threads()
    py, noise_matrix, inverse_noise_matrix = kn.estimate_latent(cj, counts, blocks)
    return NoiseEstimates(
        thresholds=thresholds,
        ood_thresholds=ood_thresholds,
        confident_joint=cj,
        joint=cj / max(float(cj.sum()), kn.TINY_VALUE),
        noise_matrix=noise_matrix,
        inverse_noise_matrix=inverse_noise_matrix,
        py=py,
        estimated_num_label_issues=estimated,
    )


def prune_counts(cj: np.ndarray, counts: np.ndarray, o: Options) -> np.ndarray:
    """How many examples to prune per cell (rows true label, columns given
    label) for the prune_* methods."""
    pcm = kn.keep_at_least_n_per_class(np.ascontiguousarray(cj.T), o.min_examples_per_class, float(o.frac_noise))
    if o.num_to_remove_per_class is not None:
        ntr = np.asarray(o.num_to_remove_per_class, dtype=np.int64)
        pcm = kn.apply_num_to_remove_per_class(pcm, ntr, counts)
    return pcm
