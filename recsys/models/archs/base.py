"""What every arch declares, and the over-arch contract that the ranker, the trainer and the export
rely on.

An arch is one file in this package that defines a module-level ``ARCH = ArchDef(...)``:

- ``model``: its ``[model]`` spec section, a subclass of :class:`ModelBase` whose ``arch`` field is
  a ``Literal`` of the arch's name (the tag of the spec's discriminated union) and which holds the
  arch's own sub-sections (``[model.pin]``, ``[model.moe]``, ...);
- ``build``: ``(model section, fields) -> over-arch``;
- flags that the trainer, objective, sharding and export read instead of comparing arch names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from recsys.validation import StrictModel, positive

# the key of the auxiliary loss in an over-arch's output (not a task: never a metric); forward
# methods spell it out because TorchScript cannot read a str global
AUX_LOSS = "_aux_loss"


class ModelBase(StrictModel):
    """The settings every arch shares: the tasks and the input side of the over-arch."""

    arch: str
    tasks: list[str] = Field(default_factory=lambda: ["click"])
    esmm: bool = False  # pCTCVR = pCTR * pCVR
    dense_arch: list[int] = Field(default_factory=lambda: [64])
    interaction_dim: int | None = None  # project every field to this dim; None = the tables' dim

    def check_dims(self, dim: int) -> list[tuple[str, str]]:
        """Problems ``(key, message)`` of this section for the interaction dim ``dim`` (archs
        that stack fields check their divisibility constraints here)."""
        return []

    @model_validator(mode="after")
    def _check_common(self) -> ModelBase:
        if not self.tasks:
            raise ValueError("tasks needs at least one task")
        positive("interaction_dim", self.interaction_dim)
        if any(h <= 0 for h in self.dense_arch):
            raise ValueError(f"dense_arch sizes must be > 0, got {self.dense_arch}")
        return self


@dataclass(frozen=True)
class Fields:
    """What the over-arch sees of the features, in the order of the pooled tensor.

    Args:
        dims: the width of each pooled sparse feature.
        names: the name of each pooled sparse feature.
        sides: the side (``user``, ``item``, ``context``) of each pooled sparse feature.
        dense_sides: the side of each dense feature, in the order of the dense tensor.
    """

    dims: list[int]
    names: list[str]
    sides: list[str]
    dense_sides: list[str] = field(default_factory=list)

    @property
    def num_dense(self) -> int:
        return len(self.dense_sides)


class OverArch(nn.Module):
    """The contract of everything above the pooled embeddings.

    ``forward(pooled (B, Σ dims), dense (B, n_dense))`` returns a dict with one logit ``(B,)`` per
    task and :data:`AUX_LOSS`, a scalar added to the training loss (zero for most archs).
    ``interaction_weights()`` lists the parameters that ``train.interaction_optimizer`` owns (none
    by default). Two-tower archs also have ``user_repr`` and ``item_repr``.
    """

    def interaction_weights(self) -> list[nn.Parameter]:
        return []

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class ArchDef:
    """One arch of the registry.

    Args:
        name: the value of ``model.arch``.
        model: the ``[model]`` section class of this arch.
        build: ``(model section, fields) -> over-arch``.
        summary: one line for help texts and docs.
        stacks_fields: the over-arch stacks the fields as ``(B, m, D)``: every table needs one
            dim, or ``model.interaction_dim`` set.
        cascade_view: trains on the data's cascade view (every stage of each request) with the
            cascade objective, not only on impressions.
        dynamic_graph: some parameters may get no gradient in a step (data-dependent routing):
            DDP must look for unused parameters.
        two_tower: user and item towers that export as a serving split (cacheable item side).
    """

    name: str
    model: type[ModelBase]
    build: Callable[[Any, Fields], OverArch]
    summary: str
    stacks_fields: bool = False
    cascade_view: bool = False
    dynamic_graph: bool = False
    two_tower: bool = False


def task_heads(tasks: list[str], width: int) -> nn.ModuleDict:
    """One linear head ``width -> 1`` per task."""
    return nn.ModuleDict({t: nn.Linear(width, 1) for t in tasks})


def no_aux_loss(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), device=like.device, dtype=like.dtype)
