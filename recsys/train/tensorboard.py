"""TensorBoard events of a training run, written while it runs into ``RUN_DIR/tb/``.

One writer per run, on rank 0 only (every rank sees the same loss and metrics; one file avoids
duplicate points); other ranks, and runs without a directory, get :class:`NullBoard`, whose
methods do nothing. Tags:

- ``train/loss``, ``objective/<stat>`` (the objective's terms and diagnostics: ``loss/bce``,
  ``hgr/l0/groups``, ...), ``lr/dense``, ``lr/sparse`` and ``train/samples_per_second`` (global
  batch, training steps only) at the logged steps;
- ``valid/<task>/<metric>`` (and ``valid/oracle/<task>/<metric>``) at each periodic validation;
- ``final/valid/...`` and ``final/test/...`` at the last step, and the run's PNG plots as images
  ``plots/<name>``.

The writer opens at the first event rather than when the trainer is built: an overwritten run's
old ``tb/`` is cleared after the trainer exists, and ``restore()`` decides the step a resumed run
starts from. Training from step S (0 when not resumed), the new event file starts with
``purge_step = S + 1``, so TensorBoard hides what a crashed attempt wrote after its last checkpoint
(the points up to S were logged before that checkpoint was written, and are kept).
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from recsys.fsutil import writing
from recsys.run_dir import RunDir

log = logging.getLogger("recsys.train")

FLUSH_SECONDS = 10.0  # a live run shows up in TensorBoard within this long


class NullBoard:
    """The board of ranks other than 0 and of runs without a directory: writes nothing.

    Example:
        >>> board = NullBoard()
        >>> board.training(10, loss=0.5, stats={}, dense_lr=1e-3, sparse_lr=None)
    """

    def training(self, step: int, loss: float, stats: Mapping[str, float], dense_lr: float,
                 sparse_lr: float | None) -> None:
        """Scalars of one logged training step."""

    def validation(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Every numeric metric of every task of one periodic validation."""

    def final(self, step: int, metrics: Mapping[str, Mapping[str, Any]],
              images: Iterable[Path] = ()) -> None:
        """The end-of-run metrics (``{"valid": ..., "test": ...}``) and plots; then closes."""

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""


class RunBoard(NullBoard):
    """Rank 0's writer of a run's scalars and images into ``log_dir``.

    ``start_step`` is read when the first event is written: the step training (re)starts from.

    Example:
        >>> board = RunBoard(Path("runs/qs/tb"), start_step=lambda: 0, global_batch=2048)
        >>> board.training(1, loss=0.69, stats={"bce": 0.69}, dense_lr=1e-3, sparse_lr=0.05)
        >>> board.validation(100, {"click": {"auc": 0.71, "logloss": 0.52}})
        >>> board.final(200, {"valid": {...}, "test": {...}}, [Path("runs/qs/calibration.png")])
    """

    def __init__(self, log_dir: Path, start_step: Callable[[], int], global_batch: int,
                 flush_seconds: float = FLUSH_SECONDS) -> None:
        self.log_dir = Path(log_dir)
        self._start_step = start_step
        self._global_batch = global_batch
        self._flush_seconds = flush_seconds
        self._writer: Any = None  # torch.utils.tensorboard.SummaryWriter, once opened
        self._closed = False
        # throughput: (step, time) of the last log or the end of the last validation
        self._since: tuple[int, float] | None = None

    def training(self, step: int, loss: float, stats: Mapping[str, float], dense_lr: float,
                 sparse_lr: float | None) -> None:
        w = self._open()
        w.add_scalar("train/loss", loss, step)
        for key, value in sorted(stats.items()):
            w.add_scalar(f"objective/{key}", float(value), step)
        w.add_scalar("lr/dense", dense_lr, step)
        if sparse_lr is not None:
            w.add_scalar("lr/sparse", sparse_lr, step)
        now = time.perf_counter()
        if self._since is not None and step > self._since[0]:
            steps, seconds = step - self._since[0], now - self._since[1]
            w.add_scalar("train/samples_per_second",
                         steps * self._global_batch / max(seconds, 1e-9), step)
        self._since = (step, now)

    def validation(self, step: int, metrics: Mapping[str, Any]) -> None:
        w = self._open()
        for tag, value in _numeric_leaves(metrics, "valid"):
            w.add_scalar(tag, value, step)
        w.flush()
        # the next throughput point measures training only, not this evaluation
        self._since = (step, time.perf_counter())

    def final(self, step: int, metrics: Mapping[str, Mapping[str, Any]],
              images: Iterable[Path] = ()) -> None:
        w = self._open()
        for split, by_task in metrics.items():
            for tag, value in _numeric_leaves(by_task, f"final/{split}"):
                w.add_scalar(tag, value, step)
        for path in images:
            image = _read_png(path)
            w.add_image(f"plots/{path.stem}", image, step,
                        dataformats="HW" if image.ndim == 2 else "HWC")
        self.close()
        log.info("TensorBoard events in %s (tensorboard --logdir %s)", self.log_dir,
                 self.log_dir)

    def close(self) -> None:
        if self._writer is not None and not self._closed:
            with writing(self.log_dir):
                self._writer.close()
            atexit.unregister(self.close)
        self._closed = True

    def _open(self) -> Any:
        if self._closed:
            raise RuntimeError(f"the TensorBoard writer of {self.log_dir} is closed")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only here

            start = self._start_step()
            with writing(self.log_dir):
                # purge even from step 0: a directory that held an earlier attempt's events
                # (a run whose metrics.json outlived its checkpoints) shows only this run's
                self._writer = SummaryWriter(str(self.log_dir), flush_secs=self._flush_seconds,
                                             purge_step=start + 1)
            atexit.register(self.close)  # a run that fails still flushes what it logged
        return self._writer


def open_board(run_dir: Path | None, is_main: bool, start_step: Callable[[], int],
               global_batch: int) -> NullBoard:
    """The board of this process: a :class:`RunBoard` into ``run_dir/tb`` on rank 0 of a run
    with a directory, a :class:`NullBoard` otherwise.

    Example:
        >>> board = open_board(Path("runs/qs"), ctx.is_main, lambda: trainer.step, 2048)
    """
    if run_dir is None or not is_main:
        return NullBoard()
    return RunBoard(RunDir(run_dir).tensorboard, start_step, global_batch)


def optimizer_sparse_lr(optimizer: Any) -> float | None:
    """The embedding tables' learning rate: the first parameter group's ``lr`` of the combined
    optimizer's sparse part (``sparse``, or ``embedding*`` for group FTRL); None without one."""
    for key, part in getattr(optimizer, "optimizers", []):
        if key == "sparse" or key.startswith("embedding"):
            for group in part.param_groups:
                if "lr" in group:
                    return float(group["lr"])
    return None


def _numeric_leaves(tree: Mapping[str, Any], prefix: str) -> Iterable[tuple[str, float]]:
    """``(prefix/key/.../leaf, value)`` of every number in a nested dict of metrics (NaN kept:
    a metric undefined on this data shows as such; strings and arrays are not scalars)."""
    for key, value in tree.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            yield from _numeric_leaves(value, tag)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield tag, float(value)


def _read_png(path: Path) -> Any:
    """A PNG as an HWC (or HW, for greyscale) float array in [0, 1]."""
    import matplotlib.image as mpimg

    return mpimg.imread(path)
