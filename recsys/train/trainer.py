"""Sharded training and evaluation of the ranker, in one process or many (torchrun).

The path: spec -> dataset (made on rank 0 if needed) -> loaders (each rank its share) -> ranker on
the ``meta`` device -> sharding plan (planned on rank 0, broadcast) -> DistributedModelParallel with
fused sparse optimizers in backward -> a TorchRec train pipeline (``recsys.train.pipeline``) ->
periodic validation, early stopping -> final evaluation on valid and test -> run directory.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel

from recsys.data.batch import Batch
from recsys.data.loader import ParquetLoader, per_rank_batch
from recsys.data.schema import TEACHER, DatasetManifest, with_dataset_sizes
from recsys.datasets import ensure_dataset, make_loader, open_split
from recsys.errors import DataError, RunError
from recsys.evaluate.accumulator import EvalAccumulator
from recsys.evaluate.cascade import prerank_metrics
from recsys.models.ranker import probabilities
from recsys.progress import progress_bar
from recsys.spec import HEADLINE_METRICS, Precision, Spec
from recsys.train import checkpoint
from recsys.train.checkpoint import Position
from recsys.train.distributed import (
    DistContext,
    all_max,
    barrier,
    on_main,
    seed_everything,
)
from recsys.train.pipeline import detached, make_pipeline, restart
from recsys.train.sharded import build_sharded_model
from recsys.train.tensorboard import open_board, optimizer_sparse_lr

log = logging.getLogger("recsys.train")

CASCADE_VIEW = "cascade"  # every candidate of every request, with the stage it reached

# Known, harmless notices from the pinned torchrec / fbgemm versions (data-parallel tables do
# train: their weights change, checked in tests/test_train.py).
warnings.filterwarnings("ignore", message=".*dense_embedding_codegen_lookup_function.*")
warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated.*")
warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)


@dataclass
class History:
    """What the training curve plots: loss per logged step and validation metrics."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    valid_steps: list[int] = field(default_factory=list)
    valid: list[dict[str, float]] = field(default_factory=list)
    # the objective's terms and diagnostics (group counts, code perplexity, ...) at the loss steps
    stats: dict[str, list[float]] = field(default_factory=dict)

    def last_stats(self) -> dict[str, float]:
        return {k: v[-1] for k, v in self.stats.items() if v}


class Trainer:
    """Trains and evaluates one spec's ranker on this process's share of the data.

    Example:
        >>> ctx = init_distributed(spec.train.device)
        >>> trainer = Trainer(spec, ctx)
        >>> history = trainer.fit()
        >>> test = trainer.evaluate("test")
    """

    def __init__(self, spec: Spec, ctx: DistContext, progress: bool = True,
                 run_dir: Path | None = None) -> None:
        self.spec, self.ctx = spec, ctx
        self.run_dir = run_dir  # where checkpoints go (None: no checkpoints)
        self.progress = progress and ctx.is_main
        seed_everything(spec.train.seed, ctx.rank)
        self.manifest = self._dataset()
        self.train_loader = make_loader(spec, self.manifest, "train", rank=ctx.rank,
                                        world_size=ctx.world_size)
        steps_per_epoch = len(self.train_loader)
        if steps_per_epoch == 0:
            raise DataError(spec.data.path, f"the train split has too few rows for one "
                            f"batch of {spec.train.batch_size} rows over {ctx.world_size} "
                            "rank(s) (train.batch_size)")
        self.total_steps = spec.train.epochs * steps_per_epoch
        if spec.train.max_steps:
            self.total_steps = min(self.total_steps, spec.train.max_steps)
        self.model = self._build_model()
        self.pipeline = make_pipeline(self.model, self.optimizer, ctx.device, ctx.world_size,
                                      self._training_forward())
        self.step = 0
        self.position = Position(0, 0, 0)
        self.history = History()
        self.timing: dict[str, float] = {}
        self.warm_started: dict[str, Any] | None = None  # what --init-from loaded, if used
        # called after each periodic validation with (step, valid train.headline_metric of the
        # first task); returning True stops training there (recsys tune prunes trials with it)
        self.on_validation: Callable[[int, float], bool] | None = None
        # TensorBoard events (rank 0 of a run with a directory); its file opens at the first
        # event, from the step that restore() may still move
        self.board = open_board(run_dir, ctx.is_main, lambda: self.position.step,
                                spec.train.batch_size)

    def restore(self, path: Path | None = None) -> Path | None:
        """Continue from ``path`` or the run's latest complete checkpoint (None if there is none).

        The checkpoint may come from another number of processes: DCP reshards the tables and
        optimizer states; training goes on from the same step (each rank's data order from there
        follows this world size). A collective: every rank calls it.
        """
        if path is None and self.run_dir is not None:
            run_dir = self.run_dir
            path = on_main(lambda: checkpoint.latest(run_dir))
        if path is None:
            return None
        self.position = checkpoint.load(path, self.model, self.optimizer)
        self.step = self.position.step
        self.optimizer.restart_at(self.step)
        saved = checkpoint.read_history(path)
        if saved is not None:
            self.history = History(**saved)
        written_by = checkpoint.world_size_of(path)
        if written_by is not None and written_by != self.ctx.world_size:
            log.warning("%s was written by %d process(es), this run has %d: the checkpoint is "
                        "resharded, and the data order from here differs from an uninterrupted "
                        "run", path, written_by, self.ctx.world_size)
        log.info("resumed from %s (step %d, epoch %d, step %d of it)", path, self.step,
                 self.position.epoch, self.position.epoch_step)
        return path

    def warm_start(self, source: str | Path) -> None:
        """Start from the weights of run ``source`` (tables matched by name, rows through the
        datasets' vocabularies; :mod:`recsys.train.warm_start`), logging what was loaded and what
        starts fresh. A collective: every rank calls it."""
        from recsys.train.warm_start import warm_start

        report = warm_start(self.model, self.spec, self.manifest, source)
        self.warm_started = report.as_dict()
        log.info("%s", report.summary())

    def save_checkpoint(self, epoch: int, epoch_step: int, best: float, bad_rounds: int) -> None:
        if self.run_dir is None:
            return
        if epoch_step == len(self.train_loader):  # an epoch's end is the next one's start
            epoch, epoch_step = epoch + 1, 0
        pos = Position(self.step, epoch, epoch_step, best, bad_rounds)
        path = checkpoint.save(self.run_dir, self.model, self.optimizer, pos,
                               self.spec.train.keep_checkpoints,
                               history=asdict(self.history) if self.ctx.is_main else None)
        log.info("checkpoint %s", path)

    # ---- construction -------------------------------------------------------------------------

    def _dataset(self) -> DatasetManifest:
        # one rank makes the data (generation or preparation); the others wait, then open it
        if self.ctx.is_main:
            manifest = ensure_dataset(self.spec, progress=self.progress)
        barrier()
        if not self.ctx.is_main:
            manifest = ensure_dataset(self.spec, progress=False)
        # sizes left "auto" come from the dataset: the run's spec.toml records them
        self.spec = with_dataset_sizes(self.spec, manifest)
        return manifest

    def _build_model(self) -> DistributedModelParallel:
        built = build_sharded_model(self.spec, self.ctx.device, self.ctx.world_size,
                                    self.total_steps)
        self.built = built
        self.plan, self.optimizer = built.plan, built.optimizer
        return built.dmp

    def _training_forward(self) -> Callable[[Batch], Any] | None:
        """The pipeline's forward under ``train.precision``: None (the model itself) for fp32;
        for bf16 the model's forward under ``torch.autocast(bfloat16)``.

        Only the forward is autocast: the pipeline runs the backward and the optimizer step after
        this returns, outside the context, as autocast asks. The embedding lookups are FBGEMM ops
        autocast leaves alone; the over-arch's matmuls run in bf16 with fp32 weights; the objective
        upcasts the logits, so every loss is computed in fp32. Evaluation (:meth:`_scored`) calls
        the model directly, in fp32, so the recorded metrics are those of the fp32 model that
        export and predict serve.
        """
        if self.spec.train.precision == Precision.FP32:
            return None
        model, device_type = self.model, self.ctx.device.type

        def forward(batch: Batch) -> Any:
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                return model(batch)

        return forward

    # ---- training -----------------------------------------------------------------------------

    def fit(self) -> History:
        spec = self.spec
        every = spec.train.eval_every_steps
        ckpt_every = spec.train.checkpoint_every_steps
        patience = spec.train.early_stopping_patience
        best, bad_rounds = self.position.best, self.position.bad_rounds
        bar = progress_bar(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not self.progress)
        start, first_step = time.perf_counter(), self.step
        stop = self.step >= self.total_steps
        epoch, epoch_step = self.position.epoch, self.position.epoch_step
        while not stop and epoch < spec.train.epochs:
            self.model.train()
            batches = self._limited(self.train_loader.epoch(epoch, start_step=epoch_step))
            restart(self.pipeline)
            while not stop:
                try:
                    out = self.pipeline.progress(batches)
                except StopIteration:
                    break
                self.step += 1
                epoch_step += 1
                if self.step % 10 == 0 or self.step == 1:
                    self.history.steps.append(self.step)
                    self.history.loss.append(float(out.loss))
                    self.history.lr.append(self.optimizer.dense_lr)
                    for key, value in out.stats.items():
                        self.history.stats.setdefault(key, []).append(float(value))
                    self.board.training(self.step, self.history.loss[-1],
                                        {k: float(v) for k, v in out.stats.items()},
                                        self.history.lr[-1], optimizer_sparse_lr(self.optimizer))
                    bar.set_postfix(loss=f"{float(out.loss):.4f}")
                bar.update()
                if every and self.step % every == 0 and self.step < self.total_steps:
                    valid = self.evaluate("valid")["metrics"]
                    self._record_valid(valid)
                    metric = self._headline(valid)  # higher is better (the sign is flipped)
                    if metric > best:
                        best, bad_rounds = metric, 0
                    else:
                        bad_rounds += 1
                        if patience and bad_rounds >= patience:
                            log.info("early stopping at step %d: valid %s %.4f did not beat "
                                     "%.4f for %d evaluations", self.step,
                                     spec.train.headline_metric, abs(metric), abs(best),
                                     patience)
                            stop = True
                    if self.on_validation is not None and self.on_validation(
                            self.step, abs(metric)):
                        log.info("stopped at step %d by the validation hook", self.step)
                        stop = True
                    self.model.train()
                if self.step >= self.total_steps:
                    stop = True
                if ckpt_every and self.step % ckpt_every == 0 and not stop:
                    self.save_checkpoint(epoch, epoch_step, best, bad_rounds)
            if not stop:
                epoch, epoch_step = epoch + 1, 0
        self.save_checkpoint(epoch, epoch_step, best, bad_rounds)  # the final state, for evaluate
        bar.close()
        elapsed = time.perf_counter() - start
        self.timing = {"train_seconds": elapsed, "steps": self.step - first_step,
                       "seconds_per_step": elapsed / max(self.step - first_step, 1)}
        rows = (self.step - first_step) * spec.train.batch_size
        log.info("trained %d steps in %.1f s (%.0f samples/s over %d rank(s))",
                 self.step - first_step, elapsed, rows / max(elapsed, 1e-9), self.ctx.world_size)
        last = self.history.last_stats()
        if last:
            log.info("last logged step's objective: %s",
                     ", ".join(f"{k} {v:.4g}" for k, v in sorted(last.items())))
        return self.history

    def _limited(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """Stop feeding the pipeline once max_steps batches have gone in overall."""
        fed = self.step
        for batch in batches:
            if fed >= self.total_steps:
                return
            fed += 1
            yield batch

    def _record_valid(self, valid: dict[str, Any]) -> None:
        self.history.valid_steps.append(self.step)
        self.history.valid.append({k: v for k, v in valid[self.spec.model.tasks[0]].items()
                                   if isinstance(v, float)})
        log.info("step %d valid: %s", self.step, _short(valid[self.spec.model.tasks[0]]))
        self.board.validation(self.step, valid)

    def _headline(self, metrics: dict[str, Any]) -> float:
        """train.headline_metric of the first task, signed so that higher is better."""
        name = self.spec.train.headline_metric
        value = float(metrics[self.spec.model.tasks[0]][name])
        return value if HEADLINE_METRICS[name] else -value

    # ---- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: str, keep_arrays: bool = False) -> dict[str, Any]:
        """Metrics of one split over every row of every rank (gathered, not averaged):
        ``{"metrics": {...}, "arrays": {...} or None}`` (arrays: the gathered predictions)."""
        loader = make_loader(self.spec, self.manifest, split, rank=self.ctx.rank,
                             world_size=self.ctx.world_size, training=False)
        acc = EvalAccumulator()
        for batch, logits in self._scored(loader):
            acc.add(probabilities(logits, self.spec.model.esmm), batch.labels, batch.groups,
                    oracle={t: batch.oracle[t] for t in self.spec.model.tasks
                            if t in batch.oracle} or None)
        metrics, arrays = acc.compute_with_arrays()
        return {"metrics": metrics, "arrays": arrays if keep_arrays else None}

    @torch.no_grad()
    def evaluate_cascade(self, split: str = "test", ks: tuple[int, ...] = (1, 3, 5, 10, 20)
                         ) -> dict[str, float] | None:
        """Pre-ranking metrics of this model on every candidate of ``split``'s requests (the
        cascade view): Recall@K / NDCG@K of its top-K against the ranker's top-K and against
        ``train.cascade_label`` (recsys.evaluate.cascade). None when the data has no cascade view
        with ranker scores. A collective: every rank calls it; the metrics are computed on rank 0
        (None elsewhere)."""
        if CASCADE_VIEW not in self.manifest.views or self.manifest.column(TEACHER) is None:
            return None
        label = self.spec.train.cascade_label
        if label not in self.spec.data.labels:
            raise DataError(self.spec.data.path, f"train.cascade_label '{label}' is not among "
                            f"data.labels {self.spec.data.labels}")
        split_rows = open_split(self.spec, self.manifest, split, view=CASCADE_VIEW)
        loader = ParquetLoader(split_rows, per_rank_batch(
                                   self.spec.train.eval_batch_size or self.spec.train.batch_size,
                                   self.ctx.world_size), rank=self.ctx.rank,
                               world_size=self.ctx.world_size, shuffle=False, drop_last=False)
        task = self.spec.model.tasks[0]
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("score", "request", "teacher",
                                                               "label")}
        for batch, logits in self._scored(loader):
            parts["score"].append(logits[task].float().cpu().numpy())
            parts["request"].append(batch.groups["request"].cpu().numpy())
            parts["teacher"].append(batch.teacher.cpu().numpy())
            parts["label"].append(batch.labels[label].cpu().numpy())
        local = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            if not self.ctx.is_main:
                return None
            local = {k: np.concatenate([g[k] for g in gathered]) for k in local}
        return prerank_metrics(local["score"], local["request"], local["teacher"],
                               local["label"], ks)

    def _scored(self, loader: ParquetLoader) -> Iterator[tuple[Batch, dict[str, torch.Tensor]]]:
        """The evaluation loop: every batch of ``loader`` on this rank with the model's logits.

        Sharded lookups are collectives, so every rank runs as many forwards as the largest
        (padding with its last batch, whose logits are not yielded). The pipeline rewrote the
        sharded modules' forward for pipelined input dists; plain forwards need the original
        back while this runs (in-flight training batches are kept)."""
        with detached(self.pipeline, self.model):
            self.model.eval()
            for batch, real in _padded(loader, all_max(len(loader))):
                batch = batch.to(self.ctx.device)
                _, out = self.model(batch)
                if real:
                    yield batch, out.logits


def _padded(loader: ParquetLoader, steps: int) -> Iterator[tuple[Batch, bool]]:
    """The loader's batches, then its last batch again (marked not real) up to ``steps``."""
    last = None
    n = 0
    for batch in loader.epoch(0):
        last = batch
        n += 1
        yield batch, True
    if last is None and n < steps:
        raise RunError("evaluation", "a rank has no rows of this split while others do (the "
                       "split has fewer rows than ranks); evaluate on fewer processes")
    for _ in range(steps - n):
        yield last, False  # type: ignore[misc]


def _short(m: dict[str, Any]) -> str:
    keys = ("auc", "gauc_impressions", "logloss", "calibration")
    return ", ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)

