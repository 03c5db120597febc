"""``recsys bench archs``: the quick path writes every arch with torch alone (torchrec, fbgemm_gpu,
pydantic and pyarrow blocked), the pure-torch DLRM and DeepFM equal a numpy oracle of their
formulas, every bench model has the parameters of the registry's model for the same spec, and the
ratios and targets are computed from the timings. No timing comparison is asserted: machines are
noisy."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import import_blocker
from torch import nn

from recsys.bench.arch_models import (
    ARCHS,
    DYNINT_MODES,
    DotInteraction,
    build_arch,
    fm_second_order,
)
from recsys.bench.archs import ArchBenchConfig, config_from_args, ratios, targets
from recsys.cli import main

REPO = Path(__file__).resolve().parents[1]

# runs `python -m recsys.cli bench archs --quick` (twice, with different options) in a
# fresh interpreter where the heavy packages cannot be imported; it fails if recsys code even
# tries to import one of them (also inside a try), as tests/test_pure_torch.py does
BLOCKED_RUN = import_blocker("bench archs must run with torch alone") + r'''
import runpy
module, out = sys.argv[1], sys.argv[2]
prefix = ["bench", "archs"] if module == "recsys.cli" else []
sys.argv = [module, *prefix, "--quick", "--no-progress", "--out", out, *sys.argv[3:]]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert not e.code, f"exit status {e.code}"
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, f"blocked packages were imported: {leaked}"
assert not attempts, f"recsys code tried to import blocked packages: {attempts}"
print("TORCH-ONLY OK")
'''


def run_blocked(module: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, module, str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "TORCH-ONLY OK" in proc.stdout, (
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_quick_run_with_torch_alone_writes_every_arch(tmp_path: Path) -> None:
    run_blocked("recsys.cli", tmp_path)
    result = json.loads((tmp_path / "archs.json").read_text())
    assert result["benchmark"] == "archs" and result["device"] == "cpu"
    assert result["threads"] == 1 and "torch" in result["machine"]
    assert set(result["results"]) == {"fp32", "bf16"}  # --quick times both dtypes
    for dtype, by_batch in result["results"].items():
        assert list(by_batch) == ["128"]
        row = by_batch["128"]
        assert sorted(row) == sorted(ARCHS), dtype  # (the JSON's keys are sorted)
        for name, numbers in row.items():
            assert numbers["params"] > 0
            for phase in ("train", "infer"):
                assert numbers[phase]["samples_per_s"] > 0, (dtype, name, phase)
                assert numbers[phase]["best_s"] <= numbers[phase]["median_s"]
    assert result["ratios"]["vs_dcn"]["fp32"]["128"]["dcn"]["train"] == pytest.approx(1.0)
    assert set(result["ratios"]["bf16_vs_fp32"]["128"]) == set(ARCHS)
    assert set(result["gemm_bf16_vs_fp32"]) == {"128"} and result["gemm_bf16_vs_fp32"]["128"] > 0
    md = (tmp_path / "archs.md").read_text()
    assert md.startswith("| arch") and "bf16 autocast / fp32" in md
    assert all(f"| {name} " in md for name in ARCHS)
    assert "dynint train step <= 1.5x pin's (fp32, batch 128)" in md


def test_cli_entry_runs_with_torch_alone(tmp_path: Path) -> None:
    run_blocked("recsys.cli", tmp_path, "--archs", "dcn", "moe", "--dtype", "fp32")
    result = json.loads((tmp_path / "archs.json").read_text())
    assert list(result["results"]) == ["fp32"]
    assert sorted(result["results"]["fp32"]["128"]) == ["dcn", "moe"]


def test_bench_all_runs_archs_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.bench.all import BENCHES, AllConfig, headline, run_all

    assert "archs" in BENCHES
    summary = run_all(AllConfig(tmp_path, quick=True), ["archs"])
    result = json.loads((tmp_path / "archs.json").read_text())
    assert result["quick"] is True and sorted(result["results"]["fp32"]["128"]) == sorted(ARCHS)
    assert "| archs" in summary and headline("archs", result).startswith("fp32 train samples/s")


# ---- the models -----------------------------------------------------------------------------------

def test_every_arch_trains_one_step() -> None:
    torch.manual_seed(0)
    pooled, dense = torch.randn(16, 26 * 16, requires_grad=True), torch.randn(16, 13)
    for name in ARCHS:
        model = build_arch(name).train()
        logit, aux = model(pooled, dense)
        assert logit.shape == (16,), name
        loss = logit.pow(2).mean() + (aux if aux is not None else 0)
        loss.backward()
        assert pooled.grad is not None and torch.isfinite(pooled.grad).all(), name
        assert (aux is not None) == (name == "moe"), name
        pooled.grad = None


def _spec_model(spec: str | None, **patch: Any) -> dict[str, Any]:
    raw = tomllib.loads((REPO / "specs" / spec).read_text())["model"] if spec else {}
    for key, value in patch.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


# the spec each bench model mirrors (None: the arch's defaults; that arch has no spec file)
SPECS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "mlp": ("mlp", None, {}), "dcn": ("dcn", "quickstart.toml", {}), "pin": ("pin", None, {}),
    "xdeepint": ("xdeepint", "xdeepint.toml", {}), "moe": ("moe", "adaensemble.toml", {}),
    "dlrm": ("dlrm", "dlrm.toml", {}), "deepfm": ("deepfm", "deepfm.toml", {}),
    "ranktower": ("ranktower", "ranktower.toml", {}),
    "dssm": ("dssm", "ranktower.toml", {"arch": "dssm"}),
    **{name: ("dynint", "dynint.toml", {"dynint": {"activation_mode": a, "parameter_mode": p}})
       for name, (a, p) in DYNINT_MODES.items()},
}


def _shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in model.parameters())


@pytest.mark.parametrize("name", ARCHS)
def test_parameters_match_the_registry_model(name: str) -> None:
    """Every bench model has the parameter shapes of ``recsys.models.archs``' over-arch for the
    same spec on the same fields (sides: fields 0-12 and the dense features user, 13-25 item)."""
    archs = pytest.importorskip("recsys.models.archs")
    assert set(SPECS) == set(ARCHS)
    arch, spec, patch = SPECS[name]
    raw = _spec_model(spec, **patch)
    raw["arch"] = arch
    model = archs.ARCHS[arch].model.model_validate_json(json.dumps(raw))  # as from a spec file
    fields = archs.Fields(dims=[16] * 26, names=[f"c{i}" for i in range(26)],
                          sides=["user"] * 13 + ["item"] * 13, dense_sides=["user"] * 13)
    assert _shapes(build_arch(name)) == _shapes(archs.build_over_arch(model, fields))


def _mlp_np(x: np.ndarray, module: nn.Module) -> np.ndarray:
    """recsys.modules.mlp.MLP in numpy: Linear then ReLU, every layer."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            x = np.maximum(x @ layer.weight.detach().numpy().T + layer.bias.detach().numpy(), 0)
    return x


def _head_np(x: np.ndarray, head: nn.Linear) -> np.ndarray:
    return (x @ head.weight.detach().numpy().T + head.bias.detach().numpy())[:, 0]


def _pairs_np(x: np.ndarray) -> np.ndarray:
    """``[<x_i, x_j> for i < j]`` per row, row-major (i, then j), by explicit loops."""
    n = x.shape[1]
    return np.stack([np.einsum("bd,bd->b", x[:, i], x[:, j])
                     for i in range(n) for j in range(i + 1, n)], axis=1)


def test_dlrm_matches_numpy_oracle() -> None:
    torch.manual_seed(1)
    fields, dim, num_dense = 4, 3, 2
    model = build_arch("dlrm", fields, dim, num_dense).double()
    pooled, dense = torch.randn(5, fields * dim, dtype=torch.float64), torch.randn(
        5, num_dense, dtype=torch.float64)
    d = _mlp_np(dense.numpy(), model.inputs.dense_arch)
    x = np.concatenate([d[:, None], pooled.numpy().reshape(5, fields, dim)], axis=1)
    z = np.concatenate([d, _pairs_np(x)], axis=1)
    assert z.shape == (5, dim + fields + fields * (fields - 1) // 2)
    want = _head_np(_mlp_np(z, model.deep), model.head)
    with torch.no_grad():
        got, aux = model(pooled, dense)
    assert aux is None
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.inputs(pooled, dense).detach().numpy(), z, rtol=0,
                               atol=1e-6)


def test_deepfm_matches_numpy_oracle() -> None:
    torch.manual_seed(2)
    fields, dim, num_dense = 5, 4, 3
    model = build_arch("deepfm", fields, dim, num_dense).double()
    pooled, dense = torch.randn(6, fields * dim, dtype=torch.float64), torch.randn(
        6, num_dense, dtype=torch.float64)
    concat = np.concatenate([pooled.numpy(), _mlp_np(dense.numpy(),
                                                     model.inputs.dense_arch)], axis=1)
    fm = _pairs_np(pooled.numpy().reshape(6, fields, dim)).sum(axis=1)
    want = _head_np(_mlp_np(concat, model.deep), model.head) + fm
    with torch.no_grad():
        got, _ = model(pooled, dense)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
    v = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]], dtype=torch.float64)
    assert fm_second_order(v).item() == pytest.approx(1 * 3 + 2 * 4 + 1 * 5 + 2 * 6 + 3 * 5 + 4 * 6)


def test_dot_interaction_equals_torchrec() -> None:
    dlrm = pytest.importorskip("torchrec.models.dlrm")
    torch.manual_seed(3)
    d, e = torch.randn(7, 5), torch.randn(7, 6, 5)
    torch.testing.assert_close(DotInteraction(6)(d, e), dlrm.InteractionArch(6)(d, e))


def test_fm_equals_the_deepfm_arch() -> None:
    deepfm = pytest.importorskip("recsys.models.archs.deepfm")
    v = torch.randn(4, 26, 16)
    torch.testing.assert_close(fm_second_order(v), deepfm.fm_second_order(v))


# ---- configuration, ratios, targets ---------------------------------------------------------------

def test_config_checks() -> None:
    with pytest.raises(ValueError, match="unknown nope"):
        ArchBenchConfig(archs=("dcn", "nope"))
    with pytest.raises(ValueError, match="dtype"):
        ArchBenchConfig(dtypes=("fp16",))
    with pytest.raises(ValueError, match="batch_sizes"):
        ArchBenchConfig(batch_sizes=(0,))
    with pytest.raises(ValueError, match="sync_debug needs device cuda"):
        ArchBenchConfig(sync_debug=True)
    args = argparse.Namespace(archs=["moe"], batch_sizes=None, dtype=["both"], device=None,
                              repeats=2, warmup=None, min_seconds=None, threads=None,
                              quick=True, all_cores=True, compile=False, sync_debug=False,
                              no_progress=True)
    cfg = config_from_args(args)
    assert cfg.archs == ("moe",) and cfg.dtypes == ("fp32", "bf16") and cfg.repeats == 2
    assert cfg.batch_sizes == (128,) and cfg.threads is None and not cfg.progress


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "archs", "--archs", "nope", "--out", "unused"]) == 2
    assert "--archs: unknown nope" in capsys.readouterr().err
    assert main(["bench", "archs", "--batch-sizes", "0", "--out", "unused"]) == 2
    assert "--batch-sizes must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "archs", "--device", "cuda", "--out", "unused"]) == 2
        assert "--device cuda" in capsys.readouterr().err


def _timed(step_s: float, batch: int = 32768) -> dict[str, Any]:
    numbers = {"best_s": step_s, "median_s": step_s, "samples_per_s": batch / step_s, "steps": 1}
    return {"params": 1, "train": numbers, "infer": numbers}


def test_ratios_and_targets() -> None:
    results = {
        "fp32": {"32768": {"dcn": _timed(1.0), "pin": _timed(2.0), "dynint": _timed(2.8),
                           "moe": _timed(5.0)}},
        "bf16": {"32768": {"dcn": _timed(0.5), "pin": _timed(2.2), "dynint": _timed(2.0),
                           "moe": _timed(3.0)}},
    }
    archs = ("dcn", "pin", "dynint", "moe")
    r = ratios(results, archs)
    assert r["vs_dcn"]["fp32"]["32768"]["moe"]["train"] == pytest.approx(5.0)
    assert r["bf16_vs_fp32"]["32768"]["pin"]["infer"] == pytest.approx(1.1)
    goals = {(g["target"], g["dtype"]): g for g in targets(results, "cuda")}
    assert not goals[("moe train step <= 4x dcn's", "fp32")]["met"]
    assert goals[("moe train step <= 4x dcn's", "bf16")]["value"] == pytest.approx(6.0)
    assert goals[("dynint train step <= 1.5x pin's", "fp32")]["met"]  # 1.4
    assert not goals[("pin train: bf16 step <= fp32's", "bf16")]["met"]
    assert goals[("moe infer: bf16 step <= fp32's", "bf16")]["met"]
    # the moe target is a CUDA one
    assert not any("moe train step" in g["target"] for g in targets(results, "cpu"))
    # where the device's own bf16 product is slower than fp32's, the bf16 goals are n/a
    slow_bf16 = {(g["target"], g["dtype"]): g for g in targets(results, "cpu", {"32768": 1.6})}
    pin_train = slow_bf16[("pin train: bf16 step <= fp32's", "bf16")]
    assert pin_train["met"] is None and pin_train["gemm"] == 1.6
    assert slow_bf16[("dynint train step <= 1.5x pin's", "fp32")]["met"]  # untouched
    fast_bf16 = {(g["target"], g["dtype"]): g for g in targets(results, "cpu", {"32768": 0.5})}
    assert fast_bf16[("pin train: bf16 step <= fp32's", "bf16")]["met"] is False


def test_sync_debug_reports_the_arches_that_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulated on CPU: inside the sync-debug region the DLRM interaction raises as CUDA's
    "error" mode does at a synchronizing call; that arch's training is reported, not timed."""
    from recsys.bench import archs

    debugging = {"on": False}

    @contextmanager
    def fake_sync_debug(on: bool) -> Iterator[None]:
        debugging["on"] = on
        try:
            yield
        finally:
            debugging["on"] = False

    real_forward = DotInteraction.forward

    def forward(self: DotInteraction, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        if debugging["on"]:
            raise RuntimeError("called a synchronizing CUDA operation")
        return real_forward(self, dense, sparse)

    monkeypatch.setattr(archs, "sync_debug_errors", fake_sync_debug)
    monkeypatch.setattr(DotInteraction, "forward", forward)
    cfg = ArchBenchConfig.quick(archs=("dcn", "dlrm"), dtypes=("fp32",), progress=False)
    cfg.sync_debug = True  # past the config's check (a CPU run never syncs)
    result = archs.run(cfg)
    assert result["sync_debug"] == {"fp32": {"128": {
        "dcn": "pass", "dlrm": "RuntimeError: called a synchronizing CUDA operation"}}}
    row = result["results"]["fp32"]["128"]
    assert row["dlrm"]["train"] is None and row["dlrm"]["infer"]["samples_per_s"] > 0
    assert row["dcn"]["train"]["samples_per_s"] > 0
    text = archs.table(result)
    assert "| sync-free" in text and "failing:\n- dlrm: RuntimeError" in text


def test_each_dtype_starts_from_the_same_weights_and_runs_in_turns_with_the_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 against fp32 compares like with like: each dtype trains its own copy of every model,
    built from the same seed (not the weights the other dtype's steps left), and every repeat
    times both dtypes (not all of fp32's repeats, then all of bf16's)."""
    import recsys.bench.archs as archs

    built: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []

    def recording_build(name: str) -> nn.Module:
        model = build_arch(name)
        built.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    timed: list[torch.dtype | None] = []  # the autocast dtype of each timed step block
    real_seconds = archs.seconds_per_call

    def recording_seconds(fn: Any, calls: int, cuda: bool) -> float:
        case = getattr(fn, "__self__", None)
        if isinstance(case, archs.Case):  # not the bf16-against-fp32 product timing
            timed.append(case.dtype)
        return real_seconds(fn, calls, cuda)

    monkeypatch.setattr(archs, "build_arch", recording_build)
    cfg = ArchBenchConfig(archs=("mlp", "moe"), batch_sizes=(16,), dtypes=("fp32", "bf16"),
                          repeats=2, warmup=0, min_seconds=0.0, progress=False)
    monkeypatch.setattr(archs, "seconds_per_call", recording_seconds)
    result = archs.run(cfg)
    assert len(built) == 4 and len({id(m) for m, _ in built}) == 4  # mlp, moe; twice
    for (_, first), (_, second) in ((built[0], built[2]), (built[1], built[3])):
        assert first.keys() == second.keys()
        for key in first:
            torch.testing.assert_close(second[key], first[key], rtol=0, atol=0, msg=key)
    # each repeat, per arch: fp32 (no autocast) train and infer, then bf16 autocast's
    assert timed == [None, None, torch.bfloat16, torch.bfloat16] * 4
    assert set(result["results"]) == {"fp32", "bf16"}
    assert result["results"]["bf16"]["16"]["moe"]["train"]["steps"] == 1
