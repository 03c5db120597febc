"""Interaction archs side by side (`recsys report --only interactions`), and xDeepInt's λ1 sweep
(`--only sparsity`).

Datasets: the quickstart world (synthetic, with the oracle AUC of the true click probabilities as
the ceiling) at a smaller number of requests, and ml-latest-small (when ``../shared/data`` holds
it). Models: MLP, DCN-v2, PIN (in the ranker, with the MLP tower), xDeepInt (with GFTRL and FTRL
selection), DynInt (A1 + B1) and AdaEnsemble; each takes its model section and optimizers from its
spec file, so the table measures what ``specs/*.toml`` train.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.experiments.runner import (
    DataConfig,
    Variant,
    dataset_base,
    dataset_bases,
    deep_merge,
    markdown,
    mean_std,
    read_spec_file,
    run_variants,
    summary_rows,
)
from recsys.tables import format_table

MODELS = ("mlp", "dcn", "dlrm", "deepfm", "pin", "xdeepint", "dynint", "adaensemble")
KEYS = ("auc", "logloss", "calibration", "ece")
LABELS = ("AUC", "log-loss", "calibration", "ECE")
_OPTIMIZERS = ("sparse_optimizer", "dense_optimizer", "interaction_optimizer")


@dataclass
class InteractionsConfig(DataConfig):
    """Sizes of the experiment (the defaults take about 15 minutes on 2 cores)."""

    models: tuple[str, ...] = MODELS
    l1_values: tuple[float, ...] = (0.0, 0.003, 0.03, 0.3)
    sparsity_requests: int = 30_000  # the λ1 sweep's world (xDeepInt on replicated tables)


# the models of the study: a plain arch (with settings), or a method's spec file whose model section
# is taken, with the train sections that belong to the method (xDeepInt's optimizers: its feature
# and interaction selection)
_PATCHES: dict[str, dict[str, Any]] = {
    "mlp": {"model": {"arch": "mlp"}},
    "dcn": {"model": {"arch": "dcn"}},
    "dlrm": {"model": {"arch": "dlrm"}},
    "deepfm": {"model": {"arch": "deepfm"}},
    "pin": {"model": {"arch": "pin", "pin": {"num_layers": 3, "subspaces": 4}}},
}
_SPEC_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "xdeepint": ("specs/xdeepint.toml", _OPTIMIZERS),
    "dynint": ("specs/dynint.toml", ()),
    "adaensemble": ("specs/adaensemble.toml", ()),
}


def model_patch(model: str) -> dict[str, Any]:
    """The partial spec that makes ``model``: a plain arch, or the method's spec file's model
    section (and the train settings that are part of the method)."""
    if model in _PATCHES:
        return copy.deepcopy(_PATCHES[model])
    if model not in _SPEC_FILES:
        raise ValueError(f"unknown model '{model}'; expected one of {', '.join(MODELS)}")
    file, train_keys = _SPEC_FILES[model]
    full = read_spec_file(file)
    patch: dict[str, Any] = {"model": {k: v for k, v in full["model"].items() if k != "tasks"}}
    if train_keys:
        patch["train"] = {k: v for k, v in full["train"].items() if k in train_keys}
    return patch


def run_interactions(cfg: InteractionsConfig, out: Path) -> tuple[dict[str, Any], str]:
    """Every model on every dataset over ``cfg.seeds`` seeds: JSON-ready result and tables."""
    result: dict[str, Any] = {"config": _config_json(cfg), "datasets": {}}
    tables = []
    for dataset, base in dataset_bases(cfg, out / "data", tables):
        variants = [Variant(m, model_patch(m)) for m in cfg.models]
        runs = run_variants(base, variants, range(cfg.seeds), out / "runs" / dataset)
        rows = summary_rows(runs, KEYS)
        entry: dict[str, Any] = {"rows": rows}
        table = markdown(rows, KEYS, LABELS)
        oracle = [m["oracle"]["auc"] for per in runs.metrics.values() for m in per
                  if "oracle" in m]
        if oracle:
            entry["oracle_auc"] = mean_std(oracle)[0]
            table += f"\n\nOracle AUC (true click probabilities): {entry['oracle_auc']:.4f}."
        result["datasets"][dataset] = entry
        first = next(iter(runs.metrics.values()))[0]
        rows_note = f"{first['test'].get('rows', '?'):,} test rows" \
            if isinstance(first["test"].get("rows"), int) else ""
        tables.append(f"**{dataset}** ({rows_note}, {cfg.seeds} seed(s), test split)\n\n{table}")
    return result, "\n\n".join(tables)


def run_sparsity(cfg: InteractionsConfig, out: Path) -> tuple[dict[str, Any], str]:
    """xDeepInt on the synthetic data with λ1 swept (the same λ1 for GFTRL on the embedding rows
    and FTRL on the PIN weights): test AUC against the fraction of exact zeros."""
    from dataclasses import replace

    small = replace(cfg, synthetic_requests=min(cfg.synthetic_requests, cfg.sparsity_requests))
    base = dataset_base("synthetic", small, out / "data")
    assert base is not None
    patch = model_patch("xdeepint")
    variants = []
    for l1 in cfg.l1_values:
        v = deep_merge(patch, {"train": {"sparse_optimizer": {"ftrl": {"l1": l1}},
                                         "interaction_optimizer": {"ftrl": {"l1": l1}}}})
        variants.append(Variant(f"l1={l1:g}", v))
    runs = run_variants(base, variants, range(cfg.seeds), out / "runs" / "sparsity")
    rows = summary_rows(runs, ("auc", "logloss"))
    body = []
    for row in rows:
        per_seed = runs.metrics[row["variant"]]
        for key in ("embedding_rows_zero", "interaction_weights_zero"):
            row[key] = mean_std([m["sparsity"][key] for m in per_seed])[0]
        body.append([row["variant"], f"{row['auc']['mean']:.4f} ± {row['auc']['std']:.4f}",
                     f"{row['logloss']['mean']:.4f}", row["embedding_rows_zero"],
                     row["interaction_weights_zero"]])
    table = format_table(["λ1", "test AUC", "log-loss", "embedding rows = 0", "PIN weights = 0"],
                         body)
    table += (f"\n\nxDeepInt (specs/xdeepint.toml) on the synthetic world "
              f"({small.synthetic_requests:,} training requests), {cfg.seeds} seed(s); λ1 is GFTRL's group strength per embedding row (times "
              "sqrt(dim)) and FTRL's L1 on the PIN weights, with the loss-sum convention.")
    return {"config": _config_json(small), "rows": rows}, table


def _config_json(cfg: InteractionsConfig) -> dict[str, Any]:
    return {"seeds": cfg.seeds, "models": list(cfg.models), "datasets": list(cfg.datasets),
            "synthetic_requests": cfg.synthetic_requests, "synthetic_epochs": cfg.synthetic_epochs,
            "movielens_epochs": cfg.movielens_epochs, "max_steps": cfg.max_steps,
            "l1_values": list(cfg.l1_values)}
