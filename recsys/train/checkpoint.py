"""Writing and restoring the checkpoints of a sharded run with ``torch.distributed.checkpoint``: written atomically, checked
on read, last N kept, resumed exactly, and readable by any number of processes.

A checkpoint is a directory ``RUN/checkpoints/step-0000123`` holding

- the DCP shards of the model and of both optimizers (every rank writes its own shards; DCP
  reshards them on load, so a run trained on 2 processes evaluates, resumes and exports on 1, and
  the other way round);
- ``rank-R.pt`` per rank: the data position and RNG states;
- ``history.json``: the training curve up to this step (so a resumed run keeps it);
- ``COMPLETE.json``, written last: the size and CRC-32 of every other file.

It is written as ``step-0000123.partial`` and renamed by rank 0 only after every rank has
finished, so a run killed mid-write leaves no directory that looks complete. A directory whose
files do not match its ``COMPLETE.json`` (truncated, corrupted) is skipped by :func:`latest`,
which falls back to the previous complete checkpoint and says so. (The read side, shared with
export and evaluation, is in :mod:`recsys.run_dir`.)
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.optim import Optimizer

from recsys.errors import OutputError
from recsys.fsutil import atomic_write_text, output_error, writing
from recsys.run_dir import (  # the read side of the format; re-exported for the trainer
    COMPLETE,
    HISTORY,
    candidates,
    checkpoint_dir,
    crc32,
    latest,
    load_state,
    load_weights,
    rank_failures,
    read_history,
    verify,
    world_size_of,
)
from recsys.train.distributed import barrier

__all__ = ["COMPLETE", "HISTORY", "Position", "checkpoint_dir", "latest", "load", "load_weights",
           "read_history", "save", "verify", "world_size_of"]

log = logging.getLogger("recsys.train")

_FORMAT = 1


@dataclass(frozen=True)
class Position:
    """Where training stands: steps done overall, the epoch and step within it, and the early
    stopping state (best validation metric, evaluations without improvement)."""

    step: int
    epoch: int
    epoch_step: int
    best: float = -float("inf")
    bad_rounds: int = 0


def save(run_dir: str | Path, model: nn.Module, optimizer: Optimizer, position: Position,
         keep: int, history: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint collectively (every rank calls this), then keep the newest ``keep``."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{position.step:07d}"
    partial = root / f"step-{position.step:07d}.partial"
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank == 0:
        with writing(root):
            # leftovers of killed writers (the run directory's lock rules out a live one)
            for stale in root.glob("step-*.partial") if root.is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True)
    barrier()
    try:
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()},
                 checkpoint_id=str(partial))
        buffer = io.BytesIO()  # torch.save to a path reports a full disk as a RuntimeError
        torch.save(_local_state(position), buffer)
        with writing(partial):
            (partial / f"rank-{rank}.pt").write_bytes(buffer.getvalue())
    except (Exception, CheckpointException) as e:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise _write_error(e, partial) from None
    barrier()
    if rank == 0:
        with writing(partial):
            if history is not None:
                (partial / HISTORY).write_text(json.dumps(history))
            files = {f.name: [f.stat().st_size, crc32(f)] for f in sorted(partial.iterdir())
                     if f.is_file()}
            atomic_write_text(partial / COMPLETE, json.dumps(
                {"format": _FORMAT, "step": position.step, "world_size": world, "files": files},
                indent=1))
            if final.exists():  # a rerun reaching the same step again
                shutil.rmtree(final)
            partial.rename(final)
        done = [p for p in candidates(run_dir) if (p / COMPLETE).is_file()]
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(path: str | Path, model: nn.Module, optimizer: Optimizer) -> Position:
    """Restore model, optimizers, RNG states and the data position from ``path`` (collective).

    A checkpoint written by another number of processes is resharded by DCP; the data position
    is then rank 0's, and the RNG states stay as seeded (they were per rank).
    """
    path = Path(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # optimizer state is created lazily (Adam's moments at the first step): make it exist, so
    # that the template DCP loads into has every entry the checkpoint holds
    if hasattr(optimizer, "init_state"):
        optimizer.init_state()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    load_state(path, state)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    own = path / f"rank-{rank}.pt"
    local = torch.load(own if own.is_file() else path / "rank-0.pt", weights_only=True)
    if own.is_file():
        torch.set_rng_state(local["torch_rng"])
        np.random.set_state(("MT19937", local["numpy_rng"].numpy().astype(np.uint32),
                             *local["numpy_pos"]))
        random.setstate((local["python_rng"][0], tuple(local["python_rng"][1]), None))
    return Position(int(local["step"]), int(local["epoch"]), int(local["epoch_step"]),
                    float(local["best"]), int(local["bad_rounds"]))


def _write_error(e: BaseException, where: Path) -> BaseException:
    """A failed checkpoint write as one line when the disk is the cause (full, read-only)."""
    for cause in [e, *rank_failures(e)]:
        while cause is not None:
            if isinstance(cause, OSError) and (err := output_error(cause, where)) is not None:
                reason = err.message.removeprefix("cannot write: ")
                return OutputError(str(where.parent), f"cannot write a checkpoint: {reason} "
                                   "(the previous checkpoint is kept)")
            cause = cause.__cause__ or cause.__context__
    return e


def _local_state(position: Position) -> dict[str, Any]:
    # only tensors and plain containers, so that loading works with weights_only=True
    _, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, _ = random.getstate()
    return {
        "step": position.step, "epoch": position.epoch, "epoch_step": position.epoch_step,
        "best": position.best, "bad_rounds": position.bad_rounds,
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": [int(pos), int(has_gauss), float(cached)],
        "python_rng": [py_version, list(py_state)],
    }
