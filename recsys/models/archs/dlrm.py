"""``dlrm``: DLRM (Naumov et al., 2019), as ``torchrec.models.dlrm`` defines it.

The dense features go through the dense arch (an MLP whose last layer is the interaction dim D);
the interaction is every pairwise dot product among ``[dense ; sparse_1 .. sparse_F]``
(``F + F(F-1)/2`` values), concatenated after the dense vector; the over-arch is the MLP tower and
one linear head per task. TorchRec's ``DenseArch`` and ``InteractionArch`` are used as they are.
Without dense features a learned vector stands in for the dense arch's output, so the layout (and
the dense-sparse dot products) stay those of DLRM.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch

from recsys.models.archs.base import ArchDef, Fields, ModelBase, OverArch
from recsys.models.archs.mlp import DeepOverArch, MLPSpec
from recsys.models.archs.pin import interaction_dim
from recsys.modules.fields import FieldStack


class DLRMModel(ModelBase):
    arch: Literal["dlrm"] = "dlrm"
    mlp: MLPSpec = Field(default_factory=MLPSpec)


class DotInteractionInput(nn.Module):
    """``(pooled, dense) -> [dense_arch(dense) ; pairwise dots]`` ``(B, D + F + F(F-1)/2)``.

    Example:
        >>> block = DotInteractionInput([8] * 3, dim=8, num_dense=2, dense_hidden=[16])
        >>> block(torch.randn(4, 24), torch.randn(4, 2)).shape, block.out_features
        (torch.Size([4, 14]), 14)
    """

    def __init__(self, field_dims: list[int], dim: int, num_dense: int,
                 dense_hidden: list[int]) -> None:
        super().__init__()
        self.fields = FieldStack(field_dims, dim, 0, [])
        self.has_dense = num_dense > 0
        self.dense_arch = DenseArch(num_dense, [*dense_hidden, dim]) if num_dense else None
        # stands in for the dense arch's output when there are no dense features
        self.dense_vector = None if num_dense else nn.Parameter(torch.randn(dim) / dim ** 0.5)
        self.interaction = InteractionArch(len(field_dims))
        f = len(field_dims)
        self.out_features = dim + f + f * (f - 1) // 2

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        sparse = self.fields(pooled, dense)
        if self.dense_arch is not None:
            d = self.dense_arch(dense)
        else:
            assert self.dense_vector is not None
            d = self.dense_vector.unsqueeze(0).expand(pooled.shape[0], -1)
        return self.interaction(d, sparse)


def build(model: DLRMModel, fields: Fields) -> OverArch:
    block = DotInteractionInput(fields.dims, interaction_dim(model, fields), fields.num_dense,
                                model.dense_arch)
    return DeepOverArch(block, model.mlp, model.tasks)


ARCH = ArchDef("dlrm", DLRMModel, build,
               "DLRM: pairwise dot products of the dense vector and the embeddings, MLP on top",
               stacks_fields=True)
