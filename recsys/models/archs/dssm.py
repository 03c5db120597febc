"""``dssm``: the plain two-tower baseline: an MLP per tower and a dot product, trained with BCE on
impressions (the towers' ``hidden`` and ``head_dim`` come from ``[model.ranktower]``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from recsys.models.archs.base import ArchDef, Fields, ModelBase, OverArch
from recsys.models.archs.pin import interaction_dim
from recsys.models.archs.ranktower import RankTowerSpec, TwoTowerOverArch
from recsys.modules.ranktower import DSSMNet


class DSSMModel(ModelBase):
    arch: Literal["dssm"] = "dssm"
    ranktower: RankTowerSpec = Field(default_factory=RankTowerSpec)


def build(model: DSSMModel, fields: Fields) -> OverArch:
    dim = interaction_dim(model, fields)
    hidden, out_dim = list(model.ranktower.hidden), model.ranktower.head_dim
    return TwoTowerOverArch(fields, dim, model.dense_arch,
                            lambda nu, ni: DSSMNet(nu, ni, dim, hidden, out_dim), model.tasks[0])


ARCH = ArchDef("dssm", DSSMModel, build, "DSSM: two MLP towers and a dot product (baseline)",
               stacks_fields=True, two_tower=True)
