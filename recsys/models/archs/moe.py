"""``moe``: AdaEnsemble, a sparse mixture of heterogeneous experts with dynamic early exit, over the
stacked fields; its per-depth estimators give the logits and its router losses the auxiliary loss
(docs/methods.md section 3). Rows routed away from an expert or exiting early give some
parameters no gradient in a step; with the gather dispatch (the CPU's default) an expert no row was
routed to, or a depth no row reached, runs nothing and its parameters get no gradient at all: the
arch has a dynamic graph."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

import torch
from pydantic import Field, model_validator

from recsys.models.archs.base import ArchDef, Fields, ModelBase, OverArch
from recsys.models.archs.pin import interaction_dim
from recsys.modules.fields import FieldStack
from recsys.modules.moe import AdaEnsemble
from recsys.validation import StrictModel, positive


class Expert(StrEnum):
    GATED_DENSE = "gated_dense"
    CROSS = "cross"
    PIN = "pin"
    CNN = "cnn"
    ATTENTION = "attention"


class MoESpec(StrictModel):
    """``[model.moe]``: AdaEnsemble."""

    experts: list[Expert] = Field(default_factory=lambda: list(Expert))
    top_k: int = 3
    # top-k annealing: k starts at the number of experts and falls linearly to top_k over this
    # many training steps (0 = top_k from the first step)
    anneal_steps: int = 0
    depths: int = 4
    init_temperature: float = 1.0  # the routers' learnable cosine temperature T
    noise_eps: float = 0.5
    weight_by_gates: bool = False
    load_balance_weight: float = 1.0
    z_loss_weight: float = 1e-3
    expert_prior: list[float] = Field(default_factory=lambda: [0.2, 0.2, 0.4, 0.1, 0.1])
    exit_prior: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.6, 0.1])
    # how the experts and depths execute, with the same results: "static" runs every expert and
    # depth on every row (no host-device sync: fast on an accelerator), "gather" runs each expert
    # only on its routed rows still in the stack (fast on the CPU); "auto" = static on an
    # accelerator, gather on the CPU, chosen per forward from the input's device
    dispatch: Literal["auto", "static", "gather"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> MoESpec:
        if not 1 <= self.top_k <= len(self.experts):
            raise ValueError(f"top_k must be in [1, {len(self.experts)}] (the number of "
                             f"experts), got {self.top_k}")
        positive("depths", self.depths)
        positive("init_temperature", self.init_temperature)
        if self.anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {self.anneal_steps}")
        for name, prior, n in (("expert_prior", self.expert_prior, len(self.experts)),
                               ("exit_prior", self.exit_prior, self.depths)):
            if len(prior) != n or min(prior) < 0 or abs(sum(prior) - 1.0) > 1e-6:
                raise ValueError(f"{name} needs {n} non-negative weights summing to 1, "
                                 f"got {prior}")
        return self


class MoEModel(ModelBase):
    arch: Literal["moe"] = "moe"
    moe: MoESpec = Field(default_factory=MoESpec)


class MoEOverArch(OverArch):
    """Stacked fields -> AdaEnsemble (experts, routers, early exit) -> logits per task.

    Example:
        >>> top = MoEOverArch(FieldStack([8] * 4, 8, 0, []), AdaEnsemble(4, 8), ["click"])
        >>> out = top(torch.randn(16, 32), torch.zeros(16, 0))   # {"click": (16,), "_aux_loss": ()}
    """

    def __init__(self, fields: FieldStack, ensemble: AdaEnsemble, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.fields = fields
        self.ensemble = ensemble

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, aux = self.ensemble(self.fields(pooled, dense))
        out = {t: logits[:, i] for i, t in enumerate(self.tasks)}
        out["_aux_loss"] = aux
        return out


def build(model: MoEModel, fields: Fields) -> OverArch:
    dim = interaction_dim(model, fields)
    stack = FieldStack(fields.dims, dim, fields.num_dense, model.dense_arch)
    kwargs = model.moe.model_dump(mode="json")
    return MoEOverArch(stack, AdaEnsemble(stack.num_fields, dim, len(model.tasks), **kwargs),
                       model.tasks)


ARCH = ArchDef("moe", MoEModel, build,
               "AdaEnsemble: sparse mixture of heterogeneous experts with early exit",
               stacks_fields=True, dynamic_graph=True)
