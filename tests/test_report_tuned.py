"""`recsys report --only tuned` and `--only hgr-sweep`: the equal-budget study and the HGR sweep at
tiny sizes, their verdicts on hand-made numbers, and resuming without retraining."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsys.cli import main
from recsys.data.schema import DatasetManifest
from recsys.experiments.hgr_sweep import (
    HgrSweepConfig,
    code_alignment,
    hgr_verdict,
    normalized_mutual_information,
    run_hgr_sweep,
)
from recsys.experiments.runner import Variant, run_variants
from recsys.experiments.tuned import TunedConfig, goal_rows, goal_table, run_tuned
from tests.conftest import tiny_spec_dict


def _row(name: str, **metrics: tuple[float, float]) -> dict[str, Any]:
    return {"variant": name, **{k: {"mean": m, "std": s} for k, (m, s) in metrics.items()}}


def test_goal_is_within_the_spread_of_the_difference_or_above() -> None:
    datasets = {"a": {"rows": [_row("dcn", auc=(0.80, 0.003)), _row("pin", auc=(0.796, 0.004)),
                               _row("dynint", auc=(0.794, 0.004)), _row("mlp", auc=(0.9, 0.0))]},
                "b": {"rows": [_row("dcn", auc=(0.70, 0.0)), _row("pin", auc=(0.71, 0.0)),
                               _row("dynint", auc=(0.69, 0.001))]}}
    rows = {(r["model"], r["dataset"]): r for r in goal_rows(datasets)}
    assert set(rows) == {("pin", "a"), ("dynint", "a"), ("pin", "b"), ("dynint", "b")}
    # pin on a: 0.004 behind, spread sqrt(0.003² + 0.004²) = 0.005: within
    assert rows[("pin", "a")]["spread"] == pytest.approx(0.005)
    assert rows[("pin", "a")]["delta_auc"] == pytest.approx(-0.004) and rows[("pin", "a")]["met"]
    assert not rows[("dynint", "a")]["met"]  # 0.006 behind a spread of 0.005
    assert rows[("pin", "b")]["met"] and not rows[("dynint", "b")]["met"]
    table = goal_table(goal_rows(datasets))
    assert "| pin " in table and "2 of 2" in table and "0 of 2" in table


def test_hgr_verdict_takes_the_better_baseline() -> None:
    def r(name: str, gauc: float, std: float) -> dict[str, Any]:
        return _row(name, gauc_impressions=(gauc, std), auc=(0.7, 0.0),
                    **{"user_ndcg@10": (0.6, 0.0)})

    beats = hgr_verdict([r("bce", 0.60, 0.001), r("bce+in-batch", 0.61, 0.003),
                         r("bce+hierarchical", 0.62, 0.004)])
    assert beats["gauc_impressions"]["vs"] == "bce+in-batch"
    assert beats["gauc_impressions"]["delta"] == pytest.approx(0.01)
    assert beats["gauc_impressions"]["spread"] == pytest.approx(0.005)
    assert beats["beats_both"]
    close = hgr_verdict([r("bce", 0.60, 0.001), r("bce+in-batch", 0.61, 0.006),
                         r("bce+hierarchical", 0.615, 0.008)])
    assert not close["beats_both"]  # +0.005 against a spread of 0.01


def test_normalized_mutual_information_by_hand() -> None:
    nmi = normalized_mutual_information
    assert nmi(np.array([0, 0, 1, 1]), np.array([7, 7, 3, 3])) == pytest.approx(1.0)
    assert nmi(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    # joint (0,0) 1/2, (0,1) 1/4, (1,1) 1/4: I = 0.215762, H(a) = 0.562335, H(b) = ln 2
    assert nmi(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])) == pytest.approx(0.345592, abs=2e-6)
    assert nmi(np.array([4, 4, 4]), np.array([0, 1, 2])) == 0.0  # a constant labeling


def test_a_report_keeps_finished_runs_of_the_same_spec(tmp_path: Path,
                                                       tiny_dataset: DatasetManifest) -> None:
    base = tiny_spec_dict(tiny_dataset.root)
    calls: list[Path] = []

    def train(spec: Any, run_dir: Path, **_: Any) -> dict[str, Any]:
        calls.append(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = {"test": {"auc": 0.5 + spec.train.seed / 100}}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    variants = [Variant("a", {})]
    first = run_variants(base, variants, [0, 1], tmp_path, train=train, reuse=True)
    again = run_variants(base, variants, [0, 1], tmp_path, train=train, reuse=True)
    assert len(calls) == 2 and again.metrics == first.metrics
    assert again.metrics["a"][1]["test"]["auc"] == pytest.approx(0.51)
    changed = [Variant("a", {"train": {"batch_size": 48}})]  # another spec: trained again
    run_variants(base, changed, [0], tmp_path, train=train, reuse=True)
    assert len(calls) == 3


@pytest.mark.slow
def test_tuned_study_gives_every_arch_the_same_budget_and_resumes(tmp_path: Path) -> None:
    cfg = TunedConfig(models=("dcn", "pin"), datasets=("synthetic",), trials=2, seeds=2,
                      startup_trials=1, synthetic_requests=2000, eval_requests=500,
                      max_steps=6, jobs=1)
    result, table = run_tuned(cfg, tmp_path)
    rows = result["datasets"]["synthetic"]["rows"]
    assert [r["variant"] for r in rows] == ["dcn", "pin"]
    for r in rows:
        assert r["study"]["trials"] == 2 and r["seeds"] == 2
        assert 0.0 < r["auc"]["mean"] < 1.0 and math.isfinite(r["gauc"]["mean"])
        best = (tmp_path / "studies" / f"synthetic-{r['variant']}" / "best.toml").read_text()
        assert "[tune]" not in best  # the retrained spec is the best trial's, without the study
    assert [g["model"] for g in result["goal"]] == ["pin"]
    assert "goal met" in table and "what each paper claims" in table
    # a rerun tops up nothing and keeps the seed runs: the same numbers
    again, _ = run_tuned(cfg, tmp_path)
    assert [r["auc"] for r in again["datasets"]["synthetic"]["rows"]] == [r["auc"] for r in rows]
    assert [r["study"]["trials"] for r in again["datasets"]["synthetic"]["rows"]] == [2, 2]


@pytest.mark.slow
def test_hgr_sweep_compares_the_objectives_on_each_world(tmp_path: Path) -> None:
    cfg = HgrSweepConfig(synthetic_requests=2000, eval_requests=500, max_steps=6, seeds=1,
                         worlds=((0.9, None), (0.5, 1)), level_weights=((0.2, 0.3, 0.5),),
                         codes_choices=())
    result, table = run_hgr_sweep(cfg, tmp_path)
    assert set(result["worlds"]) == {"share=0.9", "share=0.5,depth=1"}
    for world in result["worlds"].values():
        assert [r["variant"] for r in world["rows"]] == ["bce", "bce+in-batch",
                                                         "bce+hierarchical"]
    assert result["choices"]["world"] == "share=0.9"
    assert [r["variant"] for r in result["choices"]["rows"]] == [
        "bce+hierarchical", "hgr w=0.2/0.3/0.5", "hgr offline codes", "hgr true clusters as codes"]
    assert "where HGR beats both baselines" in table
    offline = result["choices"]["rows"][-2]
    assert len(offline["code_nmi"]) == 3 and all(0.0 <= v <= 1.0 for v in offline["code_nmi"])
    assert "true user clusters" in table
    # the oracle's codes are the world's clusters: a perfect alignment at every level
    (true_codes,) = (tmp_path / "data").glob("*-true-codes")
    synthetic = json.loads((true_codes / "dataset.json").read_text())["source"]["config"]
    assert code_alignment(true_codes, synthetic) == pytest.approx([1.0, 1.0, 1.0])
    # each world's data was generated with its own knobs; the offline codes come from the BCE
    # run of the same seed on the most shared world
    knobs = {}
    for path in (tmp_path / "data").glob("*/dataset.json"):
        source = json.loads(path.read_text())["source"]
        config = source["config"]
        knobs[path.parent.name] = (config.get("cluster_sharing"), config.get("sharing_depth"),
                                   source.get("rvq_codes_from"))
    assert sorted(knobs.values(), key=str) == sorted([
        (0.9, None, None), (0.5, 1, None),
        (0.9, None, str(tmp_path / "runs" / "hgr-sweep" / "share=0.9" / "bce-seed0")),
        (0.9, None, "the synthetic world's true user clusters")], key=str)


def test_trials_are_an_option_of_the_tuned_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--only", "interactions", "--trials", "3"]) == 2
    assert "--trials and --jobs are options of --only tuned" in capsys.readouterr().err
