"""``dcn``: DCN-v2's cross network on the concatenated features, then the MLP tower.

``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l`` (full rank, or ``W_l = U_l V_lᵀ`` with ``low_rank``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from recsys.models.archs.base import ArchDef, Fields, ModelBase, OverArch
from recsys.models.archs.mlp import ConcatInput, DeepOverArch, MLPSpec
from recsys.modules.cross import CrossNet
from recsys.validation import StrictModel, positive


class DCNSpec(StrictModel):
    """``[model.dcn]``."""

    num_layers: int = 3
    low_rank: int | None = None  # None = full-rank DCN-v2 cross

    @model_validator(mode="after")
    def _check(self) -> DCNSpec:
        positive("num_layers", self.num_layers)
        positive("low_rank", self.low_rank)
        return self


class DCNModel(ModelBase):
    arch: Literal["dcn"] = "dcn"
    mlp: MLPSpec = Field(default_factory=MLPSpec)
    dcn: DCNSpec = Field(default_factory=DCNSpec)


class CrossInput(nn.Module):
    """The concatenated features through a cross network (same width out)."""

    def __init__(self, concat: ConcatInput, num_layers: int, low_rank: int | None) -> None:
        super().__init__()
        self.concat = concat
        self.cross = CrossNet(concat.out_features, num_layers, low_rank)
        self.out_features = concat.out_features

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.cross(self.concat(pooled, dense))


def build(model: DCNModel, fields: Fields) -> OverArch:
    concat = ConcatInput(fields.dims, fields.num_dense, model.dense_arch)
    return DeepOverArch(CrossInput(concat, model.dcn.num_layers, model.dcn.low_rank), model.mlp,
                        model.tasks)


ARCH = ArchDef("dcn", DCNModel, build, "DCN-v2 cross network, then the MLP tower")
