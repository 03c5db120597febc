"""TorchScript export: every interaction arch exports, the unquantized artifact gives the eager
scores, int8 moves test AUC by little, and the artifact loads where recsys and torchrec do not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_spec_dict

from recsys.cli import main
from recsys.export.torchscript import export_run
from recsys.spec import validate_spec
from recsys.train.run import run_training

ARCHS: dict[str, dict[str, Any]] = {
    "mlp": {}, "dcn": {}, "pin": {"pin": {"num_layers": 2, "subspaces": 2}},
    "xdeepint": {"pin": {"num_layers": 3, "subspaces": 4}}, "dynint": {},
    "moe": {"moe": {"anneal_steps": 10}}, "dlrm": {"mlp": {"hidden": [32, 16]}},
    "deepfm": {"mlp": {"hidden": [32, 16]}},
}


def _train(root: Path, run: Path, arch: str, esmm: bool = False) -> Path:
    raw = tiny_spec_dict(root)
    raw["model"].update({"arch": arch, **ARCHS[arch], "esmm": esmm})
    raw["train"].update({"batch_size": 128, "epochs": 1})
    run_training(validate_spec(raw), run, progress=False)
    return run


@pytest.fixture(scope="module")
def mlp_run(tiny_dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tiny_dataset.root, tmp_path_factory.mktemp("mlp") / "run", "mlp", esmm=True)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_exports_with_eager_parity(arch: str, tiny_dataset, tmp_path: Path) -> None:
    run = _train(tiny_dataset.root, tmp_path / "run", arch)
    info = export_run(run, tmp_path / "export", "none")
    metrics = json.loads((run / "metrics.json").read_text())
    for task, p in info["parity"]["tasks"].items():
        assert p["max_abs_diff"] <= 1e-5, task
        # the weights are the trained ones: the run's own test AUC, computed by the sharded model
        # (float sums in another order can flip a near-tied AdaEnsemble route: 1e-4, not exact)
        assert p["auc_eager"] == pytest.approx(metrics["tasks"]["test"][task]["auc"], abs=1e-4)
    assert info["parity"]["rows"] == tiny_dataset.rows["impressions"]["test"]
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["arch"] == arch and manifest["spec_hash"] and manifest["inputs"]["features"]


def test_int8_and_fp16_move_auc_by_little_and_shrink_tables(mlp_run: Path, tmp_path: Path
                                                             ) -> None:
    sizes = {}
    for quantize in ("none", "fp16", "int8"):
        info = export_run(mlp_run, tmp_path / quantize, quantize)
        sizes[quantize] = info["model_bytes"]
        for task, p in info["parity"]["tasks"].items():
            assert abs(p["auc_change"]) <= 0.001, (quantize, task)
    assert sizes["int8"] < sizes["none"] and sizes["fp16"] < sizes["none"]


def test_artifact_loads_with_torch_and_fbgemm_only(mlp_run: Path, tmp_path: Path) -> None:
    export_run(mlp_run, tmp_path / "int8", "int8", check=False)
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    n_features, n_dense = len(manifest["inputs"]["features"]), len(manifest["inputs"]["dense"])
    rows = {t["name"]: t["rows"] for t in manifest["tables"]}
    script = f"""
import sys, torch, fbgemm_gpu
model = torch.jit.load({str(tmp_path / "int8" / "model.pt")!r})
B = 5
lengths = torch.ones({n_features} * B, dtype=torch.int32)
values = torch.zeros({n_features} * B, dtype=torch.int64)
out = model(torch.randn(B, {n_dense}), values, lengths)
assert set(out) == {set(manifest["tasks"])!r}, out.keys()
assert all(v.shape == (B,) and bool(((v > 0) & (v < 1)).all()) for v in out.values())
assert "recsys" not in sys.modules and "torchrec" not in sys.modules
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
    assert min(rows.values()) > 0


def test_export_cli_prints_parity(mlp_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(mlp_run), "--out", str(tmp_path / "e"), "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "parity on" in out and "AUC the run recorded" in out and "conversion" in out
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
