"""Multi-layer perceptrons: the dense arch, the deep tower and the plain MLP interaction arch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Linear -> ReLU (-> dropout) per hidden size.

    Args:
        in_features: input width.
        hidden: output width of each layer (the last one is the output width).
        dropout: dropout after each activation (0 = none).

    Example:
        >>> MLP(16, [64, 32])(torch.randn(8, 16)).shape
        torch.Size([8, 32])
    """

    def __init__(self, in_features: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
