"""``mlp``: the concatenated pooled embeddings and dense features -> MLP tower -> one head per task.

The plain deep baseline, and the building blocks that ``dcn``, ``pin`` and ``deepfm`` reuse: the
``[model.mlp]`` section and :class:`DeepOverArch` (an input block, then the tower and the heads).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from recsys.models.archs.base import ArchDef, Fields, ModelBase, OverArch, no_aux_loss, task_heads
from recsys.modules.mlp import MLP
from recsys.validation import StrictModel, probability


class MLPSpec(StrictModel):
    """``[model.mlp]``: the deep tower over the interaction arch's output."""

    hidden: list[int] = Field(default_factory=lambda: [256, 128, 64])
    dropout: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> MLPSpec:
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden sizes must be > 0, got {self.hidden}")
        probability("dropout", self.dropout)
        return self


class MLPModel(ModelBase):
    arch: Literal["mlp"] = "mlp"
    mlp: MLPSpec = Field(default_factory=MLPSpec)


class ConcatInput(nn.Module):
    """``[pooled ; dense_arch(dense)]`` ``(B, Σ dims + dense_arch[-1])``.

    Example:
        >>> block = ConcatInput([16, 16], num_dense=3, dense_hidden=[8])
        >>> block(torch.randn(4, 32), torch.randn(4, 3)).shape, block.out_features
        (torch.Size([4, 40]), 40)
    """

    def __init__(self, field_dims: list[int], num_dense: int, dense_hidden: list[int]) -> None:
        super().__init__()
        self.dense_arch = MLP(num_dense, dense_hidden) if num_dense else None
        self.out_features = sum(field_dims) + (self.dense_arch.out_features
                                               if self.dense_arch is not None else 0)

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        if self.dense_arch is None:
            return pooled
        return torch.cat([pooled, self.dense_arch(dense)], dim=1)


class DeepOverArch(OverArch):
    """An input block ``(pooled, dense) -> (B, width)`` -> MLP tower -> one linear head per task.

    Args:
        inputs: the input block; it has ``out_features`` and, optionally, ``interaction_weights()``.
        mlp: the tower's settings.
        tasks: the task names.

    Example:
        >>> top = DeepOverArch(ConcatInput([16] * 8, 0, []), MLPSpec(), ["click"])
        >>> top(torch.randn(4, 128), torch.zeros(4, 0))["click"].shape
        torch.Size([4])
    """

    def __init__(self, inputs: nn.Module, mlp: MLPSpec, tasks: list[str]) -> None:
        super().__init__()
        self.inputs = inputs
        self.deep = MLP(int(inputs.out_features), mlp.hidden, mlp.dropout)
        self.heads = task_heads(tasks, self.deep.out_features)

    def interaction_weights(self) -> list[nn.Parameter]:
        weights = getattr(self.inputs, "interaction_weights", None)
        return weights() if weights is not None else []

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.deep(self.inputs(pooled, dense))
        out = {t: head(h).squeeze(-1) for t, head in self.heads.items()}
        out["_aux_loss"] = no_aux_loss(pooled)
        return out


def build(model: MLPModel, fields: Fields) -> OverArch:
    return DeepOverArch(ConcatInput(fields.dims, fields.num_dense, model.dense_arch), model.mlp,
                        model.tasks)


ARCH = ArchDef("mlp", MLPModel, build, "MLP over the concatenated embeddings (baseline)")
