"""Wire schemas of the HTTP API: what `POST /find-issues` reads and returns.

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

from service.core import FilterBy, RankBy

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
    prob_tolerance: Annotated[
        float,
        Meta(
            description="In (0, 0.1]: how far a row's sum may be from 1, and a value above 1. Rows within it "
            "are used as given."
        ),
    ] = 1e-3


class FindIssuesRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A dataset: given labels and out-of-sample predicted probabilities."""

    labels: Annotated[list[int], Meta(description="N given labels, integers in [0, K).")]
    pred_probs: Annotated[
        list[list[float]],
        Meta(description="N rows of K probabilities (K >= 2), each row summing to 1 within `prob_tolerance`."),
    ]
    options: Annotated[
        FindIssuesOptions | None, Meta(description="Options; omit for the reference's defaults.")
    ] = None


class NoiseEstimates(msgspec.Struct):
    """Dataset-level estimates of the label noise."""

    thresholds: Annotated[list[float], Meta(description="Per-class confident thresholds (K).")]
    confident_joint: Annotated[
        list[list[int]], Meta(description="Calibrated confident joint (K x K): rows given label, columns true label.")
    ]
    joint: Annotated[list[list[float]], Meta(description="Estimated joint P(given, true) (K x K).")]
    noise_matrix: Annotated[list[list[float]], Meta(description="P(given | true) (K x K), columns sum to 1.")]
    inverse_noise_matrix: Annotated[
        list[list[float]], Meta(description="P(true | given) (K x K), columns sum to 1.")
    ]
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
    noise: Annotated[NoiseEstimates, Meta(description="Dataset-level noise estimates.")]


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
        [FindIssuesRequest, FindIssuesResponse, Problem, Health], ref_template="#/components/schemas/{name}"
    )
    return components
