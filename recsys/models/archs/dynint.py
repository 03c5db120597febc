"""``dynint``: DynInt, xDeepInt with input-dependent activations and/or weights, and the xDeepInt
readout (docs/methods.md section 2). It runs the residual single-head PIN recursion, so
``[model.pin]`` needs ``residual = true`` and ``heads = 1``."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field, model_validator

from recsys.models.archs.base import ArchDef, Fields, ModelBase, OverArch
from recsys.models.archs.pin import PINSpec, interaction_dim
from recsys.models.archs.xdeepint import ReadoutOverArch
from recsys.modules.dynint import DynamicPIN
from recsys.modules.fields import FieldStack
from recsys.validation import StrictModel, positive


class DynamicActivation(StrEnum):
    NONE = "none"  # static PIN activation
    A1 = "A1"  # gate the new interaction term per row (default)
    A2 = "A2"  # gate the layer output
    A3 = "A3"  # per-bit gate in the A1 position


class DynamicParameter(StrEnum):
    NONE = "none"  # static W
    B1 = "B1"  # row/column scaling of W (default)
    B2 = "B2"  # static plus generated low rank
    B3 = "B3"  # generated low rank only
    B4 = "B4"  # mixture of basis matrices


class DynIntSpec(StrictModel):
    """``[model.dynint]``: a dynamic activation and/or a dynamic parameter mode."""

    activation_mode: DynamicActivation = DynamicActivation.A1
    parameter_mode: DynamicParameter = DynamicParameter.B1
    rank: int = 4
    num_basis: int = 4
    stop_gradient_gate: bool = False

    @model_validator(mode="after")
    def _check(self) -> DynIntSpec:
        positive("rank", self.rank)
        positive("num_basis", self.num_basis)
        return self


class DynIntModel(ModelBase):
    arch: Literal["dynint"] = "dynint"
    pin: PINSpec = Field(default_factory=PINSpec)
    dynint: DynIntSpec = Field(default_factory=DynIntSpec)

    def check_dims(self, dim: int) -> list[tuple[str, str]]:
        problems = self.pin.check_dims(dim)
        if self.pin.heads != 1 or not self.pin.residual:
            problems.append(("pin", "dynint runs the residual single-head PIN recursion: set "
                                    "residual = true and heads = 1"))
        return problems


def build(model: DynIntModel, fields: Fields) -> OverArch:
    dim = interaction_dim(model, fields)
    stack = FieldStack(fields.dims, dim, fields.num_dense, model.dense_arch)
    pin = {k: v for k, v in model.pin.kwargs().items() if k != "heads"}
    dyn = model.dynint.model_dump(mode="json")
    return ReadoutOverArch(stack, DynamicPIN(stack.num_fields, dim, **pin, **dyn), model.tasks)


ARCH = ArchDef("dynint", DynIntModel, build,
               "DynInt: xDeepInt with dynamic activations / parameters, linear readout",
               stacks_fields=True)
