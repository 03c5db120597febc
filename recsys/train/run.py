"""A training run end to end, and its run directory.

A run directory holds: ``spec.toml`` (the resolved spec) and ``run.json`` (its hash, the world,
versions, steps and timings), ``train.log``, ``history.json``, ``metrics.json``
(``{"valid": {...}, "test": {...}, "oracle": {...}, "tasks": {...}, "sparsity": {...}}``), ``training_curve.png``
and ``calibration.png``, and ``tb/`` (TensorBoard events, written while it trains).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys import __version__
from recsys.errors import RunError
from recsys.evaluate import plots
from recsys.evaluate.accumulator import flatten_for_report
from recsys.fsutil import ExclusiveLock, atomic_write_text, writing
from recsys.process_settings import tune_process
from recsys.run_dir import RunDir
from recsys.spec import Spec, dump_toml, spec_hash
from recsys.tables import format_table
from recsys.train.distributed import barrier, init_distributed, on_main, shutdown
from recsys.train.sharded import held_embedding_bytes, sparsity
from recsys.train.trainer import Trainer

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
                 resume: bool = False, overwrite: bool = False,
                 init_from: str | Path | None = None,
                 on_validation: Callable[[int, float], bool] | None = None) -> dict[str, Any]:
    """Train and evaluate ``spec`` on this process (and its torchrun peers); rank 0 writes the
    run directory. Returns the metrics.json content (on every rank).

    A run directory that already holds a run (checkpoints or metrics) is never replaced silently:
    ``resume`` continues it (the spec must be the one it was started with), ``overwrite``
    replaces it once the new run's data and model are ready; without either it is an error. Rank
    0 holds the directory's lock for the whole run, so a second writer fails at once.

    ``init_from`` starts from the weights of another run's latest checkpoint (a warm start:
    :mod:`recsys.train.warm_start`), unless ``resume`` finds a checkpoint of this run.

    ``on_validation`` becomes :attr:`Trainer.on_validation` (called after each periodic
    validation; True stops training; recsys tune prunes with it).

    Example:
        >>> metrics = run_training(load_spec("specs/quickstart.toml"), "runs/qs")
        >>> metrics["test"]["auc"]
    """
    tune_process()
    out = Path(run_dir) if run_dir else default_run_dir(spec)
    if init_from is not None and Path(init_from).resolve() == out.resolve():
        raise RunError(str(out), "--init-from names this run's own directory; use --resume to "
                       "continue it")
    ctx = init_distributed(spec.train.device, spec.distributed.backend)
    lock: list[ExclusiveLock] = []
    trainer: Trainer | None = None
    try:
        setup_logging(None, ctx.is_main)
        on_main(lambda: lock.append(_claim_for_training(RunDir(out), spec, resume, overwrite)))
        started = time.time()
        trainer = Trainer(spec, ctx, progress, run_dir=out)
        trainer.on_validation = on_validation
        spec = trainer.spec  # with the table sizes the dataset gave where the spec said "auto"
        # the data and the model are ready: only now is an overwritten run's content replaced
        on_main(lambda: _start_run_directory(RunDir(out), spec, replace=overwrite))
        setup_logging(out, ctx.is_main)
        log.info("run %s: spec %s (hash %s) on %d rank(s), %s", out, spec.name, spec_hash(spec),
                 ctx.world_size, ctx.device)
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restarts:
            log.warning("the elastic agent restarted the worker group (restart %d after a worker "
                        "failed)%s", restarts, ": resuming from the last checkpoint" if resume
                        else "; without --resume this run starts over from step 0")
        log.info("sharding plan:\n%s", _plan_summary(trainer))
        restored = trainer.restore() if resume else None
        if resume and restored is None:
            log.info("no checkpoint in %s yet: starting from step 0", out)
        if init_from is not None:
            if restored is not None:
                log.info("resumed from %s: its weights are kept, --init-from %s is not applied",
                         restored, init_from)
            else:
                trainer.warm_start(init_from)
        trainer.fit()
        metrics = _evaluate_and_write(trainer, out, started)
        # every rank leaves together: rank 0 writes the run directory (plots, TensorBoard images)
        # while the others would already tear their gloo connections down, which can abort a
        # peer still inside the process group
        barrier()
        return metrics
    finally:
        if trainer is not None:
            # a failed run flushes what it logged now and stops its writer thread, rather than
            # at the exit of a process that may go on (a notebook, a sweep, a test session)
            trainer.board.close()
        for held in lock:
            held.release()
        shutdown()


def _claim_for_training(run: RunDir, spec: Spec, resume: bool, overwrite: bool
                        ) -> ExclusiveLock:
    """Rank 0: lock the run directory and check that this run may write it."""
    out = run.path
    if out.exists() and not out.is_dir():
        raise RunError(str(out), "exists and is not a directory")
    lock = run.lock().acquire()
    try:
        has_run = run.holds_run()
        if resume and has_run:
            if not run.file(RunDir.SPEC).is_file():
                raise RunError(str(out), "holds checkpoints but no spec.toml, so nothing tells "
                               "which model they belong to; refusing to resume (use --overwrite "
                               "to start over)")
            _check_same_spec(run, spec)
        elif has_run and not overwrite:
            raise RunError(str(out), f"already holds a run ({run.describe()}); pass --resume "
                           "to continue it, --overwrite to replace it, or choose another "
                           "--run-dir")
    except BaseException:
        lock.release()
        raise
    return lock


def _start_run_directory(run: RunDir, spec: Spec, replace: bool) -> None:
    """Rank 0: clear an overwritten run's files and write this run's spec."""
    with writing(run.path):
        if replace:
            shutil.rmtree(run.checkpoints, ignore_errors=True)
            shutil.rmtree(run.tensorboard, ignore_errors=True)
            for name in RunDir.FILES:
                run.file(name).unlink(missing_ok=True)
        elif not run.holds_run():  # what an earlier attempt that trained nothing left
            if run.file(RunDir.LOG).is_file():
                run.file(RunDir.LOG).unlink()
            shutil.rmtree(run.tensorboard, ignore_errors=True)
        atomic_write_text(run.file(RunDir.SPEC), dump_toml(spec))


def evaluate_run(run_dir: str | Path, progress: bool = True,
                 scores: str | Path | None = None) -> dict[str, Any]:
    """Re-evaluate a run from its latest complete checkpoint, on any number of processes (the
    checkpoint is resharded): valid and test metrics, written to ``evaluation.json`` and printed
    beside the metrics the run recorded (``metrics.json`` is left as the run wrote it). With
    ``scores``, the test probabilities are also written there as Parquet, one row per test row in
    file order.

    Example:
        >>> evaluate_run("runs/quickstart-5d5ee98d")["test"]["auc"]
    """
    tune_process()
    run = RunDir(run_dir)
    out = run.path
    spec = run.spec()
    ctx = init_distributed(spec.train.device, spec.distributed.backend)
    lock: list[ExclusiveLock] = []
    try:
        setup_logging(None, ctx.is_main)
        on_main(lambda: lock.append(run.lock().acquire()))
        trainer = Trainer(spec, ctx, progress=False, run_dir=out)
        path = trainer.restore()
        if path is None:
            raise RunError(str(out), "no complete checkpoint to evaluate")
        results = {split: trainer.evaluate(split, keep_arrays=ctx.is_main)
                   for split in ("valid", "test")}
        metrics = _metrics_json(spec, results)
        metrics["checkpoint"] = path.name
        metrics["world_size"] = ctx.world_size
        if ctx.is_main:
            with writing(out):
                atomic_write_text(run.file(RunDir.EVALUATION),
                                  json.dumps(_json_safe(metrics), indent=2, sort_keys=True))
                if scores is not None:
                    write_scores(Path(scores), results["test"]["arrays"]["probs"])
            recorded = run.recorded_metrics()
            print(evaluation_table(metrics, recorded), file=sys.stderr)
            log.info("evaluated %s on %d process(es); wrote %s%s", path, ctx.world_size,
                     run.file(RunDir.EVALUATION), f" and {scores}" if scores else "")
        barrier()  # leave together (see run_training)
        return metrics
    finally:
        for held in lock:
            held.release()
        shutdown()


def write_scores(path: Path, probs: dict[str, np.ndarray]) -> None:
    """Per-row probabilities of each task as Parquet (``row``, then one column per task)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(next(iter(probs.values())))
    table = pa.table({"row": np.arange(n, dtype=np.int64),
                      **{t: np.asarray(p, dtype=np.float32) for t, p in probs.items()}})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def evaluation_table(metrics: dict[str, Any], recorded: dict[str, Any] | None) -> str:
    """This evaluation's test metrics beside those the run recorded when it finished."""
    keys = ["auc", "gauc", "logloss", "ne", "calibration", "ece"]
    if recorded is None or "test" not in recorded:
        return summary_table(metrics)
    rows = []
    for k in keys:
        now = float(metrics["test"].get(k, float("nan")))
        then = recorded["test"].get(k)
        then = float("nan") if then is None else float(then)
        rows.append([k, then, now, now - then])
    return format_table(["test metric", "recorded by the run", "this evaluation", "change"], rows)


def _evaluate_and_write(trainer: Trainer, out: Path, started: float) -> dict[str, Any]:
    spec, ctx = trainer.spec, trainer.ctx
    results = {split: trainer.evaluate(split, keep_arrays=ctx.is_main)
               for split in ("valid", "test")}
    metrics = _metrics_json(spec, results)
    metrics["sparsity"] = sparsity(trainer.built)  # a collective: every rank
    metrics["embedding_bytes_held"] = held_embedding_bytes(trainer.built)  # a collective too
    metrics["train_last_step"] = trainer.history.last_stats()
    metrics["timing"] = trainer.timing
    if spec.train.eval_cascade and "request" in trainer.train_loader.split.schema.groups:
        cascade = trainer.evaluate_cascade("test")  # a collective: every rank
        if cascade is not None:
            metrics["cascade"] = cascade
    if ctx.is_main:
        with writing(out):
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


def _check_same_spec(run: RunDir, spec: Spec) -> None:
    before = run.spec()
    if spec.features.unsized_tables():  # the run recorded the sizes its dataset gave
        from recsys.data.schema import DatasetManifest, with_dataset_sizes

        spec = with_dataset_sizes(spec, DatasetManifest.load(spec.data.path))
    if spec_hash(before) != spec_hash(spec):
        raise RunError(str(run.file(RunDir.SPEC)),
                       f"--resume: the run was started from spec hash {spec_hash(before)}, this "
                       f"spec is {spec_hash(spec)}; resume with the same spec (see recsys spec "
                       "show)")


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
    atomic_write_text(out / "metrics.json", json.dumps(_json_safe(metrics), indent=2,
                                                       sort_keys=True))
    atomic_write_text(out / "history.json", json.dumps(asdict(h), indent=2))
    atomic_write_text(out / "run.json", json.dumps({
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
    # last, so that TensorBoard gets every plot the run wrote
    trainer.board.final(trainer.step, metrics["tasks"], sorted(out.glob("*.png")))


def _rank_bytes(trainer: Trainer) -> list[int]:
    """Embedding weights and sparse-optimizer state held by each rank, from the sharding plan."""
    from recsys.train import planning
    from recsys.train.plan_report import plan_summary

    topology = planning.make_topology(trainer.ctx.world_size, trainer.ctx.device.type)
    summary = plan_summary(trainer.spec, trainer.plan, topology)
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
