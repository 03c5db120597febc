"""``xdeepint``: pure xDeepInt: the stacked fields -> PIN -> xDeepInt's linear readout per task, with
no MLP, as in the paper (docs/methods.md section 1). Pair it with ``train.interaction_optimizer``
(FTRL with λ1) and the ``gftrl`` sparse optimizer for feature and interaction selection."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from recsys.models.archs.base import ArchDef, Fields, ModelBase, OverArch, no_aux_loss
from recsys.models.archs.pin import PINSpec, interaction_dim
from recsys.modules.fields import FieldStack
from recsys.modules.pin import PolynomialInteractionNetwork, XDeepIntReadout


class XDeepIntModel(ModelBase):
    arch: Literal["xdeepint"] = "xdeepint"
    pin: PINSpec = Field(default_factory=PINSpec)

    def check_dims(self, dim: int) -> list[tuple[str, str]]:
        return self.pin.check_dims(dim)


class ReadoutOverArch(OverArch):
    """Stacked fields -> an interaction network ``(B, m, D) -> (B, m', d)`` -> xDeepInt readout.

    Args:
        fields: the stacked-field block.
        interaction: the network (it has ``out_fields`` and ``interaction_weights()``).
        tasks: the task names (one readout output each).

    Example:
        >>> stack = FieldStack([8] * 4, 8, 0, [])
        >>> top = ReadoutOverArch(stack, PolynomialInteractionNetwork(4, 8), ["click"])
        >>> top(torch.randn(2, 32), torch.zeros(2, 0))["click"].shape
        torch.Size([2])
    """

    def __init__(self, fields: FieldStack, interaction: nn.Module, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.fields = fields
        self.pin = interaction
        self.readout = XDeepIntReadout(int(interaction.out_fields), len(self.tasks))

    def interaction_weights(self) -> list[nn.Parameter]:
        return self.pin.interaction_weights()

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.readout(self.pin(self.fields(pooled, dense)))
        out = {t: logits[:, i] for i, t in enumerate(self.tasks)}
        out["_aux_loss"] = no_aux_loss(pooled)
        return out


def build(model: XDeepIntModel, fields: Fields) -> OverArch:
    dim = interaction_dim(model, fields)
    stack = FieldStack(fields.dims, dim, fields.num_dense, model.dense_arch)
    pin = PolynomialInteractionNetwork(stack.num_fields, dim, **model.pin.kwargs())
    return ReadoutOverArch(stack, pin, model.tasks)


ARCH = ArchDef("xdeepint", XDeepIntModel, build, "pure xDeepInt: PIN and a linear readout, no MLP",
               stacks_fields=True)
