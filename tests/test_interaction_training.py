"""Every interaction spec trains end to end on the tiny data (its model and optimizer sections
grafted onto the tiny dataset's features), and FTRL selection works in sharded training."""

from __future__ import annotations

import json
import os
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_spec_dict
from test_train import _torchrun

from recsys.spec import dump_toml, validate_spec
from recsys.train.run import run_training

ROOT = Path(__file__).resolve().parents[1]


def tiny_variant(spec_file: str, dataset_root: Path, **train: Any) -> dict[str, Any]:
    """The tiny spec with the model section and optimizers of ``specs/<spec_file>``."""
    full = tomllib.loads((ROOT / "specs" / spec_file).read_text())
    raw = tiny_spec_dict(dataset_root)
    raw["data"]["labels"] = ["click"]
    raw["model"] = {**full["model"], "tasks": ["click"]}
    keep = ("sparse_optimizer", "dense_optimizer", "interaction_optimizer")
    raw["train"] = {**{k: v for k, v in full["train"].items() if k in keep},
                    "batch_size": 128, "seed": 5, "epochs": 1, **train}
    if raw["model"].get("moe"):
        raw["model"]["moe"]["anneal_steps"] = 10
    return raw


@pytest.mark.parametrize("spec_file", ["xdeepint.toml", "dynint.toml", "adaensemble.toml"])
def test_each_interaction_spec_trains_on_tiny_data(spec_file: str, tiny_dataset,
                                                   tmp_path: Path) -> None:
    spec = validate_spec(tiny_variant(spec_file, tiny_dataset.root, epochs=2))
    metrics = run_training(spec, tmp_path / "run", progress=False)
    test = metrics["test"]
    # learned something, never beyond the true probabilities (plus noise)
    assert 0.58 < test["auc"] < metrics["oracle"]["auc"] + 0.02
    assert 0.4 < test["calibration"] < 1.6
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["sparsity"] is not None


def test_pin_as_the_ranker_interaction_arch_trains(tiny_dataset, tmp_path: Path) -> None:
    raw = tiny_variant("quickstart.toml", tiny_dataset.root, epochs=2)
    raw["model"] = {"arch": "pin", "tasks": ["click"], "pin": {"num_layers": 2, "subspaces": 2},
                    "mlp": {"hidden": [32]}}
    metrics = run_training(validate_spec(raw), tmp_path / "run", progress=False)
    assert metrics["test"]["auc"] > 0.58


def test_sparsity_grows_with_l1(tiny_dataset, tmp_path: Path) -> None:
    """GFTRL zeroes whole embedding rows and FTRL zeroes PIN weights, more as λ1 grows."""
    seen = []
    for l1 in (0.0, 0.5):
        raw = tiny_variant("xdeepint.toml", tiny_dataset.root, max_steps=60)
        raw["train"]["sparse_optimizer"]["ftrl"]["l1"] = l1
        raw["train"]["interaction_optimizer"]["ftrl"]["l1"] = l1
        metrics = run_training(validate_spec(raw), tmp_path / f"l1-{l1}", progress=False)
        s = metrics["sparsity"]
        seen.append((s["embedding_rows_zero"], s["interaction_weights_zero"]))
    (rows0, pin0), (rows1, pin1) = seen
    assert rows0 == 0.0 and pin0 == 0.0  # no L1, no exact zeros
    assert rows1 > 0.05 and pin1 > 0.05


@pytest.mark.slow
@pytest.mark.distributed
def test_ftrl_selection_in_two_process_training(tiny_dataset, tmp_path: Path) -> None:
    """xDeepInt with GFTRL (tables sharded table-wise, updated in backward) and FTRL on 2 ranks x
    64 rows against 1 rank x 128 rows (train.batch_size is global): the tables start from the same
    weights whatever the world size and get the same updates up to float summation order, so the
    selected rows, the zero PIN weights and the test metrics agree closely; each rank holds about
    half of the tables and of their FTRL state."""
    def write(name: str, batch: int, world: int) -> Path:
        raw = tiny_variant("xdeepint.toml", tiny_dataset.root, epochs=2, batch_size=batch)
        raw["train"]["sparse_optimizer"]["ftrl"]["l1"] = 0.3
        raw["train"]["interaction_optimizer"]["ftrl"]["l1"] = 0.3
        raw["distributed"] = {"world_size": world}
        path = tmp_path / name
        path.write_text(dump_toml(validate_spec(raw)))
        return path

    m1 = _torchrun(write("one.toml", 128, 1), tmp_path / "run1", 1)
    m2 = _torchrun(write("two.toml", 128, 2), tmp_path / "run2", 2)  # the same global batch
    s1, s2 = m1["sparsity"], m2["sparsity"]
    assert s1["embedding_rows_zero"] > 0.02 and s1["interaction_weights_zero"] > 0.02
    assert abs(s1["embedding_rows_zero"] - s2["embedding_rows_zero"]) < 0.01
    assert abs(s1["interaction_weights_zero"] - s2["interaction_weights_zero"]) < 0.01
    assert abs(m1["test"]["auc"] - m2["test"]["auc"]) < 0.005
    (alone,), pair = m1["embedding_bytes_held"], m2["embedding_bytes_held"]
    for key in ("weight_bytes", "optimizer_bytes"):
        assert alone["optimizer_bytes"] == 2 * alone["weight_bytes"]  # FTRL's n and z
        assert sum(r[key] for r in pair) == alone[key]  # sharded, not replicated
        assert all(0.25 < r[key] / alone[key] < 0.75 for r in pair), pair
    _ftrl_state_reshards_onto_one_process(tmp_path / "two.toml", tmp_path / "run2", tmp_path)
    # a checkpoint written by 2 processes (sharded tables) exports in one, with parity
    from recsys.export.torchscript import export_run

    info = export_run(tmp_path / "run2", tmp_path / "export", "none")
    assert info["parity"]["tasks"]["click"]["max_abs_diff"] <= 1e-5
    assert info["parity"]["tasks"]["click"]["auc_eager"] == pytest.approx(m2["test"]["auc"],
                                                                          abs=1e-6)


@pytest.mark.slow
def test_a_gftrl_run_resumed_from_a_checkpoint_ends_like_the_whole_run(tiny_dataset,
                                                                      tmp_path: Path) -> None:
    """The FTRL state of the sharded tables (n and z) is in the checkpoint: a run resumed from a
    mid-run checkpoint ends with the metrics of the uninterrupted run (a lost state would restart
    the accumulators and change every later update)."""
    import shutil

    from recsys.train import checkpoint

    raw = tiny_variant("xdeepint.toml", tiny_dataset.root, epochs=2, batch_size=128,
                       checkpoint_every_steps=20, keep_checkpoints=10)
    raw["train"]["sparse_optimizer"]["ftrl"]["l1"] = 0.3
    spec = validate_spec(raw)
    whole = run_training(spec, tmp_path / "whole", progress=False)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    (cut / "metrics.json").unlink()
    steps = checkpoint.candidates(cut)
    for later in steps[len(steps) // 2:]:  # back to a checkpoint in the middle of the run
        shutil.rmtree(later)
    at = checkpoint.latest(cut)
    assert at is not None and at.name != steps[-1].name
    resumed = run_training(spec, cut, progress=False, resume=True)
    assert f"resumed from {at}" in (cut / "train.log").read_text()
    for key in ("auc", "logloss"):
        assert resumed["test"][key] == pytest.approx(whole["test"][key], abs=1e-6), key
    assert resumed["sparsity"] == whole["sparsity"]


def _ftrl_state_reshards_onto_one_process(spec_path: Path, run_dir: Path, tmp: Path) -> None:
    """The 2-process run's last checkpoint, loaded by a 1-process model: every table's FTRL n and
    z (now whole on this rank) equal the checkpoint's, read back independently as full tensors."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from recsys.spec import load_spec
    from recsys.train import checkpoint
    from recsys.train.distributed import init_distributed, shutdown
    from recsys.train.sharded import build_sharded_model

    path = checkpoint.latest(run_dir)
    assert path is not None
    dcp_to_torch_save(path, tmp / "full.pt")
    full = torch.load(tmp / "full.pt", weights_only=False)["optim"]["state"]
    raw = load_spec(spec_path).model_dump(mode="json")
    raw["distributed"]["world_size"] = 1
    spec = validate_spec(raw)
    old = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    with socket.socket() as free:  # a port nobody else uses (the tests run in parallel)
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    ctx = init_distributed("cpu")
    try:
        built = build_sharded_model(spec, ctx.device, 1, total_steps=10)
        checkpoint.load(path, built.dmp, built.optimizer)
        state = built.optimizer.state_dict()["state"]
        tables = [k for k in state if "embedding_bags." in k]
        assert len(tables) == len(spec.features.resolved_tables())
        for key in tables:
            for name in ("n", "z"):
                (shard,) = state[key][name].local_shards()
                torch.testing.assert_close(shard.tensor, full[key][name], rtol=0, atol=0)
            assert not torch.equal(state[key]["n"].local_shards()[0].tensor,
                                   torch.full_like(full[key]["n"], 0.1))  # trained state
    finally:
        shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
