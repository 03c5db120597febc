"""``deepfm``: DeepFM (Guo et al., 2017): the factorization machine's second-order term beside the
deep tower, on the same embeddings.

``logit_t = head_t(MLP([pooled ; dense_arch(dense)])) + ½ Σ_d [(Σ_i v_{i,d})² − Σ_i v_{i,d}²]``
over the sparse fields' pooled embeddings ``v_i`` (projected to the interaction dim when the tables'
widths differ). The FM's first-order term has no table of its own here: the tower's first layer is
linear in the same inputs.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from recsys.models.archs.base import ArchDef, Fields, ModelBase, OverArch, no_aux_loss
from recsys.models.archs.mlp import ConcatInput, DeepOverArch, MLPSpec
from recsys.models.archs.pin import interaction_dim
from recsys.modules.fields import FieldStack


class DeepFMModel(ModelBase):
    arch: Literal["deepfm"] = "deepfm"
    mlp: MLPSpec = Field(default_factory=MLPSpec)


def fm_second_order(fields: torch.Tensor) -> torch.Tensor:
    """``(B, m, D) -> (B,)``: Σ_{i<j} <v_i, v_j>, computed in O(m·D) as
    ½ Σ_d [(Σ_i v_{i,d})² − Σ_i v_{i,d}²].

    Example:
        >>> v = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
        >>> fm_second_order(v)     # 1·3 + 2·4
        tensor([11.])
    """
    return 0.5 * (fields.sum(dim=1).pow(2) - fields.pow(2).sum(dim=1)).sum(dim=1)


class DeepFMOverArch(DeepOverArch):
    """The deep tower's logits plus the FM second-order term of the stacked sparse fields."""

    def __init__(self, inputs: ConcatInput, fm_fields: FieldStack, mlp: MLPSpec,
                 tasks: list[str]) -> None:
        super().__init__(inputs, mlp, tasks)
        self.fm_fields = fm_fields

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        # (no super().forward: TorchScript cannot compile it)
        h = self.deep(self.inputs(pooled, dense))
        fm = fm_second_order(self.fm_fields(pooled, dense))
        out = {t: head(h).squeeze(-1) + fm for t, head in self.heads.items()}
        out["_aux_loss"] = no_aux_loss(pooled)
        return out


def build(model: DeepFMModel, fields: Fields) -> OverArch:
    concat = ConcatInput(fields.dims, fields.num_dense, model.dense_arch)
    fm_fields = FieldStack(fields.dims, interaction_dim(model, fields), 0, [])
    return DeepFMOverArch(concat, fm_fields, model.mlp, model.tasks)


ARCH = ArchDef("deepfm", DeepFMModel, build,
               "DeepFM: the FM second-order term beside the MLP tower", stacks_fields=True)
