"""Sharding plans: constraints per device, known plans for small specs, the report's memory
arithmetic, and `recsys plan` on the industrial spec (meta device: shapes only)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingPlan

from recsys.cli import main
from recsys.errors import SpecError
from recsys.models.tables import build_ebc
from recsys.spec import ShardingType, SparseOptimizer, Spec, validate_spec
from recsys.sysinfo import peak_rss_bytes
from recsys.train.plan_report import _rank_ranges, plan_report, plan_summary
from recsys.train.planning import (
    GIB,
    PlanStorageStats,
    collective_plan_or_fail,
    column_shard_dim,
    make_planner,
    make_topology,
    plan_sharding,
    plan_spec,
    sharding_constraints,
    validate_constraints,
)

ROOT = Path(__file__).resolve().parents[1]
INDUSTRIAL = str(ROOT / "specs" / "industrial.toml")
# table -> (rows, dim) of the small spec
SMALL = {"user_id": (1000, 16), "item_id": (800, 16), "category": (40, 8), "hour": (24, 8)}


def small_spec(sharding: list[dict[str, Any]] | None = None,
               optimizer: str = "rowwise_adagrad") -> Spec:
    """Four tables (two 16-dim, two 8-dim), one shared by two features, and a dense feature."""
    fields = [
        {"name": "user_id", "side": "user", "kind": "sparse", "num_embeddings": 1000,
         "embedding_dim": 16},
        {"name": "item_id", "side": "item", "kind": "sparse", "num_embeddings": 800,
         "embedding_dim": 16},
        {"name": "item_category", "side": "item", "kind": "sparse", "table": "category"},
        {"name": "user_hist_categories", "side": "user", "kind": "multi_sparse",
         "table": "category", "pooling": "mean"},
        {"name": "hour", "side": "context", "kind": "sparse", "num_embeddings": 24},
        {"name": "item_price", "side": "item", "kind": "dense"},
    ]
    raw = {"name": "small", "data": {"source": "synthetic", "path": "unused"},
           "features": {"embedding_dim": 8,
                        "tables": [{"name": "category", "num_embeddings": 40}],
                        "fields": fields},
           "train": {"batch_size": 128, "sparse_optimizer": {"name": optimizer}},
           "distributed": {"world_size": 2, "sharding": sharding or []}}
    return validate_spec(raw, "small.toml")


def every(types: list[str]) -> list[dict[str, Any]]:
    return [{"table": t, "types": types} for t in SMALL]


# ---- constraints ---------------------------------------------------------------------------------

def test_table_wise_on_cpu_puts_each_table_whole_on_one_rank() -> None:
    plan = plan_sharding(small_spec(every(["table_wise"])), world_size=2, device_type="cpu")
    tables = plan.plan[""]
    assert set(tables) == set(SMALL)
    for name, (rows, dim) in SMALL.items():
        ps = tables[name]
        assert ps.sharding_type == "table_wise"
        assert ps.compute_kernel == "fused"  # sharded tables on cpu: FBGEMM TBE only
        shards = ps.sharding_spec.shards
        assert len(shards) == 1
        assert list(shards[0].shard_sizes) == [rows, dim]
        assert list(shards[0].shard_offsets) == [0, 0]
        assert shards[0].placement.rank() in {0, 1}


def test_column_wise_splits_a_16_dim_table_into_column_shards() -> None:
    spec = small_spec([{"table": "user_id", "types": ["column_wise"]}])
    ps = plan_sharding(spec, world_size=2, device_type="cpu").plan[""]["user_id"]
    assert ps.sharding_type == "column_wise"
    shards = sorted(ps.sharding_spec.shards, key=lambda m: m.shard_offsets[1])
    assert len(shards) > 1
    assert sum(m.shard_sizes[1] for m in shards) == 16
    assert all(m.shard_sizes[0] == 1000 for m in shards)  # every shard has every row
    assert [m.shard_offsets[1] for m in shards] == [0, *[m.shard_sizes[1] for m in shards][:-1]]
    assert {m.placement.rank() for m in shards} <= {0, 1}


@pytest.mark.parametrize("kind", ["row_wise", "table_row_wise"])
def test_row_wise_on_cpu_is_a_clear_error_naming_the_table(kind: str) -> None:
    spec = small_spec([{"table": "item_id", "types": ["table_wise", kind]}])
    for call in (lambda: validate_constraints(spec, "cpu"),
                 lambda: sharding_constraints(spec, "cpu"),
                 lambda: plan_sharding(spec, 2, "cpu")):
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert "'item_id'" in msg and kind in msg and "small" in msg
        assert "allowed on cpu: data_parallel, table_wise, column_wise, table_column_wise" in msg
    # a pure function of the spec: every rank raises the same message
    messages = set()
    for _ in range(2):
        with pytest.raises(ValueError) as err:
            validate_constraints(spec, "cpu")
        messages.add(str(err.value))
    assert len(messages) == 1


def test_row_wise_is_allowed_on_cuda() -> None:
    spec = small_spec([{"table": "user_id", "types": ["row_wise"]}])
    validate_constraints(spec, "cuda")
    ps = plan_sharding(spec, 2, "cuda").plan[""]["user_id"]
    assert ps.sharding_type == "row_wise"
    assert sum(m.shard_sizes[0] for m in ps.sharding_spec.shards) == 1000


def test_defaults_on_cpu_never_offer_row_wise_nor_data_parallel() -> None:
    """Unlisted tables are sharded (fused kernel, the spec's sparse optimizer); data_parallel
    (a dense table under the dense optimizer) only where the spec asks for it."""
    constraints = sharding_constraints(small_spec([{"table": "hour", "types": ["table_wise"]},
                                                   {"table": "category",
                                                    "types": ["data_parallel"]}]), "cpu")
    assert set(constraints) == set(SMALL)
    for name in ("user_id", "item_id"):
        c = constraints[name]
        assert set(c.sharding_types) == {"table_wise", "column_wise", "table_column_wise"}
        assert c.compute_kernels == ["fused"]
    assert constraints["category"].sharding_types == ["data_parallel"]
    assert constraints["category"].compute_kernels == ["dense"]
    assert constraints["hour"].sharding_types == ["table_wise"]
    assert constraints["hour"].compute_kernels == ["fused"]  # sharded on cpu: fused only
    assert constraints["category"].pooling_factors == [1.0, 1.0]  # two features share it
    cuda = sharding_constraints(small_spec(), "cuda")["user_id"]
    assert {"row_wise", "table_row_wise"} <= set(cuda.sharding_types)


def test_constraint_on_an_unknown_table_is_rejected_by_the_spec() -> None:
    with pytest.raises(SpecError) as err:
        small_spec([{"table": "no_such_table", "types": ["table_wise"]}])
    msg = str(err.value)
    assert "small.toml" in msg and "distributed.sharding" in msg
    assert "names table 'no_such_table', which is not a table of this spec" in msg
    assert "user_id" in msg  # the known tables are listed


def test_duplicate_and_empty_constraints_are_errors() -> None:
    spec = small_spec([{"table": "hour", "types": ["table_wise"]},
                       {"table": "hour", "types": ["data_parallel"]},
                       {"table": "user_id", "types": []}])
    with pytest.raises(ValueError, match="(?s)'hour' is listed twice.*'user_id' lists no"):
        validate_constraints(spec, "cuda")


def test_column_shard_dim() -> None:
    assert column_shard_dim(16, 2) == 8
    assert column_shard_dim(128, 64) == 8
    assert column_shard_dim(128, 2) == 64
    assert column_shard_dim(6, 2) == 6  # no multiple-of-4 divisor: one shard
    assert column_shard_dim(64, 1) == 64


# ---- topology and planner errors -----------------------------------------------------------------

def test_topology_defaults_and_errors() -> None:
    t = make_topology(64, "cuda")
    assert t.world_size == 64 and t.local_world_size == 8
    assert t.devices[0].storage.hbm == 80 * GIB
    assert make_topology(2, "cuda", hbm_gb=40).devices[1].storage.hbm == 40 * GIB
    cpu = make_topology(2, "cpu", ddr_gb=3)
    assert cpu.local_world_size == 2 and cpu.devices[0].storage.ddr == 3 * GIB
    assert cpu.devices[0].storage.hbm == 0
    with pytest.raises(ValueError, match="no HBM"):
        make_topology(2, "cpu", hbm_gb=80)
    with pytest.raises(ValueError, match="not a multiple of local_world_size"):
        make_topology(12, "cuda", local_world_size=8)
    with pytest.raises(ValueError, match="device_type"):
        make_topology(2, "tpu")


def test_planner_failure_is_a_value_error_naming_the_spec() -> None:
    with pytest.raises(ValueError, match=r"spec 'small': planning 4 tables .* 2 cpu ranks failed"):
        plan_spec(small_spec(every(["table_wise"])), 2, "cpu", ddr_gb=1e-6)


# ---- report --------------------------------------------------------------------------------------

def constructed_plan(spec: Spec) -> ShardingPlan:
    """A hand-made plan: each sharding type once, so the expected memory is known per shard."""
    ebc = build_ebc(spec.features)
    module_plan = construct_module_sharding_plan(
        ebc, {"user_id": column_wise(ranks=[0, 1]), "item_id": row_wise(),
              "category": data_parallel(), "hour": table_wise(rank=1)},
        local_size=2, world_size=2, device_type="cuda")
    return ShardingPlan(plan={"": module_plan})


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam", "sgd"])
def test_report_memory_is_rows_times_dim_times_4_per_shard(optimizer: str) -> None:
    spec = small_spec(optimizer=optimizer)
    plan = constructed_plan(spec)
    topology = make_topology(2, "cuda")
    summary = plan_summary(spec, plan, topology)
    # expected, from the shards' own sizes
    weights = {0: 0, 1: 0}
    rows_on = {0: 0, 1: 0}
    for name, ps in plan.plan[""].items():
        if ps.sharding_spec is None:  # data parallel: a replica on each rank
            rows, dim = SMALL[name]
            for r in (0, 1):
                weights[r] += rows * dim * 4
                rows_on[r] += rows
            continue
        for m in ps.sharding_spec.shards:
            weights[m.placement.rank()] += m.shard_sizes[0] * m.shard_sizes[1] * 4
            rows_on[m.placement.rank()] += m.shard_sizes[0]
    state = {"rowwise_adagrad": lambda r: rows_on[r] * 4, "adam": lambda r: 2 * weights[r],
             "sgd": lambda r: 0}[optimizer]
    for entry in summary["ranks"]:
        r = entry["rank"]
        assert entry["weight_bytes"] == weights[r]
        assert entry["optimizer_bytes"] == state(r)
        assert entry["total_bytes"] == weights[r] + state(r)
    # by hand: user_id 1000x16 column-split in two 8-column halves; item_id 800 rows split
    # 400/400; category 40x8 on both; hour 24x8 on rank 1
    assert weights[0] == (1000 * 8 + 400 * 16 + 40 * 8) * 4
    assert weights[1] == (1000 * 8 + 400 * 16 + 40 * 8 + 24 * 8) * 4
    totals = summary["totals"]
    assert totals["rows"] == sum(rows for rows, _ in SMALL.values())
    assert totals["parameters"] == sum(rows * dim for rows, dim in SMALL.values())
    assert totals["placed_weight_bytes"] == weights[0] + weights[1]
    assert totals["placed_weight_bytes"] - totals["weight_bytes"] == 40 * 8 * 4  # one replica
    assert summary["optimizer"] == optimizer and "fp32" in summary["convention"]
    json.dumps(summary)  # machine-readable as it stands

    text = plan_report(spec, plan, topology)
    assert "| user_id " in text and "column_wise" in text and "2 x 1,000x8" in text
    assert "memory convention: weights are fp32" in text
    assert "1,864 rows" in text


def test_report_shows_the_planner_estimates_when_given() -> None:
    spec = small_spec(every(["table_wise"]))
    result = plan_spec(spec, 2, "cpu")
    assert set(result.estimated_storage) == {0, 1}
    summary = plan_summary(spec, result.plan, result.topology, result.estimated_storage)
    for entry in summary["ranks"]:
        # the planner's estimate covers at least the weights (it adds I/O buffers)
        assert entry["estimated_ddr_bytes"] >= entry["weight_bytes"]
    assert "planner DDR GiB" in plan_report(spec, result.plan, result.topology,
                                            result.estimated_storage)


def test_rank_ranges() -> None:
    assert _rank_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert _rank_ranges([3]) == "3"


# ---- collective planning -------------------------------------------------------------------------

def test_collective_plan_or_fail_broadcasts_the_plan_or_the_error(tmp_path: Path) -> None:
    spec = small_spec(every(["table_wise"]))
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        sharders = [EmbeddingBagCollectionSharder()]
        planner = make_planner(spec, make_topology(1, "cpu"), stats=[PlanStorageStats()])
        plan = collective_plan_or_fail(planner, build_ebc(spec.features), sharders)
        assert set(plan.plan[""]) == set(SMALL)
        tiny = make_planner(spec, make_topology(1, "cpu", ddr_gb=1e-6))
        with pytest.raises(ValueError, match="sharding plan failed on rank 0"):
            collective_plan_or_fail(tiny, build_ebc(spec.features), sharders)
    finally:
        dist.destroy_process_group()


def _two_rank_worker(rank: int, init: str, results: Any) -> None:
    """One of two gloo ranks: plan with room (a plan), then with none (the planner fails on rank 0)."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        spec = small_spec(every(["table_wise"]))
        sharders = [EmbeddingBagCollectionSharder()]
        for label, ddr_gb in (("roomy", 1.0), ("no room", 1e-6)):
            planner = make_planner(spec, make_topology(2, "cpu", ddr_gb=ddr_gb))
            try:
                plan = collective_plan_or_fail(planner, build_ebc(spec.features), sharders)
                ranks = {n: p.ranks for n, p in plan.plan[""].items()}
                results.put((rank, label, "plan", json.dumps(ranks, sort_keys=True)))
            except ValueError as e:
                results.put((rank, label, "error", str(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_get_the_same_plan_or_fail_together(tmp_path: Path) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_two_rank_worker, args=(r, init, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)  # a rank left waiting in the broadcast would hang here
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, "a rank hung: planning did not fail on every rank"
    assert [p.exitcode for p in procs] == [0, 0]
    got = [results.get(timeout=10) for _ in range(4)]
    by = {(rank, label): (kind, text) for rank, label, kind, text in got}
    assert by[(0, "roomy")] == by[(1, "roomy")] and by[(0, "roomy")][0] == "plan"
    for rank in (0, 1):
        kind, text = by[(rank, "no room")]
        assert kind == "error" and "sharding plan failed on rank 0" in text


# ---- CLI -----------------------------------------------------------------------------------------

def test_cli_plan_on_cpu_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    quickstart = str(ROOT / "specs" / "quickstart.toml")
    out = tmp_path / "plan.json"
    assert main(["plan", quickstart, "--world-size", "2", "--device", "cpu",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Sharding plan for 'quickstart'" in text and "2 cpu ranks" in text
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 2 and summary["device"] == "cpu"
    assert not {t["sharding_type"] for t in summary["tables"]} & {"row_wise", "table_row_wise"}

    bad = ["--set", 'distributed.sharding=[{ table = "user_id", types = ["row_wise"] }]']
    assert main(["plan", quickstart, "--device", "cpu", *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {quickstart}: spec 'quickstart'")
    assert "'user_id' asks for row_wise" in err

    unknown = ["--set", 'distributed.sharding=[{ table = "nope", types = ["table_wise"] }]']
    assert main(["plan", quickstart, *unknown]) == 2
    assert "names table 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_plans_the_industrial_spec_for_64_gpus_on_meta(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "industrial.json"
    assert main(["plan", INDUSTRIAL, "--world-size", "64", "--device", "cuda",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rows = int(re.search(r"totals: .*?; ([\d,]+) rows", text).group(1).replace(",", ""))
    assert rows >= 100_000_000
    summary = json.loads(out.read_text())
    assert summary["totals"]["rows"] == rows
    assert 30 <= summary["totals"]["tables"] <= 60
    # user_id (200M x 128 fp32 = 95 GiB) fits no 80 GiB GPU: it must be split over rows
    user = next(t for t in summary["tables"] if t["name"] == "user_id")
    assert user["sharding_type"] in {ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE}
    assert sum(s["rows"] for s in user["shards"]) == 200_000_000
    assert all(r["total_bytes"] < r["capacity_bytes"] for r in summary["ranks"])
    assert summary["optimizer"] == SparseOptimizer.ROWWISE_ADAGRAD
    # meta device: 175 GiB of weights planned without allocating them
    assert peak_rss_bytes() < 4 * GIB
    assert summary["peak_rss_bytes"] < 4 * GIB


# ---- group-lasso FTRL (no FBGEMM kernel): sharded by whole rows --------------------------------

def test_gftrl_tables_are_sharded_by_whole_rows_and_never_by_columns() -> None:
    spec = small_spec(optimizer="gftrl")
    for device, expected in (("cpu", ["table_wise"]),
                             ("cuda", ["table_wise", "row_wise", "table_row_wise"])):
        constraints = sharding_constraints(spec, device, world_size=2)
        assert {tuple(c.sharding_types) for c in constraints.values()} == {tuple(expected)}
        assert {tuple(c.compute_kernels) for c in constraints.values()} == {("fused",)}
    plan = plan_sharding(spec, world_size=2, device_type="cpu")
    assert {p.sharding_type for p in plan.plan[""].values()} == {"table_wise"}
    ranks = {p.ranks[0] for p in plan.plan[""].values()}
    assert ranks == {0, 1}  # spread over both ranks, not replicated


@pytest.mark.parametrize("types,message", [
    (["column_wise"], "asks for column_wise, but train.sparse_optimizer.name = 'gftrl' (group "
                      "lasso) needs each row whole on one rank"),
    (["data_parallel", "table_wise"], "mixes data_parallel with table_wise"),
])
def test_gftrl_refuses_column_shards_and_mixed_replication(types: list[str], message: str) -> None:
    spec = small_spec([{"table": "user_id", "types": types}], optimizer="gftrl")
    with pytest.raises(ValueError, match="distributed.sharding\\[table=user_id\\].types") as e:
        validate_constraints(spec, "cpu")
    assert message in str(e.value)
    validate_constraints(small_spec([{"table": "user_id", "types": ["data_parallel"]}],
                                    optimizer="gftrl"), "cpu")  # replicated alone is fine


def test_report_counts_fp16_tables_at_two_bytes_per_weight() -> None:
    from recsys.spec import validate_spec

    raw = small_spec().model_dump(mode="json")
    raw["features"]["data_type"] = "fp16"
    half = validate_spec(raw)
    topology = make_topology(2, "cpu")
    full_summary = plan_summary(small_spec(), constructed_plan(small_spec()), topology)
    half_summary = plan_summary(half, constructed_plan(half), topology)
    params = sum(rows * dim for rows, dim in SMALL.values())
    assert full_summary["totals"]["weight_bytes"] == 4 * params
    assert half_summary["totals"]["weight_bytes"] == 2 * params
    for f, h in zip(full_summary["ranks"], half_summary["ranks"], strict=True):
        assert h["weight_bytes"] * 2 == f["weight_bytes"]
        assert h["optimizer_bytes"] == f["optimizer_bytes"]  # the state stays fp32
