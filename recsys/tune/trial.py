"""One trial's training: ``recsys train`` of the trial's spec in its own run directory, reporting
each periodic validation metric to the study (which may prune it), in this process or in a fresh
worker process.

A worker is ``python -m recsys.tune.trial`` (a fresh interpreter: its own torch process group,
and a crash or a kill takes only the trial with it). It reads its job (the spec, the run
directory, the metric) as one JSON line on stdin and talks to the study's thread in JSON lines:
``{"valid": [step, value]}`` after each periodic validation, answered with ``true`` (prune) or
``false``, then ``{"done": value}``, ``{"pruned": step}`` or ``{"error": message}``. Everything
else it writes goes to the trial's log file.

Example:
    >>> value = train_in_worker(spec, Path("studies/s/trials/0003"), "auc",
    ...                         report=lambda step, value: False,
    ...                         log_path=Path("studies/s/trials/0003.log"))
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from recsys.errors import RecsysError
from recsys.spec import Spec, spec_to_dict, validate_spec

__all__ = ["Pruned", "ReportFn", "TrialFailed", "train_in_process", "train_in_worker"]

# (step, valid metric) -> whether the study prunes the trial there
ReportFn = Callable[[int, float], bool]


class TrialFailed(Exception):
    """A trial that could not give a value: its spec, a crash, a NaN metric (the message says)."""


class Pruned(Exception):  # noqa: N818 (a signal, as optuna.TrialPruned)
    """The study pruned the trial after the validation at ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        super().__init__(f"pruned at step {step}")


def train_in_process(spec: Spec, run_dir: Path, metric: str, report: ReportFn) -> float:
    """Train ``spec`` into ``run_dir`` here and return its final valid ``metric``; raises
    :class:`Pruned` when ``report`` asks to prune, TrialFailed for a NaN metric."""
    from recsys.train.run import run_training

    def hook(step: int, value: float) -> bool:
        if report(step, value):
            raise Pruned(step)  # stops at once: a pruned trial needs no final evaluation
        return False

    metrics = run_training(spec, run_dir, progress=False, overwrite=True, on_validation=hook)
    return final_value(metrics, metric)


def final_value(metrics: dict[str, Any], metric: str) -> float:
    """The trial's value: its final valid ``metric`` (never a test metric)."""
    value = metrics.get("valid", {}).get(metric)
    if value is None or not math.isfinite(float(value)):
        raise TrialFailed(f"the final valid {metric} is {value} (did the training diverge? "
                          "see the trial's train.log)")
    return float(value)


def train_in_worker(spec: Spec, run_dir: Path, metric: str, report: ReportFn, log_path: Path,
                    threads: int | None = None) -> float:
    """:func:`train_in_process` in a fresh worker process (``python -m recsys.tune.trial``; its
    output in ``log_path``); a worker that dies without a word (killed, out of memory, a segfault)
    is a TrialFailed."""
    # a subprocess, not multiprocessing: spawn would re-run an unguarded __main__ (python -m
    # recsys.cli is one) in every worker
    job = {"spec": spec_to_dict(spec), "run_dir": str(run_dir), "metric": metric,
           "threads": threads}
    with open(log_path, "ab") as log_file:
        worker = subprocess.Popen([sys.executable, "-m", "recsys.tune.trial"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                                  text=True, bufsize=1)
    assert worker.stdin is not None and worker.stdout is not None
    try:
        _send(worker.stdin, job)
        for line in worker.stdout:
            message = json.loads(line)
            if "valid" in message:
                _send(worker.stdin, bool(report(*message["valid"])))
            elif "done" in message:
                return float(message["done"])
            elif "pruned" in message:
                raise Pruned(message["pruned"])
            else:
                raise TrialFailed(message["error"])
        status = worker.wait()
        raise TrialFailed(f"the trial's process exited with status {status} before it "
                          f"finished (see {log_path})")
    finally:
        _stop(worker)


def _send(stream: IO[str], message: Any) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def _stop(worker: subprocess.Popen[str]) -> None:
    """Close the worker's pipes and wait for it (killed if it does not exit: the study stops)."""
    for stream in (worker.stdin, worker.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def worker_main() -> None:
    """The worker process: read the job from stdin, train, answer on the original stdout.

    The worker's own fd 1 is pointed at its stderr (the trial's log) first, so that nothing a
    library prints can corrupt the messages."""
    messages = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    job = json.loads(sys.stdin.readline())
    if job.get("threads"):
        import torch

        torch.set_num_threads(job["threads"])

    def report(step: int, value: float) -> bool:
        _send(messages, {"valid": [step, value]})
        return bool(json.loads(sys.stdin.readline()))

    run_dir = Path(job["run_dir"])
    try:
        spec = validate_spec(job["spec"], f"{run_dir}/spec.toml")
        outcome: dict[str, Any] = {"done": train_in_process(spec, run_dir, job["metric"], report)}
    except Pruned as e:
        outcome = {"pruned": e.step}
    except (TrialFailed, RecsysError) as e:
        outcome = {"error": str(e)}
    except Exception as e:  # a bug or a crash: the study records it and goes on
        traceback.print_exc()
        outcome = {"error": f"{type(e).__name__}: {e} (traceback in the trial's log)"}
    sys.stdout.flush()
    sys.stderr.flush()
    _send(messages, outcome)


if __name__ == "__main__":
    worker_main()
