"""Evaluation: metrics that are honest about ties, groups and ranks (report tables and plots next).

It knows nothing of models: it reads probabilities, labels and group ids.
"""

from recsys.evaluate.metrics import (
    EvalAccumulator,
    GAUCWeighting,
    GroupAUC,
    auc,
    calibration,
    expected_calibration_error,
    flatten_for_report,
    gauc,
    gauc_metrics,
    logloss,
    ndcg_at_k,
    normalized_entropy,
    per_group_auc,
    ranking_metrics,
    recall_at_k,
)

__all__ = [
    "EvalAccumulator", "GAUCWeighting", "GroupAUC", "auc", "calibration",
    "expected_calibration_error", "flatten_for_report", "gauc", "gauc_metrics", "logloss",
    "ndcg_at_k", "normalized_entropy", "per_group_auc", "ranking_metrics", "recall_at_k",
]
