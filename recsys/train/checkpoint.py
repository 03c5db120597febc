"""Checkpoints of a sharded run with ``torch.distributed.checkpoint``: written atomically, last N
kept, resumed exactly.

A checkpoint is a directory ``RUN/checkpoints/step-0000123`` holding the DCP shards of the model
and of both optimizers (every rank writes its own shards), plus ``rank-R.pt`` per rank with the
data position and RNG states. It is written as ``step-0000123.partial`` and renamed by rank 0 only
after every rank has finished, so a run killed mid-write leaves no directory that looks complete.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.optim import Optimizer

from recsys.train.distributed import barrier

_NAME = re.compile(r"^step-(\d{7})$")


@dataclass(frozen=True)
class Position:
    """Where training stands: steps done overall, the epoch and step within it, and the early
    stopping state (best validation metric, evaluations without improvement)."""

    step: int
    epoch: int
    epoch_step: int
    best: float = -float("inf")
    bad_rounds: int = 0


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (``.partial`` ones are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))
    return done[-1] if done else None


def save(run_dir: str | Path, model: nn.Module, optimizer: Optimizer, position: Position,
         keep: int) -> Path:
    """Write a checkpoint collectively (every rank calls this), then keep the newest ``keep``."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{position.step:07d}"
    partial = root / f"step-{position.step:07d}.partial"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    barrier()
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()},
             checkpoint_id=str(partial))
    torch.save(_local_state(position), partial / f"rank-{rank}.pt")
    barrier()
    if rank == 0:
        if final.exists():  # a rerun reaching the same step again
            shutil.rmtree(final)
        partial.rename(final)
        done = sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))
        for old in done[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def load(path: str | Path, model: nn.Module, optimizer: Optimizer) -> Position:
    """Restore model, optimizers, RNG states and the data position from ``path`` (collective)."""
    path = Path(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    own = path / f"rank-{rank}.pt"
    if not own.is_file():
        raise FileNotFoundError(f"{path}: no state for rank {rank} (was the checkpoint written "
                                "by a run with another number of processes?)")
    # optimizer state is created lazily (Adam's moments at the first step): make it exist, so
    # that the template DCP loads into has every entry the checkpoint holds
    if hasattr(optimizer, "init_state"):
        optimizer.init_state()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    local = torch.load(own, weights_only=True)
    torch.set_rng_state(local["torch_rng"])
    np.random.set_state(("MT19937", local["numpy_rng"].numpy().astype(np.uint32),
                         *local["numpy_pos"]))
    random.setstate((local["python_rng"][0], tuple(local["python_rng"][1]), None))
    return Position(int(local["step"]), int(local["epoch"]), int(local["epoch_step"]),
                    float(local["best"]), int(local["bad_rounds"]))


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
