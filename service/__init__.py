"""labelq: find label errors in classification datasets with confident learning.

The in-process API (same options and results as ``POST /find-issues``)::

    from service import find_issues
    result = find_issues(labels, pred_probs)
"""

from service.core import FindIssuesResult, NoiseEstimates, Options, find_issues
from service.errors import InputError, LabelqError

__version__ = "0.1.0"

__all__ = ["FindIssuesResult", "InputError", "LabelqError", "NoiseEstimates", "Options", "__version__", "find_issues"]
