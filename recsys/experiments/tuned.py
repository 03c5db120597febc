"""Every arch tuned with the same budget, then retrained over seeds (`recsys report --only tuned`).

For each dataset (the quickstart world, ml-latest-small, the Criteo-format world) and each arch, an
Optuna study (``recsys tune``: TPE, median pruning on the periodic validation) runs ``trials``
trials over the arch's default search space (recsys/tune/spaces.py); every arch gets the same
number of trials. The study selects on the **valid** split only. Its best spec is then trained
with ``seeds`` seeds, and the table gives the **test** metrics as mean ± std, the tuning budget
and the time it took.

The goal the table checks: each seed method (PIN, xDeepInt, DynInt, AdaEnsemble) is within seed
spread of, or above, tuned DCN. "Within seed spread" means the shortfall of its mean test AUC is
at most the standard deviation of the difference of two means, sqrt(std_m² + std_dcn²).

Studies persist (SQLite under ``OUT/studies``): a rerun tops each study up to ``trials`` trials
and reuses the finished ones, so an interrupted report resumes instead of starting again.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.experiments.interactions import MODELS, model_patch
from recsys.experiments.runner import (
    DATASETS,
    DataConfig,
    Variant,
    dataset_bases,
    deep_merge,
    mean_std,
    run_variants,
    summary_rows,
    world_oracle,
)
from recsys.tables import format_table

log = logging.getLogger("recsys.experiments")

KEYS = ("auc", "logloss", "gauc", "calibration")
LABELS = ("test AUC", "log-loss", "GAUC", "calibration")
SEED_METHODS = ("pin", "xdeepint", "dynint", "adaensemble")
BASELINE = "dcn"

# what each method's paper says it brings (docs/methods.md), set against what the table measures
CLAIMS = {
    "dcn": "DCN-v2: explicit bounded-degree crosses beside the DNN beat DNN-only and earlier "
           "cross models on Criteo and MovieLens-1M",
    "dlrm": "DLRM: pairwise dot products of embeddings and a top MLP (a strong, simple baseline)",
    "deepfm": "DeepFM: FM second-order terms beside the DNN beat either alone",
    "pin": "PIN (xDeepInt's network) with an MLP tower: polynomial interactions of bounded "
           "degree, subspace crossing mixes bit- and vector-wise crosses",
    "xdeepint": "xDeepInt: PIN with a linear readout and no DNN matches or beats DNN-based "
                "models, with GFTRL/FTRL selecting features and interactions (numbers not "
                "published in what we could read)",
    "dynint": "DynInt: instance-aware gating / generated parameters over PIN beat static PIN "
              "and the state of the art (no numbers retrievable)",
    "adaensemble": "AdaEnsemble: a sparse mixture of heterogeneous interaction experts with "
                   "early exit is more accurate and cheaper than single experts (no numbers "
                   "retrievable)",
    "mlp": "the plain DNN baseline",
}


@dataclass
class TunedConfig(DataConfig):
    """The study's sizes (the defaults take about 1.5 hours on 2 cores, with nothing else
    running)."""

    models: tuple[str, ...] = MODELS
    datasets: tuple[str, ...] = DATASETS
    seeds: int = 5
    trials: int = 8
    # trials at a time: 1 trains them in this process, one after another (no start-up cost per
    # trial); more runs each in its own worker process
    jobs: int = 1
    startup_trials: int = 4  # TPE samples at random for this many trials
    synthetic_requests: int = 15_000
    eval_requests: int | None = 5_000
    criteo_rows: int = 150_000
    evals_per_run: int = 4  # periodic validations per trial, for the pruner
    # a seed method that misses the goal on a dataset is retrained, beside DCN, with this many
    # times the epochs (same specs and seeds), to tell undertraining from a gap that stays
    longer_epochs: int = 3
    longer_seeds: int = 3  # the first this many seeds (a diagnosis, at 3x the cost of a run)

    def __post_init__(self) -> None:
        for name in ("seeds", "trials", "jobs", "evals_per_run", "longer_epochs",
                     "longer_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown:
            raise ValueError(f"unknown datasets {unknown}; expected some of {list(DATASETS)}")

    def longer_seed_range(self) -> range:
        """The seeds of the longer-training diagnosis: the first ``longer_seeds`` of ``seeds``."""
        return range(min(self.longer_seeds, self.seeds))


def run_tuned(cfg: TunedConfig, out: Path) -> tuple[dict[str, Any], str]:
    """Tune and retrain every model on every dataset: JSON-ready result and Markdown tables."""
    result: dict[str, Any] = {"config": _config_json(cfg), "datasets": {}}
    tables = []
    for dataset, base in dataset_bases(cfg, out / "data", tables):
        entry = _dataset(dataset, base, cfg, out)
        result["datasets"][dataset] = entry
        tables.append(_dataset_table(dataset, entry, cfg))
    result["goal"] = goal_rows(result["datasets"])
    for dataset, entry in result["datasets"].items():
        _longer(dataset, entry, result["goal"], cfg, out)
    tables.append(goal_table(result["goal"], cfg.longer_epochs))
    tables.append(claims_table(result["datasets"]))
    return result, "\n\n".join(tables)


def _dataset(dataset: str, base: dict[str, Any], cfg: TunedConfig, out: Path) -> dict[str, Any]:
    from recsys.datasets import ensure_dataset
    from recsys.spec import validate_spec

    # the steps of one run decide how often trials validate (for the pruner)
    probe = validate_spec(deep_merge(base, model_patch(BASELINE)), f"{dataset} base")
    manifest = ensure_dataset(probe, progress=False)
    steps = _steps(probe, manifest)
    every = max(1, steps // cfg.evals_per_run)
    entry: dict[str, Any] = {"rows": [], "steps_per_run": steps}
    world = world_oracle(base)
    if world is not None:
        entry["oracle_auc"] = world["splits"]["test"]["oracle_auc"]
        entry["first_order_oracle_auc"] = world["splits"]["test"]["first_order_auc"]
    for model in cfg.models:
        name = f"{dataset}-{model}"
        raw = deep_merge(deep_merge(base, model_patch(model)), {
            "name": name, "train": {"eval_every_steps": every},
            "tune": {"startup_trials": cfg.startup_trials, "sampler_seed": 0}})
        study = _tune(name, raw, cfg, out / "studies")
        best_raw = _best_raw(study["best_spec"])
        runs = run_variants(best_raw, [Variant(model, {})], range(cfg.seeds),
                            out / "runs" / "tuned" / dataset, reuse=True)
        row = summary_rows(runs, KEYS)[0]
        row.update(study=study["summary"], oracle=_oracle(runs.metrics[model]),
                   best_spec=str(study["best_spec"]))
        entry["rows"].append(row)
        write_portable_spec(out / "tuned-specs" / dataset / f"{model}.toml", dataset, best_raw,
                            row, cfg, out)
        log.info("%s: test AUC %.4f ± %.4f after %d trials", name, row["auc"]["mean"],
                 row["auc"]["std"], study["summary"]["trials"])
    oracle = [r["oracle"] for r in entry["rows"] if r["oracle"] is not None]
    if oracle and "oracle_auc" not in entry:
        entry["oracle_auc"] = oracle[0]
    return entry


def _longer(dataset: str, entry: dict[str, Any], goal: list[dict[str, Any]], cfg: TunedConfig,
            out: Path) -> None:
    """For the seed methods that miss the goal on ``dataset``: retrain them and DCN for up to
    ``cfg.longer_epochs`` times the epochs and put in their goal rows (``longer``) the gap in
    peak valid AUC over the first seeds, at the study's length and at the longer one."""
    missed = [g for g in goal if g["dataset"] == dataset and not g["met"]]
    if not missed or cfg.longer_epochs == 1:
        return
    by_model = {r["variant"]: r for r in entry["rows"]}
    seeds = cfg.longer_seed_range()
    short = {m: [peak_valid_auc(out / "runs" / "tuned" / dataset / f"{m}-seed{k}") for k in seeds]
             for m in [BASELINE, *(g["model"] for g in missed)]}
    longer = {m: longer_runs(dataset, m, Path(by_model[m]["best_spec"]), cfg, out)
              for m in short}
    for g in missed:
        row: dict[str, Any] = {"epochs_factor": cfg.longer_epochs, "seeds": len(seeds)}
        for name, peaks in (("study_length", short), ("longer", longer)):
            a, b = mean_std(peaks[g["model"]]), mean_std(peaks[BASELINE])
            spread = math.hypot(a[1], b[1])
            row[name] = {"delta": a[0] - b[0], "spread": spread, "met": a[0] - b[0] >= -spread}
        g["longer"] = row


def peak_valid_auc(run_dir: Path) -> float:
    """The highest valid AUC a run reached: over its periodic validations and its final one."""
    import json

    history = json.loads((run_dir / "history.json").read_text())
    final = json.loads((run_dir / "metrics.json").read_text())["valid"]["auc"]
    return max([v["auc"] for v in history.get("valid", [])] + [final])


def longer_runs(dataset: str, model: str, best_spec: Path, cfg: TunedConfig, out: Path
                ) -> list[float]:
    """The peak valid AUC of each of the first ``cfg.longer_seeds`` seeds, with the best spec
    retrained for up to ``cfg.longer_epochs`` times the epochs (finished runs are kept).

    The run stops once the valid AUC has not improved for two validations, and what counts is
    the peak it reached (valid, like the selection): with large id tables a CTR model overfits
    sharply once a second epoch starts (on the Criteo-format world, DCN made to train 3 epochs
    ends at 0.628 test AUC against 0.722 after one), and the question is whether the method
    catches up with DCN when it may train longer, not how far it falls when made to."""
    raw = _best_raw(best_spec)
    raw["train"]["epochs"] = raw["train"].get("epochs", 1) * cfg.longer_epochs
    raw["train"]["early_stopping_patience"] = 2
    if raw["train"].get("max_steps"):
        raw["train"]["max_steps"] *= cfg.longer_epochs
    run_dir = out / "runs" / f"tuned-x{cfg.longer_epochs}" / dataset
    seeds = cfg.longer_seed_range()
    run_variants(raw, [Variant(model, {})], seeds, run_dir, reuse=True)
    return [peak_valid_auc(run_dir / f"{model}-seed{k}") for k in seeds]


def _steps(spec: Any, manifest: Any) -> int:
    rows = manifest.rows[spec.data.view]["train"]
    per_epoch = rows // spec.train.batch_size
    total = per_epoch * spec.train.epochs
    return min(total, spec.train.max_steps) if spec.train.max_steps else total


def _tune(name: str, raw: dict[str, Any], cfg: TunedConfig, studies: Path) -> dict[str, Any]:
    """Top the study ``name`` up to ``cfg.trials`` trials; its best spec and a summary."""
    from recsys.fsutil import atomic_write_text, writing
    from recsys.spec import dump_toml, validate_spec
    from recsys.tune import TuneOptions, run_study

    spec_file = studies / "specs" / f"{name}.toml"
    with writing(spec_file):
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        text = dump_toml(validate_spec(raw, name))
        if not spec_file.is_file() or spec_file.read_text() != text:
            atomic_write_text(spec_file, text)
    done = _finished_trials(studies / name)
    started = time.perf_counter()
    if done < cfg.trials or not (studies / name / "best.toml").is_file():
        log.info("tuning %s: %d trial(s) done, %d to run", name, done, cfg.trials - done)
        run_study(spec_file, TuneOptions(trials=max(1, cfg.trials - done), jobs=cfg.jobs,
                                         study=name, study_dir=studies,
                                         in_process=cfg.jobs == 1))
    if not (studies / name / "best.toml").is_file():
        from recsys.errors import RunError

        raise RunError(str(studies / name), "no trial of the study completed, so it has no best "
                       "spec (see trials.md and the trials' logs)")
    summary = _study_summary(studies / name)
    summary["seconds_this_run"] = time.perf_counter() - started
    return {"best_spec": studies / name / "best.toml", "summary": summary}


def _finished_trials(study_dir: Path) -> int:
    import optuna

    db = study_dir / "study.db"
    if not db.is_file():
        return 0
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=study_dir.name, storage=f"sqlite:///{db.resolve()}")
    return sum(t.state.is_finished() for t in study.trials)


def _study_summary(study_dir: Path) -> dict[str, Any]:
    import optuna

    study = optuna.load_study(study_name=study_dir.name,
                              storage=f"sqlite:///{(study_dir / 'study.db').resolve()}")
    trials = [t for t in study.trials if t.state.is_finished()]
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    seconds = sum(t.duration.total_seconds() for t in trials if t.duration)
    return {"trials": len(trials), "states": states, "tuning_seconds": seconds,
            "best_valid": study.best_value, "best_trial": study.best_trial.number,
            "best_params": study.best_trial.user_attrs.get("spec_values", study.best_params)}


def _best_raw(path: Path) -> dict[str, Any]:
    import tomllib

    raw = tomllib.loads(path.read_text())
    raw.pop("tune", None)
    return copy.deepcopy(raw)


# where a shipped tuned spec finds its raw data (paths relative to the repository root, as in
# specs/), and how a user gets it
PORTABLE_DATA = {
    "synthetic": (None, "the quickstart world at the study's size, generated into data.path by "
                        "the first run"),
    "movielens": ("../shared/data/ml-latest-small",
                  "ml-latest-small, converted from data.prepare.input by the first run (as "
                  "specs/movielens.toml)"),
    "criteo-world": ("data/criteo-world/train.txt",
                     "the Criteo-format world: `recsys data criteo-world --out data/criteo-world "
                     "--rows {rows}` first; for real Criteo data, `--set "
                     "data.prepare.input=/path/to/train.txt --set data.path=data/criteo-tuned`"),
}


def portable_spec(dataset: str, best_raw: dict[str, Any], out: Path) -> dict[str, Any]:
    """The best spec of a study with its data paths relative to the repository root, so that it
    can ship in specs/tuned/ and retrain on another machine (or, through ``--set``, on other
    data of the same format).

    Raises:
        ValueError: a value still names a path inside ``out`` (the report's folder), which the
            spec could not carry elsewhere.
    """
    raw = copy.deepcopy(best_raw)
    data = raw.setdefault("data", {})
    data["path"] = f"data/tuned/{dataset}"
    source, _ = PORTABLE_DATA[dataset]
    if source is not None:
        data.setdefault("prepare", {})["input"] = source
    local = [key for key, value in _strings(raw) if str(out.resolve()) in value]
    if local:
        raise ValueError(f"{dataset}: the tuned spec still names the report's folder in "
                         f"{', '.join(local)}")
    return raw


def _strings(d: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _strings(v, f"{prefix}{k}.")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _strings(v, f"{prefix}{i}.")
    elif isinstance(d, str):
        yield prefix.rstrip("."), d


def write_portable_spec(path: Path, dataset: str, best_raw: dict[str, Any], row: dict[str, Any],
                        cfg: TunedConfig, out: Path) -> None:
    """Write the tuned spec of one arch and dataset, headed by how it was chosen and what it
    scored (``recsys report --only tuned`` puts them in ``OUT/tuned-specs/``)."""
    from recsys.fsutil import atomic_write_text
    from recsys.spec import dump_toml, validate_spec

    raw = portable_spec(dataset, best_raw, out)
    raw["description"] = (f"{row['variant']} on {dataset}, tuned by `recsys report --only tuned` "
                          "(docs/tuning.md)")
    spec = validate_spec(raw, str(path))
    s = row["study"]
    values = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                       for k, v in s["best_params"].items())
    _, how = PORTABLE_DATA[dataset]
    lines = [
        f"{dataset}, {row['variant']}: the best of {s['trials']} Optuna trials of `recsys report "
        f"--only tuned` (trial {s['best_trial']}, valid AUC {s['best_valid']:.4f})",
        f"retrained with train.seed 0-{cfg.seeds - 1}: test AUC {row['auc']['mean']:.4f} ± "
        f"{row['auc']['std']:.4f}, log-loss {row['logloss']['mean']:.4f} ± "
        f"{row['logloss']['std']:.4f} (docs/results.md)",
        f"tuned values: {values}",
        f"data: {how.format(rows=cfg.criteo_rows)}",
        f"run from the repository root: recsys train specs/tuned/{dataset}/{row['variant']}.toml",
    ]
    header = "".join(f"# {line}\n" for line in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, header + dump_toml(spec))


def _oracle(per_seed: list[dict[str, Any]]) -> float | None:
    values = [m["oracle"]["auc"] for m in per_seed if "oracle" in m]
    return values[0] if values else None


def _dataset_table(dataset: str, entry: dict[str, Any], cfg: TunedConfig) -> str:
    body = []
    for r in entry["rows"]:
        s = r["study"]
        trials = f"{s['trials']} ({s['states']['PRUNED']} pruned, {s['states']['FAIL']} failed)"
        body.append([r["variant"], trials, f"{s['best_valid']:.4f}",
                     *[_cell(r[k]) for k in KEYS],
                     round(s["tuning_seconds"] / 60, 1), round(r["seconds"], 1)])
    table = format_table(["model", "trials", "best valid AUC", *LABELS, "tuning min",
                          "s / run"], body)
    notes = [f"{cfg.trials} trials per model ({cfg.startup_trials} random, then TPE), "
             f"selected on valid AUC; the best spec retrained with {cfg.seeds} seeds, test "
             f"split; {entry['steps_per_run']} steps per run"]
    if "oracle_auc" in entry:
        notes.append(f"oracle test AUC (true click probabilities) {entry['oracle_auc']:.4f}")
    if "first_order_oracle_auc" in entry:
        notes.append("the oracle without its planted crosses "
                     f"{entry['first_order_oracle_auc']:.4f}")
    return f"**{dataset}**\n\n{table}\n\n" + "; ".join(notes) + "."


def _cell(stat: dict[str, Any]) -> str:
    """``mean ± std``; "-" for a metric the dataset cannot give (GAUC without a user column)."""
    if not math.isfinite(stat["mean"]):
        return "-"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def goal_rows(datasets: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed method and dataset: its test AUC against tuned DCN's, and whether it is within
    seed spread of it or above (see the module docstring)."""
    rows = []
    for dataset, entry in datasets.items():
        by_model = {r["variant"]: r for r in entry["rows"]}
        if BASELINE not in by_model:
            continue
        base = by_model[BASELINE]["auc"]
        for model in SEED_METHODS:
            if model not in by_model:
                continue
            auc = by_model[model]["auc"]
            delta = auc["mean"] - base["mean"]
            spread = math.hypot(auc["std"], base["std"])
            valid = by_model[model]["study"]["best_valid"] - \
                by_model[BASELINE]["study"]["best_valid"]
            rows.append({"model": model, "dataset": dataset, "delta_auc": delta,
                         "spread": spread, "met": delta >= -spread, "delta_best_valid": valid})
    return rows


def goal_table(rows: list[dict[str, Any]], longer_epochs: int = 3) -> str:
    if not rows:
        return "**goal**: no dataset has both DCN and a seed method."
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    body = []
    for model in SEED_METHODS:
        cells = {r["dataset"]: r for r in rows if r["model"] == model}
        if not cells:
            continue
        met = sum(c["met"] for c in cells.values())
        body.append([model, *[f"{cells[d]['delta_auc']:+.4f} (± {cells[d]['spread']:.4f}) "
                              f"{'yes' if cells[d]['met'] else 'no'}" if d in cells else "-"
                              for d in datasets],
                     f"{met} of {len(cells)}", "yes" if met >= min(2, len(cells)) else "no"])
    table = format_table(["method", *[f"{d}: Δ test AUC vs DCN" for d in datasets],
                          "within spread or above", "goal met (>= 2 datasets)"], body)
    text = ("**goal: each seed method within seed spread of tuned DCN, or above, on at least two "
            "datasets**\n\n" + table + "\n\nΔ is the method's mean test AUC minus tuned DCN's; "
            "± is sqrt(std_method² + std_dcn²), the spread of that difference.")
    misses = [r for r in rows if not r["met"]]
    if misses:
        def cell(r: dict[str, Any], key: str) -> str:
            if "longer" not in r:
                return "-"
            c = r["longer"][key]
            return f"{c['delta']:+.4f} (± {c['spread']:.4f}) {'yes' if c['met'] else 'no'}"

        why = [[r["model"], r["dataset"], f"{r['delta_auc']:+.4f}", f"{r['delta_best_valid']:+.4f}",
                cell(r, "study_length"), cell(r, "longer")] for r in misses]
        text += ("\n\n**why the misses**: the gap on the valid split that the study selected on "
                 "(its best trial against DCN's), then the gap in peak valid AUC over the first "
                 f"seeds, at the study's run length and when both may train for up to "
                 f"{longer_epochs}× the epochs (stopped once valid AUC falls: with large id tables "
                 "a second epoch overfits). A gap that closes with longer training is "
                 "undertraining at the study's length; one that stays is the method's\n\n"
                 + format_table(["method", "dataset", "Δ test AUC", "Δ best valid AUC (study)",
                                 "Δ peak valid AUC, study length, within spread",
                                 f"Δ peak valid AUC, up to {longer_epochs}× epochs, within "
                                 "spread"], why))
    return text


def claims_table(datasets: dict[str, dict[str, Any]]) -> str:
    body = []
    for model, claim in CLAIMS.items():
        deltas = []
        for dataset, entry in datasets.items():
            by_model = {r["variant"]: r for r in entry["rows"]}
            if model in by_model and BASELINE in by_model and model != BASELINE:
                d = by_model[model]["auc"]["mean"] - by_model[BASELINE]["auc"]["mean"]
                deltas.append(f"{dataset} {d:+.4f}")
            elif model == BASELINE and model in by_model:
                mlp = by_model.get("mlp")
                if mlp is not None:
                    d = by_model[model]["auc"]["mean"] - mlp["auc"]["mean"]
                    deltas.append(f"{dataset} {d:+.4f} vs mlp")
        if deltas:
            body.append([model, claim, "; ".join(deltas)])
    return ("**what each paper claims, against what we measured** (Δ mean test AUC vs tuned "
            "DCN; DCN's own row is against the MLP)\n\n"
            + format_table(["model", "claim", "measured"], body))


def _config_json(cfg: TunedConfig) -> dict[str, Any]:
    return {"seeds": cfg.seeds, "trials": cfg.trials, "jobs": cfg.jobs,
            "startup_trials": cfg.startup_trials, "models": list(cfg.models),
            "datasets": list(cfg.datasets), "synthetic_requests": cfg.synthetic_requests,
            "criteo_rows": cfg.criteo_rows, "criteo_hash_size": cfg.criteo_hash_size,
            "longer_epochs": cfg.longer_epochs, "longer_seeds": cfg.longer_seeds,
            "max_steps": cfg.max_steps}


__all__ = ["TunedConfig", "claims_table", "goal_rows", "goal_table", "portable_spec", "run_tuned",
           "write_portable_spec"]
