"""Group-lasso FTRL on model-parallel tables, applied in backward to the rows a batch touched.

FBGEMM has no FTRL kernel, and on CPU no kernel that hands back a row-sparse gradient
(``OptimType.NONE`` is CUDA-only). So the tables are sharded as usual (FBGEMM's fused lookup,
planned table-wise or row-wise) with a zero-learning-rate SGD as their in-backward optimizer, and
the lookup of each shard is routed through :class:`_FTRLLookup`: its forward is FBGEMM's, its
backward computes each touched row's gradient from the pooled-output gradient and the ids the shard
received, and applies :func:`recsys.optim.ftrl.group_ftrl_rows` to those rows at once, as FBGEMM's
fused optimizers do. The work per step is proportional to the ids in the batch, never to the table.

The FTRL state (``n`` and ``z``, one value per weight) lives beside each shard, and
:class:`ShardedGroupFTRL` exposes it as ShardedTensors laid out like the table, so DCP checkpoints
save it and reshard it across world sizes.

Column-wise shards are not offered: group lasso shrinks a row by the norm of its whole ``z`` row,
which column shards split across ranks (an exact update would need a collective per step inside
backward).

Gradient scale: TorchRec divides the embeddings' gradient by the world size in the backward
all-to-all, so a shard sees the gradient of the global-batch mean loss, as on one process.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torchrec.distributed.batched_embedding_kernel import BatchedFusedEmbeddingBag
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import get_unwrapped_module
from torchrec.optim.fused import FusedOptimizer

from recsys.optim.ftrl import group_ftrl_rows


@dataclass
class FTRLSettings:
    """The update's hyper-parameters (see :class:`recsys.optim.ftrl.GroupFTRL`)."""

    lr: float
    beta: float
    l1: float
    l2: float
    initial_accumulator: float
    grad_scale: float


class _ShardGroup:
    """One FBGEMM lookup module (the tables of one shard group on this rank) and its FTRL state.

    All tables of the group are viewed as one ``(rows, D)`` matrix when they share D and sit one
    after the other in FBGEMM's buffer (the usual case), so one update covers every table;
    otherwise the tables are updated one by one.
    """

    def __init__(self, kernel: BatchedFusedEmbeddingBag, settings: FTRLSettings) -> None:
        module = kernel.emb_module
        kinds = {t.compute_kernel for t in kernel.config.embedding_tables}
        if kinds != {EmbeddingComputeKernel.FUSED}:  # a UVM cache would hold stale rows
            raise ValueError(f"gftrl needs the fused kernel on device or host memory, got "
                             f"{sorted(k.value for k in kinds)}")
        if module.pooling_mode not in (PoolingMode.SUM, PoolingMode.MEAN):
            raise ValueError(f"gftrl supports sum and mean pooling, not {module.pooling_mode}")
        self.settings = settings
        self.mean = module.pooling_mode == PoolingMode.MEAN
        self.tables = list(kernel.config.embedding_tables)
        self.weights = module.split_embedding_weights()  # views of FBGEMM's buffer, (rows, D_t)
        dims = [w.shape[1] for w in self.weights]
        rows = [w.shape[0] for w in self.weights]
        self.feature_table = module.feature_table_map
        self.feature_dims = [dims[t] for t in module.feature_table_map]
        self.state_dtype = torch.float32
        device = self.weights[0].device if self.weights else torch.device("cpu")
        # each feature's first row in the group's row space (its table's offset), on the device
        # once, so that a step's row keys are one gather and one add
        table_base = torch.tensor(rows, dtype=torch.long).cumsum(0) - torch.tensor(rows)
        self.feature_base = table_base[torch.tensor(self.feature_table, dtype=torch.long)].to(device)
        init = settings.initial_accumulator
        uniform = len(set(dims)) == 1 and _contiguous(self.weights)
        if uniform:
            total = sum(rows)
            self.whole: torch.Tensor | None = _as_matrix(self.weights, total, dims[0])
            n = torch.full((total, dims[0]), init, dtype=self.state_dtype, device=device)
            z = torch.zeros(total, dims[0], dtype=self.state_dtype, device=device)
            self.n_whole, self.z_whole = n, z
            self.n = list(n.split(rows))
            self.z = list(z.split(rows))
        else:
            self.whole = None
            self.n = [torch.full(w.shape, init, dtype=self.state_dtype, device=device)
                      for w in self.weights]
            self.z = [torch.zeros(w.shape, dtype=self.state_dtype, device=device)
                      for w in self.weights]

    @torch.no_grad()
    def update(self, grad_out: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
               per_sample_weights: torch.Tensor | None) -> None:
        """Apply one step to the rows touched by ``indices`` given the pooled-output gradient
        ``grad_out`` (B, Σ_f D_f); ``offsets`` has F·B + 1 entries, feature-major."""
        num_features = len(self.feature_dims)
        bags = offsets.numel() - 1
        if bags == 0 or indices.numel() == 0:
            return
        batch = bags // num_features
        indices = indices.long()
        offsets = offsets.long()
        lengths = offsets[1:] - offsets[:-1]
        bag = torch.repeat_interleave(torch.arange(bags, device=offsets.device), lengths,
                                      output_size=indices.numel())
        feature, row_in_batch = bag // batch, bag % batch
        scale = None if per_sample_weights is None else per_sample_weights.to(self.state_dtype)
        if self.mean:
            inv = 1.0 / lengths.clamp_min(1).to(self.state_dtype)
            per_id = inv.index_select(0, bag)
            scale = per_id if scale is None else scale * per_id
        grad_out = grad_out.to(self.state_dtype)
        key = self.feature_base.index_select(0, feature) + indices
        s = self.settings
        if self.whole is not None:
            dim = self.feature_dims[0]
            # (nnz, D): one index_select of the (B·F, D) rows, 3-4x a two-tensor index
            g = grad_out.reshape(batch * num_features, dim).index_select(
                0, row_in_batch * num_features + feature)
            if scale is not None:
                g = g * scale[:, None]
            rows, inverse = torch.unique(key, return_inverse=True)
            summed = torch.zeros(rows.numel(), dim, dtype=g.dtype, device=g.device)
            summed.index_add_(0, inverse, g)
            group_ftrl_rows(self.whole, self.n_whole, self.z_whole, rows, summed * s.grad_scale,
                            lr=s.lr, beta=s.beta, l1=s.l1, l2=s.l2)
            return
        # mixed widths: feature by feature into per-table sums, then table by table
        col = 0
        per_table: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for f, dim in enumerate(self.feature_dims):
            lo, hi = int(offsets[f * batch]), int(offsets[(f + 1) * batch])
            g = grad_out[row_in_batch[lo:hi], col:col + dim]
            if scale is not None:
                g = g * scale[lo:hi, None]
            per_table.setdefault(self.feature_table[f], []).append((indices[lo:hi], g))
            col += dim
        for t, parts in per_table.items():
            ids = torch.cat([p[0] for p in parts])
            g = torch.cat([p[1] for p in parts])
            rows, inverse = torch.unique(ids, return_inverse=True)
            summed = torch.zeros(rows.numel(), g.shape[1], dtype=g.dtype, device=g.device)
            summed.index_add_(0, inverse, g)
            group_ftrl_rows(self.weights[t], self.n[t], self.z[t], rows, summed * s.grad_scale,
                            lr=s.lr, beta=s.beta, l1=s.l1, l2=s.l2)


def _contiguous(weights: list[torch.Tensor]) -> bool:
    """Whether the views follow one another in one buffer."""
    for a, b in zip(weights, weights[1:], strict=False):
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() or \
                a.storage_offset() + a.numel() != b.storage_offset():
            return False
    return all(w.is_contiguous() for w in weights)


def _as_matrix(weights: list[torch.Tensor], rows: int, dim: int) -> torch.Tensor:
    first = weights[0]
    return first.as_strided((rows, dim), (dim, 1), first.storage_offset())


class _FTRLLookup(torch.autograd.Function):
    """FBGEMM's pooled lookup forward; the backward updates the touched rows in place and returns
    no gradient (``anchor`` is a parameter that only makes autograd call this backward)."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, lookup: Callable[..., torch.Tensor],
                group: _ShardGroup, indices: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: torch.Tensor | None) -> torch.Tensor:
        ctx.group = group
        ctx.save_for_backward(indices, offsets,
                              per_sample_weights if per_sample_weights is not None else anchor)
        ctx.weighted = per_sample_weights is not None
        return lookup(indices=indices, offsets=offsets, per_sample_weights=per_sample_weights)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, ...]:
        indices, offsets, weights = ctx.saved_tensors
        ctx.group.update(grad_out, indices, offsets, weights if ctx.weighted else None)
        return (None,) * 6


def _route_through_ftrl(kernel: BatchedFusedEmbeddingBag, group: _ShardGroup) -> None:
    module = kernel.emb_module
    lookup = module.forward  # the bound FBGEMM forward

    def forward(indices: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if any(v is not None for v in kwargs.values()):
            raise NotImplementedError(f"gftrl tables do not support {sorted(kwargs)} "
                                      "(variable batch sizes per feature)")
        return _FTRLLookup.apply(module.placeholder_autograd_tensor, lookup, group, indices,
                                 offsets, per_sample_weights)

    module.forward = forward  # an instance attribute: nn.Module.__call__ finds it first


class ShardedGroupFTRL(FusedOptimizer):
    """Group-lasso FTRL over every model-parallel table of a DistributedModelParallel model,
    applied in backward (``step`` is a no-op, as for TorchRec's fused optimizers).

    Its state, ``n`` and ``z`` per table, is a pair of ShardedTensors with the table's sharding,
    keyed like the table's weight in the model's state dict, so that checkpoints save and reshard
    it. The tables must carry a zero-learning-rate SGD as their in-backward optimizer (see
    :func:`recsys.train.optim.attach_sparse_optimizer`), so that TorchRec shards them with
    FBGEMM's fused kernel.

    Example:
        >>> opt = ShardedGroupFTRL(dmp, FTRLSettings(lr=0.05, beta=1.0, l1=0.1, l2=0.0,
        ...                                          initial_accumulator=0.1, grad_scale=1.0))
        >>> sorted(opt.state_dict()["state"])[0]
        'model.ranker.ebc.embedding_bags.item_id.weight'
    """

    def __init__(self, model: nn.Module, settings: FTRLSettings) -> None:
        self.groups: list[_ShardGroup] = []
        shards: dict[str, list[tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        meta: dict[str, Any] = {}
        # keys without DistributedModelParallel's and DDP's own levels, as in the model's state
        # dict: the same on one process (no DDP) and on many
        for path, sebc in get_unwrapped_module(model).named_modules():
            if not isinstance(sebc, ShardedEmbeddingBagCollection):
                continue
            prefix = f"{path}.embedding_bags." if path else "embedding_bags."
            # the lookups are a plain list, not submodules (TorchRec keeps them out of
            # named_modules): reach the FBGEMM kernels through them
            kernels = [m for lookup in sebc._lookups for m in lookup.modules()
                       if isinstance(m, BatchedFusedEmbeddingBag)]
            for kernel in kernels:
                group = _ShardGroup(kernel, settings)
                _route_through_ftrl(kernel, group)
                self.groups.append(group)
                for t, table in enumerate(group.tables):
                    key = prefix + table.name + ".weight"
                    shards.setdefault(key, []).append(
                        (table.local_metadata, group.weights[t], group.n[t], group.z[t]))
                    meta[key] = table.global_metadata
        params: dict[str, Any] = {}
        state: dict[Any, Any] = {}
        for key, local in shards.items():
            weight = _sharded(meta[key], [(m, w) for m, w, _, _ in local], local[0][1].dtype)
            params[key] = weight
            state[weight] = {
                "n": _sharded(meta[key], [(m, n) for m, _, n, _ in local], torch.float32),
                "z": _sharded(meta[key], [(m, z) for m, _, _, z in local], torch.float32),
            }
        super().__init__(params, state, [{"params": list(params.values()),
                                          "lr": settings.lr}])

    def step(self, closure: Any = None) -> None:  # noqa: D102 - applied in backward
        pass

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: D102 - no gradients kept
        pass


def _sharded(global_meta: Any, local: list[tuple[Any, torch.Tensor]],
             dtype: torch.dtype) -> ShardedTensor:
    """A ShardedTensor laid out like the table (``global_meta``) over ``local`` shards."""
    meta = copy.deepcopy(global_meta)
    meta.tensor_properties.dtype = dtype
    meta.tensor_properties.requires_grad = False
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local_shards=[Shard(t, m) for m, t in local], sharded_tensor_metadata=meta)
