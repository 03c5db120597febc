"""What a study directory holds besides its database: the trials table (``trials.md`` and
``trials.json``), the parameter importances (``importances.json``, and in ``trials.md``) and the
best trial's spec (``best.toml``). Every file is written atomically.

Example:
    >>> rows = trial_rows(study)
    >>> write_trials(Path("studies/quickstart"), rows, "auc", "maximize")
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from recsys.fsutil import atomic_write_text, writing
from recsys.spec import dump_toml, validate_spec
from recsys.tables import format_table
from recsys.tune.space import apply_params

log = logging.getLogger("recsys.tune")

__all__ = ["MIN_IMPORTANCE_TRIALS", "importances", "trial_rows", "write_best", "write_trials"]

# fANOVA fits a forest to the complete trials; with fewer it says nothing useful
MIN_IMPORTANCE_TRIALS = 4

TRIALS_JSON = "trials.json"
TRIALS_MD = "trials.md"
IMPORTANCES_JSON = "importances.json"
BEST_TOML = "best.toml"


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One JSON-ready row per trial: number, state, value (the final valid metric), the spec
    values tried, duration, and why it failed or where it was pruned."""
    return [_row(t) for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]


def _row(t: FrozenTrial) -> dict[str, Any]:
    duration = t.duration.total_seconds() if t.duration is not None else None
    pruned_at = t.last_step if t.state == TrialState.PRUNED else None
    return {"number": t.number, "state": t.state.name, "value": t.value,
            "params": t.user_attrs.get("spec_values", t.params),
            "duration_s": None if duration is None else round(duration, 2),
            "error": t.user_attrs.get("error"), "pruned_at_step": pruned_at,
            "run_dir": t.user_attrs.get("run_dir")}


def write_trials(study_dir: Path, rows: list[dict[str, Any]], metric: str, direction: str,
                 importance: Mapping[str, float] | str | None = None) -> None:
    """``trials.json`` and ``trials.md`` (the table, then the importances or why there are none)."""
    with writing(study_dir):
        atomic_write_text(study_dir / TRIALS_JSON, json.dumps(
            {"metric": metric, "direction": direction, "trials": rows}, indent=2) + "\n")
        atomic_write_text(study_dir / TRIALS_MD, trials_markdown(rows, metric, direction,
                                                                  importance))


def trials_markdown(rows: list[dict[str, Any]], metric: str, direction: str,
                    importance: Mapping[str, float] | str | None = None) -> str:
    """The trials as a markdown table (valid metric only: a study never looks at test)."""
    keys = sorted({k for r in rows for k in r["params"]})
    body = [[r["number"], r["state"], _num(r["value"]), *[_value(r["params"].get(k)) for k in keys],
             _num(r["duration_s"]), _note(r)] for r in rows]
    text = (f"# Trials\n\nvalid {metric} ({direction}); the value of a trial is its final valid "
            f"{metric}.\n\n" + format_table(["trial", "state", f"valid {metric}", *keys, "s",
                                              "note"], body) + "\n")
    if isinstance(importance, str):
        text += f"\n## Parameter importances\n\n{importance}\n"
    elif importance:
        text += "\n## Parameter importances (fANOVA)\n\n" + format_table(
            ["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in importance.items()]) + "\n"
    return text


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _note(row: dict[str, Any]) -> str:
    if row["error"]:
        return str(row["error"]).replace("\n", " ").replace("|", "/")
    if row["pruned_at_step"] is not None:
        return f"pruned at step {row['pruned_at_step']}"
    return ""


def importances(study: optuna.Study) -> dict[str, float] | str:
    """fANOVA importances of the searched keys over the complete trials, or why there are none."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        return (f"too few complete trials for importances ({len(complete)}; they need "
                f"{MIN_IMPORTANCE_TRIALS})")
    try:
        found = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as e:  # e.g. no parameter varies across the trials
        return f"no importances: {e}"
    return {k: float(v) for k, v in found.items()}


def write_best(study_dir: Path, study: optuna.Study, base_raw: Mapping[str, Any],
               metric: str) -> Path | None:
    """``best.toml``: the base spec with the best trial's values, a complete spec that ``recsys
    train`` takes; None when no trial completed."""
    try:
        best = study.best_trial
    except ValueError:  # no complete trial
        return None
    values = best.user_attrs.get("spec_values", best.params)
    spec = validate_spec(apply_params(base_raw, values), f"best trial {best.number}")
    header = (f"# best trial {best.number} of study '{study.study_name}': valid {metric} = "
              f"{best.value:.6g}\n# its values: "
              + ", ".join(f"{k} = {json.dumps(v)}" for k, v in sorted(values.items())) + "\n")
    path = study_dir / BEST_TOML
    with writing(path):
        atomic_write_text(path, header + dump_toml(spec))
    return path

