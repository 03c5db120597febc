"""``recsys bench models``: the run order that keeps each target's two models side by side, and
the ratios from those pairs (known answers, no training)."""

from __future__ import annotations

import pytest

from recsys.bench.models import MODELS, TARGETS, ModelsBenchConfig, run_order, summarise
from recsys.spec import validate_spec


def test_each_target_pair_runs_side_by_side() -> None:
    order = run_order(list(MODELS))
    assert sorted(order) == sorted(MODELS)
    for num, den, _ in TARGETS.values():
        assert order.index(num) == order.index(den) + 1, order
    assert run_order(["mlp", "moe", "pin"]) == ["mlp", "moe", "pin"]  # no dcn: left alone


def test_ratio_is_the_median_of_the_side_by_side_pairs() -> None:
    from recsys.bench.models import model_spec

    cfg = ModelsBenchConfig(tables=2, rows=100, batch_size=8, repeats=3,
                            models=["dcn", "moe"])
    specs = {m: validate_spec(model_spec(m, cfg), m) for m in cfg.models}

    def run(rate: float) -> dict[str, float]:
        return {"samples_per_s": rate, "optimizer_state_bytes": 0, "param_bytes": 0}

    # repeat 2 caught dcn in a fast phase: the pairs are 0.4, 0.25, 0.45
    runs = {"dcn": [run(100.0), run(200.0), run(100.0)], "moe": [run(40.0), run(50.0), run(45.0)]}
    result, table = summarise(cfg, specs, runs)
    ratio = result["ratios"]["moe_vs_dcn"]
    assert ratio["per_repeat"] == pytest.approx([0.4, 0.25, 0.45])
    assert ratio["value"] == pytest.approx(0.4) and ratio["met"]
    assert ratio["of_best"] == pytest.approx(50.0 / 200.0)
    assert result["samples_per_s"] == {"dcn": 200.0, "moe": 50.0}
    assert "moe_vs_dcn: 0.40x" in table and "(0.40, 0.25, 0.45)" in table
    # an even number of repeats: the mean of the middle two
    runs = {m: r[:2] for m, r in runs.items()}
    assert summarise(cfg, specs, runs)[0]["ratios"]["moe_vs_dcn"]["value"] == pytest.approx(0.325)


def test_interleaved_run_gives_the_ratio_and_the_pairs_stay_beside_it() -> None:
    from recsys.bench.models import model_spec

    cfg = ModelsBenchConfig(tables=2, rows=100, batch_size=8, repeats=2, models=["dcn", "moe"])
    specs = {m: validate_spec(model_spec(m, cfg), m) for m in cfg.models}

    def run(rate: float) -> dict[str, float]:
        return {"samples_per_s": rate, "optimizer_state_bytes": 0, "param_bytes": 0}

    runs = {"dcn": [run(100.0), run(200.0)], "moe": [run(40.0), run(50.0)]}  # pairs 0.4, 0.25
    turns = {"moe_vs_dcn": {"dcn": 120.0, "moe": 54.0, "chunk": 2, "steps": 20}}
    result, table = summarise(cfg, specs, runs, turns)
    ratio = result["ratios"]["moe_vs_dcn"]
    assert ratio["value"] == pytest.approx(0.45) and ratio["met"]  # 54 / 120, from the turns
    assert ratio["median_of_pairs"] == pytest.approx(0.325)
    assert ratio["interleaved"] == turns["moe_vs_dcn"]
    assert "moe_vs_dcn: 0.45x in turns of 2 steps in one process" in table
    assert "the median of the side-by-side pairs 0.33x (0.40, 0.25)" in table


@pytest.mark.slow
def test_command_trains_each_target_pair_in_turns(tmp_path) -> None:
    """The whole command on tiny tables: the separate runs, then dcn and moe in turns in one
    subprocess (python -m recsys.bench.train with two --spec-json), which gives the ratio."""
    import json

    from recsys.cli import main

    rc = main(["bench", "models", "--models", "dcn,moe", "--tables", "3", "--rows", "1000",
               "--batch-size", "256", "--steps", "3", "--warmup", "1", "--repeats", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "models.json").read_text())
    ratio = result["ratios"]["moe_vs_dcn"]
    turns = ratio["interleaved"]
    assert turns["steps"] == 3 and turns["chunk"] == 2 and turns["dcn"] > 0 and turns["moe"] > 0
    assert ratio["value"] == pytest.approx(turns["moe"] / turns["dcn"])
    assert len(ratio["per_repeat"]) == 1
    assert "in turns of 2 steps in one process" in (tmp_path / "models.md").read_text()
