"""RankTower against the DSSM baseline and the full ranker, with an ablation of each loss term
(`recsys report --only ranktower`, docs/methods.md section 4).

Synthetic data only (the cascade simulator logs every stage; the real datasets have exposures
only). Every model is evaluated the same way: all retrieved candidates of each test request are
scored and the model's top-K is compared with the ranking stage's top-K and with the clicks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.experiments.runner import (
    DataConfig,
    Variant,
    dataset_base,
    deep_merge,
    mean_std,
    read_spec_file,
    run_variants,
)
from recsys.tables import format_table

KEYS = ("ranker_recall@10", "ranker_ndcg@10", "click_recall@10", "click_ndcg@10")
LABELS = ("Recall@10 vs ranker", "NDCG@10 vs ranker", "Recall@10 vs clicks", "NDCG@10 vs clicks")


@dataclass
class RankTowerConfig(DataConfig):
    datasets: tuple[str, ...] = ("synthetic",)
    synthetic_requests: int = 10_000  # 30 candidates each in the cascade view
    ablations: bool = True
    # 2,000 valid and test requests (60,000 candidates each): every model scores all of them
    extra: dict[str, Any] = field(default_factory=lambda: {
        "data": {"synthetic": {"requests": {"valid": 2000, "test": 2000}}}})


def variants(cfg: RankTowerConfig) -> list[Variant]:
    full = read_spec_file("specs/ranktower.toml")
    ranktower = {"data": {"view": "cascade", "request_batches": True},
                 "model": {k: v for k, v in full["model"].items() if k != "tasks"},
                 "loss": full["loss"], "train": {"batch_size": full["train"]["batch_size"]}}
    out = [Variant("ranktower", ranktower)]
    if cfg.ablations:
        for term in ("distill", "fine", "coarse"):
            out.append(Variant(f"ranktower −{term}", deep_merge(
                ranktower, {"loss": {"cascade": {f"{term}_weight": 0.0}}})))
    out.append(Variant("dssm (exposures, BCE)", {"model": {"arch": "dssm"}}))
    out.append(Variant("ranker (DCN-v2, upper bound)", {"model": {"arch": "dcn"}}))
    return out


def run_ranktower(cfg: RankTowerConfig, out: Path) -> tuple[dict[str, Any], str]:
    base = dataset_base("synthetic", cfg, out / "data")
    assert base is not None
    runs = run_variants(base, variants(cfg), range(cfg.seeds), out / "runs" / "ranktower")
    rows, body = [], []
    for name, per_seed in runs.metrics.items():
        row: dict[str, Any] = {"variant": name, "seeds": len(per_seed),
                               "spec_hash": runs.hashes[name]}
        for key in KEYS:
            values = [m.get("cascade", {}).get(key) for m in per_seed]
            mean, std = mean_std(values)
            row[key] = {"mean": mean, "std": std, "values": values}
        rows.append(row)
        body.append([name, *[f"{row[k]['mean']:.4f} ± {row[k]['std']:.4f}" for k in KEYS]])
    table = format_table(["model", *LABELS], body)
    table += (f"\n\nSynthetic cascade ({cfg.synthetic_requests:,} training requests, "
              f"{cfg.seeds} seed(s)); every test request's retrieved candidates scored; targets: "
              "the ranking stage's top-10 (by the logged ranker score) and the clicked items.")
    return {"config": {"seeds": cfg.seeds, "synthetic_requests": cfg.synthetic_requests},
            "rows": rows}, table
