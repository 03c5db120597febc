"""Hierarchical group-wise ranking end to end on the tiny data: online codes (RVQ in the model,
one process and two), offline codes written by `recsys rvq encode`, and the codes as a feature."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_spec_dict
from test_train import _torchrun

from recsys.data.schema import RVQ_CODE, DatasetManifest, num_nodes
from recsys.rvq_encode import encode_run
from recsys.spec import dump_toml, validate_spec
from recsys.train.distributed import init_distributed, shutdown
from recsys.train.run import run_training
from recsys.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RVQ = {"levels": 3, "codes": 4, "kmeans_init_batches": 2}


def _raw(root: Path, **loss: Any) -> dict[str, Any]:
    """The tiny spec with specs/hierarchical.toml's loss section (small codebooks)."""
    full = tomllib.loads((ROOT / "specs" / "hierarchical.toml").read_text())
    raw = tiny_spec_dict(root)
    raw["data"]["labels"] = ["click"]
    raw["data"]["request_batches"] = True
    raw["model"] = {"arch": "mlp", "tasks": ["click"], "mlp": {"hidden": [32]}}
    raw["loss"] = {"hierarchical": {**full["loss"]["hierarchical"], "rvq": RVQ, **loss}}
    raw["train"] = {"batch_size": 128, "seed": 4, "epochs": 1, "checkpoint_every_steps": 20}
    return raw


def test_online_codes_train_group_and_checkpoint(tiny_dataset, tmp_path: Path) -> None:
    spec = validate_spec(_raw(tiny_dataset.root))
    metrics = run_training(spec, tmp_path / "run", progress=False)
    last = metrics["train_last_step"]
    assert last["loss/hierarchical"] > 0
    for level in (1, 2, 3):  # groups nest: deeper levels have more, smaller groups
        assert last[f"hgr/l{level}/groups"] >= 1
    assert last["hgr/l1/mean_size"] >= last["hgr/l2/mean_size"] >= last["hgr/l3/mean_size"]
    assert 1.0 <= last["rvq/perplexity_l1"] <= RVQ["codes"]
    assert metrics["test"]["auc"] > 0.55
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert "hgr/l1/covered" in history["stats"]
    # the codebooks are part of the checkpoint: a fresh trainer restores them exactly
    ctx = init_distributed("cpu")
    try:
        trainer = Trainer(spec, ctx, progress=False, run_dir=tmp_path / "run")
        before = {k: v.clone() for k, v in trainer.model.state_dict().items() if ".rvq." in k}
        trainer.restore()
        after = {k: v for k, v in trainer.model.state_dict().items() if ".rvq." in k}
    finally:
        shutdown()
    assert any(k.endswith("rvq.codebooks") for k in after)
    key = next(k for k in after if k.endswith("rvq.codebooks"))
    assert not torch.equal(before[key], after[key])  # restored, not the fresh zeros
    assert bool(after[next(k for k in after if k.endswith("rvq.initialized"))].all())


def test_offline_codes_from_a_run_feed_the_loss_and_a_table(tiny_dataset, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_training(validate_spec(_raw(tiny_dataset.root, weight=0.0)), run, progress=False)
    out = tmp_path / "coded"
    summary = encode_run(run, out, iters=2, progress=False)
    manifest = DatasetManifest.load(out)
    column = manifest.column(RVQ_CODE)
    assert column is not None and column.cardinality == num_nodes(3, 4)
    assert summary["users"] == 300 and len(summary["perplexity"]) == 3
    assert summary["rows"]["impressions/train"] == tiny_dataset.rows["impressions"]["train"]

    raw = _raw(out, codes="data")
    # the codes also feed an embedding table of the ranker (one more multi-valued user field)
    raw["features"]["fields"].append({"name": RVQ_CODE, "side": "user", "kind": "multi_sparse",
                                      "num_embeddings": num_nodes(3, 4), "pooling": "sum"})
    metrics = run_training(validate_spec(raw), tmp_path / "run-data", progress=False)
    last = metrics["train_last_step"]
    assert last["loss/hierarchical"] > 0 and last["hgr/l3/groups"] >= 1
    assert "rvq/perplexity_l1" not in last  # no online RVQ in this model
    with pytest.raises(Exception, match="exists"):
        encode_run(run, out, progress=False)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_with_groups_across_ranks(tiny_dataset, tmp_path: Path) -> None:
    raw = _raw(tiny_dataset.root, all_gather=True)
    raw["train"]["batch_size"] = 128  # global: 64 rows on each rank
    raw["distributed"] = {"world_size": 2}
    path = tmp_path / "two.toml"
    path.write_text(dump_toml(validate_spec(raw)))
    metrics = _torchrun(path, tmp_path / "run", 2)
    last = metrics["train_last_step"]
    # groups span both ranks' rows: the level-1 groups hold more rows than one rank's batch could
    assert last["loss/hierarchical"] > 0
    assert last["hgr/l1/mean_size"] * last["hgr/l1/groups"] > 64
    assert metrics["test"]["auc"] > 0.55
