"""What a sharding plan costs and where it puts things: per-table shards, per-rank weight and
optimizer bytes (the memory convention of each sparse optimizer), as a table for the log and as a
report for ``recsys plan``. The planning itself is :mod:`recsys.train.planning`.

Example:
    >>> result = plan_spec(spec, world_size=64, device_type="cuda")
    >>> print(plan_report(spec, result.plan, result.topology, result.estimated_storage))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from torchrec.distributed.planner.types import Storage, Topology
from torchrec.distributed.types import ParameterSharding, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from recsys.models.tables import embedding_bag_configs
from recsys.spec import SparseOptimizer, Spec
from recsys.tables import format_table
from recsys.train.planning import GIB, OPTIMIZER_STATE, WEIGHT_BYTES

DATA_TYPE_BYTES = {"FP32": 4, "FP16": 2}  # TorchRec's DataType names


def _shards(ps: ParameterSharding, cfg: EmbeddingBagConfig, world_size: int
            ) -> list[dict[str, int]]:
    if ps.sharding_spec is None:  # data_parallel: a full replica on every rank
        ranks = ps.ranks if ps.ranks else list(range(world_size))
        return [{"rank": r, "rows": cfg.num_embeddings, "cols": cfg.embedding_dim,
                 "row_offset": 0, "col_offset": 0} for r in ranks]
    return [{"rank": int(m.placement.rank()), "rows": int(m.shard_sizes[0]),  # type: ignore[union-attr]
             "cols": int(m.shard_sizes[1]), "row_offset": int(m.shard_offsets[0]),
             "col_offset": int(m.shard_offsets[1])}
            for m in ps.sharding_spec.shards]  # type: ignore[attr-defined]


def shard_state_bytes(rows: int, cols: int, optimizer: SparseOptimizer,
                      weight_bytes: int = WEIGHT_BYTES) -> tuple[int, int]:
    """(weight bytes, optimizer-state bytes) of one shard under ``optimizer``, its weights
    ``weight_bytes`` each (4: fp32, 2: fp16); the optimizer state is fp32 either way.

    Example:
        >>> shard_state_bytes(1000, 16, SparseOptimizer.ROWWISE_ADAGRAD)
        (64000, 4000)
        >>> shard_state_bytes(1000, 16, SparseOptimizer.ROWWISE_ADAGRAD, weight_bytes=2)
        (32000, 4000)
    """
    per_weight, per_row = OPTIMIZER_STATE[optimizer]
    return rows * cols * weight_bytes, (per_weight * rows * cols + per_row * rows) * WEIGHT_BYTES


def table_weight_bytes(cfg: Any) -> int:
    """Bytes per weight of a table config (its ``data_type``: fp32 4, fp16 2)."""
    return DATA_TYPE_BYTES.get(str(getattr(cfg.data_type, "name", cfg.data_type)).upper(),
                               WEIGHT_BYTES)


def memory_convention(optimizer: SparseOptimizer) -> str:
    """How the report counts memory, in one sentence (printed under it and kept in the JSON)."""
    per_weight, per_row = OPTIMIZER_STATE[optimizer]
    state = {(0, 0): "none", (0, 1): "one fp32 per row of each shard"}.get(
        (per_weight, per_row), f"{per_weight} fp32 per weight")
    return (f"weights are fp32: rows x cols x 4 bytes per shard (2 for fp16 tables); optimizer state "
            f"({optimizer.value}): {state}; a data-parallel table counts in full on every rank. "
            "The planner's estimates add input/output buffers and hold no optimizer state.")


def plan_summary(spec: Spec, plan: ShardingPlan, topology: Topology,
                 estimated_storage: Mapping[int, Storage] | None = None) -> dict[str, Any]:
    """The plan as a JSON-ready dict: per table, per rank and totals (bytes; see ``convention``).

    Example:
        >>> s = plan_summary(spec, result.plan, result.topology, result.estimated_storage)
        >>> s["totals"]["tables"], s["totals"]["rows"]             # specs/industrial.toml
        (39, 414720575)
    """
    cfgs = {c.name: c for c in embedding_bag_configs(spec.features)}
    ws = topology.world_size
    optimizer = spec.train.sparse_optimizer.name
    memory_kind = "hbm" if topology.compute_device == "cuda" else "ddr"
    ranks: list[dict[str, Any]] = [
        {"rank": r, "shards": 0, "parameters": 0, "weight_bytes": 0, "optimizer_bytes": 0,
         "capacity_bytes": int(getattr(topology.devices[r].storage, memory_kind))}
        for r in range(ws)]
    tables: list[dict[str, Any]] = []
    for module_path, module_plan in plan.plan.items():
        for name, ps in module_plan.items():  # type: ignore[attr-defined]
            cfg = cfgs[name]
            shards = _shards(ps, cfg, ws)
            for s in shards:
                weight, state = shard_state_bytes(s["rows"], s["cols"], optimizer,
                                                  table_weight_bytes(cfg))
                entry = ranks[s["rank"]]
                entry["shards"] += 1
                entry["parameters"] += s["rows"] * s["cols"]
                entry["weight_bytes"] += weight
                entry["optimizer_bytes"] += state
            tables.append({
                "name": name, "module": module_path, "rows": cfg.num_embeddings,
                "dim": cfg.embedding_dim, "features": list(cfg.feature_names),
                "sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                "ranks": sorted({s["rank"] for s in shards}), "shards": shards})
    for entry in ranks:
        entry["total_bytes"] = entry["weight_bytes"] + entry["optimizer_bytes"]
        est = (estimated_storage or {}).get(entry["rank"])
        entry["estimated_hbm_bytes"] = int(est.hbm) if est is not None else None
        entry["estimated_ddr_bytes"] = int(est.ddr) if est is not None else None
    logical = sum(t["rows"] * t["dim"] for t in tables)
    logical_bytes = sum(t["rows"] * t["dim"] * table_weight_bytes(cfgs[t["name"]])
                        for t in tables)
    return {
        "spec": spec.name,
        "world_size": ws,
        "local_world_size": topology.local_world_size,
        "device": topology.compute_device,
        "optimizer": optimizer.value,
        "convention": memory_convention(optimizer),
        "tables": tables,
        "ranks": ranks,
        "totals": {
            "tables": len(tables),
            "rows": sum(t["rows"] for t in tables),
            "parameters": logical,
            "weight_bytes": logical_bytes,  # one copy of every table
            "placed_weight_bytes": sum(r["weight_bytes"] for r in ranks),  # replicas included
            "placed_optimizer_bytes": sum(r["optimizer_bytes"] for r in ranks),
            "placed_total_bytes": sum(r["total_bytes"] for r in ranks),
            "max_rank_total_bytes": max(r["total_bytes"] for r in ranks),
            "sharding_types": dict(Counter(t["sharding_type"] for t in tables)),
        },
    }


def _rank_ranges(ranks: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    runs: list[tuple[int, int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], r)
        else:
            runs.append((r, r))
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _shard_sizes(shards: Sequence[Mapping[str, int]]) -> str:
    """Runs of equal shard shapes: '8 x 12,500,000x128' (data parallel: one replica per rank)."""
    runs: list[list[Any]] = []
    for s in shards:
        shape = (s["rows"], s["cols"])
        if runs and runs[-1][1] == shape:
            runs[-1][0] += 1
        else:
            runs.append([1, shape])
    return ", ".join(f"{n} x {rows:,}x{cols}" for n, (rows, cols) in runs)


def _gib(n: int | None) -> float | str:
    return "-" if n is None else n / GIB


def plan_report(spec: Spec, plan: ShardingPlan, topology: Topology,
                estimated_storage: Mapping[int, Storage] | None = None) -> str:
    """A readable report of the plan: per table, per rank (memory in GiB) and totals.

    Memory per rank follows :func:`memory_convention` (fp32 weights from the shard sizes, the
    spec's sparse optimizer state); the planner's own estimates appear beside it when given.

    Example:
        >>> print(plan_report(spec, result.plan, result.topology, result.estimated_storage))
        Sharding plan for 'industrial': 39 tables, 414,720,575 rows, ... on 64 cuda ranks ...
        | table | rows | dim | sharding | kernel | ranks | shards (rows x cols) |
        ...
    """
    s = plan_summary(spec, plan, topology, estimated_storage)
    t = s["totals"]
    memory_kind = "HBM" if s["device"] == "cuda" else "DDR"
    capacity = s["ranks"][0]["capacity_bytes"] / GIB
    head = (f"Sharding plan for '{s['spec']}': {t['tables']} tables, {t['rows']:,} rows, "
            f"{t['parameters']:,} parameters ({t['weight_bytes'] / GIB:,.2f} GiB fp32) on "
            f"{s['world_size']} {s['device']} ranks ({s['local_world_size']} per host, "
            f"{capacity:,.1f} GiB {memory_kind} each)")
    table_rows = [[tb["name"], tb["rows"], tb["dim"], tb["sharding_type"], tb["compute_kernel"],
                   _rank_ranges(tb["ranks"]), _shard_sizes(tb["shards"])]
                  for tb in sorted(s["tables"], key=lambda x: -x["rows"] * x["dim"])]
    tables = format_table(["table", "rows", "dim", "sharding", "kernel", "ranks",
                           "shards (rows x cols)"], table_rows)
    est_headers = ["planner HBM GiB", "planner DDR GiB"] if s["device"] == "cuda" \
        else ["planner DDR GiB"]
    rank_rows = []
    for r in s["ranks"]:
        est = [_gib(r["estimated_hbm_bytes"]), _gib(r["estimated_ddr_bytes"])] \
            if s["device"] == "cuda" else [_gib(r["estimated_ddr_bytes"])]
        fill = 100.0 * r["total_bytes"] / r["capacity_bytes"] if r["capacity_bytes"] else 0.0
        rank_rows.append([r["rank"], r["shards"], r["parameters"], _gib(r["weight_bytes"]),
                          _gib(r["optimizer_bytes"]), _gib(r["total_bytes"]), round(fill, 1),
                          *est])
    per_rank = format_table(["rank", "shards", "parameters", "weights GiB", "optimizer GiB",
                             "total GiB", f"% of {memory_kind}", *est_headers], rank_rows)
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(t["sharding_types"].items()))
    totals = (f"totals: {t['tables']} tables ({kinds}); {t['rows']:,} rows; "
              f"{t['parameters']:,} parameters; {t['weight_bytes'] / GIB:,.2f} GiB of weights "
              f"({t['placed_weight_bytes'] / GIB:,.2f} GiB placed, replicas included) + "
              f"{t['placed_optimizer_bytes'] / GIB:,.2f} GiB optimizer state = "
              f"{t['placed_total_bytes'] / GIB:,.2f} GiB; fullest rank "
              f"{t['max_rank_total_bytes'] / GIB:,.2f} GiB")
    return "\n\n".join([head, tables, per_rank, totals, f"memory convention: {s['convention']}"])
