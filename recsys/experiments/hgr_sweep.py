"""Where hierarchical group-wise ranking (HGR) should help (`recsys report --only hgr-sweep`).

HGR's listwise loss groups the users of a batch by the prefixes of their RVQ codes, so the
negatives of a level-l group are the items shown to users who share its first l codes: the harder,
the deeper the level. That can only pay off when users of one cluster really share preferences.
The sweep turns the quickstart world's knob for it (``data.synthetic.cluster_sharing``: the share
of a user's latent preferences that its cluster holds; ``sharing_depth``: how many levels of the
cluster tree carry it) and, on every world, compares over seeds:

* ``bce``: BCE alone;
* ``bce+in-batch``: BCE + the in-batch listwise loss (one group: the whole batch);
* ``bce+hierarchical``: BCE + HGR with online RVQ codes (the paper's method).

On the world with the most sharing it also varies the paper's own choices: the level weights
(uniform, deeper levels heavier, shallower heavier), the codes per level, and offline codes (RVQ of
the seed's trained BCE run's user table, ``recsys rvq encode``) against online ones.

The verdict per world: HGR minus the better baseline, in mean test GAUC, AUC and NDCG@10 within
users, against the spread of that difference (sqrt(std_a² + std_b²)); "beats both" only when the
difference exceeds it.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.experiments.runner import (
    DataConfig,
    Variant,
    dataset_base,
    deep_merge,
    run_variants,
    summary_rows,
)
from recsys.tables import format_table

log = logging.getLogger("recsys.experiments")

KEYS = ("auc", "gauc_impressions", "user_ndcg@10", "logloss")
LABELS = ("AUC", "GAUC", "NDCG@10 in users", "log-loss")
VERDICT_KEYS = ("gauc_impressions", "auc", "user_ndcg@10")
HGR = "bce+hierarchical"
BASELINES = ("bce", "bce+in-batch")


@dataclass
class HgrSweepConfig(DataConfig):
    """The worlds and objectives of the sweep (the defaults take about an hour on 2 cores)."""

    seeds: int = 5
    datasets: tuple[str, ...] = ("synthetic",)
    synthetic_requests: int = 20_000
    synthetic_epochs: int = 2
    # (cluster_sharing, sharing_depth) of each world; None: the default world's
    worlds: tuple[tuple[float | None, int | None], ...] = (
        (0.3, None), (0.6, None), (0.9, None), (0.99, None), (0.99, 1))
    weight: float = 0.3  # λ of both listwise terms
    levels: int = 3
    codes: int = 8
    # the paper's choices, varied on the world with the most sharing
    level_weights: tuple[tuple[float, ...], ...] = ((0.2, 0.3, 0.5), (0.5, 0.3, 0.2))
    codes_choices: tuple[int, ...] = (4, 16)
    offline_codes: bool = True
    # HGR given the world's true user clusters as its codes: what perfect codes would bring
    oracle_codes: bool = True


def objectives(cfg: HgrSweepConfig) -> list[Variant]:
    rvq = {"levels": cfg.levels, "codes": cfg.codes}
    return [
        Variant("bce", {}),
        Variant("bce+in-batch", {"loss": {"listwise": {"weight": cfg.weight, "group": "batch"}}}),
        Variant(HGR, {"loss": {"hierarchical": {"weight": cfg.weight, "rvq": rvq}}}),
    ]


def paper_choices(cfg: HgrSweepConfig) -> list[Variant]:
    """HGR with the level weights and codes per level varied (online codes)."""
    out = []
    for weights in cfg.level_weights:
        out.append(Variant(f"hgr w={'/'.join(f'{w:g}' for w in weights)}", {"loss": {
            "hierarchical": {"weight": cfg.weight, "level_weights": list(weights),
                             "rvq": {"levels": cfg.levels, "codes": cfg.codes}}}}))
    for codes in cfg.codes_choices:
        out.append(Variant(f"hgr K={codes}", {"loss": {"hierarchical": {
            "weight": cfg.weight, "rvq": {"levels": cfg.levels, "codes": codes}}}}))
    return out


def world_name(sharing: float | None, depth: int | None) -> str:
    return f"share={'default' if sharing is None else f'{sharing:g}'}" + \
        (f",depth={depth}" if depth else "")


def run_hgr_sweep(cfg: HgrSweepConfig, out: Path) -> tuple[dict[str, Any], str]:
    """Every world with the three objectives, then the paper's choices on the most shared one."""
    result: dict[str, Any] = {"config": _config_json(cfg), "worlds": {}}
    parts = []
    for sharing, depth in cfg.worlds:
        name = world_name(sharing, depth)
        base = _world_base(cfg, out, sharing, depth, name)
        runs = run_variants(base, objectives(cfg), range(cfg.seeds),
                            out / "runs" / "hgr-sweep" / name, reuse=True)
        rows = summary_rows(runs, KEYS)
        verdict = hgr_verdict(rows)
        result["worlds"][name] = {"sharing": sharing, "depth": depth, "rows": rows,
                                  "verdict": verdict}
        parts.append(_world_table(name, rows, verdict, cfg))
    # the most sharing, through the whole tree (depth None) before a shallower one
    top = max(cfg.worlds, key=lambda w: (w[0] or 0.0, w[1] is None, w[1] or 0))
    name = world_name(*top)
    base = _world_base(cfg, out, *top, name)
    choice_dir = out / "runs" / "hgr-sweep" / f"{name}-choices"
    runs = run_variants(base, paper_choices(cfg), range(cfg.seeds), choice_dir, reuse=True)
    rows = summary_rows(runs, KEYS)
    if cfg.offline_codes:
        rows.append(_offline_row(cfg, base, out / "runs" / "hgr-sweep" / name, choice_dir,
                                 out / "data"))
    if cfg.oracle_codes:
        rows.append(_oracle_row(cfg, base, choice_dir, out / "data"))
    online = next(r for r in result["worlds"][name]["rows"] if r["variant"] == HGR)
    result["choices"] = {"world": name, "rows": [online, *rows]}
    parts.append(_choices_table(name, [online, *rows], cfg))
    parts.append(summary_table(result["worlds"]))
    return result, "\n\n".join(parts)


def _world_base(cfg: HgrSweepConfig, out: Path, sharing: float | None, depth: int | None,
                name: str) -> dict[str, Any]:
    base = dataset_base("synthetic", cfg, out / "data")
    assert base is not None  # (the synthetic world needs no raw files)
    knobs = {k: v for k, v in (("cluster_sharing", sharing), ("sharing_depth", depth))
             if v is not None}
    base = deep_merge(base, {"data": {"synthetic": knobs, "request_batches": True}})
    base["data"]["path"] = f"{base['data']['path']}-{name.replace('=', '').replace(',', '-')}"
    return base


def _offline_row(cfg: HgrSweepConfig, base: dict[str, Any], bce_runs: Path, out_dir: Path,
                 data_dir: Path) -> dict[str, Any]:
    """HGR on offline codes: per seed, the RVQ of that seed's BCE run's user table."""
    from recsys.experiments.runner import Runs
    from recsys.rvq_encode import encode_run
    from recsys.spec import RVQSpec

    merged = Runs()
    rvq = {"levels": cfg.levels, "codes": cfg.codes}
    alignment = []
    for seed in range(cfg.seeds):
        coded = data_dir / f"{Path(base['data']['path']).name}-codes-seed{seed}"
        if not (coded / "dataset.json").is_file():
            encode_run(bce_runs / f"bce-seed{seed}", coded, rvq=RVQSpec(**rvq), seed=seed,
                       force=True, progress=False)
        alignment.append(code_alignment(coded, base["data"]["synthetic"]))
        raw = copy.deepcopy(base)
        raw["data"] = {**{k: v for k, v in raw["data"].items()
                          if k not in ("synthetic", "source", "prepare")},
                       "source": "parquet", "path": str(coded)}
        runs = run_variants(raw, [Variant("hgr offline codes", {"loss": {"hierarchical": {
            "weight": cfg.weight, "codes": "data", "rvq": rvq}}})], [seed], out_dir, reuse=True)
        for key in ("metrics", "seconds"):
            getattr(merged, key).setdefault("hgr offline codes", []).extend(
                getattr(runs, key)["hgr offline codes"])
        merged.hashes.update(runs.hashes)
    row = summary_rows(merged, KEYS)[0]
    row["code_nmi"] = [sum(a[level] for a in alignment) / len(alignment)
                       for level in range(len(alignment[0]))]
    return row


def _oracle_row(cfg: HgrSweepConfig, base: dict[str, Any], out_dir: Path, data_dir: Path
                ) -> dict[str, Any]:
    """HGR whose codes are the world's true user clusters (the path of each user in the cluster
    tree, as trie-node ids): the best codes RVQ could find."""
    import numpy as np
    import torch

    from recsys.data.parquet import dataset_write, partial_path
    from recsys.data.schema import USER_ID, DatasetManifest
    from recsys.data.synthetic import build_world
    from recsys.datasets import ensure_dataset
    from recsys.quantization.rvq import prefix_ids
    from recsys.rvq_encode import publish, write_coded_dataset
    from recsys.spec import SyntheticSpec, validate_spec

    synthetic = SyntheticSpec(**base["data"]["synthetic"])
    branching = synthetic.cluster_branching
    codes_per_level = max(branching)
    coded = data_dir / f"{Path(base['data']['path']).name}-true-codes"
    if not (coded / "dataset.json").is_file():
        source = ensure_dataset(validate_spec(base, "hgr-sweep base"), progress=False)
        path = build_world(synthetic).user_path
        # level l's child index under its parent: the node id modulo the branching of that level
        child = np.stack([path[:, lvl] % branching[lvl] for lvl in range(len(branching))], 1)
        ids = prefix_ids(torch.from_numpy(child), codes_per_level).numpy()
        with dataset_write(coded):
            shutil.rmtree(partial_path(coded), ignore_errors=True)  # left by a killed run
            write_coded_dataset(DatasetManifest.load(source.root), partial_path(coded), USER_ID,
                                ids, {"run": "the synthetic world's true user clusters",
                                      "codes": codes_per_level, "rows": {}}, progress=False)
            publish(partial_path(coded), coded)
    raw = copy.deepcopy(base)
    raw["data"] = {**{k: v for k, v in raw["data"].items()
                      if k not in ("synthetic", "source", "prepare")},
                   "source": "parquet", "path": str(coded)}
    name = "hgr true clusters as codes"
    runs = run_variants(raw, [Variant(name, {"loss": {"hierarchical": {
        "weight": cfg.weight, "codes": "data",
        "rvq": {"levels": len(branching), "codes": codes_per_level}}}})],
        range(cfg.seeds), out_dir, reuse=True)
    return summary_rows(runs, KEYS)[0]


def code_alignment(coded: Path, synthetic: dict[str, Any]) -> list[float]:
    """How well offline user codes recover the world's true user clusters: per level l, the
    normalized mutual information between users' level-l code prefixes and their level-l
    clusters (1 = the same partition, 0 = independent), over the users of the train split."""
    import numpy as np
    import pyarrow.parquet as pq

    from recsys.data.schema import RVQ_CODE, USER_ID, DatasetManifest
    from recsys.data.synthetic import build_world
    from recsys.spec import SyntheticSpec

    manifest = DatasetManifest.load(coded)
    view = next(iter(manifest.views))
    table = pq.ParquetDataset(manifest.files(view, "train")).read(columns=[USER_ID, RVQ_CODE])
    users, first = np.unique(table.column(USER_ID).to_numpy(), return_index=True)
    codes = np.asarray(table.column(RVQ_CODE).combine_chunks().take(first).to_pylist())
    path = build_world(SyntheticSpec(**synthetic)).user_path[users]
    levels = min(codes.shape[1], path.shape[1])
    return [normalized_mutual_information(codes[:, level], path[:, level])
            for level in range(levels)]


def normalized_mutual_information(a: Any, b: Any) -> float:
    """NMI of two labelings, I(a; b) / sqrt(H(a) H(b)) (0 when either is constant).

    Example:
        >>> normalized_mutual_information(np.array([0, 0, 1, 1]), np.array([5, 5, 7, 7]))
        1.0
    """
    import numpy as np

    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha = float(-(pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hb = float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    return mi / math.sqrt(ha * hb) if ha > 0 and hb > 0 else 0.0


def hgr_verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """HGR minus the better baseline per metric, with the spread of that difference."""
    by = {r["variant"]: r for r in rows}
    verdict: dict[str, Any] = {}
    for key in VERDICT_KEYS:
        best = max(BASELINES, key=lambda b: by[b][key]["mean"])
        delta = by[HGR][key]["mean"] - by[best][key]["mean"]
        spread = math.hypot(by[HGR][key]["std"], by[best][key]["std"])
        verdict[key] = {"delta": delta, "spread": spread, "vs": best, "beats": delta > spread}
    verdict["beats_both"] = verdict["gauc_impressions"]["beats"]
    return verdict


def _cells(row: dict[str, Any]) -> list[str]:
    return [f"{row[k]['mean']:.4f} ± {row[k]['std']:.4f}" for k in KEYS]


def _world_table(name: str, rows: list[dict[str, Any]], verdict: dict[str, Any],
                 cfg: HgrSweepConfig) -> str:
    table = format_table(["objective", *LABELS, "s / run"],
                         [[r["variant"], *_cells(r), round(r["seconds"], 1)] for r in rows])
    g = verdict["gauc_impressions"]
    return (f"**world {name}** ({cfg.seeds} seeds, test split)\n\n{table}\n\nHGR − "
            f"{g['vs']}: GAUC {g['delta']:+.4f} (spread {g['spread']:.4f}): "
            f"{'beats both baselines' if g['beats'] else 'within noise or behind'}.")


def _choices_table(name: str, rows: list[dict[str, Any]], cfg: HgrSweepConfig) -> str:
    table = format_table(["HGR variant", *LABELS, "s / run"],
                         [[r["variant"], *_cells(r), round(r["seconds"], 1)] for r in rows])
    text = (f"**the paper's choices, on world {name}** (λ = {cfg.weight}, L = {cfg.levels}; "
            f"the first row is the default: uniform level weights, K = {cfg.codes} codes, online)"
            f"\n\n{table}")
    nmi = next((r["code_nmi"] for r in rows if "code_nmi" in r), None)
    if nmi:
        text += ("\n\nThe offline codes against the world's true user clusters (normalized mutual "
                 "information of users' level-l code prefixes and their level-l clusters, mean "
                 "over seeds): " + ", ".join(f"level {i + 1} {v:.3f}" for i, v in enumerate(nmi))
                 + ".")
    return text


def summary_table(worlds: dict[str, dict[str, Any]]) -> str:
    body = []
    for name, w in worlds.items():
        v = w["verdict"]
        body.append([name, *[f"{v[k]['delta']:+.4f} (± {v[k]['spread']:.4f})"
                             for k in VERDICT_KEYS],
                     "yes" if v["beats_both"] else "no"])
    return ("**where HGR beats both baselines** (HGR minus the better baseline; ± the spread of "
            "the difference)\n\n"
            + format_table(["world", "Δ GAUC", "Δ AUC", "Δ NDCG@10", "beats both (GAUC)"],
                           body))


def _config_json(cfg: HgrSweepConfig) -> dict[str, Any]:
    return {"seeds": cfg.seeds, "synthetic_requests": cfg.synthetic_requests,
            "synthetic_epochs": cfg.synthetic_epochs, "worlds": [list(w) for w in cfg.worlds],
            "weight": cfg.weight, "levels": cfg.levels, "codes": cfg.codes,
            "level_weights": [list(w) for w in cfg.level_weights],
            "codes_choices": list(cfg.codes_choices), "offline_codes": cfg.offline_codes,
            "max_steps": cfg.max_steps}


__all__ = ["HgrSweepConfig", "hgr_verdict", "objectives", "paper_choices", "run_hgr_sweep",
           "summary_table", "world_name"]
