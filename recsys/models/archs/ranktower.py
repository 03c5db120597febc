"""``ranktower``: RankTower, a two-tower pre-ranker that learns from every stage of the cascade
(docs/methods.md section 4).

The pooled features split by side: user and context fields feed the user tower, item fields the
item tower (dense features of each side become one more field of that side). The towers never see
the other side, so item representations can be computed once and cached; only ``score`` (RankTower:
gated cross-attention and max-sim; DSSM, in dssm.py: a dot product) runs per user-item pair.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from recsys.models.archs.base import ArchDef, Fields, ModelBase, OverArch, no_aux_loss
from recsys.models.archs.pin import interaction_dim
from recsys.modules.fields import FieldSubset
from recsys.modules.ranktower import RankTowerNet
from recsys.validation import StrictModel, positive

ITEM = "item"  # the side whose fields feed the item tower (user and context feed the user tower)


class RankTowerSpec(StrictModel):
    """``[model.ranktower]`` (the DSSM baseline reads ``hidden`` and ``head_dim`` from it too, so
    that both towers compare like for like)."""

    heads: int = 4
    head_dim: int = 32
    hidden: list[int] = Field(default_factory=lambda: [128])
    late_interaction: bool = False
    init_temperature: float = 0.07

    @model_validator(mode="after")
    def _check(self) -> RankTowerSpec:
        for name in ("heads", "head_dim", "init_temperature"):
            positive(name, getattr(self, name))
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden sizes must be > 0, got {self.hidden}")
        return self


class RankTowerModel(ModelBase):
    arch: Literal["ranktower"] = "ranktower"
    ranktower: RankTowerSpec = Field(default_factory=RankTowerSpec)


class TwoTowerOverArch(OverArch):
    """User tower, item tower, pairwise score -> the first task's logit.

    Args:
        fields: the pooled and dense features (their sides split them between the towers).
        dim: the interaction dim D.
        dense_hidden: the dense arch's hidden sizes.
        make_net: ``(user fields, item fields) -> net`` with ``user_tower``, ``item_tower`` and
            ``score``.
        task: the task it scores.

    Example:
        >>> top = TwoTowerOverArch(fields, 16, [64], lambda nu, ni: RankTowerNet(nu, ni, 16), "click")
        >>> out = top(pooled, batch.dense)             # {"click": (B,), "_aux_loss": ()}
        >>> items = top.item_repr(pooled, batch.dense)  # cacheable
    """

    def __init__(self, fields: Fields, dim: int, dense_hidden: list[int],
                 make_net: Callable[[int, int], nn.Module], task: str) -> None:
        super().__init__()
        is_item = [s == ITEM for s in fields.sides]
        self.user_inputs = FieldSubset(
            fields.dims, [i for i, x in enumerate(is_item) if not x],
            [i for i, s in enumerate(fields.dense_sides) if s != ITEM], dim, dense_hidden)
        self.item_inputs = FieldSubset(
            fields.dims, [i for i, x in enumerate(is_item) if x],
            [i for i, s in enumerate(fields.dense_sides) if s == ITEM], dim, dense_hidden)
        if not any(is_item) or all(is_item):
            raise ValueError("a two-tower model needs user (or context) and item features")
        self.net = make_net(self.user_inputs.num_fields, self.item_inputs.num_fields)
        self.task = task

    def user_repr(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.net.user_tower(self.user_inputs(pooled, dense))

    def item_repr(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.net.item_tower(self.item_inputs(pooled, dense))

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        score = self.net.score(self.user_repr(pooled, dense), self.item_repr(pooled, dense))
        out = {self.task: score}
        out["_aux_loss"] = no_aux_loss(pooled)
        return out


def build(model: RankTowerModel, fields: Fields) -> OverArch:
    dim = interaction_dim(model, fields)
    kwargs = model.ranktower.model_dump()
    return TwoTowerOverArch(fields, dim, model.dense_arch,
                            lambda nu, ni: RankTowerNet(nu, ni, dim, **kwargs), model.tasks[0])


ARCH = ArchDef("ranktower", RankTowerModel, build,
               "RankTower: decoupled two-tower pre-ranker trained on the whole cascade",
               stacks_fields=True, cascade_view=True, two_tower=True)
