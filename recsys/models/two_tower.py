"""Two-tower over-arches: RankTower (METHODS.md section 4) and the DSSM baseline.

The pooled features split by side: user and context fields feed the user tower, item fields the
item tower (dense features of each side become one more field of that side). The towers never see
the other side, so item representations can be computed once and cached; only ``score`` (RankTower:
gated cross-attention and max-sim; DSSM: a dot product) runs per user-item pair.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.models.over_arch import FieldStack
from recsys.modules.ranktower import DSSMNet, RankTowerNet
from recsys.spec import Arch, Side, Spec


def _columns(dims: list[int], chosen: list[int]) -> list[int]:
    starts = [sum(dims[:i]) for i in range(len(dims))]
    return [c for i in chosen for c in range(starts[i], starts[i] + dims[i])]


class TowerInputs(nn.Module):
    """One side's fields out of the pooled embeddings and the dense features: ``(B, m, D)``.

    Args:
        field_dims: widths of every pooled feature, in order.
        fields: the indices of this side's pooled features.
        dense: the indices of this side's dense features.
        dim: the interaction dim D.
        dense_hidden: the dense arch's hidden sizes.
    """

    def __init__(self, field_dims: list[int], fields: list[int], dense: list[int], dim: int,
                 dense_hidden: list[int]) -> None:
        super().__init__()
        self.register_buffer("pooled_cols", torch.tensor(_columns(field_dims, fields),
                                                         dtype=torch.long), persistent=False)
        self.register_buffer("dense_cols", torch.tensor(dense, dtype=torch.long),
                             persistent=False)
        self.stack = FieldStack([field_dims[i] for i in fields], dim, len(dense), dense_hidden)
        self.num_fields = self.stack.num_fields

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.stack(pooled.index_select(1, self.pooled_cols),
                          dense.index_select(1, self.dense_cols))


class TwoTowerOverArch(nn.Module):
    """``ranktower`` | ``dssm``: user tower, item tower, pairwise score -> the first task's logit.

    Example:
        >>> top = TwoTowerOverArch(spec, field_names, field_dims)
        >>> out = top(pooled, batch.dense)             # {"click": (B,), AUX_LOSS: ()}
        >>> items = top.item_repr(pooled, batch.dense)  # cacheable
    """

    def __init__(self, spec: Spec, field_names: list[str], field_dims: list[int]) -> None:
        super().__init__()
        m, feats = spec.model, spec.features
        side = {f.name: f.side for f in feats.fields}
        dim = m.interaction_dim or field_dims[0]
        dense = [f.side for f in feats.dense_fields()]
        is_item = [side[n] == Side.ITEM for n in field_names]
        self.user_inputs = TowerInputs(
            field_dims, [i for i, x in enumerate(is_item) if not x],
            [i for i, s in enumerate(dense) if s != Side.ITEM], dim, m.dense_arch)
        self.item_inputs = TowerInputs(
            field_dims, [i for i, x in enumerate(is_item) if x],
            [i for i, s in enumerate(dense) if s == Side.ITEM], dim, m.dense_arch)
        if not any(is_item) or all(is_item):
            raise ValueError(f"model.arch '{m.arch}' needs user (or context) and item features")
        nu, ni = self.user_inputs.num_fields, self.item_inputs.num_fields
        if m.arch == Arch.RANKTOWER:
            self.net: nn.Module = RankTowerNet(nu, ni, dim, m.ranktower)
        else:
            self.net = DSSMNet(nu, ni, dim, list(m.ranktower.hidden), m.ranktower.head_dim)
        self.task = m.tasks[0]

    def interaction_weights(self) -> list[nn.Parameter]:
        return []

    def user_repr(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.net.user_tower(self.user_inputs(pooled, dense))

    def item_repr(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.net.item_tower(self.item_inputs(pooled, dense))

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        score = self.net.score(self.user_repr(pooled, dense), self.item_repr(pooled, dense))
        out = {self.task: score}
        out["_aux_loss"] = torch.zeros((), device=pooled.device, dtype=pooled.dtype)
        return out
