"""labelq: find label errors in classification datasets with confident learning.

The in-process API (same options and results as the HTTP endpoints)::

    from service import find_issues, dataset_health, out_of_distribution
    result = find_issues(labels, pred_probs)
"""

from service.core import CATEGORIES, FindIssuesResult, NoiseEstimates, Options, Thresholds, find_issues
from service.errors import InputError, LabelqError
from service.health import (
    ClassLabelQuality,
    DatasetHealthResult,
    OutOfDistributionResult,
    OverlappingClasses,
    dataset_health,
    out_of_distribution,
)

__version__ = "0.1.0"

__all__ = [
    "CATEGORIES",
    "ClassLabelQuality",
    "DatasetHealthResult",
    "FindIssuesResult",
    "InputError",
    "LabelqError",
    "NoiseEstimates",
    "Options",
    "OutOfDistributionResult",
    "OverlappingClasses",
    "Thresholds",
    "__version__",
    "dataset_health",
    "find_issues",
    "out_of_distribution",
]
