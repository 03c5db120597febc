"""Optimizers of a sharded model: fused sparse ones applied in backward, a keyed dense one, the
learning-rate schedule and gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recsys.spec import DenseOptimizer, LRSchedule, SparseOptimizer, TrainSpec

_SPARSE: dict[SparseOptimizer, type[torch.optim.Optimizer]] = {
    SparseOptimizer.SGD: torch.optim.SGD,
    SparseOptimizer.ADAGRAD: torch.optim.Adagrad,
    SparseOptimizer.ROWWISE_ADAGRAD: RowWiseAdagrad,
    SparseOptimizer.ADAM: torch.optim.Adam,
}


def attach_sparse_optimizer(embedding_params: Iterable[nn.Parameter], train: TrainSpec) -> None:
    """Mark the embedding tables for an optimizer applied in backward; the sharder turns it into
    FBGEMM's fused kernel (no embedding gradient is ever materialised)."""
    opt = train.sparse_optimizer
    if opt.name not in _SPARSE:
        raise ValueError(f"train.sparse_optimizer.name = '{opt.name}' has no fused kernel; "
                         f"choose one of {[o.value for o in _SPARSE]}")
    kwargs: dict[str, Any] = {"lr": opt.lr}
    if opt.name != SparseOptimizer.SGD:
        kwargs["eps"] = opt.eps
    if opt.weight_decay:
        kwargs["weight_decay"] = opt.weight_decay
    apply_optimizer_in_backward(_SPARSE[opt.name], embedding_params, kwargs)


def dense_optimizer(model: nn.Module, train: TrainSpec) -> KeyedOptimizer:
    opt = train.dense_optimizer
    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    factories = {
        DenseOptimizer.SGD: lambda p: torch.optim.SGD(p, lr=opt.lr, weight_decay=opt.weight_decay),
        DenseOptimizer.ADAGRAD: lambda p: torch.optim.Adagrad(p, lr=opt.lr,
                                                               weight_decay=opt.weight_decay),
        DenseOptimizer.ADAM: lambda p: torch.optim.Adam(p, lr=opt.lr,
                                                         weight_decay=opt.weight_decay),
        DenseOptimizer.ADAMW: lambda p: torch.optim.AdamW(p, lr=opt.lr,
                                                           weight_decay=opt.weight_decay),
    }
    if opt.name not in factories:
        raise ValueError(f"train.dense_optimizer.name = '{opt.name}' is not available yet")
    return KeyedOptimizerWrapper(params, factories[opt.name])


class TrainOptimizer(CombinedOptimizer):
    """The fused sparse optimizer and the dense one as one, with the dense learning-rate schedule
    and gradient-norm clipping applied inside ``step`` (TrainPipelineSparseDist calls backward
    and step itself, so there is no other place to put them).

    Example:
        >>> opt = TrainOptimizer(dmp.fused_optimizer, dense, spec.train, total_steps=1000)
    """

    def __init__(self, fused: KeyedOptimizer, dense: KeyedOptimizer, train: TrainSpec,
                 total_steps: int) -> None:
        super().__init__([("sparse", fused), ("dense", dense)])
        self._dense = dense
        self._base_lr = train.dense_optimizer.lr
        self._train = train
        self._total = max(total_steps, 1)
        self.steps = 0
        self._clip_params = [p for group in dense.param_groups for p in group["params"]]
        self._set_lr()

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant, linear or cosine decay to 0."""
        t = self._train
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == LRSchedule.CONSTANT:
            return 1.0
        span = max(self._total - t.warmup_steps, 1)
        progress = min(max(step - t.warmup_steps, 0) / span, 1.0)
        if t.lr_schedule == LRSchedule.LINEAR:
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def _set_lr(self) -> None:
        for group in self._dense.param_groups:
            group["lr"] = self._base_lr * self.lr_factor(self.steps)

    def restart_at(self, step: int) -> None:
        """After a resume: the schedule continues from ``step``."""
        self.steps = step
        self._set_lr()

    def step(self, closure: Any = None) -> None:  # noqa: D102
        if self._train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self._clip_params, self._train.grad_clip)
        super().step(closure)
        self.steps += 1
        self._set_lr()

    @property
    def dense_lr(self) -> float:
        return float(self._dense.param_groups[0]["lr"])
