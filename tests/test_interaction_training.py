"""Every interaction spec trains end to end on the tiny data (its model and optimizer sections
grafted onto the tiny dataset's features), and FTRL selection works in sharded training."""

from __future__ import annotations

import json
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
    """xDeepInt with GFTRL (data-parallel tables) and FTRL on 2 ranks x 64 rows against 1 rank x
    128 rows (train.batch_size is global): the same data-parallel update up to float summation order, so the selected rows,
    the zero PIN weights and the test metrics agree closely."""
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
    # a checkpoint written by 2 processes (data-parallel tables) exports in one, with parity
    from recsys.export.torchscript import export_run

    info = export_run(tmp_path / "run2", tmp_path / "export", "none")
    assert info["parity"]["tasks"]["click"]["max_abs_diff"] <= 1e-5
    assert info["parity"]["tasks"]["click"]["auc_eager"] == pytest.approx(m2["test"]["auc"],
                                                                          abs=1e-6)
