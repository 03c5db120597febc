"""Plots a run directory holds: the training curve and the reliability (calibration) diagram."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(size: tuple[float, float]) -> Figure:
    """A figure that only renders to files: no pyplot state, no display backend. matplotlib is
    imported here rather than at module load: it costs about a second of every training process's
    start, and only the process that writes the run directory's plots needs it."""
    from matplotlib.figure import Figure

    return Figure(figsize=size)


def training_curve(steps: Sequence[int], loss: Sequence[float], valid_steps: Sequence[int],
                   valid_auc: Sequence[float], path: str | Path, title: str = "") -> Path:
    """Training loss per step, and validation AUC where it was measured."""
    fig = _figure((7, 4))
    ax = fig.subplots()
    ax.plot(steps, loss, color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if valid_steps:
        ax2 = ax.twinx()
        ax2.plot(valid_steps, valid_auc, "o-", color="tab:orange", label="valid AUC")
        ax2.set_ylabel("valid AUC", color="tab:orange")
    ax.set_title(title or "training curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int = 10,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width probability bin: mean prediction, observed rate and row count."""
    idx = np.clip((probs * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    pred = np.bincount(idx, weights=probs, minlength=bins) / np.maximum(count, 1)
    rate = np.bincount(idx, weights=labels, minlength=bins) / np.maximum(count, 1)
    return pred, rate, count


def reliability_diagram(labels: np.ndarray, probs: dict[str, np.ndarray], path: str | Path,
                        bins: int = 10, title: str = "") -> Path:
    """Observed positive rate against mean prediction per bin, one line per predictor (e.g. the
    model and the oracle), with the diagonal of perfect calibration."""
    fig = _figure((5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for name, p in probs.items():
        pred, rate, count = reliability_bins(labels, p, bins)
        keep = count > 0
        ax.plot(pred[keep], rate[keep], "o-", label=name)
    ax.set_xlabel("mean prediction")
    ax.set_ylabel("observed rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(title or "reliability")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
