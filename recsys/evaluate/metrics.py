"""Evaluation metrics that are honest about ties, groups and ranks.

Pure functions take 1-D arrays (NumPy, lists, or CPU tensors) and compute in float64:

* :func:`auc`: ROC AUC as the Mann-Whitney statistic with average ranks (a tie between a positive
  and a negative counts one half);
* :func:`logloss`, :func:`normalized_entropy` (NE, He et al. 2014), :func:`calibration`,
  :func:`expected_calibration_error`;
* :func:`per_group_auc`, :func:`gauc`, :func:`gauc_metrics`: AUC inside groups (users, requests),
  averaged uniformly or weighted by the group's row count, always named as such;
* :func:`ndcg_at_k`, :func:`recall_at_k`: ranking quality inside request groups;
* :func:`metrics_of`: all of them for one task's labels, probabilities and groups.

Grouped metrics sort the rows once by ``(group, score)`` and work on segments
(runs of equal group, runs of equal score within a group) with cumulative sums, ``np.add.reduceat``
and ``np.bincount``: there is no Python loop over groups, so millions of groups cost one sort.

Ties are never broken by row order. AUC counts tied positive/negative pairs as one half; NDCG@K and
Recall@K give the expected value over a uniformly random order of tied scores (a run of tied rows
shares its gain evenly over the positions it occupies), which is what scikit-learn's ``ndcg_score``
does by default. A model that outputs a constant therefore scores like a random ranker whatever order
the rows were logged or gathered in, and the result does not depend on how rows were split over
ranks.

:class:`~recsys.evaluate.accumulator.EvalAccumulator` collects per-batch tensors and, when
``torch.distributed`` is initialised, gathers every rank's rows before computing, so that the
metrics are those of the global evaluation set and never an average of per-rank metrics.

torchmetrics / torchrec.metrics: ``torchmetrics.functional.classification.binary_auroc`` computes
exactly :func:`auc` (trapezoids over distinct thresholds = ties count half) and torchrec's
``compute_cross_entropy``/``compute_ne`` compute :func:`normalized_entropy` (in bits; the ratio is the
same); the tests check both against this module. torchrec's AUC (``_compute_auc_helper``) and GAUC
(``compute_gauc_3d``) do not count ties as one half (the result depends on the order of tied rows),
and its GAUC also skips groups whose predictions are all equal, so they are not used here. At run
time this module calls none of them: one float64 code path (torchmetrics 1.0.3 accumulates its ROC
curve in float32).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import torch

__all__ = [
    "GAUCWeighting",
    "GroupAUC",
    "auc",
    "calibration",
    "expected_calibration_error",
    "gauc",
    "gauc_metrics",
    "logloss",
    "metrics_of",
    "ndcg_at_k",
    "normalized_entropy",
    "per_group_auc",
    "ranking_metrics",
    "recall_at_k",
]

# Headline keys of a report, in the order metrics.json lists them.
HEADLINE_KEYS = ("auc", "gauc", "logloss", "ne", "calibration", "ece")


class GAUCWeighting(StrEnum):
    """How per-group AUCs are averaged into a GAUC."""

    UNIFORM = "uniform"  # every group with both classes counts once
    IMPRESSIONS = "impressions"  # each group weighted by its row count (the common industry GAUC)


# --------------------------------------------------------------------------------------------------
# input checks


def _array(name: str, x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty: a metric of no rows is undefined")
    return a


def _floats(name: str, x: Any) -> np.ndarray:
    a = _array(name, x)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    _refuse_first(name, a, ~np.isfinite(a), "is not finite")
    return a


def _refuse_first(name: str, a: np.ndarray, bad: np.ndarray, what: str) -> None:
    """ValueError naming the first index where ``bad`` holds, with its value."""
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        sep = "" if what.startswith(":") else " "
        raise ValueError(f"{name}[{i}] = {a[i]}{sep}{what}")


def _binary_labels(name: str, x: Any) -> np.ndarray:
    a = _floats(name, x)
    _refuse_first(name, a, (a != 0.0) & (a != 1.0), ": labels must be 0 or 1")
    return a


def _unit_interval(name: str, x: Any) -> np.ndarray:
    a = _floats(name, x)
    _refuse_first(name, a, (a < 0.0) | (a > 1.0), "is outside [0, 1]")
    return a


def _group_ids(name: str, x: Any) -> np.ndarray:
    a = _array(name, x)
    if a.dtype.kind not in "biuUS":
        raise ValueError(f"{name} must hold integer (or string) group ids, got dtype {a.dtype}")
    return a


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have the same length, got {lengths}")


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


# --------------------------------------------------------------------------------------------------
# segments: rows sorted by (group, score), with runs of equal group and runs of equal score


@dataclass(frozen=True)
class _Segments:
    """Rows sorted by group then score, cut into groups and into tie runs inside groups."""

    order: np.ndarray  # (n,) permutation: sorted row j is original row order[j]
    group_of_row: np.ndarray  # (n,) index in [0, n_groups) of each sorted row's group
    group_first_row: np.ndarray  # (n_groups,) first sorted row of each group
    group_ids: np.ndarray  # (n_groups,) the group id of each group (ascending)
    run_starts: np.ndarray  # (n_runs,) first sorted row of each tie run
    run_lengths: np.ndarray  # (n_runs,) rows in each tie run
    run_group: np.ndarray  # (n_runs,) group index of each run

    @property
    def n_groups(self) -> int:
        return int(self.group_first_row.size)

    def run_sums(self, values_sorted: np.ndarray) -> np.ndarray:
        """Sum of ``values_sorted`` (already in sorted order) over each tie run."""
        return np.add.reduceat(values_sorted, self.run_starts)

    def group_sums(self, values_sorted: np.ndarray) -> np.ndarray:
        """Sum of ``values_sorted`` (already in sorted order) over each group."""
        return np.bincount(self.group_of_row, weights=values_sorted, minlength=self.n_groups)

    def rank_in_group(self) -> np.ndarray:
        """0-based position of each sorted row inside its group."""
        return np.arange(self.order.size) - self.group_first_row[self.group_of_row]


def _sort_within_groups(keys: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """A permutation that sorts by ``(groups, keys)``.

    The order of rows with equal group and key is arbitrary: every metric here treats such a tie
    run as a whole. An unstable sort by key, then a stable sort by group, measured about 2x faster
    than ``np.lexsort((keys, groups))`` on 5M rows.
    """
    by_key = np.argsort(keys)
    return by_key[np.argsort(groups[by_key], kind="stable")]


def _segments(scores: np.ndarray, groups: np.ndarray | None) -> _Segments:
    """Sort by (group, score ascending); ``groups=None`` means one group."""
    n = scores.size
    if groups is None:
        order = np.argsort(scores)
        new_group = np.zeros(n, dtype=bool)
        new_group[0] = True
        group_ids = np.zeros(1, dtype=np.int64)
    else:
        order = _sort_within_groups(scores, groups)
        g = groups[order]
        new_group = np.empty(n, dtype=bool)
        new_group[0] = True
        np.not_equal(g[1:], g[:-1], out=new_group[1:])
        group_ids = g[new_group]
    s = scores[order]
    new_run = new_group.copy()
    new_run[1:] |= s[1:] != s[:-1]
    run_starts = np.flatnonzero(new_run)
    group_of_row = np.cumsum(new_group) - 1
    return _Segments(
        order=order,
        group_of_row=group_of_row,
        group_first_row=np.flatnonzero(new_group),
        group_ids=group_ids,
        run_starts=run_starts,
        run_lengths=np.diff(np.append(run_starts, n)),
        run_group=group_of_row[run_starts],
    )


# --------------------------------------------------------------------------------------------------
# AUC and GAUC


@dataclass(frozen=True)
class GroupAUC:
    """AUC of every group (NaN where a group lacks a positive or a negative).

    Args:
        group: ``(G,)`` the group ids, ascending.
        auc: ``(G,)`` the AUC inside each group, NaN where undefined.
        rows: ``(G,)`` rows in each group.
        positives: ``(G,)`` positive rows in each group.

    Example:
        >>> per_group_auc([0, 1, 1, 0], [0.1, 0.9, 0.2, 0.3], groups=[7, 7, 8, 8]).auc
        array([1., 0.])
    """

    group: np.ndarray
    auc: np.ndarray
    rows: np.ndarray
    positives: np.ndarray

    @property
    def defined(self) -> np.ndarray:
        """Mask of the groups that have both a positive and a negative (the groups GAUC uses)."""
        return (self.positives > 0) & (self.positives < self.rows)

    def mean(self, weighting: GAUCWeighting | str = GAUCWeighting.IMPRESSIONS) -> float:
        """GAUC over the defined groups; NaN when no group has both classes."""
        weighting = GAUCWeighting(weighting)
        used = self.defined
        if not used.any():
            return float("nan")
        if weighting is GAUCWeighting.UNIFORM:
            return float(self.auc[used].mean())
        w = self.rows[used].astype(np.float64)
        return float(np.dot(w, self.auc[used]) / w.sum())


def _grouped_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray | None) -> GroupAUC:
    seg = _segments(scores, groups)
    y = labels[seg.order]
    run_pos = seg.run_sums(y)
    run_neg = seg.run_lengths - run_pos
    # Negatives strictly below each run inside its group: an exclusive cumulative count over all
    # runs, minus that count at the group's first run.
    neg_below = np.cumsum(run_neg) - run_neg
    first_run = np.flatnonzero(np.diff(seg.run_group, prepend=-1))
    neg_below = neg_below - neg_below[first_run][seg.run_group]
    # Each positive beats the negatives below its run and ties (one half) with those in its run:
    # the Mann-Whitney U with average ranks.
    wins = run_pos * (neg_below + 0.5 * run_neg)
    numerator = np.bincount(seg.run_group, weights=wins, minlength=seg.n_groups)
    rows = np.bincount(seg.group_of_row, minlength=seg.n_groups)
    positives = seg.group_sums(y)
    negatives = rows - positives
    with np.errstate(invalid="ignore", divide="ignore"):
        value = numerator / (positives * negatives)
    value[(positives == 0) | (negatives == 0)] = np.nan
    return GroupAUC(group=seg.group_ids, auc=value, rows=rows, positives=positives)


def auc(labels: Any, scores: Any) -> float:
    """ROC AUC: the probability that a random positive scores above a random negative, ties one half.

    Computed as the Mann-Whitney U statistic with average ranks, in one sort. Returns NaN when the
    labels hold only one class.

    Args:
        labels: ``(n,)`` 0/1 labels.
        scores: ``(n,)`` scores or probabilities (any monotone transform gives the same AUC).

    Example:
        >>> auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9])  # pairs: (0.5>0.5?) 1/2, 1, 1, 1 -> 3.5 / 4
        0.875
    """
    y = _binary_labels("labels", labels)
    s = _floats("scores", scores)
    _same_length(labels=y, scores=s)
    return float(_grouped_auc(y, s, None).auc[0])


def per_group_auc(labels: Any, scores: Any, groups: Any) -> GroupAUC:
    """AUC inside each group, vectorised over all groups (one sort by group and score).

    Args:
        labels: ``(n,)`` 0/1 labels.
        scores: ``(n,)`` scores.
        groups: ``(n,)`` integer group ids (any order, need not be contiguous).

    Example:
        >>> per_group_auc([0, 1, 1, 1], [0.2, 0.4, 0.1, 0.3], [1, 1, 2, 2]).auc
        array([ 1., nan])
    """
    y = _binary_labels("labels", labels)
    s = _floats("scores", scores)
    g = _group_ids("groups", groups)
    _same_length(labels=y, scores=s, groups=g)
    return _grouped_auc(y, s, g)


def gauc(labels: Any, scores: Any, groups: Any,
         weighting: GAUCWeighting | str = GAUCWeighting.IMPRESSIONS) -> float:
    """Group AUC: the mean of per-group AUCs over the groups that have a positive and a negative.

    ``weighting="uniform"`` counts each such group once; ``"impressions"`` weights each by its row
    count (all of its rows). Groups with only positives or only negatives are skipped. NaN when no
    group qualifies.

    Example:
        >>> gauc([0, 1, 1, 0, 0, 1], [.1, .9, .2, .3, .4, .5], [7, 7, 8, 8, 8, 8], "uniform")
        0.75
    """
    return per_group_auc(labels, scores, groups).mean(weighting)


def gauc_metrics(labels: Any, scores: Any, groups: Any) -> dict[str, float]:
    """Both GAUC variants, named, and the number of groups they average over.

    Returns:
        ``{"gauc_uniform": ..., "gauc_impressions": ..., "gauc_groups": G}``.

    Example:
        >>> gauc_metrics([0, 1, 1, 0, 0, 1], [.1, .9, .2, .3, .4, .5], [7, 7, 8, 8, 8, 8])
        {'gauc_uniform': 0.75, 'gauc_impressions': 0.6666666666666666, 'gauc_groups': 2}
    """
    per_group = per_group_auc(labels, scores, groups)
    return {
        "gauc_uniform": per_group.mean(GAUCWeighting.UNIFORM),
        "gauc_impressions": per_group.mean(GAUCWeighting.IMPRESSIONS),
        "gauc_groups": int(per_group.defined.sum()),
    }


# --------------------------------------------------------------------------------------------------
# probability metrics


def logloss(labels: Any, probs: Any, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy in nats, with probabilities clipped to ``[eps, 1 - eps]``.

    Example:
        >>> round(logloss([1, 0], [0.8, 0.4]), 6)  # -(ln 0.8 + ln 0.6) / 2
        0.366985
    """
    y = _unit_interval("labels", labels)
    p = _unit_interval("probs", probs)
    _same_length(labels=y, probs=p)
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _entropy(rate: float) -> float:
    if rate <= 0.0 or rate >= 1.0:
        return 0.0
    return float(-(rate * np.log(rate) + (1.0 - rate) * np.log1p(-rate)))


def normalized_entropy(labels: Any, probs: Any, eps: float = 1e-7) -> float:
    """Normalized entropy (NE, He et al. 2014): log-loss divided by the entropy of the base rate.

    1.0 is what always predicting the observed positive rate scores; lower is better. NaN when the
    labels hold one class only (the base-rate entropy is 0).

    Example:
        >>> round(normalized_entropy([1, 0], [0.8, 0.4]), 6)  # 0.366985 / ln 2
        0.529447
    """
    y = _unit_interval("labels", labels)
    h = _entropy(float(y.mean()))
    if h == 0.0:
        return float("nan")
    return logloss(y, probs, eps) / h


def calibration(labels: Any, probs: Any) -> float:
    """Mean predicted probability over the observed positive rate (1.0 is calibrated on average).

    NaN when there is no positive.

    Example:
        >>> round(calibration([1, 0, 0, 0], [0.5, 0.1, 0.1, 0.1]), 12)  # mean 0.2 / rate 0.25
        0.8
    """
    y = _unit_interval("labels", labels)
    p = _unit_interval("probs", probs)
    _same_length(labels=y, probs=p)
    positives = y.sum()
    return float(p.sum() / positives) if positives > 0 else float("nan")


def expected_calibration_error(labels: Any, probs: Any, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-width bins of ``[0, 1]``.

    Convention: row ``i`` falls in bin ``min(floor(p_i * bins), bins - 1)``, i.e. bins are
    ``[b/bins, (b+1)/bins)`` with the last one closed at 1.0; ``ECE = sum_b (n_b / n) *
    |mean(p in b) - mean(y in b)|`` (empty bins contribute nothing), which equals
    ``sum_b |sum(p in b) - sum(y in b)| / n``.

    Example:
        >>> # bin 1: |0.25 - 1| = 0.75; bin 9: |1.9 - 2| = 0.1; (0.75 + 0.1) / 4
        >>> round(expected_calibration_error([0, 1, 1, 1], [0.1, 0.15, 0.9, 1.0]), 12)
        0.2125
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    y = _unit_interval("labels", labels)
    p = _unit_interval("probs", probs)
    _same_length(labels=y, probs=p)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    sum_p = np.bincount(index, weights=p, minlength=bins)
    sum_y = np.bincount(index, weights=y, minlength=bins)
    return float(np.abs(sum_p - sum_y).sum() / p.size)


# --------------------------------------------------------------------------------------------------
# ranking metrics inside request groups


def _ranking_inputs(labels: Any, scores: Any, groups: Any
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = _floats("labels", labels)
    if (y < 0).any():
        i = int(np.flatnonzero(y < 0)[0])
        raise ValueError(f"labels[{i}] = {y[i]}: ranking gains must be >= 0")
    s = _floats("scores", scores)
    g = _group_ids("groups", groups)
    _same_length(labels=y, scores=s, groups=g)
    return y, s, g


def _ranking(y: np.ndarray, s: np.ndarray, g: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """NDCG@K and Recall@K for every K from one sort by (group, -score)."""
    seg = _segments(-s, g)  # ascending -score = descending score
    rank = seg.rank_in_group()
    a = rank[seg.run_starts]  # first position of each tie run in its group
    c = seg.run_lengths
    gain_runs = seg.run_sums(y[seg.order])
    relevant = (y[seg.order] > 0).astype(np.float64)
    relevant_runs = seg.run_sums(relevant)
    total_relevant = seg.group_sums(relevant)
    used = total_relevant > 0  # a group has a positive label iff its ideal DCG is > 0
    binary = bool(np.all((y == 0) | (y == 1)))
    ideal_sorted = None if binary else y[_sort_within_groups(-y, g)]
    max_k = max(ks)
    discount = 1.0 / np.log2(np.arange(max_k) + 2.0)
    below = np.concatenate(([0.0], np.cumsum(discount)))  # below[j]: sum of discounts of r < j

    out: dict[str, float] = {}
    for k in ks:
        if not used.any():
            out[f"ndcg@{k}"] = out[f"recall@{k}"] = float("nan")
            continue
        # A tie run over positions [a, a + c) spreads its gain evenly over them: expected DCG
        # over a random order of the tied rows.
        run_discount = below[np.minimum(a + c, k)] - below[np.minimum(a, k)]
        dcg = np.bincount(seg.run_group, weights=gain_runs / c * run_discount,
                          minlength=seg.n_groups)
        if ideal_sorted is None:  # binary gains: the ideal order puts all P positives first
            idcg = below[np.minimum(total_relevant.astype(np.int64), k)]
        else:
            top = rank < k
            idcg = seg.group_sums(np.where(top, ideal_sorted * discount[np.minimum(rank, k - 1)], 0.0))
        out[f"ndcg@{k}"] = float(np.mean(dcg[used] / idcg[used]))
        # Expected number of a run's positives that land in the top k.
        share = (np.minimum(a + c, k) - np.minimum(a, k)) / c
        hits = np.bincount(seg.run_group, weights=relevant_runs * share, minlength=seg.n_groups)
        out[f"recall@{k}"] = float(np.mean(hits[used] / total_relevant[used]))
    out["ranking_groups"] = int(used.sum())
    return out


def ranking_metrics(labels: Any, scores: Any, groups: Any, ks: Iterable[int] = (5, 10)
                    ) -> dict[str, float]:
    """:func:`ndcg_at_k` and :func:`recall_at_k` for several K from one sort, and
    ``ranking_groups``, the number of groups they average over (the groups with a positive).

    Example:
        >>> ranking_metrics([1, 0, 1, 1, 0], [0.9, 0.8, 0.7, 0.2, 0.1], [1, 1, 1, 2, 2], ks=(2,))
        {'ndcg@2': 0.8065735963827292, 'recall@2': 0.75, 'ranking_groups': 2}
    """
    ks = tuple(_check_k(k) for k in ks)
    if not ks:
        raise ValueError("ks is empty: pass at least one cut-off K")
    return _ranking(*_ranking_inputs(labels, scores, groups), ks)


def ndcg_at_k(labels: Any, scores: Any, groups: Any, k: int) -> float:
    """NDCG@K inside each group, averaged uniformly over the groups that have a positive label.

    Gain is the label itself (binary or graded, >= 0), the discount of 0-based position ``r`` is
    ``1 / log2(r + 2)``, and the ideal DCG sorts the group's labels descending. Ties: a run of
    equal scores gets its expected DCG over a random order of its rows (each position the run
    occupies receives the run's mean gain), the convention of scikit-learn's ``ndcg_score``.
    Groups without a positive label are skipped; NaN when none is left.

    Example:
        >>> # one group, labels by descending score 0, 2, 1: DCG = 2/log2(3) + 1/2,
        >>> # ideal = 2 + 1/log2(3)
        >>> round(ndcg_at_k([0, 2, 1], [0.9, 0.5, 0.1], [4, 4, 4], k=3), 6)
        0.669672
    """
    return ranking_metrics(labels, scores, groups, (k,))[f"ndcg@{int(k)}"]


def recall_at_k(labels: Any, scores: Any, groups: Any, k: int) -> float:
    """Recall@K inside each group, averaged uniformly over the groups that have a positive.

    Recall@K of a group = (positives among its top ``k`` rows by score) / (all positives of the
    group), the standard definition: a group with fewer than ``k`` rows has recall 1, and a group
    with more than ``k`` positives cannot reach 1. A positive is a label > 0. Ties: a run of equal
    scores straddling position ``k`` contributes its expected number of positives in the top ``k``
    under a random order of its rows. Groups without a positive are skipped; NaN when none is left.

    Example:
        >>> # group 1: positives at score ranks 0 and 2 -> top-2 holds 1 of 2; group 2: 1 of 1
        >>> recall_at_k([1, 0, 1, 1, 0], [0.9, 0.8, 0.7, 0.2, 0.1], [1, 1, 1, 2, 2], k=2)
        0.75
    """
    return ranking_metrics(labels, scores, groups, (k,))[f"recall@{int(k)}"]


# --------------------------------------------------------------------------------------------------
# accumulation across batches and ranks


def metrics_of(labels: np.ndarray, probs: np.ndarray, groups: Mapping[str, np.ndarray],
               gauc_group: str, ranking_group: str, ks: Sequence[int]) -> dict[str, float]:
    """Every metric of one task: the pointwise ones, GAUC over ``groups[gauc_group]`` and NDCG@K /
    Recall@K within ``groups[ranking_group]`` (each only when that group kind is given), and within
    users as ``user_ndcg@K`` / ``user_recall@K`` when user groups are given."""
    out: dict[str, float] = {
        "rows": int(labels.size),
        "positive_rate": float(labels.mean()),
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        "ne": normalized_entropy(labels, probs),
        "calibration": calibration(labels, probs),
        "ece": expected_calibration_error(labels, probs),
    }
    if gauc_group in groups:
        out.update(gauc_metrics(labels, probs, groups[gauc_group]))
    if ranking_group in groups and ks:
        out.update(ranking_metrics(labels, probs, groups[ranking_group], ks))
    if ranking_group != "user" and "user" in groups and ks:  # also ranked within each user
        out.update({f"user_{k}": v
                    for k, v in ranking_metrics(labels, probs, groups["user"], ks).items()})
    return out
