"""DCN-v2 cross network (Wang et al. 2021): explicit bounded-degree feature crosses."""

from __future__ import annotations

import torch
from torch import nn


class CrossNet(nn.Module):
    """``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``; with ``low_rank = r``, ``W_l = U_l V_l^T``.

    Args:
        width: the width of x_0 (the concatenated features).
        num_layers: number of cross layers (crosses up to degree num_layers + 1).
        low_rank: rank of each W_l, or None for full rank.

    Example:
        >>> CrossNet(24, num_layers=3)(torch.randn(8, 24)).shape
        torch.Size([8, 24])
    """

    def __init__(self, width: int, num_layers: int, low_rank: int | None = None) -> None:
        super().__init__()
        if low_rank is None:
            self.w = nn.ModuleList(nn.Linear(width, width) for _ in range(num_layers))
        else:
            self.w = nn.ModuleList(
                nn.Sequential(nn.Linear(width, low_rank, bias=False), nn.Linear(low_rank, width))
                for _ in range(num_layers))
        self.out_features = width

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w in self.w:
            x = x0 * w(x) + x
        return x
