"""recsys/bench/targets.py: each target read from its benchmark's JSON, met or not, by hand."""

from __future__ import annotations

from recsys.bench.targets import targets


def test_targets_are_read_from_each_benchmark_and_judged() -> None:
    results = {
        "models": {"ratios": {"moe_vs_dcn": {"value": 0.35, "target": 0.4, "met": False,
                                             "interleaved": {"chunk": 2},
                                             "median_of_pairs": 0.41},
                              "xdeepint_gftrl_vs_adagrad": {"value": 0.9, "target": 0.5,
                                                            "met": True}}},
        "moe": {"ratio_depth4_to_depth1": {"best": 3.1, "median": 3.0}},
        "ranktower": {"results": {"ranktower": {"p50_ms": 1.4, "p99_ms": 4.5},
                                  "dssm": {"p50_ms": 0.02, "p99_ms": 0.05}}},
        "data": {"ratio_to_bare": {"loader -> Batch (shuffled)": 0.5}},
        "small": {"skipped": "skipped: no data"},
        "archs": {"device": "cpu", "targets": [
            {"target": "dynint train step <= 1.5x pin's", "value": 1.2, "limit": 1.5,
             "met": True, "batch": 2048, "dtype": "fp32"},
            {"target": "moe train: bf16 step <= fp32's", "value": 1.3, "limit": 1.0,
             "met": False, "batch": 2048, "dtype": "bf16"},
            {"target": "dcn train: bf16 step <= fp32's", "value": 0.7, "limit": 1.0,
             "met": True, "batch": 2048, "dtype": "bf16"}]},
        "serve": {"anything": 1},  # no target of its own: left out
    }
    summary, table = targets(results)
    met = {r["target"]: r["met"] for r in summary["targets"]}
    assert met["AdaEnsemble full CPU training >= 0.4x DCN's samples/s"] is False
    assert met["xDeepInt with gftrl >= 0.5x its rowwise_adagrad samples/s (26 x 262k tables)"]
    assert met["AdaEnsemble inference: depth-1 exit >= 2.5x faster than depth 4"]
    assert met["RankTower, 1,000 cached candidates, 1 thread: p50 <= 2 ms, p99 <= 4 ms"] is False
    assert met["shuffled loading >= 0.5x a bare pyarrow read of the same columns"]  # 0.5 is enough
    assert met["DCN-v2 on MovieLens, batch 1024, 1 process: >= 100k samples/s"] is None
    assert met["dynint train step <= 1.5x pin's (cpu, batch 2048, fp32)"]
    bf16 = next(r for r in summary["targets"] if r["target"].startswith("bf16 autocast"))
    assert bf16["met"] is False and bf16["measured"] == "1 of 2 arch/phase pairs; slower: moe train"
    assert (summary["met"], summary["applicable"], summary["total"]) == (4, 7, 8)
    moe = next(r for r in summary["targets"] if r["target"].startswith("AdaEnsemble full"))
    assert moe["measured"] == "0.35x (in turns; separate runs 0.41x)"
    loading = next(r for r in summary["targets"] if r["benchmark"] == "data")
    assert loading["measured"] == "0.50x"  # no worker case in this run: nothing beside it
    assert "| no  |" in table and "4 of 7 targets met on this machine (1 n/a here)" in table


def test_a_benchmark_whose_layout_changed_is_named_not_fatal() -> None:
    summary, _ = targets({"moe": {"ratio": 3.0}})
    (row,) = summary["targets"]
    assert row["met"] is None and row["measured"].startswith("unreadable: KeyError")


def test_bf16_goal_is_not_applicable_where_the_device_gains_nothing_from_bf16() -> None:
    """A CPU without bf16 matrix units runs a bf16 product slower than an fp32 one (the run's own
    ``gemm`` ratio): the arches cannot gain there, so the goal is n/a, with the counts kept."""
    def goal(gemm: float) -> dict:
        return {"target": "moe train: bf16 step <= fp32's", "value": 1.3, "limit": 1.0,
                "met": None if gemm > 1 else False, "batch": 2048, "dtype": "bf16",
                "gemm": gemm}

    for gemm, met in ((1.6, None), (0.5, False)):
        summary, _ = targets({"archs": {"device": "cpu", "targets": [goal(gemm)]}})
        (row,) = summary["targets"]
        assert row["met"] is met
        if met is None:
            assert row["measured"] == ("n/a here: a bf16 matrix product itself takes 1.60x "
                                       "fp32's on this cpu (no bf16 matrix units); bf16 no "
                                       "slower in 0 of 1 arch/phase pairs")
        else:
            assert row["measured"] == "0 of 1 arch/phase pairs; slower: moe train"


def test_loading_target_reports_the_worker_case_beside_it() -> None:
    name = "loader -> Batch (shuffled, 2 workers)"
    data = {"ratio_to_bare": {"loader -> Batch (shuffled)": 0.41, name: 0.2}, "num_workers": 2,
            "rows_per_s": {name: 3_400_000.0}, "cores": {name: 2},
            "rows_per_s_per_core": {name: 1_700_000.0}}
    summary, _ = targets({"data": data})
    (row,) = summary["targets"]
    assert row["met"] is False
    assert row["measured"] == "0.41x (2 workers: 3.40M rows/s on 2 cores, 1.70M per core)"
