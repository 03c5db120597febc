"""A run directory: its paths, its spec, its checkpoints, and its trained model.

``recsys train`` writes one; ``evaluate``, ``export``, ``rvq encode`` and ``predict RUN_DIR`` read it,
all through :class:`RunDir`. Layout::

    RUN/spec.toml           the resolved spec the run was trained with
    RUN/run.json            what ran (steps, world size, versions), written at the end
    RUN/metrics.json        valid and test metrics at the end of training
    RUN/evaluation.json     the latest ``recsys evaluate``
    RUN/history.json, train.log, training_curve.png, calibration.png
    RUN/tb/                 TensorBoard event files, written while the run trains
    RUN/checkpoints/step-0000123/   torch.distributed.checkpoint shards + COMPLETE.json
    RUN/.lock               held by the one process that writes the directory

This module also holds the read side of the checkpoint format (finding the newest complete
checkpoint, verifying it, loading weights: DCP reshards any world size); the write side is
:mod:`recsys.train.checkpoint`.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from recsys.errors import RunError
from recsys.fsutil import ExclusiveLock
from recsys.models.ranker import Ranker, RankerConfig
from recsys.spec import Spec, load_run_spec

log = logging.getLogger("recsys.train")

_NAME = re.compile(r"^step-(\d{7})$")
COMPLETE = "COMPLETE.json"
HISTORY = "history.json"
_CHUNK = 1 << 22
# the state-dict prefix of the ranker inside a training checkpoint (DMP wraps a TrainWrapper)
MODEL_PREFIX = "model."


class RunDir:
    """One run directory (it need not exist yet).

    Example:
        >>> run = RunDir("runs/quickstart-demo")
        >>> run.spec().model.arch, run.latest_checkpoint().name
        ('dcn', 'step-0000195')
        >>> ranker, checkpoint = run.trained_ranker("cpu")
    """

    SPEC, RUN, METRICS, EVALUATION = "spec.toml", "run.json", "metrics.json", "evaluation.json"
    HISTORY, LOG, LOCK, TENSORBOARD = "history.json", "train.log", ".lock", "tb"
    # what a run writes besides checkpoints/ (an overwritten run's are removed)
    FILES = (SPEC, RUN, METRICS, HISTORY, LOG, "training_curve.png", "calibration.png",
             EVALUATION)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return checkpoint_dir(self.path)

    @property
    def tensorboard(self) -> Path:
        """The TensorBoard event files (``tensorboard --logdir RUN/tb``)."""
        return self.path / self.TENSORBOARD

    # ---- what it holds --------------------------------------------------------------------

    @cached_property
    def _spec(self) -> Spec:
        return load_run_spec(self.path)

    def spec(self) -> Spec:
        """The resolved spec it was trained with (RunError if there is no spec.toml)."""
        return self._spec

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (see :func:`latest`)."""
        return latest(self.path)

    def require_checkpoint(self, purpose: str) -> Path:
        """The newest complete checkpoint, or a RunError saying there is none to ``purpose``."""
        path = self.latest_checkpoint()
        if path is None:
            raise RunError(str(self.path), f"no complete checkpoint to {purpose}")
        return path

    def holds_run(self) -> bool:
        """Whether it holds something a run made worth keeping (checkpoints or metrics)."""
        ckpts = self.checkpoints
        return self.file(self.METRICS).is_file() or (
            ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir()))

    def describe(self) -> str:
        """What run it holds, for an error message (no checkpoint is read or verified)."""
        try:
            info = json.loads(self.file(self.RUN).read_text())
            return f"spec {info.get('spec')}, {info.get('steps')} steps, finished"
        except (OSError, ValueError):
            steps = sorted(p.name for p in self.checkpoints.glob("step-*")
                           if not p.name.endswith(".partial"))
            return f"unfinished, newest checkpoint {steps[-1]}" if steps else "unfinished"

    def recorded_metrics(self) -> dict[str, Any] | None:
        """The metrics.json the run wrote when it finished (None if absent or unreadable)."""
        try:
            return json.loads(self.file(self.METRICS).read_text())
        except (OSError, ValueError):
            return None

    def lock(self) -> ExclusiveLock:
        """The directory's writer lock (not yet acquired)."""
        return ExclusiveLock(self.file(self.LOCK), f"run directory {self.path}")

    # ---- its trained model ----------------------------------------------------------------

    def trained_ranker(self, device: str | torch.device = "cpu",
                       purpose: str = "load the trained model from") -> tuple[Ranker, Path]:
        """The run's ranker, unsharded on ``device`` in eval mode, with the weights of the latest
        complete checkpoint (written by any number of processes), and that checkpoint's path
        (a RunError saying there is none to ``purpose`` otherwise)."""
        path = self.require_checkpoint(purpose)
        ranker = Ranker(RankerConfig(self.spec(), device="cpu")).to(device)
        load_weights(path, ranker)
        return ranker.eval(), path

    def table_weight(self, table: str) -> tuple[torch.Tensor, Path]:
        """One embedding table's trained weight ``(rows, dim)`` from the latest checkpoint, read
        alone (no model is built; DCP assembles it from however many shards wrote it)."""
        tables = {t.name: t for t in self.spec().features.resolved_tables()}
        if table not in tables:
            raise RunError(str(self.path), f"the model has no embedding table '{table}' "
                           f"(tables: {', '.join(sorted(tables))})")
        path = self.require_checkpoint("read the embeddings from")
        t = tables[table]
        key = f"{MODEL_PREFIX}ebc.embedding_bags.{table}.weight"
        state = {"model": {key: torch.empty(t.num_embeddings, t.embedding_dim or 0)}}
        load_state(path, state)
        return state["model"][key], path


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def candidates(run_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run: ``.partial`` ones are ignored, and one whose files
    do not match its completion record (truncated, corrupted, half-deleted) is skipped with a
    warning that names it and the checkpoint used instead."""
    skipped: list[str] = []
    chosen = None
    for path in reversed(candidates(run_dir)):
        problem = verify(path)
        if problem is None:
            chosen = path
            break
        skipped.append(f"{path.name} ({problem})")
    if skipped:
        log.warning("skipping incomplete checkpoint(s) of %s: %s; %s", run_dir, "; ".join(skipped),
                    f"using {chosen.name}" if chosen else "no complete checkpoint is left")
    return chosen


def verify(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None if it is."""
    record_path = path / COMPLETE
    if not record_path.is_file():
        return f"no {COMPLETE}: the write did not finish"
    try:
        record = json.loads(record_path.read_text())
        files: dict[str, list[int]] = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{COMPLETE} is unreadable"
    for name, (size, crc) in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"{name} has {actual:,} bytes, {size:,} were written"
        if crc32(f) != crc:
            return f"{name} is corrupt (checksum mismatch)"
    return None


def world_size_of(path: Path) -> int | None:
    """The number of processes that wrote a checkpoint (None if unrecorded)."""
    try:
        return int(json.loads((path / COMPLETE).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_history(path: Path) -> dict[str, Any] | None:
    """The training curve saved with a checkpoint (None for checkpoints without one)."""
    f = path / HISTORY
    if not f.is_file():
        return None
    return json.loads(f.read_text())



def load_state(path: Path, state: dict[str, Any]) -> None:
    """``dcp.load`` into ``state`` in place; a checkpoint that does not fit (other tables, other
    layer sizes, unreadable shards) is one :class:`RunError` naming it, on every rank."""
    try:
        dcp.load(state, checkpoint_id=str(path))
    # DCP gathers every rank's failure into a CheckpointException (a BaseException); report the
    # first cause in one line
    except (Exception, CheckpointException) as e:
        raise RunError(str(path), f"cannot load this checkpoint into the model: {_cause(e)} "
                       "(was it written by a run of another spec?)") from None


def load_weights(path: Path, module: nn.Module, prefix: str = MODEL_PREFIX) -> None:
    """Load only the weights of ``module`` (an unsharded model) from a training checkpoint,
    whose state dict holds it under ``prefix`` (DistributedModelParallel's wrapper)."""
    state = {"model": {f"{prefix}{k}": v for k, v in module.state_dict().items()}}
    load_state(path, state)
    module.load_state_dict({k.removeprefix(prefix): v for k, v in state["model"].items()})



def rank_failures(e: BaseException) -> list[BaseException]:
    """The per-rank exceptions that DCP's CheckpointException gathers (``[e]`` for any other)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        return [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return [e]


def _cause(e: BaseException) -> str:
    e = rank_failures(e)[0]
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "") or type(e).__name__


def crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


