"""Evaluation metrics: hand-computed answers, scikit-learn / torchmetrics / torchrec / naive-loop
oracles, exact tie expectations by enumerating orders, and the 2-rank gather."""

from __future__ import annotations

import itertools
import json
import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recsys.evaluate import (
    EvalAccumulator,
    GAUCWeighting,
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

LOG2_3 = math.log2(3)


# --------------------------------------------------------------------------------------------------
# hand-computed cases


def test_auc_counts_ties_as_half() -> None:
    # positives score 0.5 and 0.9, negatives 0.5 and 0.2. Pairs (pos, neg):
    # (0.5, 0.5) tie -> 1/2; (0.5, 0.2) -> 1; (0.9, 0.5) -> 1; (0.9, 0.2) -> 1. AUC = 3.5 / 4.
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == 0.875
    # every score tied: each of the 2 * 2 pairs counts 1/2 -> 0.5
    assert auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == 0.5
    # perfect and reversed ordering
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    # positives 0.4, 0.6 vs negatives 0.1, 0.6, 0.7: 0.4 beats 0.1 (1); 0.6 beats 0.1 (1) and ties
    # 0.6 (1/2) -> 2.5 / 6
    assert auc([1, 0, 1, 0, 0], [0.4, 0.1, 0.6, 0.6, 0.7]) == pytest.approx(2.5 / 6, abs=1e-15)


def test_auc_one_class_is_nan() -> None:
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))


def test_logloss_hand() -> None:
    # -(ln 0.9 + ln(1 - 0.2) + ln 0.6) / 3 = (0.1053605 + 0.2231436 + 0.5108256) / 3 = 0.2797766
    assert logloss([1, 0, 1], [0.9, 0.2, 0.6]) == pytest.approx(0.27977656, abs=1e-8)
    # p = 0 for a positive is clipped to eps = 1e-7: -ln(1e-7) = 16.1180957
    assert logloss([1], [0.0]) == pytest.approx(-math.log(1e-7), rel=1e-12)
    assert logloss([1], [0.0], eps=1e-3) == pytest.approx(-math.log(1e-3), rel=1e-12)


def test_normalized_entropy_hand() -> None:
    # logloss = -(ln 0.5 + 3 ln 0.75) / 4 = (0.6931472 + 3 * 0.2876821) / 4 = 0.3890484
    # base rate 1/4: H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623351
    # NE = 0.3890484 / 0.5623351 = 0.6918443
    assert normalized_entropy([1, 0, 0, 0], [0.5, 0.25, 0.25, 0.25]) == pytest.approx(
        0.6918443, abs=1e-7)
    # predicting the base rate everywhere is NE = 1 by construction
    assert normalized_entropy([1, 0, 0, 0], [0.25] * 4) == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(normalized_entropy([0, 0], [0.1, 0.2]))


def test_calibration_hand() -> None:
    # mean prediction (0.5 + 0.1 * 3) / 4 = 0.2; observed rate 1 / 4 = 0.25 -> 0.8
    assert calibration([1, 0, 0, 0], [0.5, 0.1, 0.1, 0.1]) == pytest.approx(0.8, abs=1e-15)
    # over-prediction: mean 0.6 / rate 0.5 = 1.2
    assert calibration([1, 0], [0.7, 0.5]) == pytest.approx(1.2, abs=1e-15)
    assert math.isnan(calibration([0, 0], [0.1, 0.2]))


def test_ece_hand() -> None:
    # bins of width 0.1: p = 0.1 and 0.15 -> bin 1 (sum p 0.25, sum y 1 -> |diff| 0.75);
    # p = 0.9 and p = 1.0 -> bin 9 (1.0 joins the last bin; sum p 1.9, sum y 2 -> 0.1).
    # ECE = sum_b n_b/n |mean p - mean y| = (0.75 + 0.1) / 4 = 0.2125
    assert expected_calibration_error([0, 1, 1, 1], [0.1, 0.15, 0.9, 1.0]) == pytest.approx(
        0.2125, abs=1e-15)
    # 2 bins [0, 0.5), [0.5, 1]: p = 0, 0.25 -> bin 0 (|0.25 - 0| = 0.25); p = 0.5, 1 -> bin 1
    # (|1.5 - 2| = 0.5). ECE = 0.75 / 4
    assert expected_calibration_error([0, 1, 1, 0], [0.0, 0.5, 1.0, 0.25], bins=2) == pytest.approx(
        0.1875, abs=1e-15)
    # p = 1.0 belongs to the last bin with p = 0.95: |1.95 - 1| / 2 (were it its own bin or bin 0,
    # (|1 - 0| + |0.95 - 1|) / 2 = 0.525)
    assert expected_calibration_error([0, 1], [1.0, 0.95]) == pytest.approx(0.475, abs=1e-15)
    # calibrated bins: bin 5 holds p 0.5, 0.5 (sum 1) with labels 1, 0 (sum 1); bin 2 holds four
    # p = 0.25 (sum 1) with one positive -> ECE 0
    assert expected_calibration_error([1, 0, 1, 0, 0, 0], [.5, .5, .25, .25, .25, .25]) == 0.0


def test_gauc_uniform_and_impressions_differ_and_single_class_groups_skipped() -> None:
    labels = [1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0]
    scores = [.8, .3, .9, .7, .2, .2, .6, .1, .6, .5, .4, .9]
    groups = [1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 4]
    # group 1 (3 rows): positive 0.8 beats 0.3, loses to 0.9 -> AUC 1/2
    # group 2 (6 rows): positives .7 .2 .6, negatives .2 .6 .1
    #   .7 beats all 3 -> 3; .2 ties .2 (1/2), loses .6, beats .1 -> 1.5; .6 beats .2, ties .6,
    #   beats .1 -> 2.5. AUC = 7 / 9
    # group 3: only positives; group 4: only a negative -> both skipped
    per_group = per_group_auc(labels, scores, groups)
    np.testing.assert_array_equal(per_group.group, [1, 2, 3, 4])
    np.testing.assert_allclose(per_group.auc[:2], [0.5, 7 / 9], rtol=0, atol=1e-15)
    assert np.isnan(per_group.auc[2:]).all()
    # uniform: (1/2 + 7/9) / 2 = 23/36; impressions: (3 * 1/2 + 6 * 7/9) / 9 = 37/54
    assert gauc(labels, scores, groups, "uniform") == pytest.approx(23 / 36, abs=1e-15)
    assert gauc(labels, scores, groups, GAUCWeighting.IMPRESSIONS) == pytest.approx(37 / 54,
                                                                                     abs=1e-15)
    assert gauc_metrics(labels, scores, groups) == pytest.approx(
        {"gauc_uniform": 23 / 36, "gauc_impressions": 37 / 54, "gauc_groups": 2}, abs=1e-15)
    # group ids need not be sorted or contiguous: relabel and shuffle rows
    perm = np.random.default_rng(0).permutation(len(labels))
    relabel = {1: 900, 2: -5, 3: 17, 4: 3}
    shuffled = gauc_metrics(np.array(labels)[perm], np.array(scores)[perm],
                            np.array([relabel[g] for g in groups])[perm])
    assert shuffled == pytest.approx({"gauc_uniform": 23 / 36, "gauc_impressions": 37 / 54,
                                      "gauc_groups": 2}, abs=1e-15)


def test_gauc_no_group_has_both_classes_is_nan() -> None:
    out = gauc_metrics([1, 1, 0], [0.1, 0.2, 0.3], [1, 1, 2])
    assert math.isnan(out["gauc_uniform"]) and math.isnan(out["gauc_impressions"])
    assert out["gauc_groups"] == 0


def test_ndcg_graded_gains_hand() -> None:
    labels = [0, 2, 1, 3, 0, 0, 0, 0]
    scores = [.9, .5, .1, .2, .1, .5, .4, .3]
    groups = [7, 7, 7, 8, 8, 9, 9, 9]
    # group 7, labels by descending score: 0, 2, 1. ideal order 2, 1, 0.
    #   k=1: DCG 0 / IDCG 2 = 0
    #   k=2: DCG 2/log2(3) / IDCG (2 + 1/log2(3))
    #   k=3: DCG (2/log2(3) + 1/log2(4)) / IDCG (2 + 1/log2(3))
    # group 8: labels 3, 0 already ideal -> 1 at every k. group 9: no positive -> skipped.
    g7 = {1: 0.0, 2: (2 / LOG2_3) / (2 + 1 / LOG2_3), 3: (2 / LOG2_3 + 0.5) / (2 + 1 / LOG2_3)}
    for k, value in g7.items():
        assert ndcg_at_k(labels, scores, groups, k) == pytest.approx((value + 1) / 2, abs=1e-15)
    assert g7[3] == pytest.approx(0.669672, abs=1e-6)
    # k larger than every group: same as k=3
    assert ndcg_at_k(labels, scores, groups, 50) == pytest.approx((g7[3] + 1) / 2, abs=1e-15)


def test_ndcg_ties_are_averaged_over_orders() -> None:
    # labels 1, 0 with equal scores: either order is equally likely.
    # k=1: DCG = 1/2 * 1 + 1/2 * 0 = 0.5; ideal 1 -> 0.5
    assert ndcg_at_k([1, 0], [0.5, 0.5], [0, 0], 1) == pytest.approx(0.5, abs=1e-15)
    assert ndcg_at_k([0, 1], [0.5, 0.5], [0, 0], 1) == pytest.approx(0.5, abs=1e-15)
    # k=2: DCG = (1 + 1/log2(3)) / 2 (each position gets the mean gain 1/2); ideal 1
    assert ndcg_at_k([1, 0], [0.5, 0.5], [0, 0], 2) == pytest.approx((1 + 1 / LOG2_3) / 2,
                                                                      abs=1e-15)


def test_recall_at_k_hand() -> None:
    labels = [1, 0, 1, 0, 1, 0, 1, 0, 0]
    scores = [.9, .8, .7, .6, .5, .3, .4, .2, .1]
    groups = [1, 1, 1, 1, 1, 2, 2, 3, 3]
    # group 1: positives at ranks 0, 2, 4 (3 positives). k=2 -> 1 of 3; k=5 -> 3 of 3.
    # group 2: positive at rank 0 -> 1 at k >= 1. group 3: no positive -> skipped.
    assert recall_at_k(labels, scores, groups, 2) == pytest.approx((1 / 3 + 1) / 2, abs=1e-15)
    assert recall_at_k(labels, scores, groups, 3) == pytest.approx((2 / 3 + 1) / 2, abs=1e-15)
    # K larger than every group: every positive is in the top K -> 1
    assert recall_at_k(labels, scores, groups, 100) == 1.0
    # more positives than K: 3 positives, k=1 -> at most 1/3 for group 1
    assert recall_at_k(labels, scores, groups, 1) == pytest.approx((1 / 3 + 1) / 2, abs=1e-15)


def test_recall_at_k_ties_straddling_k() -> None:
    # one positive among three tied rows, k=1: expected 1/3 of it in the top 1
    assert recall_at_k([1, 0, 0], [0.5, 0.5, 0.5], [4, 4, 4], 1) == pytest.approx(1 / 3, abs=1e-15)
    # 0.9 is a positive at rank 0; ranks 1-3 tie (one positive among them); k=2 takes one of
    # the three tied rows: expected hits 1 + 1/3 of 2 positives -> 2/3
    assert recall_at_k([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.5], [0, 0, 0, 0], 2) == pytest.approx(
        2 / 3, abs=1e-15)


def test_ranking_metrics_one_sort_matches_single_k() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 400).astype(float)
    s = np.round(rng.random(400), 1)
    g = rng.integers(0, 40, 400)
    many = ranking_metrics(y, s, g, ks=(1, 3, 10))
    for k in (1, 3, 10):
        assert many[f"ndcg@{k}"] == ndcg_at_k(y, s, g, k)
        assert many[f"recall@{k}"] == recall_at_k(y, s, g, k)
    assert many["ranking_groups"] == len(np.unique(g[y > 0]))


def test_every_metric_ignores_row_order() -> None:
    # tie handling never depends on row order, so a permutation of the rows changes nothing
    rng = np.random.default_rng(5)
    n = 2000
    y = (rng.random(n) < 0.3).astype(float)
    s = np.round(rng.random(n), 1)  # heavy ties
    g = rng.integers(0, 100, n)
    perm = rng.permutation(n)

    def all_metrics(y: np.ndarray, s: np.ndarray, g: np.ndarray) -> dict[str, float]:
        return {"auc": auc(y, s), **gauc_metrics(y, s, g), **ranking_metrics(y, s, g, (1, 5))}

    assert all_metrics(y[perm], s[perm], g[perm]) == pytest.approx(all_metrics(y, s, g), abs=1e-12)


@pytest.mark.parametrize("bad, match", [
    (dict(labels=[0, 2], scores=[0.1, 0.2]), r"labels\[1\] = 2.0: labels must be 0 or 1"),
    (dict(labels=[0, 1], scores=[0.1, float("nan")]), r"scores\[1\] = nan is not finite"),
    (dict(labels=[0, 1], scores=[0.1]), "same length"),
    (dict(labels=[], scores=[]), "empty"),
    (dict(labels=[[0, 1]], scores=[[0.1, 0.2]]), "1-D"),
])
def test_bad_input_named(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        auc(**bad)


def test_bad_probability_and_k_named() -> None:
    with pytest.raises(ValueError, match=r"probs\[0\] = 1.5 is outside \[0, 1\]"):
        logloss([1], [1.5])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        ndcg_at_k([1], [0.5], [0], 0)
    with pytest.raises(ValueError, match="ranking gains must be >= 0"):
        ndcg_at_k([-1, 1], [0.5, 0.4], [0, 0], 1)
    with pytest.raises(ValueError, match="integer"):
        gauc([1, 0], [0.5, 0.4], [0.5, 0.5])


# --------------------------------------------------------------------------------------------------
# oracles: scikit-learn, torchmetrics, torchrec, naive loops, enumeration of tie orders


def _random_ranking_data(seed: int, n_groups: int = 500, graded: bool = False,
                         decimals: int | None = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 30, n_groups)
    groups = np.repeat(rng.permutation(n_groups) * 7 + 3, sizes)  # scattered, non-contiguous ids
    n = groups.size
    scores = rng.random(n)
    p = 1 / (1 + np.exp(-(3 * scores - 2.5)))
    labels = (rng.random(n) < p).astype(float)
    if graded:
        labels = labels * rng.integers(1, 4, n)
    if decimals is not None:
        scores = np.round(scores, decimals)
    perm = rng.permutation(n)
    return labels[perm], scores[perm], groups[perm]


def test_auc_and_logloss_match_sklearn_with_many_ties() -> None:
    from sklearn.metrics import log_loss, roc_auc_score

    rng = np.random.default_rng(1)
    n = 10_000
    p = rng.random(n)
    y = (rng.random(n) < p).astype(float)
    scores = np.round(p, 2)  # ~100 distinct values: every score is tied with ~100 others
    assert len(np.unique(scores)) < 110
    assert auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    probs = np.clip(p, 0.01, 0.99)  # away from the clip so both use the raw probabilities
    assert logloss(y, probs) == pytest.approx(log_loss(y, probs), abs=1e-12)


def test_auc_matches_torchmetrics_binary_auroc() -> None:
    from torchmetrics.functional.classification import binary_auroc

    rng = np.random.default_rng(2)
    p = rng.random(5000)
    y = (rng.random(5000) < p).astype(float)
    scores = np.round(p, 2)
    theirs = binary_auroc(torch.from_numpy(scores), torch.from_numpy(y).long()).item()
    # torchmetrics 1.0.3 accumulates its ROC curve in float32 (~3e-8 off here); breaking the ties
    # by row order instead (torchrec's _compute_auc_helper) measured 3.3e-5 off on these data
    assert auc(y, scores) == pytest.approx(theirs, abs=1e-6)
    hand = binary_auroc(torch.tensor([0.5, 0.5, 0.2, 0.9]), torch.tensor([0, 1, 0, 1])).item()
    assert hand == auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == 0.875


def test_ne_and_calibration_match_torchrec() -> None:
    from torchrec.metrics.calibration import compute_calibration
    from torchrec.metrics.ne import compute_cross_entropy, compute_ne

    rng = np.random.default_rng(3)
    p = rng.random(5000) * 0.6
    y = (rng.random(5000) < p).astype(float)
    yt, pt, w = torch.from_numpy(y), torch.from_numpy(p), torch.ones(5000, dtype=torch.float64)
    ce_sum = compute_cross_entropy(yt, pt.clone(), w, 1e-7).sum()
    theirs = compute_ne(ce_sum, w.sum(), yt.sum(), (1 - yt).sum(), 1e-7).item()
    assert normalized_entropy(y, p) == pytest.approx(theirs, rel=1e-9)
    assert calibration(y, p) == pytest.approx(compute_calibration(pt.sum(), yt.sum()).item(),
                                              rel=1e-12)


@pytest.mark.parametrize("graded", [False, True])
def test_ndcg_matches_sklearn_per_group(graded: bool) -> None:
    from sklearn.metrics import ndcg_score

    labels, scores, groups = _random_ranking_data(10 + graded, graded=graded)
    for k in (1, 5, 10):
        per_group = []
        for g in np.unique(groups):
            m = groups == g
            if labels[m].sum() > 0:  # groups without a positive are skipped
                # sklearn's default (ignore_ties=False) averages over tied orders, as ours does
                per_group.append(ndcg_score(labels[m][None], scores[m][None], k=k))
        assert len(per_group) > 200
        assert ndcg_at_k(labels, scores, groups, k) == pytest.approx(np.mean(per_group), abs=1e-12)


def test_gauc_and_recall_match_naive_loops() -> None:
    from sklearn.metrics import roc_auc_score

    labels, scores, groups = _random_ranking_data(20, decimals=2)
    rows, aucs = [], []
    for g in np.unique(groups):
        m = groups == g
        if 0 < labels[m].sum() < m.sum():
            aucs.append(roc_auc_score(labels[m], scores[m]))
            rows.append(m.sum())
    assert len(aucs) > 300
    ours = gauc_metrics(labels, scores, groups)
    assert ours["gauc_uniform"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert ours["gauc_impressions"] == pytest.approx(np.average(aucs, weights=rows), abs=1e-12)
    assert ours["gauc_groups"] == len(aucs)
    assert abs(ours["gauc_uniform"] - ours["gauc_impressions"]) > 1e-4

    # Recall@K without ties (continuous scores): a plain top-K per group
    labels, scores, groups = _random_ranking_data(21, decimals=None)
    assert len(np.unique(scores)) == scores.size
    for k in (1, 3, 10):
        recalls = []
        for g in np.unique(groups):
            m = groups == g
            y, s = labels[m], scores[m]
            if y.sum() > 0:
                top = np.argsort(-s)[:k]
                recalls.append(y[top].sum() / y.sum())
        assert recall_at_k(labels, scores, groups, k) == pytest.approx(np.mean(recalls), abs=1e-12)


def test_tie_handling_equals_enumeration_of_all_orders() -> None:
    # NDCG@K and Recall@K with ties = their mean over every order of the tied rows, computed here by
    # brute force over all permutations of small groups (ties broken by permutation position).
    rng = np.random.default_rng(6)
    for _ in range(30):
        n = int(rng.integers(2, 7))
        y = rng.integers(0, 3, n).astype(float)
        y[rng.integers(n)] = max(y.max(), 1.0)  # at least one positive
        s = rng.integers(0, 3, n).astype(float)  # heavy ties
        g = np.zeros(n, dtype=np.int64)
        for k in (1, 2, 4):
            ndcgs, recalls = [], []
            ideal = sum(v / math.log2(r + 2) for r, v in enumerate(sorted(y, reverse=True)[:k]))
            for perm in itertools.permutations(range(n)):
                # rank by score descending, ties by position in this permutation
                order = sorted(range(n), key=lambda i, perm=perm: (-s[i], perm.index(i)))
                top = order[:k]
                ndcgs.append(sum(y[i] / math.log2(r + 2) for r, i in enumerate(top)) / ideal)
                recalls.append(sum(y[i] > 0 for i in top) / (y > 0).sum())
            assert ndcg_at_k(y, s, g, k) == pytest.approx(np.mean(ndcgs), abs=1e-12)
            assert recall_at_k(y, s, g, k) == pytest.approx(np.mean(recalls), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# EvalAccumulator, one process


def _dataset(seed: int = 0, n: int = 3000) -> dict[str, np.ndarray]:
    """Rows in two regimes (a low-rate, well-ranked block then a high-rate, noisier block) so that
    metrics of parts differ clearly from metrics of the whole."""
    rng = np.random.default_rng(seed)
    oracle = np.concatenate([rng.random(n // 3) * 0.3, 0.3 + rng.random(n - n // 3) * 0.6])
    click = (rng.random(n) < oracle).astype(np.float32)
    probs = np.clip(oracle + rng.normal(0, 0.15, n) * (np.arange(n) >= n // 3), 0, 1)
    probs = np.round(probs, 2)  # ties
    conv = (rng.random(n) < oracle * 0.3).astype(np.float32)
    request = rng.integers(0, 400, n)  # requests scattered over the whole set (and over ranks)
    user = request % 97
    return {"click": click, "conversion": conv, "p_click": probs.astype(np.float32),
            "p_conv": (probs * 0.3).astype(np.float32), "oracle": oracle.astype(np.float32),
            "request": request, "user": user}


def _feed(acc: EvalAccumulator, data: dict[str, np.ndarray], lo: int, hi: int,
          batch: int = 256, oracle: bool = True) -> None:
    for start in range(lo, hi, batch):
        sl = slice(start, min(start + batch, hi))

        def t(key: str, sl: slice = sl) -> torch.Tensor:
            return torch.from_numpy(data[key][sl])

        acc.add(probs={"click": t("p_click"), "conversion": t("p_conv")},
                labels={"click": t("click"), "conversion": t("conversion"), "extra": t("click")},
                groups={"request": t("request"), "user": t("user")},
                oracle={"click": t("oracle")} if oracle else None)


def test_accumulator_equals_pure_functions_on_concatenated_rows() -> None:
    data = _dataset()
    acc = EvalAccumulator()
    _feed(acc, data, 0, 3000)
    assert acc.rows == 3000
    result = acc.compute(ks=(5, 10))
    assert set(result) == {"click", "conversion", "oracle"}
    assert set(result["oracle"]) == {"click"}

    y, p = data["click"].astype(np.float64), data["p_click"].astype(np.float64)
    click = result["click"]
    assert click["auc"] == auc(y, p)
    assert click["logloss"] == logloss(y, p)
    assert click["ne"] == normalized_entropy(y, p)
    assert click["calibration"] == calibration(y, p)
    assert click["ece"] == expected_calibration_error(y, p)
    assert click["rows"] == 3000 and click["positive_rate"] == pytest.approx(y.mean(), abs=1e-15)
    for key, value in gauc_metrics(y, p, data["user"]).items():
        assert click[key] == value
    for key, value in ranking_metrics(y, p, data["request"], (5, 10)).items():
        assert click[key] == value
    assert result["oracle"]["click"]["auc"] == auc(y, data["oracle"].astype(np.float64))
    # the oracle (true probabilities) ranks better than the noisy model
    assert result["oracle"]["click"]["auc"] > click["auc"] + 0.01

    report = flatten_for_report(result, "click")
    assert list(report)[:6] == ["auc", "gauc", "logloss", "ne", "calibration", "ece"]
    assert report["gauc"] == report["gauc_impressions"] != report["gauc_uniform"]
    assert flatten_for_report(result["oracle"], "click")["gauc"] == \
        result["oracle"]["click"]["gauc_impressions"]
    with pytest.raises(KeyError, match="tasks"):
        flatten_for_report(result, "oracle")
    json.dumps(result)  # plain Python numbers only


def test_accumulator_keys_follow_collected_groups() -> None:
    acc = EvalAccumulator(gauc_group="user", ranking_group="request")
    acc.add({"click": torch.tensor([0.2, 0.7, 0.4])}, {"click": torch.tensor([0.0, 1.0, 1.0])})
    out = acc.compute(ks=(5,))["click"]
    assert "gauc" not in out and "gauc_uniform" not in out and "ndcg@5" not in out
    # positives 0.7, 0.4 vs negative 0.2 -> AUC 1
    assert out["auc"] == 1.0 and out["rows"] == 3
    assert "gauc" not in flatten_for_report({"click": out}, "click")


def test_accumulator_errors_name_the_batch_and_key() -> None:
    acc = EvalAccumulator()
    with pytest.raises(ValueError, match="no batch was added"):
        acc.compute()
    acc.add({"click": torch.tensor([0.5])}, {"click": torch.tensor([1.0])})
    with pytest.raises(ValueError, match=r"batch 1: labels\[click\]\[1\] = 2.0; expected 0 or 1"):
        acc.add({"click": torch.tensor([0.5, 0.5])}, {"click": torch.tensor([1.0, 2.0])})
    with pytest.raises(ValueError, match=r"batch 1: probs\[click\]\[0\] = 1.5"):
        acc.add({"click": torch.tensor([1.5])}, {"click": torch.tensor([1.0])})
    with pytest.raises(ValueError, match="batch 1: columns .* differ from the earlier batches"):
        acc.add({"click": torch.tensor([0.5])}, {"click": torch.tensor([1.0])},
                groups={"user": torch.tensor([3])})
    with pytest.raises(ValueError, match="labels lack the tasks"):
        acc.add({"ctr": torch.tensor([0.5])}, {"click": torch.tensor([1.0])})
    with pytest.raises(ValueError, match="different lengths"):
        acc.add({"click": torch.tensor([0.5, 0.1])}, {"click": torch.tensor([1.0])})
    with pytest.raises(ValueError, match="integer group ids"):
        EvalAccumulator().add({"click": torch.tensor([0.5])}, {"click": torch.tensor([1.0])},
                              groups={"user": torch.tensor([0.5])})
    acc.reset()
    assert acc.rows == 0


# --------------------------------------------------------------------------------------------------
# EvalAccumulator across 2 ranks

SPLIT = 1100  # rank 0 gets rows [0, 1100), rank 1 gets [1100, 3000): unequal, and requests straddle


def _rank_main(rank: int, store_path: str, out_dir: str) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        data = _dataset()
        lo, hi = (0, SPLIT) if rank == 0 else (SPLIT, 3000)
        acc = EvalAccumulator()
        _feed(acc, data, lo, hi, batch=200 + 57 * rank)
        outputs: dict[str, object] = {"split": acc.compute(ks=(5, 10))}

        # a rank with no rows still takes part and gets the global metrics
        acc.reset()
        if rank == 0:
            _feed(acc, data, 0, 3000)
        outputs["one_rank_has_all"] = acc.compute(ks=(5, 10))

        # ranks that disagree on the columns all raise (none is left waiting)
        acc.reset()
        _feed(acc, data, lo, hi, oracle=rank == 0)
        try:
            acc.compute()
            outputs["mismatch"] = "no error"
        except ValueError as e:
            outputs["mismatch"] = str(e)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outputs))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_accumulator_two_ranks_equal_one_process_on_whole_set(tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    data = _dataset()
    whole = EvalAccumulator()
    _feed(whole, data, 0, 3000)
    expected = whole.compute(ks=(5, 10))

    parts = []
    for lo, hi in ((0, SPLIT), (SPLIT, 3000)):
        part = EvalAccumulator()
        _feed(part, data, lo, hi)
        parts.append(part.compute(ks=(5, 10)))

    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for scenario in ("split", "one_rank_has_all"):
            assert set(got[scenario]) == set(expected)
            for task in ("click", "conversion"):
                assert got[scenario][task] == pytest.approx(expected[task], abs=1e-9), (rank, task)
            assert got[scenario]["oracle"]["click"] == pytest.approx(expected["oracle"]["click"],
                                                                     abs=1e-9)
        assert "ranks collected different columns" in got["mismatch"]

    # the global metrics are not the average of per-rank metrics (so this test can fail)
    click = expected["click"]
    for key in ("auc", "gauc_impressions", "logloss", "ne", "calibration", "ece", "ndcg@5"):
        mean_of_ranks = (parts[0]["click"][key] + parts[1]["click"][key]) / 2
        assert abs(click[key] - mean_of_ranks) > 1e-3, key
    assert parts[0]["click"]["rows"] + parts[1]["click"]["rows"] == click["rows"] == 3000
