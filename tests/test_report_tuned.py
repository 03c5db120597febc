"""`recsys report --only tuned` and `--only hgr-sweep`: the equal-budget study and the HGR sweep at
tiny sizes, their verdicts on hand-made numbers, and resuming without retraining."""

from __future__ import annotations

import json
import math
import re
import tomllib
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
from recsys.experiments.tuned import (
    TunedConfig,
    _longer,
    goal_rows,
    goal_table,
    peak_valid_auc,
    portable_spec,
    run_tuned,
)
from tests.conftest import tiny_spec_dict


def _row(name: str, valid: float = 0.0, **metrics: tuple[float, float]) -> dict[str, Any]:
    return {"variant": name, "study": {"best_valid": valid},
            **{k: {"mean": m, "std": s} for k, (m, s) in metrics.items()}}


def test_goal_is_within_the_spread_of_the_difference_or_above() -> None:
    datasets = {"a": {"rows": [_row("dcn", 0.81, auc=(0.80, 0.003)),
                               _row("pin", 0.805, auc=(0.796, 0.004)),
                               _row("dynint", 0.805, auc=(0.794, 0.004)), _row("mlp", auc=(0.9, 0.0))]},
                "b": {"rows": [_row("dcn", auc=(0.70, 0.0)), _row("pin", auc=(0.71, 0.0)),
                               _row("dynint", auc=(0.69, 0.001))]}}
    rows = {(r["model"], r["dataset"]): r for r in goal_rows(datasets)}
    assert set(rows) == {("pin", "a"), ("dynint", "a"), ("pin", "b"), ("dynint", "b")}
    # pin on a: 0.004 behind, spread sqrt(0.003² + 0.004²) = 0.005: within
    assert rows[("pin", "a")]["spread"] == pytest.approx(0.005)
    assert rows[("pin", "a")]["delta_auc"] == pytest.approx(-0.004) and rows[("pin", "a")]["met"]
    assert not rows[("dynint", "a")]["met"]  # 0.006 behind a spread of 0.005
    assert rows[("pin", "b")]["met"] and not rows[("dynint", "b")]["met"]
    assert rows[("pin", "a")]["delta_best_valid"] == pytest.approx(-0.005)
    # a miss gets its why: the valid gap, and the gap at longer training where it was measured
    rows[("dynint", "a")]["longer"] = {
        "study_length": {"delta": -0.004, "spread": 0.002, "met": False},
        "longer": {"delta": -0.001, "spread": 0.002, "met": True}}
    table = goal_table(list(rows.values()), longer_epochs=3)
    why = table.split("**why the misses**")[1]
    assert ("| dynint | a | -0.0060 | -0.0050 | -0.0040 (± 0.0020) no | -0.0010 (± 0.0020) yes |"
            in re.sub(" +", " ", why))
    assert "| dynint | b |" in re.sub(" +", " ", why) and "| pin |" not in why
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


def test_a_tuned_spec_ships_with_paths_relative_to_the_repository(tmp_path: Path) -> None:
    out = tmp_path / "report"
    raw = {"name": "movielens-pin", "data": {"path": str(out / "data" / "movielens"),
                                             "prepare": {"input": "/elsewhere/ml-latest-small"}},
           "model": {"arch": "pin"}}
    shipped = portable_spec("movielens", raw, out)
    assert shipped["data"] == {"path": "data/tuned/movielens",
                               "prepare": {"input": "../shared/data/ml-latest-small"}}
    assert raw["data"]["path"].startswith(str(out))  # the study's own spec is left as it was
    synthetic = portable_spec("synthetic", {"data": {"path": str(out / "d")}}, out)
    assert synthetic["data"] == {"path": "data/tuned/synthetic"}
    # a path into the report's folder that is not the data's cannot travel: it is named
    raw["train"] = {"init_checkpoint": str(out / "runs" / "x")}
    with pytest.raises(ValueError, match="train.init_checkpoint"):
        portable_spec("movielens", raw, out)


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "specs" / "tuned").glob("*/*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_tuned_specs_validate_and_name_no_machine_paths(path: Path) -> None:
    from recsys.spec import validate_spec

    raw = tomllib.loads(path.read_text())
    spec = validate_spec(raw, str(path))
    assert spec.data.path == f"data/tuned/{path.parent.name}"
    assert spec.model.arch and "/work/" not in path.read_text() and "/tmp/" not in path.read_text()


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
        shipped = tmp_path / "tuned-specs" / "synthetic" / f"{r['variant']}.toml"
        text = shipped.read_text()
        assert str(tmp_path) not in text and f"test AUC {r['auc']['mean']:.4f}" in text
        a, b = tomllib.loads(best), tomllib.loads(text)
        assert b["data"]["path"] == "data/tuned/synthetic"
        assert (a["model"], a["features"], a["train"]) == (b["model"], b["features"], b["train"])
    assert [g["model"] for g in result["goal"]] == ["pin"]
    assert "goal met" in table and "what each paper claims" in table
    # a rerun tops up nothing and keeps the seed runs: the same numbers
    again, _ = run_tuned(cfg, tmp_path)
    assert [r["auc"] for r in again["datasets"]["synthetic"]["rows"]] == [r["auc"] for r in rows]
    assert [r["study"]["trials"] for r in again["datasets"]["synthetic"]["rows"]] == [2, 2]
    # a miss is retrained beside DCN with 3x the steps, the same seeds
    goal = [{"model": "pin", "dataset": "synthetic", "met": False}]
    _longer("synthetic", again["datasets"]["synthetic"], goal, cfg, tmp_path)
    longer = goal[0]["longer"]
    peaks = {m: [peak_valid_auc(tmp_path / "runs" / "tuned-x3" / "synthetic" / f"{m}-seed{k}")
                 for k in (0, 1)] for m in ("dcn", "pin")}
    assert longer["longer"]["delta"] == pytest.approx(np.mean(peaks["pin"]) - np.mean(peaks["dcn"]))
    assert longer["longer"]["spread"] == pytest.approx(
        math.hypot(np.std(peaks["pin"], ddof=1), np.std(peaks["dcn"], ddof=1)))
    for model in ("dcn", "pin"):
        run = tmp_path / "runs" / "tuned-x3" / "synthetic" / f"{model}-seed1"
        train = tomllib.loads((run / "spec.toml").read_text())["train"]
        assert train["max_steps"] == 18 and train["early_stopping_patience"] == 2
        # the peak is the best of the periodic validations and the final one
        history = json.loads((run / "history.json").read_text())["valid"]
        final = json.loads((run / "metrics.json").read_text())["valid"]["auc"]
        assert peak_valid_auc(run) == max([v["auc"] for v in history] + [final])


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


def test_a_metric_the_dataset_cannot_give_shows_as_a_dash() -> None:
    from recsys.experiments.tuned import _cell

    assert _cell({"mean": float("nan"), "std": float("nan")}) == "-"  # GAUC without users
    assert _cell({"mean": 0.5, "std": 0.01}) == "0.5000 ± 0.0100"
