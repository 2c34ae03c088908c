"""Wire schemas of the HTTP API: what `POST /find-issues`, `POST /dataset-health`
and `POST /out-of-distribution` read and return.

The request is decoded with msgspec (litestar's own serialiser): it is strict
(a string or boolean where a number belongs is an error naming its path) and
decodes a 100k x 10 matrix about as fast as orjson. Value ranges are checked
by :mod:`service.core`, the one place that knows the options, so that the
in-process API and HTTP give the same errors.

The same structs generate the OpenAPI components served under /schema.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from service.core import FilterBy, RankBy, ThresholdMethod
from service.health import OODMethod

_PROB_TOLERANCE = Meta(
    description="In (0, 0.1]: how far a row's sum may be from 1, and a value above 1. Rows within it are used as given."
)
_LABELS = Meta(description="N given labels, integers in [0, K).")
_PRED_PROBS = Meta(description="N rows of K probabilities (K >= 2), each row summing to 1 within `prob_tolerance`.")


class ThresholdsOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """How the per-class thresholds are set, and the out-of-distribution thresholds of the categories."""

    method: Annotated[
        ThresholdMethod,
        Meta(
            description="`mean` (the confident-learning rule): class k's threshold is the mean of "
            "`pred_probs[i][k]` over the examples labeled k. `percentile`: that `class_percentile`-th "
            "percentile (numpy's default, linear). The thresholds chosen replace the others for the whole "
            "computation: confident joint, pruning, noise estimates, and scores with `adjust_pred_probs`. "
            "A class with no examples gets 2.0 (no example is confident for it)."
        ),
    ] = "mean"
    class_percentile: Annotated[
        float | None,
        Meta(description="In [0, 100], only with method `percentile`; omitted: 50."),
    ] = None
    ood_percentile: Annotated[
        float,
        Meta(
            description="In [0, 100], with either method: class k's out-of-distribution threshold is this "
            "percentile of `pred_probs[i][k]` over the examples labeled k (2.0 for a class with no examples). "
            "An example counted nowhere in the confident joint whose every probability is below its class's "
            "out-of-distribution threshold is `out_of_distribution`."
        ),
    ] = 15.0


class FindIssuesOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Options; each is optional and defaults to the reference's default."""

    filter_by: Annotated[
        FilterBy,
        Meta(
            description="Which examples to flag (cleanlab's `filter_by`). "
            "`prune_by_noise_rate`: per (given, true) cell of the calibrated confident joint, the examples "
            "with the largest margin; `prune_by_class`: per class, the lowest self-confidence; `both`: "
            "flagged by both; `confident_learning`: off-diagonal of the confident joint; "
            "`predicted_neq_given`: argmax differs from the label; `low_normalized_margin` / "
            "`low_self_confidence`: the `estimated_num_label_issues` lowest scores."
        ),
    ] = "prune_by_noise_rate"
    rank_by: Annotated[
        RankBy, Meta(description="The label quality score reported per example and used to rank the flagged ones.")
    ] = "self_confidence"
    frac_noise: Annotated[
        float,
        Meta(
            description="In [0, 1]: flag only this fraction of the estimated issues. "
            "Only for the prune_* methods and `both`."
        ),
    ] = 1.0
    num_to_remove_per_class: Annotated[
        list[int] | None,
        Meta(
            description="K integers >= 0: how many examples to flag in each class. "
            "Only for the prune_* methods and `both`."
        ),
    ] = None
    min_examples_per_class: Annotated[
        int, Meta(description="Integer >= 0: never prune a class that has this many examples or fewer.")
    ] = 1
    adjust_pred_probs: Annotated[
        bool,
        Meta(
            description="Subtract the per-class thresholds from pred_probs before scoring "
            "(not with `confidence_weighted_entropy`)."
        ),
    ] = False
    prob_tolerance: Annotated[float, _PROB_TOLERANCE] = 1e-3
    thresholds: Annotated[
        ThresholdsOptions | None,
        Meta(description='How the class thresholds are set; omit for `{"method": "mean"}`, the reference\'s rule.'),
    ] = None


class FindIssuesRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A dataset: given labels and out-of-sample predicted probabilities."""

    labels: Annotated[list[int], Meta(description="N given labels, integers in [0, K).")]
    pred_probs: Annotated[
        list[list[float]],
        Meta(description="N rows of K probabilities (K >= 2), each row summing to 1 within `prob_tolerance`."),
    ]
    options: Annotated[FindIssuesOptions | None, Meta(description="Options; omit for the reference's defaults.")] = None


class NoiseEstimates(msgspec.Struct):
    """Dataset-level estimates of the label noise."""

    thresholds: Annotated[list[float], Meta(description="Per-class confident thresholds (K).")]
    ood_thresholds: Annotated[
        list[float], Meta(description="Per-class out-of-distribution thresholds (K), see `options.thresholds`.")
    ]
    confident_joint: Annotated[
        list[list[int]], Meta(description="Calibrated confident joint (K x K): rows given label, columns true label.")
    ]
    joint: Annotated[list[list[float]], Meta(description="Estimated joint P(given, true) (K x K).")]
    noise_matrix: Annotated[
        list[list[float]],
        Meta(description="P(given | true) (K x K); columns sum to 1, or are all zero for a true class left empty."),
    ]
    inverse_noise_matrix: Annotated[list[list[float]], Meta(description="P(true | given) (K x K), columns sum to 1.")]
    py: Annotated[list[float], Meta(description="Estimated prior of the true labels (K).")]
    estimated_num_label_issues: Annotated[
        int, Meta(description="cleanlab's `num_label_issues` (off_diagonal estimate).")
    ]


class FindIssuesResponse(msgspec.Struct):
    """Per-example results and dataset-level noise estimates."""

    n_examples: Annotated[int, Meta(description="N.")]
    n_classes: Annotated[int, Meta(description="K.")]
    num_label_issues: Annotated[int, Meta(description="How many examples are flagged.")]
    is_label_issue: Annotated[list[bool], Meta(description="Per example: flagged as a probable label error.")]
    label_quality_score: Annotated[list[float], Meta(description="Per example: score in [0, 1], lower is worse.")]
    suggested_label: Annotated[list[int], Meta(description="Per example: the row argmax (lowest index on ties).")]
    ranked_issue_indices: Annotated[
        list[int], Meta(description="The flagged examples, lowest score first (equal scores in index order).")
    ]
    category: Annotated[
        list[Annotated[int, Meta(ge=0, le=3)]],
        Meta(
            description="Per example, a code: 0 `ok` (counted on the diagonal of the confident joint), "
            "1 `label_issue` (counted off the diagonal: confidently another class; this is the confident joint's "
            "rule, not `filter_by`), 2 `out_of_distribution` (counted nowhere, and every probability below its "
            "class's out-of-distribution threshold), 3 `unconfident` (counted nowhere, not out of distribution)."
        ),
    ]
    category_counts: Annotated[
        list[int], Meta(description="How many examples have each category, indexed by code (4 integers).")
    ]
    noise: Annotated[NoiseEstimates, Meta(description="Dataset-level noise estimates.")]


# --------------------------------------------------------------------- dataset health


class DatasetHealthOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Options of the dataset health summary; each is optional."""

    class_names: Annotated[
        list[str] | None, Meta(description="K names, in class order, to name the classes in the tables.")
    ] = None
    asymmetric: Annotated[
        bool,
        Meta(
            description="Report each ordered pair (a, b), a != b, with `joint[a][b]` (examples labeled a that "
            "are b), instead of each pair once with `joint[a][b] + joint[b][a]`."
        ),
    ] = False
    prob_tolerance: Annotated[float, _PROB_TOLERANCE] = 1e-3


class DatasetHealthRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A dataset: given labels and out-of-sample predicted probabilities."""

    labels: Annotated[list[int], _LABELS]
    pred_probs: Annotated[list[list[float]], _PRED_PROBS]
    options: Annotated[DatasetHealthOptions | None, Meta(description="Options; omit for the reference's defaults.")] = (
        None
    )


class ClassLabelQuality(msgspec.Struct):
    """Per-class label quality (cleanlab's `rank_classes_by_label_quality`), one entry per class in each
    list, worst label quality first (equal scores in class order)."""

    class_index: Annotated[list[int], Meta(description="The class.")]
    class_name: Annotated[list[str] | None, Meta(description="Its name, with the `class_names` option; else null.")]
    label_issues: Annotated[
        list[int],
        Meta(description="Estimated examples labeled k that belong to another class: round(N x P(given=k, true!=k))."),
    ]
    inverse_label_issues: Annotated[
        list[int], Meta(description="Estimated examples of class k labeled as another: round(N x P(given!=k, true=k)).")
    ]
    label_noise: Annotated[list[float], Meta(description="P(true != k | given = k).")]
    inverse_label_noise: Annotated[list[float], Meta(description="P(given != k | true = k).")]
    label_quality_score: Annotated[
        list[float], Meta(description="P(true = k | given = k) = 1 - label_noise; the sort key, ascending.")
    ]


class OverlappingClasses(msgspec.Struct):
    """Pairs of classes the labels confuse (cleanlab's `find_overlapping_classes`), one entry per pair in each
    list, highest joint probability first (equal values in row-major pair order)."""

    class_index_a: Annotated[list[int], Meta(description="First class of the pair (the given label when asymmetric).")]
    class_index_b: Annotated[list[int], Meta(description="Second class of the pair (the true label when asymmetric).")]
    class_name_a: Annotated[
        list[str] | None, Meta(description="Names of `class_index_a`, with `class_names`; else null.")
    ]
    class_name_b: Annotated[
        list[str] | None, Meta(description="Names of `class_index_b`, with `class_names`; else null.")
    ]
    num_overlapping_examples: Annotated[
        list[int], Meta(description="Estimated number of overlapping examples: round(N x joint_probability).")
    ]
    joint_probability: Annotated[
        list[float],
        Meta(
            description="joint[a][b] + joint[b][a] (symmetric), or joint[a][b] (asymmetric); the sort key, descending."
        ),
    ]


class DatasetHealthResponse(msgspec.Struct):
    """The dataset health summary (cleanlab's `health_summary`)."""

    n_examples: Annotated[int, Meta(description="N.")]
    n_classes: Annotated[int, Meta(description="K.")]
    overall_label_health_score: Annotated[
        float, Meta(description="1 - num_label_issues / N: the estimated fraction of correct labels.")
    ]
    num_label_issues: Annotated[
        int, Meta(description="cleanlab's `num_label_issues` (off-diagonal estimate) behind the score.")
    ]
    classes_by_label_quality: Annotated[ClassLabelQuality, Meta(description="Per class, worst first.")]
    overlapping_classes: Annotated[OverlappingClasses, Meta(description="Pairs of classes, most confused first.")]
    joint: Annotated[
        list[list[float]],
        Meta(description="Estimated joint P(given, true) (K x K): rows given label, columns true label."),
    ]


# --------------------------------------------------------------------- out of distribution


class OutOfDistributionOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Options of the out-of-distribution scores (cleanlab's `OutOfDistribution` params); each is optional."""

    method: Annotated[
        OODMethod,
        Meta(
            description="`entropy`: one minus the normalized entropy, 1 + sum(p log p) / log K; "
            "`least_confidence`: the largest probability; `gen`: 1 - sum(q^gamma (1 - q)^gamma) / M over the M "
            "largest q of softmax(row) (GEN, Liu et al. 2023)."
        ),
    ] = "entropy"
    adjust_pred_probs: Annotated[
        bool,
        Meta(
            description="First subtract the class thresholds (the mean of `pred_probs[i][k]` over the examples "
            "labeled k, or `confident_thresholds`) from each row, shift by the largest and renormalise. Needs "
            "`labels` or `confident_thresholds`."
        ),
    ] = True
    M: Annotated[int, Meta(description="`gen` only, integer >= 1: how many of the largest values enter the score.")] = (
        100
    )
    gamma: Annotated[float, Meta(description="`gen` only, > 0: the exponent.")] = 0.1
    confident_thresholds: Annotated[
        list[float] | None,
        Meta(
            description="K thresholds >= 0 to adjust with instead of computing them from `labels` (e.g. the "
            "`confident_thresholds` a call on the training set returned)."
        ),
    ] = None
    prob_tolerance: Annotated[float, _PROB_TOLERANCE] = 1e-3


class OutOfDistributionRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Predicted probabilities, and the labels when the scores are adjusted by class thresholds."""

    pred_probs: Annotated[list[list[float]], _PRED_PROBS]
    labels: Annotated[
        list[int] | None,
        Meta(
            description="N given labels in [0, K): needed with `adjust_pred_probs` (the default) unless "
            "`confident_thresholds` are given; otherwise checked and unused."
        ),
    ] = None
    options: Annotated[
        OutOfDistributionOptions | None, Meta(description="Options; omit for the reference's defaults.")
    ] = None


class OutOfDistributionResponse(msgspec.Struct):
    """Per-example out-of-distribution scores."""

    n_examples: Annotated[int, Meta(description="N.")]
    n_classes: Annotated[int, Meta(description="K.")]
    method: Annotated[OODMethod, Meta(description="The scoring method used.")]
    ood_score: Annotated[
        list[float],
        Meta(description="Per example, in [0, 1]: lower is less typical of the dataset (more likely an outlier)."),
    ]
    confident_thresholds: Annotated[
        list[float] | None,
        Meta(description="The K class thresholds the rows were adjusted with; null without `adjust_pred_probs`."),
    ]


# --------------------------------------------------------------------- batched protocol


class BatchOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The options of a batched run: those of `/find-issues` but the `thresholds` object
    (batched runs use the reference's mean thresholds)."""

    filter_by: Annotated[FilterBy, Meta(description="Which examples to flag.")] = "prune_by_noise_rate"
    rank_by: Annotated[RankBy, Meta(description="The label quality score.")] = "self_confidence"
    frac_noise: Annotated[float, Meta(ge=0, le=1)] = 1.0
    num_to_remove_per_class: list[int] | None = None
    min_examples_per_class: Annotated[int, Meta(ge=0)] = 1
    adjust_pred_probs: bool = False
    prob_tolerance: Annotated[float, _PROB_TOLERANCE] = 1e-3


class BatchStartRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Start a batched run: what the client knows from the labels alone."""

    class_counts: Annotated[list[int], Meta(description="Examples per given label over the whole dataset (K).")]
    n_examples: Annotated[int, Meta(ge=1, description="N, the sum of class_counts.")]
    dtype: Annotated[Literal["float16", "float32", "float64"], Meta(description="The dtype of pred_probs.")]
    options: BatchOptions | None = None


class BatchContext(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Everything a step needs to know about the whole dataset. Returned by
    `/batched/start` and `/batched/finalize`; send it back unchanged."""

    protocol: int
    n_examples: int
    n_classes: int
    dtype: Literal["float16", "float32", "float64"]
    class_counts: list[int]
    options: BatchOptions
    passes: Annotated[list[str], Meta(description="The passes this run needs, in order, before `apply`.")]
    done: Annotated[list[str], Meta(description="The passes finalized so far.")]
    thresholds: list[float] | None = None
    thresholds_cmp: list[float] | None = None
    thresholds_dtype: Literal["float16", "float32", "float64"] | None = None
    confident_joint: list[list[int]] | None = None
    joint: list[list[float]] | None = None
    noise_matrix: list[list[float]] | None = None
    inverse_noise_matrix: list[list[float]] | None = None
    py: list[float] | None = None
    estimated_num_label_issues: int | None = None
    limits: list[int] | None = None
    all_rows: list[bool] | None = None
    cut_key: list[float] | None = None
    cut_index: list[int] | None = None


class BatchPartial(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A pass's partial statistics over some rows (`rows`: [start, end) ranges):
    `sums` carry sum-tree nodes and leaf values, `joint` counts, `candidates`
    the smallest keys per cell. Merge any number in any order."""

    protocol: int
    pass_: Annotated[Literal["sums", "joint", "candidates"], Meta(description="The pass.")] = msgspec.field(name="pass")
    n_classes: int = 0
    rows: list[list[int]] = []
    node_class: list[int] | None = None
    node_lo: list[int] | None = None
    node_len: list[int] | None = None
    node_sum: list[float] | None = None
    frag_class: list[int] | None = None
    frag_pos: list[int] | None = None
    frag_value: list[float] | None = None
    confident_joint_raw: list[list[int]] | None = None
    seen: list[int] | None = None
    issues: int | None = None
    positive: list[list[int]] | None = None
    cell: list[int] | None = None
    key: list[float] | None = None
    index: list[int] | None = None


class BatchMapRequest(msgspec.Struct, forbid_unknown_fields=True):
    """One batch of rows for a map step (or `apply`)."""

    labels: Annotated[list[int], Meta(description="The batch's given labels.")]
    pred_probs: Annotated[list[list[float]], Meta(description="The batch's rows of predicted probabilities.")]
    row_offset: Annotated[int, Meta(ge=0, description="Global index of the batch's first row.")]
    context: BatchContext
    class_offsets: Annotated[
        list[int] | None, Meta(description="`sums` pass only: per class, its examples in rows before this batch.")
    ] = None


class BatchMergeRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Partials of one pass to merge (or to merge and finalize)."""

    context: BatchContext
    partials: Annotated[list[BatchPartial], Meta(min_length=1)]


class BatchApplyResponse(msgspec.Struct):
    """A batch's part of the result."""

    protocol: int
    pass_: Literal["apply"] = msgspec.field(name="pass")
    n_classes: int = 0
    rows: list[list[int]] = []
    is_label_issue: list[bool] = []
    label_quality_score: list[float] = []
    suggested_label: list[int] = []
    issue_index: Annotated[list[int], Meta(description="The batch's flagged rows (global indices).")] = []
    issue_score: Annotated[list[float], Meta(description="Their scores.")] = []


# --------------------------------------------------------------------- errors, health


class Problem(msgspec.Struct, omit_defaults=True):
    """An RFC 9457 problem: what was wrong with the request."""

    type: str
    title: str
    status: int
    detail: str
    field: Annotated[
        str | None, Meta(description="The offending input, e.g. `pred_probs[3][1]` or `options.filter_by`.")
    ] = None


class Health(msgspec.Struct):
    status: Literal["ok", "starting", "draining"]


def openapi_components() -> dict[str, dict]:
    """JSON schemas of the structs above, referenced as #/components/schemas/NAME."""
    _, components = msgspec.json.schema_components(
        [
            FindIssuesRequest,
            FindIssuesResponse,
            DatasetHealthRequest,
            DatasetHealthResponse,
            OutOfDistributionRequest,
            OutOfDistributionResponse,
            Problem,
            Health,
            BatchStartRequest,
            BatchContext,
            BatchPartial,
            BatchMapRequest,
            BatchMergeRequest,
            BatchApplyResponse,
        ],
        ref_template="#/components/schemas/{name}",
    )
    return components
