"""Pre-ranking metrics on whole candidate sets against a per-request loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys.evaluate.cascade import prerank_metrics


def _naive(scores, request, teacher, click, k):
    out = {"ranker": ([], []), "click": ([], [])}
    for r in np.unique(request):
        idx = np.flatnonzero(request == r)
        order = idx[np.argsort(-scores[idx], kind="stable")]
        top = list(order[:k])
        scored = [i for i in idx if not np.isnan(teacher[i])]
        by_teacher = sorted(scored, key=lambda i: (-teacher[i], i))[:k]
        for name, rel in (("ranker", set(by_teacher)), ("click", {i for i in idx if click[i]})):
            if not rel:
                continue
            hits = [i for i in top if i in rel]
            out[name][0].append(len(hits) / min(len(rel), k))
            dcg = sum(1 / math.log2(p + 2) for p, i in enumerate(top) if i in rel)
            idcg = sum(1 / math.log2(p + 2) for p in range(min(len(rel), k)))
            out[name][1].append(dcg / idcg)
    return {n: (np.mean(a), np.mean(b)) for n, (a, b) in out.items()}


def test_prerank_metrics_match_a_loop_over_requests() -> None:
    rng = np.random.default_rng(0)
    n = 400
    request = rng.integers(0, 30, n) * 7 + 3  # arbitrary ids, unsorted
    scores = rng.normal(size=n)
    teacher = np.where(rng.random(n) < 0.5, rng.normal(size=n), np.nan)
    click = rng.random(n) < 0.1
    got = prerank_metrics(scores, request, teacher, click, ks=(3, 5))
    for k in (3, 5):
        want = _naive(scores, request, teacher, click, k)
        for name in ("ranker", "click"):
            assert got[f"{name}_recall@{k}"] == pytest.approx(want[name][0])
            assert got[f"{name}_ndcg@{k}"] == pytest.approx(want[name][1])


def test_a_perfect_preranker_scores_one() -> None:
    request = np.repeat(np.arange(4), 6)
    teacher = np.tile(np.arange(6.0), 4)
    got = prerank_metrics(teacher.copy(), request, teacher, teacher >= 5, ks=(2,))
    assert got["ranker_recall@2"] == 1.0 and got["ranker_ndcg@2"] == pytest.approx(1.0)
    assert got["click_recall@2"] == 1.0
    worst = prerank_metrics(-teacher, request, teacher, teacher >= 5, ks=(2,))
    assert worst["ranker_recall@2"] == 0.0 and worst["click_ndcg@2"] == 0.0
