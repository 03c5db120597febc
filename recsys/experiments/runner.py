"""Run model variants over seeds on one base spec and tabulate their test metrics.

A variant is a partial spec (a TOML-shaped dict) deep-merged into the base spec; every run is a
normal training run (``recsys.train.run.run_training``) with its own run directory, so each number
in a table can be traced to a resolved spec and its hash.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recsys.errors import RecsysError
from recsys.spec import Spec, only_arch_sections, spec_hash, validate_spec
from recsys.tables import format_table

log = logging.getLogger("recsys.experiments")

ROOT = Path(__file__).resolve().parents[2]


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged in (dicts recursively, everything else replaced).

    Example:
        >>> deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}})
        {'a': {'b': 1, 'c': 3}}
    """
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """A spec file as a raw dict (relative names resolve against the repository root)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = ROOT / p
    return tomllib.loads(p.read_text())


@dataclass
class DataConfig:
    """The datasets of an experiment and how long each run trains."""

    seeds: int = 3
    datasets: tuple[str, ...] = ("synthetic", "movielens")
    synthetic_requests: int = 100_000  # training requests of the quickstart world (5 rows each)
    synthetic_epochs: int = 1
    movielens_epochs: int = 2
    max_steps: int | None = None  # cap per run (the --quick mode)
    # valid and test requests of the synthetic world (None: the quickstart's); the --quick mode
    # shrinks them, since every run scores both and the test requests' whole cascade
    eval_requests: int | None = None
    # the Criteo-format world (recsys.data.adapters.criteo_world), written as TSV and read by the Criteo
    # adapter: its rows, epochs and the adapter's buckets per categorical field
    criteo_rows: int = 300_000
    criteo_epochs: int = 1
    criteo_hash_size: int = 1 << 16
    criteo_batch_size: int = 1024
    extra: dict[str, Any] = field(default_factory=dict)  # merged into every run's spec


DATASETS = ("synthetic", "movielens", "criteo-world")


def criteo_world_file(directory: Path, rows: int, seed: int = 0) -> Path:
    """The Criteo TSV of the world with ``rows`` rows in ``directory``, written unless the world
    there was made from the same config."""
    from recsys.data.adapters.criteo_world import CriteoWorldConfig
    from recsys.data.adapters.criteo_world_writer import write_criteo_world

    cfg = CriteoWorldConfig(rows=rows, seed=seed)
    meta, tsv = directory / "world.json", directory / "train.txt"
    if tsv.is_file() and meta.is_file() and \
            json.loads(meta.read_text()).get("config") == asdict(cfg):
        return tsv
    log.info("writing the Criteo-format world (%d rows) to %s", rows, directory)
    write_criteo_world(directory, cfg, progress=False)
    return tsv


def world_oracle(base: dict[str, Any]) -> dict[str, Any] | None:
    """The Criteo-format world's ``world.json`` for a base spec that reads one (else None)."""
    prepare = base.get("data", {}).get("prepare") or {}
    meta = Path(prepare.get("input", "")).parent / "world.json"
    return json.loads(meta.read_text()) if meta.is_file() else None


def dataset_base(name: str, cfg: DataConfig, data_dir: Path) -> dict[str, Any] | None:
    """The base spec of a dataset (one process, no checkpoints), or None if its raw files are
    missing."""
    train: dict[str, Any] = {"checkpoint_every_steps": None, "max_steps": cfg.max_steps}
    if name == "synthetic":
        raw = read_spec_file("specs/quickstart.toml")
        requests = raw["data"]["synthetic"]["requests"]
        requests["train"] = cfg.synthetic_requests
        name = f"synthetic-{cfg.synthetic_requests}"
        if cfg.eval_requests:
            requests.update(valid=cfg.eval_requests, test=cfg.eval_requests)
            name += f"-eval{cfg.eval_requests}"
        raw["data"]["path"] = str(data_dir / name)
        train["epochs"] = cfg.synthetic_epochs
    elif name == "movielens":
        raw = read_spec_file("specs/movielens.toml")
        source = (ROOT / raw["data"]["prepare"]["input"]).resolve()
        if not source.exists():
            log.warning("skipping movielens: %s is missing", source)
            return None
        raw["data"]["prepare"]["input"] = str(source)
        raw["data"]["path"] = str(data_dir / "movielens")
        train["epochs"] = cfg.movielens_epochs
    elif name == "criteo-world":
        raw = read_spec_file("specs/criteo.toml")
        world = criteo_world_file(data_dir / f"criteo-world-{cfg.criteo_rows}-raw",
                                  cfg.criteo_rows)
        raw["data"]["prepare"].update(input=str(world), hash_size=cfg.criteo_hash_size)
        raw["data"]["path"] = str(data_dir / f"criteo-world-{cfg.criteo_rows}")
        train["epochs"] = cfg.criteo_epochs
        # the spec's batch of 8192 suits tens of millions of rows; on a world of a few hundred
        # thousand it would leave a run a few dozen steps
        train["batch_size"] = cfg.criteo_batch_size
    else:
        raise ValueError(f"unknown dataset '{name}'; expected one of {', '.join(DATASETS)}")
    raw["train"] = {**raw["train"], **train}
    raw["train"] = {k: v for k, v in raw["train"].items() if v is not None}
    raw["model"] = {"tasks": raw["model"]["tasks"]}
    raw["distributed"] = {"world_size": 1}
    return deep_merge(raw, cfg.extra)


def dataset_bases(cfg: DataConfig, data_dir: Path, notes: list[str]
                  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(dataset, base spec)`` for each of ``cfg.datasets`` whose raw files are present; a
    dataset that is skipped gets a line in ``notes`` (the report's text) instead."""
    for name in cfg.datasets:
        base = dataset_base(name, cfg, data_dir)
        if base is None:
            notes.append(f"**{name}**: skipped (raw data missing)")
            continue
        yield name, base


@dataclass(frozen=True)
class Variant:
    """One row of a table: a name and the partial spec that makes it."""

    name: str
    patch: dict[str, Any]


@dataclass
class Runs:
    """Per variant, the metrics dict of each seed's run (see ``run_training``)."""

    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)


def run_variants(base: dict[str, Any], variants: Sequence[Variant], seeds: Sequence[int],
                 out_dir: Path, train: Callable[..., dict[str, Any]] | None = None,
                 reuse: bool = False) -> Runs:
    """Train every variant with every seed (one process each) and collect the metrics.

    Args:
        base: the raw base spec (data, features, train settings shared by all variants).
        variants: the rows.
        seeds: ``train.seed`` values; the data is the same for every seed.
        out_dir: run directories go to ``out_dir/<variant>-seed<k>``.
        train: the training function (default: ``recsys.train.run.run_training``).
        reuse: keep a finished run whose directory holds the same spec (by hash) instead of
            training it again (a long report resumes); otherwise a rerun replaces it.
    """
    if train is None:
        from recsys.train.run import run_training as train
    runs = Runs()
    total, done = len(variants) * len(seeds), 0
    for variant in variants:
        for seed in seeds:
            raw = only_arch_sections(deep_merge(deep_merge(base, variant.patch),
                                                {"train": {"seed": seed}}))
            spec = validate_spec(raw, f"{base.get('name', 'base')} + variant '{variant.name}'")
            started = time.perf_counter()
            run_dir = out_dir / f"{variant.name}-seed{seed}"
            finished = _finished_run(run_dir, spec) if reuse else None
            if finished is not None:
                log.info("[%d/%d] %s, seed %d: kept (finished, same spec)", done + 1, total,
                         variant.name, seed)
                metrics, seconds = finished
            else:
                log.info("[%d/%d] %s, seed %d", done + 1, total, variant.name, seed)
                # the report owns its run directories: a rerun replaces them
                metrics = train(spec, run_dir, progress=False, overwrite=True)
                seconds = time.perf_counter() - started
                if reuse:
                    (run_dir / REPORT_RUN).write_text(json.dumps(
                        {"spec_hash": spec_hash(spec), "seconds": seconds}))
            runs.metrics.setdefault(variant.name, []).append(metrics)
            runs.seconds.setdefault(variant.name, []).append(seconds)
            runs.hashes[variant.name] = spec_hash(spec)
            done += 1
    return runs


REPORT_RUN = "report-run.json"  # written last by a report's run: its spec hash and wall time


def _finished_run(run_dir: Path, spec: Spec) -> tuple[dict[str, Any], float] | None:
    """A finished run's metrics and wall seconds when ``run_dir`` holds a run of ``spec`` that a
    report finished."""
    hash_ = spec_hash(spec)
    try:
        done = json.loads((run_dir / REPORT_RUN).read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if "test" not in metrics:
        return None
    if done.get("spec_hash") != hash_ and not _same_recorded_spec(run_dir, spec):
        return None
    return metrics, float(done["seconds"])


def _same_recorded_spec(run_dir: Path, spec: Spec) -> bool:
    """Whether the run's recorded ``spec.toml`` is ``spec``: both read back from TOML (so that a
    value's in-memory form, an int for a float, is no difference) and with their data paths
    absolute (a run records them relative to where it ran)."""
    from recsys.spec import dump_toml, load_run_spec, spec_to_dict

    try:
        recorded = spec_to_dict(load_run_spec(run_dir))
    except RecsysError:
        return False
    again = spec_to_dict(validate_spec(tomllib.loads(dump_toml(spec)), str(run_dir)))
    for d in (recorded, again):
        data = d["data"]
        data["path"] = str(Path(data["path"]).resolve())
        if data.get("prepare"):
            data["prepare"]["input"] = str(Path(data["prepare"]["input"]).resolve())
    return recorded == again


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN where a value is missing."""
    xs = [float("nan") if v is None else float(v) for v in values]
    if not xs:
        return float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def pm(values: Sequence[float | None], digits: int = 4) -> str:
    """``mean ± std`` as text."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def metric(runs: list[dict[str, Any]], split: str, key: str) -> list[float | None]:
    return [m.get(split, {}).get(key) for m in runs]


def summary_rows(runs: Runs, keys: Sequence[str], split: str = "test") -> list[dict[str, Any]]:
    """One JSON-ready dict per variant: mean and std of each metric, seconds, spec hash."""
    rows = []
    for name, per_seed in runs.metrics.items():
        row: dict[str, Any] = {"variant": name, "seeds": len(per_seed),
                               "spec_hash": runs.hashes[name]}
        for key in keys:
            mean, std = mean_std(metric(per_seed, split, key))
            row[key] = {"mean": mean, "std": std, "values": metric(per_seed, split, key)}
        row["seconds"] = mean_std(runs.seconds[name])[0]
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], keys: Sequence[str], labels: Sequence[str],
             first: str = "model") -> str:
    """The summary rows as a table of ``mean ± std`` cells."""
    body = [[r["variant"], *[f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in keys],
             round(r["seconds"], 1)] for r in rows]
    return format_table([first, *labels, "s / run"], body)
