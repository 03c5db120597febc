"""Sharding plans for a spec's embedding tables: constraints, topology, the TorchRec planner (the
report of a plan's shards and bytes is :mod:`recsys.train.plan_report`).

The planner sees the spec's EmbeddingBagCollection built on the ``meta`` device, so planning a
400M-row model for 64 GPUs allocates shapes only and runs on a laptop. The same constraints serve the
trainer, which plans under DistributedModelParallel with :func:`collective_plan_or_fail`.

Device rules (facts about the pinned torchrec and fbgemm-gpu-cpu versions):

* ``cpu`` (gloo): data_parallel, table_wise, column_wise and table_column_wise only. Row-wise types
  need reduce-scatter, which gloo lacks, so asking for one is an error and tables without a
  constraint never get one. Sharded tables use the ``fused`` kernel (FBGEMM TBE with the optimizer
  fused into the backward); data-parallel tables the ``dense`` kernel.
* ``cuda``: every type; sharded tables use ``fused`` and, where HBM runs short, ``fused_uvm_caching``.

TorchRec breaks ties between options of equal estimated cost in hash order, which varies with
``PYTHONHASHSEED``: two processes may call the same one-shard placement ``table_wise`` in one and
``column_wise`` in the other. Fix ``PYTHONHASHSEED`` for identical plans; under DMP rank 0 plans and
broadcasts, so the ranks always agree.

Example:
    >>> spec = load_spec("specs/industrial.toml")
    >>> result = plan_spec(spec, world_size=64, device_type="cuda")
    >>> result.topology.world_size
    64
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import nn
from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    ShardingOption,
    Stats,
    Storage,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from recsys.models.tables import build_ebc, embedding_bag_configs
from recsys.spec import ShardingType, SparseOptimizer, Spec

GIB = 1024**3
DEVICE_TYPES = ("cpu", "cuda")
# A typical training GPU (A100 / H100 80 GB); TorchRec's own default of 32 GB is a V100.
DEFAULT_HBM_GB = 80.0
# GPUs per host of a typical training node; table_row_wise and table_column_wise split within a host.
CUDA_LOCAL_WORLD_SIZE = 8
# Share of every rank's memory kept off-limits to embeddings: the dense model, its optimizer,
# activations and input batches. A fixed share, because the planner sees only the EBC (its
# heuristic reservation measures the dense part of the module it plans, which is nothing here).
RESERVED_FRACTION = 0.15
# Bytes per fp32 weight (and per optimizer-state value); fp16 tables take 2 per weight.
WEIGHT_BYTES = 4
# A column-wise shard asked for explicitly is at least this wide (FBGEMM needs multiples of 4).
MIN_COLUMN_SHARD_DIM = 8

ROW_WISE_TYPES = frozenset({ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE})
SHARDING_TYPES: dict[str, tuple[ShardingType, ...]] = {
    "cpu": tuple(t for t in ShardingType if t not in ROW_WISE_TYPES),
    "cuda": tuple(ShardingType),
}
_COLUMN_TYPES = frozenset({ShardingType.COLUMN_WISE, ShardingType.TABLE_COLUMN_WISE})
_SHARDED_KERNELS: dict[str, tuple[str, ...]] = {
    "cpu": (EmbeddingComputeKernel.FUSED.value,),
    "cuda": (EmbeddingComputeKernel.FUSED.value, EmbeddingComputeKernel.FUSED_UVM_CACHING.value),
}
_WHY_NOT: dict[str, str] = {
    "cpu": "row-wise pooled embeddings need reduce-scatter, which gloo lacks",
    "cuda": "",
}
# fp32 optimizer state per shard: (floats per weight, floats per row). Row-wise Adagrad keeps one
# accumulator per row; FTRL keeps z and n per weight.
OPTIMIZER_STATE: dict[SparseOptimizer, tuple[int, int]] = {
    SparseOptimizer.SGD: (0, 0),
    SparseOptimizer.ADAGRAD: (1, 0),
    SparseOptimizer.ROWWISE_ADAGRAD: (0, 1),
    SparseOptimizer.ADAM: (2, 0),
    SparseOptimizer.GFTRL: (2, 0),
}


# --------------------------------------------------------------------------------------------------
# constraints


# sparse optimizers without an FBGEMM kernel: their model-parallel tables take FBGEMM's fused
# lookup and recsys.train.sharded_ftrl updates the touched rows in backward. Group lasso couples
# the columns of a row, so their tables are never split by columns.
UNFUSED_SPARSE_OPTIMIZERS = frozenset({SparseOptimizer.GFTRL})


def data_parallel_tables(spec: Spec) -> frozenset[str]:
    """The tables the spec pins to data_parallel (``distributed.sharding`` lists only that type)."""
    return frozenset(s.table for s in spec.distributed.sharding
                     if set(s.types) == {ShardingType.DATA_PARALLEL})


def _check_device(device_type: str) -> None:
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type must be one of {', '.join(DEVICE_TYPES)}, "
                         f"got '{device_type}'")


def _names(types: Sequence[ShardingType]) -> str:
    return ", ".join(t.value for t in types)


def validate_constraints(spec: Spec, device_type: str) -> None:
    """Raise ``ValueError`` if the spec's sharding constraints cannot run on ``device_type``.

    A pure function of the spec and the device type: under DistributedModelParallel every rank calls
    it before planning and fails identically, with no collective that could hang.
    Every problem is reported at once, each naming the table and the types allowed.

    Args:
        spec: the validated spec (its tables are known to exist: ``Spec`` checks the names).
        device_type: ``"cpu"`` (gloo) or ``"cuda"``.

    Example:
        >>> validate_constraints(spec, "cpu")
        ValueError: spec 'x': sharding constraints cannot run on cpu:
          distributed.sharding[table=user_id].types: table 'user_id' asks for row_wise, ...
    """
    _check_device(device_type)
    allowed = SHARDING_TYPES[device_type]
    unfused = spec.train.sparse_optimizer.name in UNFUSED_SPARSE_OPTIMIZERS
    problems: list[str] = []
    seen: set[str] = set()
    for s in spec.distributed.sharding:
        key = f"distributed.sharding[table={s.table}].types"
        if s.table in seen:
            problems.append(f"distributed.sharding: table '{s.table}' is listed twice; "
                            "give all its types in one entry")
        seen.add(s.table)
        if not s.types:
            problems.append(f"{key}: table '{s.table}' lists no sharding type; give at least "
                            f"one of: {_names(allowed)}")
        columns = [t for t in s.types if t in _COLUMN_TYPES]
        if unfused and columns:
            problems.append(f"{key}: table '{s.table}' asks for {_names(columns)}, but "
                            f"train.sparse_optimizer.name = '{spec.train.sparse_optimizer.name}' "
                            "(group lasso) needs each row whole on one rank; use table_wise, "
                            "row_wise (cuda) or data_parallel")
        elif unfused and ShardingType.DATA_PARALLEL in s.types and len(set(s.types)) > 1:
            problems.append(f"{key}: table '{s.table}' mixes data_parallel with "
                            f"{_names([t for t in s.types if t != ShardingType.DATA_PARALLEL])}; "
                            f"with train.sparse_optimizer.name = "
                            f"'{spec.train.sparse_optimizer.name}' a table is either replicated "
                            "or sharded: list one or the other")
        bad = [t for t in s.types if t not in allowed]
        if bad:
            why = f" ({_WHY_NOT[device_type]})" if _WHY_NOT[device_type] else ""
            problems.append(f"{key}: table '{s.table}' asks for {_names(bad)}, which cannot run "
                            f"on {device_type}{why}; allowed on {device_type}: {_names(allowed)}")
    if problems:
        raise ValueError(f"spec '{spec.name}': sharding constraints cannot run on {device_type}:\n"
                         + "\n".join(f"  {p}" for p in problems))


def column_shard_dim(embedding_dim: int, world_size: int) -> int:
    """Width of the column shards of a table asked to be column-wise: the narrowest multiple of 4
    dividing ``embedding_dim`` that is at least ``MIN_COLUMN_SHARD_DIM`` and gives at most
    ``world_size`` shards (TorchRec's default, 128-column blocks, would leave a table of 128 or
    fewer columns in one piece, which is table-wise under another name).

    Example:
        >>> column_shard_dim(16, 2), column_shard_dim(128, 64), column_shard_dim(6, 2)
        (8, 8, 6)
    """
    lower = max(MIN_COLUMN_SHARD_DIM, math.ceil(embedding_dim / world_size))
    for d in range(lower, embedding_dim):
        if embedding_dim % d == 0 and d % 4 == 0:
            return d
    return embedding_dim


def _kernels(types: Sequence[ShardingType], device_type: str, unfused: bool = False) -> list[str]:
    kernels: list[str] = []
    if ShardingType.DATA_PARALLEL in types:
        kernels.append(EmbeddingComputeKernel.DENSE.value)
    if any(t != ShardingType.DATA_PARALLEL for t in types):
        # our FTRL update writes the shard's weights directly: no UVM cache may hold stale rows
        kernels.extend([EmbeddingComputeKernel.FUSED.value] if unfused
                       else _SHARDED_KERNELS[device_type])
    return kernels


def sharding_constraints(spec: Spec, device_type: str, world_size: int | None = None
                         ) -> dict[str, ParameterConstraints]:
    """TorchRec ``ParameterConstraints`` for every table of the spec's EmbeddingBagCollection.

    A table listed in ``distributed.sharding`` gets its types; every other table gets every
    sharded type the device can run (so on cpu the planner never picks a row-wise type), but not
    data_parallel: a data-parallel table becomes a dense parameter that the dense optimizer
    updates, not the spec's sparse optimizer, so it is used only where the spec asks for it. With a
    sparse optimizer that has no fused kernel (gftrl) no table is split by columns (group lasso
    needs whole rows; see recsys/train/sharded_ftrl.py). Kernels follow the
    types: ``dense`` for data_parallel, the device's fused kernels for the rest. With
    ``world_size``, a table that asks for a column-wise type is split into real column shards
    (:func:`column_shard_dim`). Each feature of a table counts as one lookup per sample: the
    spec records no list lengths, and these only steer the planner's speed estimates.

    Raises:
        ValueError: as :func:`validate_constraints`.

    Example:
        >>> c = sharding_constraints(spec, "cpu")
        >>> c["user_id"].sharding_types, c["user_id"].compute_kernels
        (['table_wise', 'column_wise', 'table_column_wise'], ['fused'])
    """
    validate_constraints(spec, device_type)
    listed = {s.table: tuple(s.types) for s in spec.distributed.sharding}
    out: dict[str, ParameterConstraints] = {}
    default = tuple(t for t in SHARDING_TYPES[device_type] if t != ShardingType.DATA_PARALLEL)
    unfused = spec.train.sparse_optimizer.name in UNFUSED_SPARSE_OPTIMIZERS
    if unfused or world_size == 1:
        # group lasso needs whole rows; on one rank, column shards only add lookups and permutes
        default = tuple(t for t in default if t not in _COLUMN_TYPES)
    for cfg in embedding_bag_configs(spec.features):
        types = listed.get(cfg.name, default)
        explicit_columns = cfg.name in listed and any(t in _COLUMN_TYPES for t in types)
        out[cfg.name] = ParameterConstraints(
            sharding_types=[t.value for t in types],
            compute_kernels=_kernels(types, device_type, unfused),
            min_partition=(column_shard_dim(cfg.embedding_dim, world_size)
                           if explicit_columns and world_size else None),
            pooling_factors=[1.0] * len(cfg.feature_names),
        )
    return out


# --------------------------------------------------------------------------------------------------
# topology and planner


def machine_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def make_topology(world_size: int, device_type: str, local_world_size: int | None = None,
                  hbm_gb: float | None = None, ddr_gb: float | None = None) -> Topology:
    """The cluster the planner plans for.

    Args:
        world_size: ranks in all.
        device_type: ``"cuda"`` or ``"cpu"``.
        local_world_size: ranks per host. Default on cuda: 8 when ``world_size`` is a multiple of
            8, else all ranks on one host; on cpu: all ranks on this machine (as gloo runs here).
        hbm_gb: GPU memory per rank in GiB (cuda only); default ``DEFAULT_HBM_GB`` (80).
        ddr_gb: host memory per rank in GiB. Default on cpu: this machine's memory shared by its
            ``local_world_size`` ranks; on cuda: TorchRec's default (128 GiB).

    Example:
        >>> make_topology(64, "cuda").devices[0].storage.hbm / GIB
        80.0
    """
    _check_device(device_type)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for name, value in (("local_world_size", local_world_size), ("hbm_gb", hbm_gb),
                        ("ddr_gb", ddr_gb)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if device_type == "cuda":
        default_local = CUDA_LOCAL_WORLD_SIZE if world_size % CUDA_LOCAL_WORLD_SIZE == 0 \
            else world_size
        local = local_world_size or default_local
        hbm: int | None = int((hbm_gb or DEFAULT_HBM_GB) * GIB)
        ddr = int(ddr_gb * GIB) if ddr_gb else None
    else:
        if hbm_gb is not None:
            raise ValueError("cpu ranks have no HBM: give ddr_gb (memory per rank) instead")
        local = local_world_size or world_size
        hbm = None
        ddr = int(ddr_gb * GIB) if ddr_gb else machine_memory_bytes() // local
    if world_size % local:
        raise ValueError(f"world_size {world_size} is not a multiple of local_world_size {local}")
    return TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=local, hbm_cap_bytes=hbm,
                      ddr_cap_bytes=ddr),
        kernel_config=KernelConfig(compute_device=device_type))


class PlanStorageStats(Stats):
    """Keeps the planner's per-rank storage estimate of its best plan (TorchRec's ``Stats`` hook;
    it replaces the planner's default log table, which this module's report supersedes)."""

    def __init__(self) -> None:
        self.per_rank: dict[int, Storage] = {}
        self.num_proposals = 0

    def log(self, sharding_plan: ShardingPlan, topology: Topology, batch_size: int,
            storage_reservation: Any, num_proposals: int, num_plans: int, run_time: float,
            best_plan: list[ShardingOption], constraints: Any = None, sharders: Any = None,
            enumerator: Any = None, debug: bool = False, debug_stats: Any = None) -> None:
        self.num_proposals = num_proposals
        if not sharding_plan.plan:  # no plan: the planner logs its last proposal, ranks set to -1
            return
        per_rank = {r: Storage(hbm=0, ddr=0) for r in range(topology.world_size)}
        for option in best_plan:
            for shard in option.shards:
                if shard.rank is not None and shard.rank >= 0 and shard.storage is not None:
                    per_rank[shard.rank] = per_rank[shard.rank] + shard.storage
        self.per_rank = per_rank


def make_planner(spec: Spec, topology: Topology, batch_size: int | None = None,
                 stats: Sequence[Stats] = ()) -> EmbeddingShardingPlanner:
    """An ``EmbeddingShardingPlanner`` with the spec's constraints for ``topology``.

    Args:
        batch_size: rows per rank per step, as TorchRec's planner counts; default the spec's
            global ``train.batch_size`` split over ``topology.world_size`` ranks.
        stats: planner ``Stats`` hooks (e.g. :class:`PlanStorageStats`); none by default, which
            also silences TorchRec's own plan table.

    Example:
        >>> planner = make_planner(spec, make_topology(2, "cpu"))
        >>> plan = planner.plan(build_ebc(spec.features), [EmbeddingBagCollectionSharder()])
    """
    constraints = sharding_constraints(spec, topology.compute_device, topology.world_size)
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size or max(spec.train.batch_size // topology.world_size, 1),
        storage_reservation=FixedPercentageStorageReservation(RESERVED_FRACTION),
        constraints=constraints, stats=list(stats), debug=False)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextmanager
def _quiet_planner_logs() -> Iterator[None]:
    # TorchRec warns "Sharding spec not found" for every data-parallel table, which has no shards
    # by design: one line per replicated table that tells the user nothing.
    root = logging.getLogger()
    drop = _DropMessages(("Sharding spec not found",))
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


# Errors the planner raises on impossible inputs (PlannerError: no plan fits; RuntimeError: no
# sharding type and kernel left for a table; ValueError / AssertionError: shapes it cannot split).
_PLANNER_ERRORS = (PlannerError, RuntimeError, ValueError, AssertionError)


@dataclass(frozen=True)
class PlanResult:
    """A sharding plan with what it was planned for and the planner's storage estimates.

    Attributes:
        plan: the ``ShardingPlan`` (module path ``""`` is the EmbeddingBagCollection).
        topology: the cluster it was planned for.
        seconds: wall time of ``planner.plan``.
        estimated_storage: the planner's per-rank estimate (weights and input/output buffers, in
            bytes of HBM and DDR); it holds no optimizer state, which the trainer adds later.
        num_proposals: proposals the planner evaluated.
    """

    plan: ShardingPlan
    topology: Topology
    seconds: float
    estimated_storage: dict[int, Storage] = field(default_factory=dict)
    num_proposals: int = 0


def plan_spec(spec: Spec, world_size: int, device_type: str, *, batch_size: int | None = None,
              local_world_size: int | None = None, hbm_gb: float | None = None,
              ddr_gb: float | None = None, fused_params: dict[str, Any] | None = None
              ) -> PlanResult:
    """Plan the spec's EmbeddingBagCollection (built on ``meta``) for ``world_size`` ranks.

    Args:
        spec: the validated spec.
        world_size, device_type, local_world_size, hbm_gb, ddr_gb: see :func:`make_topology`.
        batch_size: rows per rank per step; default ``train.batch_size / world_size``.
        fused_params: passed to ``EmbeddingBagCollectionSharder`` (the trainer's fused optimizer
            settings; they do not change the plan's shape).

    Raises:
        ValueError: constraints the device cannot run, a topology that makes no sense, or a plan
            the planner cannot find (e.g. not enough memory), naming the spec and what failed.

    Example:
        >>> r = plan_spec(spec, 64, "cuda")
        >>> r.plan.plan[""]["user_id"].sharding_type
        'table_row_wise'
    """
    constraints = sharding_constraints(spec, device_type, world_size)  # fails before any work
    topology = make_topology(world_size, device_type, local_world_size, hbm_gb, ddr_gb)
    stats = PlanStorageStats()
    planner = make_planner(spec, topology, batch_size, stats=[stats])
    module = build_ebc(spec.features, device="meta")
    sharders: list[ModuleSharder[nn.Module]] = [
        EmbeddingBagCollectionSharder(fused_params=fused_params)]  # type: ignore[list-item]
    start = time.perf_counter()
    try:
        with _quiet_planner_logs():
            plan = planner.plan(module, sharders)
    except _PLANNER_ERRORS as e:
        rows = sum(c.num_embeddings for c in embedding_bag_configs(spec.features))
        raise ValueError(f"spec '{spec.name}': planning {len(constraints)} tables ({rows:,} rows) "
                         f"for {world_size} {device_type} ranks failed "
                         f"({type(e).__name__}): {e}") from e
    return PlanResult(plan=plan, topology=topology, seconds=time.perf_counter() - start,
                      estimated_storage=stats.per_rank, num_proposals=stats.num_proposals)


def plan_sharding(spec: Spec, world_size: int, device_type: str, batch_size: int | None = None
                  ) -> ShardingPlan:
    """The sharding plan of the spec's EmbeddingBagCollection (see :func:`plan_spec`).

    Example:
        >>> plan = plan_sharding(spec, world_size=2, device_type="cpu")  # specs/quickstart.toml
        >>> plan.plan[""]["user_id"].sharding_type, plan.plan[""]["hour"].sharding_type
        ('table_wise', 'data_parallel')
    """
    return plan_spec(spec, world_size, device_type, batch_size=batch_size).plan


@dataclass(frozen=True)
class _PlanFailure:
    message: str


def collective_plan_or_fail(planner: EmbeddingShardingPlanner, module: nn.Module,
                            sharders: list[ModuleSharder[nn.Module]],
                            pg: dist.ProcessGroup | None = None) -> ShardingPlan:
    """Plan on rank 0 and broadcast the plan, or the planner's error, to every rank.

    ``planner.collective_plan`` runs ``planner.plan`` on rank 0 inside a broadcast: if planning
    raises there, rank 0 leaves with the error and every other rank waits in the broadcast forever.
    Two guards make all ranks fail together:

    1. *before* this call, every rank runs :func:`validate_constraints` (a pure function of the
       spec, so it raises identically everywhere without communicating); :func:`make_planner`
       does so too, so building the planner on every rank is enough;
    2. here, rank 0 catches planner errors and broadcasts them in place of a plan, and every rank
       raises the same ``ValueError``.

    Args:
        planner: from :func:`make_planner`, built on every rank.
        module: the model (or its EmbeddingBagCollection) on ``meta``.
        sharders: the sharders DMP will use.
        pg: the process group; default: the world.

    Example:
        >>> validate_constraints(spec, device_type)               # every rank, before collectives
        >>> planner = make_planner(spec, make_topology(world_size, device_type))
        >>> plan = collective_plan_or_fail(planner, model, sharders)
        >>> model = DistributedModelParallel(model, plan=plan, sharders=sharders)
    """
    group = pg if pg is not None else dist.group.WORLD
    if group is None:
        raise RuntimeError("collective_plan_or_fail needs an initialised process group")

    def plan_or_failure(m: nn.Module, s: list[ModuleSharder[nn.Module]]
                        ) -> ShardingPlan | _PlanFailure:
        try:
            with _quiet_planner_logs():
                return planner.plan(m, s)
        except _PLANNER_ERRORS as e:
            return _PlanFailure(f"{type(e).__name__}: {e}")

    result = invoke_on_rank_and_broadcast_result(group, 0, plan_or_failure, module, sharders)
    if isinstance(result, _PlanFailure):
        raise ValueError(f"sharding plan failed on rank 0 (every rank stops): {result.message}")
    return result
