"""Pre-ranking metrics on whole candidate sets (RankTower's evaluation, docs/methods.md section 4).

For each request, the pre-ranker's top-K of all retrieved candidates is compared with (a) the
ranking stage's top-K (the K candidates with the highest ranker score, the ``teacher``) and (b) the
clicked candidates (definitions in :func:`prerank_metrics`). Pure numpy, vectorised over requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _rank_within(group: np.ndarray, score: np.ndarray) -> np.ndarray:
    """0-based rank of each row by descending ``score`` within its group (ties: row order)."""
    order = np.lexsort((np.arange(len(score)), -score, group))
    g = group[order]
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    sizes = np.diff(np.r_[starts, len(g)])
    pos = np.arange(len(g)) - np.repeat(starts, sizes)
    rank = np.empty(len(g), dtype=np.int64)
    rank[order] = pos
    return rank


def _recall_ndcg(group_index: np.ndarray, n_groups: int, rank: np.ndarray, relevant: np.ndarray,
                 k: int) -> tuple[float, float, int]:
    """Mean Recall@k and NDCG@k (binary relevance) over the groups with a relevant row."""
    n_rel = np.bincount(group_index, weights=relevant, minlength=n_groups)
    hit = relevant & (rank < k)
    hits = np.bincount(group_index, weights=hit, minlength=n_groups)
    gain = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    dcg = np.bincount(group_index, weights=gain, minlength=n_groups)
    discounts = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))
    ideal = discounts[np.minimum(n_rel, k).astype(np.int64) - 1]
    valid = n_rel > 0
    if not valid.any():
        return float("nan"), float("nan"), 0
    recall = hits[valid] / np.minimum(n_rel[valid], k)
    return float(recall.mean()), float((dcg[valid] / ideal[valid]).mean()), int(valid.sum())


def prerank_metrics(scores: np.ndarray, request: np.ndarray, teacher: np.ndarray,
                    click: np.ndarray, ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """Recall@K and NDCG@K of each request's top-K by ``scores`` against two targets:

    - ``ranker``: the request's K candidates with the highest ``teacher`` score (NaN = not scored
      by the ranker; fewer than K scored candidates: all of them);
    - ``click``: the clicked candidates (requests without a click are left out).

    Recall@K = hits / min(K, |targets|); NDCG@K with binary relevance. Means over requests.

    Example:
        >>> prerank_metrics(scores, request_ids, teacher, clicks, ks=[10])["ranker_recall@10"]
        0.71
    """
    scores = np.asarray(scores, dtype=np.float64)
    request = np.asarray(request)
    teacher = np.asarray(teacher, dtype=np.float64)
    click = np.asarray(click) > 0
    _, group_index = np.unique(request, return_inverse=True)
    n_groups = int(group_index.max()) + 1 if len(group_index) else 0
    rank = _rank_within(group_index, scores)
    scored = ~np.isnan(teacher)
    teacher_rank = _rank_within(group_index, np.where(scored, teacher, -np.inf))
    out: dict[str, float] = {"requests": float(n_groups), "candidates": float(len(scores))}
    for k in ks:
        in_ranker_top = scored & (teacher_rank < k)
        for name, relevant in (("ranker", in_ranker_top), ("click", click)):
            recall, ndcg, n = _recall_ndcg(group_index, n_groups, rank, relevant, k)
            out[f"{name}_recall@{k}"] = recall
            out[f"{name}_ndcg@{k}"] = ndcg
            out[f"{name}_requests"] = float(n)
    return out
