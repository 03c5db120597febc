"""The ranker in plain PyTorch, the baseline of ``recsys bench train``: one ``nn.EmbeddingBag``
per table with dense gradients, the ranker's own over-arch, and ``torch.optim`` optimizers (what a
PyTorch user writes first). :func:`plain_state_from_sharded` maps the sharded model's weights onto
it one to one, so both sides can start from the same weights.

Example:
    >>> side = PlainSide.build(spec)
    >>> loss = side.step(batch)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from recsys.data.batch import Batch
from recsys.models.archs import AUX_LOSS, build_over_arch
from recsys.models.objective import ranker_loss
from recsys.models.tables import embedding_bag_configs, mean_pooled_features, over_arch_fields
from recsys.spec import (
    DenseOptimizer,
    SparseOptimizer,
    Spec,
    TrainSpec,
)
from recsys.sysinfo import tensor_bytes

PLAIN_SPARSE: dict[SparseOptimizer, type[torch.optim.Optimizer]] = {
    SparseOptimizer.SGD: torch.optim.SGD,
    SparseOptimizer.ADAGRAD: torch.optim.Adagrad,
    # torch.optim has no row-wise Adagrad: plain Adagrad keeps one accumulator per weight
    SparseOptimizer.ROWWISE_ADAGRAD: torch.optim.Adagrad,
    SparseOptimizer.ADAM: torch.optim.Adam,
}
PLAIN_DENSE: dict[DenseOptimizer, type[torch.optim.Optimizer]] = {
    DenseOptimizer.SGD: torch.optim.SGD,
    DenseOptimizer.ADAGRAD: torch.optim.Adagrad,
    DenseOptimizer.ADAM: torch.optim.Adam,
    DenseOptimizer.ADAMW: torch.optim.AdamW,
}


class PlainRanker(nn.Module):
    """The ranker of :mod:`recsys.models.ranker` in plain PyTorch: one ``nn.EmbeddingBag`` per
    table (dense gradients), then the ranker's own over-arch (dense arch, interaction
    arch, heads).

    The over-arch sits in ``over`` as in the ranker, and the tables live in ``embedding_bags`` as
    in TorchRec's EmbeddingBagCollection, so that weights map
    one to one (:func:`plain_state_from_sharded`). Pooled embeddings are concatenated in the
    collection's order (table by table, the features of a table in order).

    Args:
        spec: the spec whose features and model section to build.

    Example:
        >>> model = PlainRanker(spec)
        >>> logits = model(batch)               # {"click": (B,), ...}
    """

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.tasks = list(spec.model.tasks)
        self.esmm = spec.model.esmm
        configs = embedding_bag_configs(spec.features)
        mean = set(mean_pooled_features(spec.features))
        self.embedding_bags = nn.ModuleDict()
        for c in configs:
            # a table pools one way for all its features (the spec's table pooling)
            mode = "mean" if mean & set(c.feature_names) else "sum"
            bag = nn.EmbeddingBag(c.num_embeddings, c.embedding_dim, mode=mode)
            bound = math.sqrt(1.0 / c.num_embeddings)  # TorchRec's default table init
            nn.init.uniform_(bag.weight, -bound, bound)
            self.embedding_bags[c.name] = bag
        self._lookups = [(c.name, f) for c in configs for f in c.feature_names]
        # the very module the sharded ranker uses
        self.over = build_over_arch(spec.model, over_arch_fields(spec.features))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        kjt = batch.sparse
        keys = kjt.keys()
        # ids per feature and the start of each row's bag (what nn.EmbeddingBag takes)
        lengths = kjt.lengths().view(len(keys), -1).to(torch.int64)
        starts = torch.cumsum(lengths, dim=1) - lengths
        ids = torch.split(kjt.values(), lengths.sum(dim=1).tolist())
        index = {k: i for i, k in enumerate(keys)}
        parts = [self.embedding_bags[table](ids[index[f]], starts[index[f]])
                 for table, f in self._lookups]
        return self.over(torch.cat(parts, dim=1), batch.dense)


def check_plain_optimizers(train: TrainSpec) -> None:
    """ValueError unless the spec's optimizers exist on both sides (the plain side's children
    would otherwise fail on it, with a traceback, after the batches are written)."""
    s, d = train.sparse_optimizer, train.dense_optimizer
    if s.name not in PLAIN_SPARSE:
        raise ValueError(f"train.sparse_optimizer.name = '{s.name}' has no fused kernel; "
                         f"choose one of {[o.value for o in PLAIN_SPARSE]}")
    if d.name not in PLAIN_DENSE:
        raise ValueError(f"train.dense_optimizer.name = '{d.name}' is not available yet")


def plain_optimizers(model: PlainRanker, train: TrainSpec
                     ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """``(sparse, dense)`` torch.optim optimizers with the spec's names and hyper-parameters:
    the sparse one over the embedding weights, the dense one over every other parameter.

    Example:
        >>> sparse, dense = plain_optimizers(PlainRanker(spec), spec.train)
    """
    check_plain_optimizers(train)
    s, d = train.sparse_optimizer, train.dense_optimizer
    # the same keyword arguments as recsys.train.optim.attach_sparse_optimizer / dense_optimizer
    kwargs: dict[str, Any] = {"lr": s.lr}
    if s.name != SparseOptimizer.SGD:
        kwargs["eps"] = s.eps
    if s.weight_decay:
        kwargs["weight_decay"] = s.weight_decay
    sparse = PLAIN_SPARSE[s.name](list(model.embedding_bags.parameters()), **kwargs)
    tables = {id(p) for p in model.embedding_bags.parameters()}
    rest = [p for p in model.parameters() if id(p) not in tables]
    dense = PLAIN_DENSE[d.name](rest, lr=d.lr, weight_decay=d.weight_decay)
    return sparse, dense


@dataclass
class PlainSide:
    """The plain model and its optimizers; :meth:`step` is one training step.

    The dense gradient norm is clipped as the trainer's optimizer does (``train.grad_clip``); the
    learning-rate schedule is not applied (a few scalar writes a step; steps of a constant
    schedule without warm-up match the trainer's exactly).

    Example:
        >>> side = PlainSide.build(spec)
        >>> loss = side.step(batch)
    """

    model: PlainRanker
    sparse: torch.optim.Optimizer
    dense: torch.optim.Optimizer
    grad_clip: float | None = None

    @classmethod
    def build(cls, spec: Spec) -> PlainSide:
        model = PlainRanker(spec)
        model.train()
        sparse, dense = plain_optimizers(model, spec.train)
        return cls(model, sparse, dense, spec.train.grad_clip)

    def step(self, batch: Batch) -> torch.Tensor:
        self.sparse.zero_grad(set_to_none=True)
        self.dense.zero_grad(set_to_none=True)
        logits = self.model(batch)
        loss = ranker_loss(logits, batch.labels, self.model.tasks, self.model.esmm) + logits[AUX_LOSS]
        loss.backward()
        if self.grad_clip:
            params = [p for group in self.dense.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.sparse.step()
        self.dense.step()
        return loss.detach()

    def param_bytes(self) -> int:
        return tensor_bytes(self.model.state_dict())

    def optimizer_state_bytes(self) -> int:
        return tensor_bytes([dict(self.sparse.state), dict(self.dense.state)])

    def grad_bytes(self) -> int:
        return tensor_bytes([p.grad for p in self.model.parameters() if p.grad is not None])


def plain_state_from_sharded(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The sharded model's ``state_dict`` as a :class:`PlainRanker` state dict: keys without the
    wrapper's ``model.`` prefix and sharded tables assembled from their shards (every shard must
    be local: one process).

    Example:
        >>> plain.model.load_state_dict(plain_state_from_sharded(sharded.model.state_dict()))
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("model.").replace("ebc.embedding_bags.", "embedding_bags.")
        if isinstance(value, ShardedTensor):
            meta = value.metadata()
            full = torch.empty(meta.size, dtype=meta.tensor_properties.dtype)
            covered = 0
            for shard in value.local_shards():
                sl = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets,
                                                           shard.metadata.shard_sizes,
                                                           strict=True))
                full[sl] = shard.tensor.detach()
                covered += shard.tensor.numel()
            if covered != full.numel():
                raise ValueError(f"'{key}': only {covered} of {full.numel()} values are local; "
                                 "assemble the table in a one-process run")
            out[name] = full
        else:
            out[name] = value.detach().clone()
    return out
