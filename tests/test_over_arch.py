"""The arch registry and the over-arch of every arch: the contract, TorchScript parity, numpy
oracles of the DLRM and DeepFM interactions, and "nothing outside archs/ compares arch names"."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_spec_dict

from recsys.models.archs import ARCHS, AUX_LOSS, OverArch, arch_of, build_over_arch
from recsys.models.archs.deepfm import fm_second_order
from recsys.models.tables import over_arch_fields
from recsys.modules.fields import FieldStack
from recsys.spec import validate_spec

ROOT = Path(__file__).resolve().parents[1]

SETTINGS: dict[str, dict[str, Any]] = {
    "mlp": {}, "dcn": {}, "pin": {"pin": {"num_layers": 2, "subspaces": 2}},
    "xdeepint": {"pin": {"num_layers": 3, "subspaces": 4}}, "dynint": {},
    "moe": {"moe": {"anneal_steps": 5}}, "dlrm": {"mlp": {"hidden": [16, 8]}},
    "deepfm": {"mlp": {"hidden": [16, 8]}}, "ranktower": {"ranktower": {"hidden": [16]}},
    "dssm": {"ranktower": {"hidden": [16]}},
}


def _spec(arch: str, **extra: Any) -> Any:
    raw = tiny_spec_dict(Path("unused"))
    raw["model"].update({"arch": arch, **SETTINGS.get(arch, {}), **extra})
    return validate_spec(raw)


def _over(arch: str) -> OverArch:
    spec = _spec(arch)
    return build_over_arch(spec.model, over_arch_fields(spec.features))


def test_every_arch_is_tested_and_has_a_spec_file() -> None:
    assert set(SETTINGS) == set(ARCHS)
    for name in ("dlrm", "deepfm"):
        spec_file = ROOT / "specs" / f"{name}.toml"
        assert f'arch = "{name}"' in spec_file.read_text()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_over_arch_outputs_and_scripted_parity(arch: str) -> None:
    torch.manual_seed(0)
    over = _over(arch).eval()
    assert isinstance(over, OverArch)
    pooled, dense = torch.randn(16, 72), torch.randn(16, 3)
    out = over(pooled, dense)
    tasks = {"click"} if arch_of(arch).two_tower else {"click", "conversion"}
    assert set(out) == tasks | {AUX_LOSS}
    assert out["click"].shape == (16,) and out[AUX_LOSS].shape == ()
    scripted = torch.jit.script(over)
    again = scripted(pooled, dense)
    # an eager-only fast path (DynInt's fused stack) sums in another order than the path
    # TorchScript compiles: bit-exact against that same path, within float32 rounding of the fast one
    reference = [m for m in over.modules() if getattr(m, "fused", False)]
    for m in reference:
        m.fused = False
    exact = over(pooled, dense)
    for key in out:
        torch.testing.assert_close(again[key], exact[key], rtol=0, atol=0)
        torch.testing.assert_close(again[key], out[key], rtol=1e-5, atol=1e-5)
    assert bool(reference) == (arch == "dynint")
    # the interaction optimizer's parameters belong to the module
    ids = {id(p) for p in over.parameters()}
    assert all(id(w) in ids for w in over.interaction_weights())


def test_a_resolved_spec_holds_only_its_arch_sections() -> None:
    spec = _spec("mlp")
    assert set(type(spec.model).model_fields) == {"arch", "tasks", "esmm", "dense_arch",
                                                  "interaction_dim", "mlp"}
    assert spec.model.model_dump().keys() == type(spec.model).model_fields.keys()


def test_moe_aux_loss_is_positive_in_training() -> None:
    over = _over("moe").train()
    out = over(torch.randn(32, 72), torch.randn(32, 3))
    assert float(out[AUX_LOSS]) > 0  # load balance is >= its minimum, which is positive


def test_field_stack_projects_other_widths_and_adds_the_dense_field() -> None:
    torch.manual_seed(0)
    stack = FieldStack([4, 8, 4], dim=8, num_dense=2, dense_hidden=[5])
    pooled, dense = torch.randn(3, 16), torch.randn(3, 2)
    x = stack(pooled, dense)
    assert x.shape == (3, 4, 8) and stack.num_fields == 4
    torch.testing.assert_close(x[:, 1], pooled[:, 4:12])  # already 8 wide: unchanged
    torch.testing.assert_close(x[:, 0], pooled[:, :4] @ stack.proj[0].weight.T)
    torch.testing.assert_close(x[:, 3], stack.dense_arch(dense))


def _mlp_numpy(layers: torch.nn.Module, x: np.ndarray, relu_last: bool = True) -> np.ndarray:
    linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]
    for i, lin in enumerate(linears):
        x = x @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
        if relu_last or i < len(linears) - 1:
            x = np.maximum(x, 0.0)
    return x


def test_dlrm_matches_a_numpy_oracle_of_the_dot_interaction() -> None:
    """logit = head(MLP([d ; <z_i, z_j> for i < j over z = [d, e_1..e_F]])), d = dense_arch(x)."""
    torch.manual_seed(1)
    over = _over("dlrm").eval().double()
    pooled, dense = torch.randn(5, 72, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    out = over(pooled, dense)
    block = over.inputs
    d = _mlp_numpy(block.dense_arch, dense.numpy())  # TorchRec's DenseArch: ReLU on every layer
    e = pooled.numpy().reshape(5, 9, 8)
    z = np.concatenate([d[:, None, :], e], axis=1)
    pairs = np.stack([np.einsum("bd,bd->b", z[:, i], z[:, j])
                      for i in range(10) for j in range(i + 1, 10)], axis=1)
    assert pairs.shape[1] == 45
    x = np.concatenate([d, pairs], axis=1)
    assert x.shape[1] == block.out_features == 8 + 9 + 36
    h = _mlp_numpy(over.deep, x)
    for task in ("click", "conversion"):
        head = over.heads[task]
        want = h @ head.weight.detach().numpy().T[:, 0] + head.bias.detach().numpy()[0]
        np.testing.assert_allclose(out[task].detach().numpy(), want, rtol=1e-10, atol=1e-10)


def test_dlrm_without_dense_features_uses_its_learned_vector() -> None:
    raw = tiny_spec_dict(Path("unused"))
    raw["features"]["fields"] = [f for f in raw["features"]["fields"] if f["kind"] != "dense"]
    raw["model"].update({"arch": "dlrm"})
    spec = validate_spec(raw)
    over = build_over_arch(spec.model, over_arch_fields(spec.features))
    out = over(torch.randn(4, 72), torch.zeros(4, 0))
    out["click"].sum().backward()
    assert over.inputs.dense_vector.grad is not None
    assert float(over.inputs.dense_vector.grad.abs().sum()) > 0


def test_fm_second_order_is_the_sum_of_pairwise_dot_products() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(6, 5, 4))
    want = np.array([sum(v[b, i] @ v[b, j] for i in range(5) for j in range(i + 1, 5))
                     for b in range(6)])
    got = fm_second_order(torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_deepfm_adds_the_fm_term_to_the_deep_logit() -> None:
    torch.manual_seed(2)
    over = _over("deepfm").eval().double()
    pooled, dense = torch.randn(5, 72, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    out = over(pooled, dense)
    e = pooled.numpy().reshape(5, 9, 8)
    fm = np.array([sum(e[b, i] @ e[b, j] for i in range(9) for j in range(i + 1, 9))
                   for b in range(5)])
    x = np.concatenate([pooled.numpy(), _mlp_numpy(over.inputs.dense_arch, dense.numpy())], 1)
    h = _mlp_numpy(over.deep, x)
    for task in ("click", "conversion"):
        head = over.heads[task]
        deep = h @ head.weight.detach().numpy().T[:, 0] + head.bias.detach().numpy()[0]
        np.testing.assert_allclose(out[task].detach().numpy(), deep + fm, rtol=1e-10)


def test_old_spec_with_another_arch_section_names_the_key() -> None:
    from recsys.errors import SpecError

    raw = tiny_spec_dict(Path("unused"))
    raw["model"].update({"arch": "mlp", "pin": {"num_layers": 2}})
    with pytest.raises(SpecError, match=r"model\.pin: unknown key for arch 'mlp' .*belongs to "
                                        r"arch dynint, pin, xdeepint"):
        validate_spec(raw)
    raw["model"]["arch"] = "nope"
    with pytest.raises(SpecError, match=r"model\.arch: unknown arch 'nope'; expected one of: "):
        validate_spec(raw)


# a comparison of an arch with an arch name (`arch == "pin"`, `model.arch != 'moe'`,
# `arch in ("ranktower", ...)`) or the old enum (`Arch.X`)
_NAMES = "|".join(ARCHS)
_COMPARISON = re.compile(
    r"""arch\w*\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\[\{]?\s*["'](""" + _NAMES
    + r""")["']|\bArch\.[A-Z]""")


def test_no_arch_name_comparisons_outside_the_archs_package() -> None:
    found = []
    for path in sorted((ROOT / "recsys").rglob("*.py")):
        if "archs" in path.relative_to(ROOT / "recsys").parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _COMPARISON.search(line.split("#")[0]):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "arch names compared outside recsys/models/archs/:\n" + "\n".join(found)


def test_the_comparison_finder_finds_comparisons() -> None:
    assert _COMPARISON.search('if spec.model.arch == "moe":')
    assert _COMPARISON.search("if arch in ('ranktower', 'dssm'):")
    assert _COMPARISON.search("x = Arch.DCN")
    assert not _COMPARISON.search('arch = "moe"')
    assert not _COMPARISON.search('if kind == "pin":')  # an expert kind, not an arch
