"""RankTower and DSSM end to end on the tiny cascade: training with the hybrid objective, the
pre-ranking metrics on whole candidate sets, and the serving split's cache parity."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_spec_dict

from recsys.export.inputs import flat_inputs
from recsys.export.torchscript import export_run
from recsys.run_dir import RunDir
from recsys.spec import validate_spec
from recsys.train.run import run_training

ROOT = Path(__file__).resolve().parents[1]


def _raw(root: Path, arch: str, **cascade: Any) -> dict[str, Any]:
    full = tomllib.loads((ROOT / "specs" / "ranktower.toml").read_text())
    raw = tiny_spec_dict(root)
    raw["data"].update({"labels": ["click"], "view": "cascade", "request_batches": True})
    raw["model"] = {**full["model"], "arch": arch, "tasks": ["click"],
                    "ranktower": {**full["model"]["ranktower"], "hidden": [32], "head_dim": 8}}
    if arch == "ranktower":
        raw["loss"] = {**full["loss"], "cascade": {**full["loss"]["cascade"], **cascade}}
    else:
        raw["data"]["view"] = "impressions"
    raw["train"].update({"batch_size": 400, "max_steps": 40})
    return raw


@pytest.fixture(scope="module")
def ranktower_run(tiny_dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("rt") / "run"
    run_training(validate_spec(_raw(tiny_dataset.root, "ranktower")), run, progress=False)
    return run


def test_ranktower_trains_on_the_cascade_with_every_term(ranktower_run: Path) -> None:
    import json

    metrics = json.loads((ranktower_run / "metrics.json").read_text())
    last = metrics["train_last_step"]
    for term in ("distill", "fine", "coarse"):
        assert last[f"loss/cascade_{term}"] > 0
    cascade = metrics["cascade"]
    assert cascade["requests"] == 500 and cascade["candidates"] == 500 * 20
    # better than a random order of the 20 candidates (10 of them are the ranker's top 10)
    assert cascade["ranker_recall@10"] > 0.55


def test_an_ablated_term_is_not_computed(tiny_dataset, tmp_path: Path) -> None:
    raw = _raw(tiny_dataset.root, "ranktower", distill_weight=0.0)
    raw["train"]["max_steps"] = 5
    metrics = run_training(validate_spec(raw), tmp_path / "run", progress=False)
    assert "loss/cascade_distill" not in metrics["train_last_step"]
    assert "loss/cascade_fine" in metrics["train_last_step"]


def test_dssm_baseline_trains_on_exposures(tiny_dataset, tmp_path: Path) -> None:
    metrics = run_training(validate_spec(_raw(tiny_dataset.root, "dssm")), tmp_path / "run",
                           progress=False)
    assert metrics["cascade"]["candidates"] == 500 * 20  # evaluated on whole candidate sets
    assert metrics["test"]["auc"] > 0.5


def test_scoring_from_the_item_cache_equals_the_joint_model(ranktower_run: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "export"
    info = export_run(ranktower_run, out, "none")
    split = info["serving_split"]
    assert split["items_cached"] > 0 and split["score_1000_cached"]["p50_ms"] > 0
    spec = RunDir(ranktower_run).spec()
    joint = torch.jit.load(str(out / "model.pt"))
    user_tower = torch.jit.load(str(out / "user_tower.pt"))
    scorer = torch.jit.load(str(out / "scorer.pt"))
    cache = torch.load(out / "item_cache.pt", weights_only=True)
    from recsys.datasets import ensure_dataset, make_loader

    dense_names = [f.source_column for f in spec.features.dense_fields()]
    user_cols = [dense_names.index(c) for c in split["user_dense"]]
    batch = next(iter(make_loader(spec, ensure_dataset(spec), "test", training=False).epoch(0)))
    expected = joint(*flat_inputs(batch, info["inputs"]["features"]))["click"]
    dense, values, lengths = flat_inputs(batch, split["user_features"])
    users = user_tower(dense[:, user_cols], values, lengths)
    position = {int(i): n for n, i in enumerate(cache["item_id"].tolist())}
    items = batch.sparse["item_id"].values().tolist()
    assert cache["prepared"].shape[0] == cache["repr"].shape[0]
    for row in range(0, batch.batch_size, 37):
        at = position[items[row]]
        logit = scorer(users[row], cache["repr"][at][None])
        torch.testing.assert_close(torch.sigmoid(logit)[0], expected[row], atol=1e-5, rtol=0)
        # with the cached user-free projections, as served: the same score
        cached = scorer(users[row], cache["repr"][at][None], cache["prepared"][at][None])
        torch.testing.assert_close(cached, logit, atol=1e-6, rtol=0)
