"""The ranker as TorchRec trains it: built on ``meta``, planned, wrapped in
DistributedModelParallel, with every optimizer in place. Shared by the trainer and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.types import ShardingPlan

from recsys.models.archs import arch_of
from recsys.models.ranker import Ranker, RankerConfig, TrainWrapper
from recsys.models.tables import embedding_bag_configs
from recsys.optim.ftrl import zero_fraction
from recsys.spec import Spec
from recsys.train import planning
from recsys.train.optim import (
    EMBEDDING_KEY,
    TrainOptimizer,
    attach_sparse_optimizer,
    build_optimizer,
)


@dataclass
class ShardedModel:
    """A DistributedModelParallel-wrapped :class:`TrainWrapper` and what goes with it."""

    dmp: DistributedModelParallel
    optimizer: TrainOptimizer
    plan: ShardingPlan
    interaction_weights: list[torch.nn.Parameter]  # PIN's W_l (replicated on every rank)


class _DataParallelBeyondOneRank(DefaultDataParallelWrapper):
    """TorchRec's DDP wrapping of the dense part, except on one process, where DDP would only add
    its hooks and an all-reduce with itself to every step (most of a small model's fixed cost).
    The state dict's keys are the same either way (DistributedModelParallel unwraps DDP)."""

    def wrap(self, dmp: DistributedModelParallel, env: Any, device: torch.device) -> None:
        if env.world_size == 1:
            dmp._dmp_wrapped_module.to(device)
            return
        super().wrap(dmp, env, device)


def build_sharded_model(spec: Spec, device: torch.device, world_size: int,
                        total_steps: int) -> ShardedModel:
    """Plan the spec's tables on rank 0 (broadcast to all), shard them, attach the optimizers.

    Must be called on every rank of the process group, with the same spec.

    Example:
        >>> built = build_sharded_model(spec, torch.device("cpu"), world_size=2, total_steps=100)
        >>> pipeline = make_pipeline(built.dmp, built.optimizer, device, world_size=2)
    """
    ranker = Ranker(RankerConfig(spec, device="meta"))
    ranker.over.to(device)
    interaction_weights = ranker.over.interaction_weights()
    wrapper = TrainWrapper(ranker, spec)
    tables = ranker.ebc.embedding_bags
    if spec.train.sparse_optimizer.name in planning.UNFUSED_SPARSE_OPTIMIZERS:
        replicated = planning.data_parallel_tables(spec)  # these keep a keyed optimizer
        attach_sparse_optimizer([m.weight for name, m in tables.items() if name not in replicated],
                                spec.train)
    else:
        attach_sparse_optimizer(ranker.ebc.parameters(), spec.train)
    # a pure function of the spec on every rank: every rank fails here together, instead of rank 0
    # failing inside collective_plan while the others wait for its broadcast
    planning.validate_constraints(spec, device.type)
    planner = planning.make_planner(spec, planning.make_topology(world_size, device.type))
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planning.collective_plan_or_fail(planner, wrapper, sharders)  # type: ignore[arg-type]
    # in archs with data-dependent routing (AdaEnsemble's experts and deeper layers see only the
    # rows routed to them) some parameters get no gradient in a step: DDP must look for unused
    # parameters (and the graph is not static); every other arch keeps TorchRec's faster
    # static-graph default
    dynamic = arch_of(spec.model).dynamic_graph
    wrapper_ddp = _DataParallelBeyondOneRank(static_graph=not dynamic,
                                             find_unused_parameters=dynamic)
    dmp = DistributedModelParallel(module=wrapper, device=device, plan=plan, sharders=sharders,
                                   data_parallel_wrapper=wrapper_ddp)  # type: ignore[arg-type]
    seed_tables(dmp, spec)
    optimizer = build_optimizer(dmp, spec.train, total_steps, interaction_weights,
                                global_batch=spec.train.batch_size)
    return ShardedModel(dmp, optimizer, plan, list(interaction_weights))


INIT_BLOCK_ROWS = 1 << 16  # rows drawn per seeded block of a table


@torch.no_grad()
def seed_tables(dmp: DistributedModelParallel, spec: Spec) -> None:
    """Initialise every table from (train.seed, table, block of rows) alone, whatever the world size
    and the shard a rank holds, so that a run on 1 process and on N start from the same weights.

    Each rank draws only the row blocks its shards overlap (work and memory follow the shard), with
    the table's own init range (TorchRec's default, uniform ±sqrt(1/num_embeddings)).

    Example:
        >>> seed_tables(built.dmp, spec)  # done by build_sharded_model
    """
    configs = {c.name: (i, c) for i, c in enumerate(embedding_bag_configs(spec.features))}
    for key, value in dmp.state_dict().items():
        if EMBEDDING_KEY not in key or not key.endswith(".weight"):
            continue
        index, cfg = configs[key.split(EMBEDDING_KEY)[1].removesuffix(".weight")]
        lo, hi = cfg.get_weight_init_min(), cfg.get_weight_init_max()
        if isinstance(value, ShardedTensor):
            shards = [(s.tensor, *s.metadata.shard_offsets) for s in value.local_shards()]
        else:
            shards = [(value, 0, 0)]
        for tensor, row0, col0 in shards:
            rows, cols = tensor.shape
            first, last = row0 // INIT_BLOCK_ROWS, (row0 + rows - 1) // INIT_BLOCK_ROWS
            for block in range(first, last + 1):
                start = block * INIT_BLOCK_ROWS
                size = min(INIT_BLOCK_ROWS, cfg.num_embeddings - start)
                seed = np.random.SeedSequence([spec.train.seed, index, block]).generate_state(1)
                g = torch.Generator().manual_seed(int(seed[0]))
                values = torch.empty(size, cfg.embedding_dim).uniform_(lo, hi, generator=g)
                a, b = max(start, row0), min(start + size, row0 + rows)
                tensor[a - row0:b - row0].copy_(values[a - start:b - start, col0:col0 + cols])


def sparsity(built: ShardedModel) -> dict[str, Any]:
    """The measurable outcome of FTRL feature and interaction selection: the fraction of embedding
    rows that are exactly zero (per table and over all tables) and of interaction weights that are
    zero. Tables whose local shards hold whole rows (data-parallel, table-wise) are counted, summed
    over ranks; column-split tables are listed under ``not_counted``. Call on every rank.

    Example:
        >>> sparsity(built)["embedding_rows_zero"]
        0.41
    """
    counts: dict[str, list[int]] = {}
    not_counted: list[str] = []
    replicated: set[str] = set()
    for key, value in built.dmp.state_dict().items():
        if EMBEDDING_KEY not in key or not key.endswith(".weight"):
            continue
        table = key.split(EMBEDDING_KEY)[1].removesuffix(".weight")
        if isinstance(value, ShardedTensor):
            width = value.size(1)
            shards = [s.tensor for s in value.local_shards()]
            if any(t.shape[1] != width for t in shards):
                not_counted.append(table)
                continue
        else:
            shards = [value]
            replicated.add(table)
        zeros = sum(int((t == 0).all(dim=1).sum()) for t in shards)
        counts[table] = [zeros, sum(t.shape[0] for t in shards)]
    names = sorted(counts)
    totals = torch.tensor([counts[n] for n in names], dtype=torch.int64).reshape(-1, 2)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # replicated tables count once: only rank 0 contributes them
        mask = torch.tensor([n not in replicated or dist.get_rank() == 0 for n in names])
        totals = totals * mask[:, None]
        dist.all_reduce(totals)
    per_table = {n: int(z) / max(int(t), 1) for n, (z, t) in zip(names, totals.tolist(), strict=True)}
    all_zero, all_rows = (int(v) for v in totals.sum(dim=0).tolist()) if names else (0, 0)
    return {
        "embedding_rows_zero": all_zero / all_rows if all_rows else None,
        "embedding_rows_zero_per_table": per_table,
        "not_counted": sorted(not_counted),
        "interaction_weights_zero": (zero_fraction(w.detach() for w in built.interaction_weights)
                                     if built.interaction_weights else None),
    }


def held_embedding_bytes(built: ShardedModel) -> list[dict[str, int]]:
    """The embedding weights and sparse-optimizer state each rank really holds (its local shards,
    or the whole table when replicated), gathered from every rank: a collective.

    Example:
        >>> held_embedding_bytes(built)
        [{'weight_bytes': 218103808, 'optimizer_bytes': 436207616}, {...}]
    """
    def local(tensor: Any) -> int:
        if isinstance(tensor, ShardedTensor):
            return sum(s.tensor.numel() * s.tensor.element_size() for s in tensor.local_shards())
        return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0

    def nested(value: Any) -> int:
        if isinstance(value, dict):
            return sum(nested(v) for v in value.values())
        return local(value)

    weights = sum(local(v) for k, v in built.dmp.state_dict().items()
                  if EMBEDDING_KEY in k and k.endswith(".weight"))
    state = built.optimizer.state_dict()["state"]
    optimizer = sum(nested(v) for k, v in state.items() if "embedding_bags." in k)
    mine = torch.tensor([weights, optimizer], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
    else:
        every = [mine]
    return [{"weight_bytes": int(t[0]), "optimizer_bytes": int(t[1])} for t in every]
