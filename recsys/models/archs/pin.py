"""``pin``: PIN (xDeepInt's polynomial interaction network) on the stacked fields, then the MLP
tower over its flattened output (docs/methods.md section 1).

The ``[model.pin]`` section declared here is shared by ``xdeepint`` and ``dynint``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from recsys.models.archs.base import ArchDef, Fields, ModelBase, OverArch
from recsys.models.archs.mlp import DeepOverArch, MLPSpec
from recsys.modules.fields import FieldStack
from recsys.modules.pin import ACTIVATIONS, PolynomialInteractionNetwork
from recsys.validation import StrictModel, positive, probability


class PINSpec(StrictModel):
    """``[model.pin]``: PIN / xDeepInt (docs/methods.md section 1)."""

    num_layers: int = 4
    subspaces: int = 1  # h: must divide the interaction embedding dim
    residual: bool = True
    activation: str = "linear"
    dropout: float = 0.0
    heads: int = 1

    @model_validator(mode="after")
    def _check(self) -> PINSpec:
        for name in ("num_layers", "subspaces", "heads"):
            positive(name, getattr(self, name))
        probability("dropout", self.dropout)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, "
                             f"got '{self.activation}'")
        return self

    def kwargs(self) -> dict[str, Any]:
        """The module's keyword arguments."""
        return self.model_dump()

    def check_dims(self, dim: int) -> list[tuple[str, str]]:
        """Problems of this section for interaction dim ``dim``: the heads and subspaces must
        divide it."""
        if dim % self.heads:
            return [("pin.heads", f"must divide the interaction embedding dim {dim}, "
                                  f"got {self.heads}")]
        if (dim // self.heads) % self.subspaces:
            return [("pin.subspaces", f"must divide the interaction embedding dim per head "
                                      f"{dim // self.heads}, got {self.subspaces}")]
        return []


class PINModel(ModelBase):
    arch: Literal["pin"] = "pin"
    mlp: MLPSpec = Field(default_factory=MLPSpec)
    pin: PINSpec = Field(default_factory=PINSpec)

    def check_dims(self, dim: int) -> list[tuple[str, str]]:
        return self.pin.check_dims(dim)


def interaction_dim(model: ModelBase, fields: Fields) -> int:
    """The D of the stacked fields: ``model.interaction_dim``, else the first table's dim."""
    return model.interaction_dim or fields.dims[0]


class PINInput(nn.Module):
    """Stacked fields -> PIN -> flattened ``(B, out_fields · out_dim)``."""

    def __init__(self, fields: Fields, dim: int, dense_hidden: list[int], pin: PINSpec) -> None:
        super().__init__()
        self.fields = FieldStack(fields.dims, dim, fields.num_dense, dense_hidden)
        self.pin = PolynomialInteractionNetwork(self.fields.num_fields, dim, **pin.kwargs())
        self.out_features = self.pin.out_fields * self.pin.out_dim

    def interaction_weights(self) -> list[nn.Parameter]:
        return self.pin.interaction_weights()

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.pin(self.fields(pooled, dense)).flatten(1)


def build(model: PINModel, fields: Fields) -> OverArch:
    inputs = PINInput(fields, interaction_dim(model, fields), model.dense_arch, model.pin)
    return DeepOverArch(inputs, model.mlp, model.tasks)


ARCH = ArchDef("pin", PINModel, build, "PIN on the stacked fields, then the MLP tower",
               stacks_fields=True)
