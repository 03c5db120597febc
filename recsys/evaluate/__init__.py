"""Evaluation: metrics that are honest about ties, groups and ranks (report tables and plots next).

It knows nothing of models: it reads probabilities, labels and group ids.
"""

from recsys.evaluate.accumulator import ORACLE_KEY, EvalAccumulator, flatten_for_report
from recsys.evaluate.metrics import (
    GAUCWeighting,
    GroupAUC,
    auc,
    calibration,
    expected_calibration_error,
    gauc,
    gauc_metrics,
    logloss,
    metrics_of,
    ndcg_at_k,
    normalized_entropy,
    per_group_auc,
    ranking_metrics,
    recall_at_k,
)

__all__ = [
    "ORACLE_KEY", "EvalAccumulator", "GAUCWeighting", "GroupAUC", "auc", "calibration",
    "expected_calibration_error", "flatten_for_report", "gauc", "gauc_metrics", "logloss", "metrics_of",
    "ndcg_at_k", "normalized_entropy", "per_group_auc", "ranking_metrics", "recall_at_k",
]
