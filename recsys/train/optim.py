"""Optimizers of a sharded model: fused sparse ones applied in backward, a keyed dense one, the
learning-rate schedule and gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recsys.optim.ftrl import FTRL, GroupFTRL
from recsys.spec import (
    DenseOptimizer,
    DenseOptimizerSpec,
    FTRLOptions,
    LRSchedule,
    SparseOptimizer,
    TrainSpec,
)
from recsys.train.planning import UNFUSED_SPARSE_OPTIMIZERS
from recsys.train.sharded_ftrl import FTRLSettings, ShardedGroupFTRL

# the parameters of the EmbeddingBagCollection's tables, as DistributedModelParallel names them
EMBEDDING_KEY = ".ebc.embedding_bags."

_SPARSE: dict[SparseOptimizer, type[torch.optim.Optimizer]] = {
    SparseOptimizer.SGD: torch.optim.SGD,
    SparseOptimizer.ADAGRAD: torch.optim.Adagrad,
    SparseOptimizer.ROWWISE_ADAGRAD: RowWiseAdagrad,
    SparseOptimizer.ADAM: torch.optim.Adam,
}


def attach_sparse_optimizer(embedding_params: Iterable[nn.Parameter], train: TrainSpec) -> None:
    """Mark the embedding tables for an optimizer applied in backward; the sharder turns it into
    FBGEMM's fused kernel (no embedding gradient is ever materialised).

    ``gftrl`` has no FBGEMM kernel: its model-parallel tables get a zero-learning-rate SGD (so that
    TorchRec shards them with the fused kernel) and :class:`ShardedGroupFTRL` replaces its update
    in backward; pass only those tables (data-parallel ones stay unmarked: :func:`build_optimizer`
    gives them a keyed GroupFTRL)."""
    opt = train.sparse_optimizer
    if opt.name in UNFUSED_SPARSE_OPTIMIZERS:
        apply_optimizer_in_backward(torch.optim.SGD, embedding_params, {"lr": 0.0})
        return
    if opt.name not in _SPARSE:
        raise ValueError(f"train.sparse_optimizer.name = '{opt.name}' has no fused kernel; "
                         f"choose one of {[o.value for o in _SPARSE]}")
    kwargs: dict[str, Any] = {"lr": opt.lr}
    if opt.name != SparseOptimizer.SGD:
        kwargs["eps"] = opt.eps
    if opt.weight_decay:
        kwargs["weight_decay"] = opt.weight_decay
    apply_optimizer_in_backward(_SPARSE[opt.name], embedding_params, kwargs)


def _ftrl_kwargs(lr: float, options: FTRLOptions, global_batch: int) -> dict[str, Any]:
    return {"lr": lr, "beta": options.beta, "l1": options.l1, "l2": options.l2,
            "initial_accumulator": options.initial_accumulator,
            "grad_scale": float(global_batch) if options.summed_loss else 1.0}


def _fused(params: list[Any]) -> dict[str, bool]:
    """``fused=True`` where torch has a fused kernel for every parameter (floating point, on cpu
    or cuda); otherwise torch's default."""
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict)
                                               else [group])]
    ok = bool(tensors) and all(t.is_floating_point() and t.device.type in ("cpu", "cuda")
                               for t in tensors)
    return {"fused": True} if ok else {}


def _dense_factory(opt: DenseOptimizerSpec, key: str, global_batch: int
                   ) -> Callable[[list[Any]], torch.optim.Optimizer]:
    wd = opt.weight_decay
    # one fused kernel per step instead of a few ops per parameter tensor (torch's default on CPU),
    # which is most of the optimizer's time for small models
    factories: dict[DenseOptimizer, Callable[[list[Any]], torch.optim.Optimizer]] = {
        DenseOptimizer.SGD: lambda p: torch.optim.SGD(p, lr=opt.lr, weight_decay=wd,
                                                      **_fused(p)),
        DenseOptimizer.ADAGRAD: lambda p: torch.optim.Adagrad(p, lr=opt.lr, weight_decay=wd,
                                                              **_fused(p)),
        DenseOptimizer.ADAM: lambda p: torch.optim.Adam(p, lr=opt.lr, weight_decay=wd,
                                                        **_fused(p)),
        DenseOptimizer.ADAMW: lambda p: torch.optim.AdamW(p, lr=opt.lr, weight_decay=wd,
                                                          **_fused(p)),
        DenseOptimizer.FTRL: lambda p: FTRL(p, **_ftrl_kwargs(opt.lr, opt.ftrl, global_batch)),
    }
    if opt.name not in factories:
        raise ValueError(f"{key}.name = '{opt.name}' is not available")
    return factories[opt.name]


def dense_optimizer(model: nn.Module, train: TrainSpec, global_batch: int = 1) -> KeyedOptimizer:
    """The dense optimizer over every parameter that no other optimizer owns."""
    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    return KeyedOptimizerWrapper(
        params, _dense_factory(train.dense_optimizer, "train.dense_optimizer", global_batch))


def build_optimizer(dmp: DistributedModelParallel, train: TrainSpec, total_steps: int,
                    interaction_weights: Sequence[nn.Parameter] = (),
                    global_batch: int = 1) -> TrainOptimizer:
    """All optimizers of a DistributedModelParallel model as one :class:`TrainOptimizer`.

    - ``sparse``: FBGEMM's fused optimizer of the sharded tables (if any);
    - ``embedding``: group-lasso FTRL over the model-parallel tables when the sparse optimizer is
      ``gftrl``, applied in backward to the touched rows (:class:`ShardedGroupFTRL`);
    - ``embedding_replicated``: group-lasso FTRL over the tables the spec pins to data_parallel
      (TorchRec's per-table slices of the batched weights, dense gradients);
    - ``interaction``: ``train.interaction_optimizer`` over ``interaction_weights`` (if set);
    - ``dense``: ``train.dense_optimizer`` over everything else (the learning-rate schedule and
      gradient clipping apply to this one).
    """
    owned: set[int] = set()
    parts: list[tuple[str, KeyedOptimizer]] = []
    gftrl = train.sparse_optimizer.name == SparseOptimizer.GFTRL
    if list(dmp.fused_optimizer.params) and not gftrl:  # gftrl's is a zero-lr SGD placeholder
        parts.append(("sparse", dmp.fused_optimizer))
    named = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    if gftrl:
        opt = train.sparse_optimizer
        kwargs = _ftrl_kwargs(opt.lr, opt.ftrl, global_batch)
        sharded = ShardedGroupFTRL(dmp, FTRLSettings(**kwargs))
        if sharded.params:
            parts.append(("embedding", sharded))
        replicated = {k: p for k, p in named.items() if EMBEDDING_KEY in k}
        if replicated:  # tables the spec pins to data_parallel
            parts.append(("embedding_replicated", KeyedOptimizerWrapper(
                replicated, lambda p: GroupFTRL(p, **kwargs))))
            owned |= {id(p) for p in replicated.values()}
    if train.interaction_optimizer is not None and interaction_weights:
        ids = {id(p) for p in interaction_weights}
        chosen = {k: p for k, p in named.items() if id(p) in ids}
        if len(chosen) != len(ids):
            raise RuntimeError(f"found {len(chosen)} of the {len(ids)} interaction weights "
                               "among the model's parameters")
        parts.append(("interaction", KeyedOptimizerWrapper(chosen, _dense_factory(
            train.interaction_optimizer, "train.interaction_optimizer", global_batch))))
        owned |= ids
    rest = {k: p for k, p in named.items() if id(p) not in owned}
    dense = KeyedOptimizerWrapper(
        rest, _dense_factory(train.dense_optimizer, "train.dense_optimizer", global_batch))
    parts.append(("dense", dense))
    return TrainOptimizer(parts, train, total_steps)


class TrainOptimizer(CombinedOptimizer):
    """The model's optimizers as one (see :func:`build_optimizer`), with the dense learning-rate
    schedule and gradient-norm clipping applied inside ``step`` (TrainPipelineSparseDist calls backward
    and step itself, so there is no other place to put them).

    Example:
        >>> opt = TrainOptimizer([("sparse", dmp.fused_optimizer), ("dense", dense)], spec.train,
        ...                      total_steps=1000)
    """

    def __init__(self, parts: list[tuple[str, KeyedOptimizer]], train: TrainSpec,
                 total_steps: int) -> None:
        super().__init__(parts)
        dense = dict(parts)["dense"]
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
