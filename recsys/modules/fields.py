"""The stacked-field view of pooled embeddings that the interaction archs read: ``(B, m, D)``."""

from __future__ import annotations

import torch
from torch import nn

from recsys.modules.mlp import MLP


class FieldStack(nn.Module):
    """Pooled embeddings (and dense features) as stacked fields ``(B, m, D)``.

    Fields whose width is not ``dim`` get a linear projection (no bias); the dense features, if any,
    pass through the dense arch, whose last layer is ``dim`` wide, and become one more field.

    Args:
        field_dims: the width of each pooled feature, in the order of the pooled tensor.
        dim: the interaction dim D.
        num_dense: the number of dense features (0: none).
        dense_hidden: the dense arch's hidden sizes (its output is ``dim``).

    Example:
        >>> stack = FieldStack([16, 16, 16], 16, num_dense=3, dense_hidden=[64])
        >>> stack(torch.randn(8, 48), torch.randn(8, 3)).shape
        torch.Size([8, 4, 16])
    """

    def __init__(self, field_dims: list[int], dim: int, num_dense: int,
                 dense_hidden: list[int]) -> None:
        super().__init__()
        self.field_dims = list(field_dims)
        self.dim = dim
        self.same_width = all(d == dim for d in field_dims)
        self.proj = nn.ModuleList(
            nn.Identity() if d == dim else nn.Linear(d, dim, bias=False) for d in field_dims)
        self.has_dense = num_dense > 0
        self.dense_arch = MLP(num_dense, [*dense_hidden, dim]) if num_dense else nn.Identity()
        self.num_fields = len(field_dims) + int(self.has_dense)

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        if self.same_width:
            x = pooled.view(pooled.shape[0], len(self.field_dims), self.dim)
        else:
            parts = torch.split(pooled, self.field_dims, dim=1)
            x = torch.stack([proj(parts[i]) for i, proj in enumerate(self.proj)], dim=1)
        if self.has_dense:
            x = torch.cat([x, self.dense_arch(dense).unsqueeze(1)], dim=1)
        return x


def _columns(dims: list[int], chosen: list[int]) -> list[int]:
    starts = [sum(dims[:i]) for i in range(len(dims))]
    return [c for i in chosen for c in range(starts[i], starts[i] + dims[i])]


class FieldSubset(nn.Module):
    """Some of the pooled features and some of the dense features, stacked: ``(B, m, D)`` (one
    tower's inputs in a two-tower model).

    Args:
        field_dims: widths of every pooled feature, in order.
        fields: the indices of the chosen pooled features.
        dense: the indices of the chosen dense features.
        dim: the interaction dim D.
        dense_hidden: the dense arch's hidden sizes.

    Example:
        >>> item = FieldSubset([8, 8, 8], fields=[2], dense=[], dim=8, dense_hidden=[16])
        >>> item(torch.randn(4, 24), torch.randn(4, 0)).shape
        torch.Size([4, 1, 8])
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
