"""A training run end to end, and its run directory.

A run directory holds: ``spec.toml`` (the resolved spec) and ``run.json`` (its hash, the world,
versions, steps and timings), ``train.log``, ``history.json``, ``metrics.json``
(``{"valid": {...}, "test": {...}, "oracle": {...}, "tasks": {...}, "sparsity": {...}}``), ``training_curve.png``
and ``calibration.png``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys import __version__
from recsys.errors import SpecError
from recsys.evaluate import plots
from recsys.evaluate.accumulator import flatten_for_report
from recsys.spec import Spec, dump_toml, spec_hash, validate_spec
from recsys.tables import format_table
from recsys.train.checkpoint import checkpoint_dir
from recsys.train.distributed import barrier, init_distributed, shutdown
from recsys.train.sharded import sparsity
from recsys.train.trainer import History, Trainer

log = logging.getLogger("recsys")


def default_run_dir(spec: Spec) -> Path:
    return Path("runs") / f"{spec.name}-{spec_hash(spec)[:8]}"


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    """INFO to stderr (and to ``train.log``) on rank 0, warnings only elsewhere."""
    root = logging.getLogger("recsys")
    root.handlers.clear()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if run_dir is not None and is_main:
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(fmt)
        root.addHandler(file)
    root.propagate = False


def run_training(spec: Spec, run_dir: str | Path | None = None, progress: bool = True,
                 resume: bool = False) -> dict[str, Any]:
    """Train and evaluate ``spec`` on this process (and its torchrun peers); rank 0 writes the
    run directory. With ``resume``, training continues from the run's latest checkpoint (the spec
    must be the one the run was started with). Returns the metrics.json content (on every rank).

    Example:
        >>> metrics = run_training(load_spec("specs/quickstart.toml"), "runs/qs")
        >>> metrics["test"]["auc"]
    """
    out = Path(run_dir) if run_dir else default_run_dir(spec)
    if resume:
        _check_same_spec(out, spec)
    ctx = init_distributed(spec.train.device, spec.distributed.backend)
    try:
        stale = checkpoint_dir(out)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "spec.toml").write_text(dump_toml(spec))
            if not resume and stale.exists():
                # a fresh run must never leave an older run's checkpoints to be resumed from
                shutil.rmtree(stale)
        barrier()
        setup_logging(out, ctx.is_main)
        log.info("run %s: spec %s (hash %s) on %d rank(s), %s", out, spec.name, spec_hash(spec),
                 ctx.world_size, ctx.device)
        started = time.time()
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restarts:
            log.warning("the elastic agent restarted the worker group (restart %d after a worker "
                        "failed)%s", restarts, ": resuming from the last checkpoint" if resume
                        else "; without --resume this run starts over from step 0")
        trainer = Trainer(spec, ctx, progress, run_dir=out)
        log.info("sharding plan:\n%s", _plan_summary(trainer))
        if resume and trainer.restore() is None:
            log.info("no checkpoint in %s yet: starting from step 0", out)
        trainer.fit()
        return _evaluate_and_write(trainer, out, started)
    finally:
        shutdown()


def evaluate_run(run_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Re-evaluate a run from its latest checkpoint (same number of processes as it trained
    with): valid and test metrics, rewritten into the run directory.

    Example:
        >>> evaluate_run("runs/quickstart-5d5ee98d")["test"]["auc"]
    """
    out = Path(run_dir)
    spec = _run_spec(out)
    ctx = init_distributed(spec.train.device, spec.distributed.backend)
    try:
        setup_logging(out, ctx.is_main)
        trainer = Trainer(spec, ctx, progress=False, run_dir=out)
        path = trainer.restore()
        if path is None:
            raise SpecError(str(out), ["no checkpoint to evaluate (checkpoints/ is empty)"])
        history = out / "history.json"
        if history.is_file():
            trainer.history = History(**json.loads(history.read_text()))
        return _evaluate_and_write(trainer, out, time.time())
    finally:
        shutdown()


def _evaluate_and_write(trainer: Trainer, out: Path, started: float) -> dict[str, Any]:
    spec, ctx = trainer.spec, trainer.ctx
    results = {split: trainer.evaluate(split, keep_arrays=ctx.is_main)
               for split in ("valid", "test")}
    metrics = _metrics_json(spec, results)
    metrics["sparsity"] = sparsity(trainer.built)  # a collective: every rank
    metrics["train_last_step"] = trainer.history.last_stats()
    metrics["timing"] = trainer.timing
    if spec.train.eval_cascade and "request" in trainer.train_loader.split.schema.groups:
        cascade = trainer.evaluate_cascade("test")  # a collective: every rank
        if cascade is not None:
            metrics["cascade"] = cascade
    if ctx.is_main:
        _write_run(out, spec, trainer, metrics, results, started)
        print(summary_table(metrics), file=sys.stderr)
        _log_sparsity(metrics["sparsity"])
        log.info("wrote %s", out)
    return metrics


def _log_sparsity(s: dict[str, Any]) -> None:
    if s["embedding_rows_zero"] is not None:
        log.info("embedding rows exactly zero: %.4f of all rows%s", s["embedding_rows_zero"],
                 f" (column-split tables not counted: {', '.join(s['not_counted'])})"
                 if s["not_counted"] else "")
    if s["interaction_weights_zero"] is not None:
        log.info("interaction weights exactly zero: %.4f", s["interaction_weights_zero"])


def _run_spec(run_dir: Path) -> Spec:
    path = run_dir / "spec.toml"
    if not path.is_file():
        raise SpecError(str(run_dir), ["not a run directory (spec.toml is missing)"])
    return validate_spec(tomllib.loads(path.read_text()), str(path))


def _check_same_spec(run_dir: Path, spec: Spec) -> None:
    if not (run_dir / "spec.toml").is_file():
        return  # nothing ran there yet
    before = _run_spec(run_dir)
    if spec_hash(before) != spec_hash(spec):
        raise SpecError(str(run_dir / "spec.toml"), [
            f"--resume: the run was started from spec hash {spec_hash(before)}, this spec is "
            f"{spec_hash(spec)}; resume with the same spec (see recsys spec show)"])


def _metrics_json(spec: Spec, results: dict[str, Any]) -> dict[str, Any]:
    task = spec.model.tasks[0]
    metrics: dict[str, Any] = {split: flatten_for_report(results[split]["metrics"], task)
                               for split in ("valid", "test")}
    if "oracle" in results["test"]["metrics"]:
        metrics["oracle"] = flatten_for_report(results["test"]["metrics"]["oracle"], task)
    metrics["tasks"] = {split: results[split]["metrics"] for split in ("valid", "test")}
    return metrics


def _write_run(out: Path, spec: Spec, trainer: Trainer, metrics: dict[str, Any],
               results: dict[str, Any], started: float) -> None:
    h = trainer.history
    (out / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2, sort_keys=True))
    (out / "history.json").write_text(json.dumps(asdict(h), indent=2))
    (out / "run.json").write_text(json.dumps({
        "spec": spec.name, "spec_hash": spec_hash(spec), "world_size": trainer.ctx.world_size,
        "device": str(trainer.ctx.device), "steps": trainer.step,
        "seconds": round(time.time() - started, 1), "recsys": __version__,
        "timing": trainer.timing, "embedding_bytes_per_rank": _rank_bytes(trainer),
        "torch": torch.__version__, "python": platform.python_version(),
    }, indent=2))
    task = spec.model.tasks[0]
    plots.training_curve(h.steps, h.loss, h.valid_steps, [v.get("auc", np.nan) for v in h.valid],
                         out / "training_curve.png", f"{spec.name}: {task}")
    arrays = results["test"]["arrays"]
    curves = {"model": arrays["probs"][task]}
    if task in arrays.get("oracle", {}):
        curves["oracle"] = arrays["oracle"][task]
    plots.reliability_diagram(arrays["labels"][task], curves, out / "calibration.png",
                              title=f"{spec.name}: {task} on test")


def _rank_bytes(trainer: Trainer) -> list[int]:
    """Embedding weights and sparse-optimizer state held by each rank, from the sharding plan."""
    from recsys.train import planning

    topology = planning.make_topology(trainer.ctx.world_size, trainer.ctx.device.type)
    summary = planning.plan_summary(trainer.spec, trainer.plan, topology)
    return [int(r["total_bytes"]) for r in summary["ranks"]]


def _json_safe(obj: Any) -> Any:
    """NaN (a metric undefined on this data, e.g. AUC with one class) as null: valid JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def _plan_summary(trainer: Trainer) -> str:
    rows = []
    for module_path, module_plan in trainer.plan.plan.items():
        for table, p in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted({r for r in (p.ranks or [])})
            rows.append([f"{module_path}.{table}", str(p.sharding_type), str(p.compute_kernel),
                         ",".join(map(str, ranks))])
    return format_table(["table", "sharding", "kernel", "ranks"], rows)


def summary_table(metrics: dict[str, Any]) -> str:
    """The headline metrics of valid, test and the oracle side by side."""
    keys = ["auc", "gauc", "logloss", "ne", "calibration", "ece"]
    cols = [c for c in ("valid", "test", "oracle") if c in metrics]
    return format_table(["metric", *cols],
                        [[k, *[float(metrics[c].get(k, float("nan"))) for c in cols]]
                         for k in keys])
