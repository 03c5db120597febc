"""The over-arches of every ranker arch: field stacking, outputs, TorchScript parity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_spec_dict

from recsys.models.over_arch import AUX_LOSS, FieldStack, build_over_arch
from recsys.spec import validate_spec

ARCHS: dict[str, dict[str, Any]] = {
    "mlp": {}, "dcn": {}, "pin": {"pin": {"num_layers": 2, "subspaces": 2}},
    "xdeepint": {"pin": {"num_layers": 3, "subspaces": 4}}, "dynint": {},
    "moe": {"moe": {"anneal_steps": 5}},
}


def _over(arch: str) -> torch.nn.Module:
    raw = tiny_spec_dict(Path("unused"))
    raw["model"].update({"arch": arch, **ARCHS[arch]})
    return build_over_arch(validate_spec(raw), [8] * 9)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_over_arch_outputs_and_scripted_parity(arch: str) -> None:
    torch.manual_seed(0)
    over = _over(arch).eval()
    pooled, dense = torch.randn(16, 72), torch.randn(16, 3)
    out = over(pooled, dense)
    assert set(out) == {"click", "conversion", AUX_LOSS}
    assert out["click"].shape == (16,) and out[AUX_LOSS].shape == ()
    scripted = torch.jit.script(over)
    again = scripted(pooled, dense)
    for key in out:
        torch.testing.assert_close(again[key], out[key], rtol=0, atol=0)


def test_moe_aux_loss_is_positive_in_training() -> None:
    over = _over("moe").train()
    out = over(torch.randn(32, 72), torch.randn(32, 3))
    assert float(out[AUX_LOSS]) > 0  # load balance is >= its minimum, which is positive


def test_field_stack_projects_other_widths_and_adds_the_dense_field() -> None:
    torch.manual_seed(0)
    stack = FieldStack([4, 8, 4], dim=8, n_dense=2, dense_hidden=[5])
    pooled, dense = torch.randn(3, 16), torch.randn(3, 2)
    x = stack(pooled, dense)
    assert x.shape == (3, 4, 8) and stack.num_fields == 4
    torch.testing.assert_close(x[:, 1], pooled[:, 4:12])  # already 8 wide: unchanged
    torch.testing.assert_close(x[:, 0], pooled[:, :4] @ stack.proj[0].weight.T)
    torch.testing.assert_close(x[:, 3], stack.dense_arch(dense))
