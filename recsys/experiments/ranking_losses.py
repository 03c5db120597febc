"""BCE alone against BCE + in-batch listwise against BCE + hierarchical group-wise listwise
(`recsys report --only ranking-losses`, docs/methods.md section 5).

The same model (the dataset's default spec: DCN-v2), data, batches (whole requests per batch) and
seeds for the three objectives; λ is the same for both listwise terms. Reported on the test split:
AUC, GAUC in both conventions, log-loss, calibration, ECE and NDCG@10 within users; and the step
time of each objective relative to BCE alone, from the same runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.experiments.runner import (
    DataConfig,
    Variant,
    dataset_bases,
    mean_std,
    run_variants,
    summary_rows,
)
from recsys.tables import format_table

KEYS = ("auc", "gauc_uniform", "gauc_impressions", "logloss", "calibration", "ece",
        "user_ndcg@10")
LABELS = ("AUC", "GAUC (uniform)", "GAUC (impressions)", "log-loss", "calibration", "ECE",
          "NDCG@10 in users")


@dataclass
class RankingLossesConfig(DataConfig):
    """λ of both listwise terms, and the user codes of the hierarchical one."""

    weight: float = 0.3
    levels: int = 3
    codes: int = 8  # per level: 8 / 64 / 512 trie nodes for ~1,000 users (METHODS default 32)
    temperature: float = 1.0


def variants(cfg: RankingLossesConfig) -> list[Variant]:
    rvq = {"levels": cfg.levels, "codes": cfg.codes}
    return [
        Variant("bce", {}),
        Variant("bce+in-batch", {"loss": {"listwise": {
            "weight": cfg.weight, "group": "batch", "temperature": cfg.temperature}}}),
        Variant("bce+hierarchical", {"loss": {"hierarchical": {
            "weight": cfg.weight, "temperature": cfg.temperature, "rvq": rvq}}}),
    ]


def run_ranking_losses(cfg: RankingLossesConfig, out: Path) -> tuple[dict[str, Any], str]:
    """The three objectives on every dataset over ``cfg.seeds`` seeds."""
    result: dict[str, Any] = {"config": {**cfg.__dict__}, "datasets": {}}
    parts = []
    for dataset, base in dataset_bases(cfg, out / "data", parts):
        base["data"]["request_batches"] = True  # whole requests per batch, for every objective
        runs = run_variants(base, variants(cfg), range(cfg.seeds),
                            out / "runs" / f"losses-{dataset}")
        rows = summary_rows(runs, KEYS)
        per_step = {name: mean_std([m["timing"]["seconds_per_step"] for m in per])[0]
                    for name, per in runs.metrics.items()}
        body = []
        for row in rows:
            row["step_time_vs_bce"] = per_step[row["variant"]] / per_step["bce"]
            last = runs.metrics[row["variant"]][-1].get("train_last_step", {})
            row["train_last_step"] = last
            body.append([row["variant"], *[f"{row[k]['mean']:.4f} ± {row[k]['std']:.4f}"
                                           for k in KEYS], round(row["step_time_vs_bce"], 3)])
        table = format_table(["objective", *LABELS, "step time vs bce"], body)
        notes = _code_notes(runs.metrics.get("bce+hierarchical", []))
        result["datasets"][dataset] = {"rows": rows}
        parts.append(f"**{dataset}** ({cfg.seeds} seed(s), test split, λ = {cfg.weight}, "
                     f"L = {cfg.levels} levels × K = {cfg.codes} codes)\n\n{table}{notes}")
    return result, "\n\n".join(parts)


def _code_notes(runs: list[dict[str, Any]]) -> str:
    """Code usage and group statistics of the hierarchical runs' last logged training step."""
    if not runs:
        return ""
    last = [r.get("train_last_step", {}) for r in runs]
    keys = sorted({k for s in last for k in s if k.startswith(("rvq/", "hgr/"))})
    if not keys:
        return ""
    cells = ", ".join(f"{k} {mean_std([s.get(k) for s in last])[0]:.3g}" for k in keys)
    return f"\n\nHierarchical runs, last logged training step (mean over seeds): {cells}."
