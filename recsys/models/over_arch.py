"""Everything above the pooled embeddings: the field stack, the interaction arch and the heads.

One over-arch per family of interaction arch, all with the same contract: ``forward(pooled,
dense)`` returns a dict of one logit ``(B,)`` per task plus :data:`AUX_LOSS`, a scalar added to the
training loss (AdaEnsemble's router losses; zero for the others).

- :class:`DeepOverArch`: ``mlp``, ``dcn`` (cross network on the concatenated features) and ``pin``
  (PIN on the stacked fields), each followed by the MLP tower and one linear head per task;
- :class:`ReadoutOverArch`: ``xdeepint`` (PIN) and ``dynint`` (dynamic PIN) with xDeepInt's linear
  readout and no MLP, as in the papers;
- :class:`MoEOverArch`: ``moe``, AdaEnsemble's sparse mixture of experts with early exit, whose
  per-depth estimators give the logits.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.modules.cross import CrossNet
from recsys.modules.dynint import DynamicPIN
from recsys.modules.mlp import MLP
from recsys.modules.moe import AdaEnsemble
from recsys.modules.pin import PolynomialInteractionNetwork, XDeepIntReadout
from recsys.spec import Arch, Spec

# the key of the auxiliary loss in an over-arch's output (not a task: never a metric); forward
# methods spell it out because TorchScript cannot read a str global
AUX_LOSS = "_aux_loss"

class FieldStack(nn.Module):
    """Pooled embeddings (and dense features) as stacked fields ``(B, m, D)``.

    Fields whose width is not ``dim`` get a linear projection (no bias); the dense features, if any,
    pass through the dense arch, whose last layer is ``dim`` wide, and become one more field.

    Args:
        field_dims: the width of each pooled feature, in the order of the pooled tensor.
        dim: the interaction dim D.
        n_dense: the number of dense features (0: none).
        dense_hidden: the dense arch's hidden sizes (its output is ``dim``).

    Example:
        >>> stack = FieldStack([16, 16, 16], 16, n_dense=3, dense_hidden=[64])
        >>> stack(torch.randn(8, 48), torch.randn(8, 3)).shape
        torch.Size([8, 4, 16])
    """

    def __init__(self, field_dims: list[int], dim: int, n_dense: int,
                 dense_hidden: list[int]) -> None:
        super().__init__()
        self.field_dims = list(field_dims)
        self.dim = dim
        self.same_width = all(d == dim for d in field_dims)
        self.proj = nn.ModuleList(
            nn.Identity() if d == dim else nn.Linear(d, dim, bias=False) for d in field_dims)
        self.has_dense = n_dense > 0
        self.dense_arch = MLP(n_dense, [*dense_hidden, dim]) if n_dense else nn.Identity()
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


def _heads(tasks: list[str], width: int) -> nn.ModuleDict:
    return nn.ModuleDict({t: nn.Linear(width, 1) for t in tasks})


class DeepOverArch(nn.Module):
    """``mlp`` | ``dcn`` | ``pin`` -> MLP tower -> one linear head per task.

    ``mlp`` and ``dcn`` see ``[pooled ; dense_arch(dense)]``; ``pin`` sees the stacked fields of
    :class:`FieldStack` and the tower sees PIN's flattened output.

    Example:
        >>> top = DeepOverArch(spec, field_dims=[16] * 9)
        >>> out = top(pooled, batch.dense)      # {"click": (B,), ..., AUX_LOSS: ()}
    """

    def __init__(self, spec: Spec, field_dims: list[int]) -> None:
        super().__init__()
        m = spec.model
        n_dense = len(spec.features.dense_fields())
        self.arch = m.arch
        self.cross: nn.Module | None = None
        self.pin: PolynomialInteractionNetwork | None = None
        self.fields: FieldStack | None = None
        self.dense_arch: MLP | None = None
        if m.arch == Arch.PIN:
            dim = m.interaction_dim or field_dims[0]
            self.fields = FieldStack(field_dims, dim, n_dense, m.dense_arch)
            self.pin = PolynomialInteractionNetwork(m.pin, self.fields.num_fields, dim)
            width = self.pin.out_fields * self.pin.out_dim
        else:
            self.dense_arch = MLP(n_dense, m.dense_arch) if n_dense else None
            width = sum(field_dims) + (self.dense_arch.out_features if self.dense_arch else 0)
            if m.arch == Arch.DCN:
                self.cross = CrossNet(width, m.dcn.num_layers, m.dcn.low_rank)
        self.deep = MLP(width, m.mlp.hidden, m.mlp.dropout)
        self.heads = _heads(list(m.tasks), self.deep.out_features)

    def interaction_weights(self) -> list[nn.Parameter]:
        """PIN's W_l (what the interaction optimizer owns); none for mlp and dcn."""
        return self.pin.interaction_weights() if self.pin is not None else []

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.pin is not None and self.fields is not None:
            x = self.pin(self.fields(pooled, dense)).flatten(1)
        else:
            parts = [pooled]
            if self.dense_arch is not None:
                parts.append(self.dense_arch(dense))
            x = torch.cat(parts, dim=1)
            if self.cross is not None:
                x = self.cross(x)
        h = self.deep(x)
        out = {t: head(h).squeeze(-1) for t, head in self.heads.items()}
        out["_aux_loss"] = torch.zeros((), device=pooled.device, dtype=pooled.dtype)
        return out


class ReadoutOverArch(nn.Module):
    """``xdeepint`` | ``dynint``: stacked fields -> (dynamic) PIN -> xDeepInt readout per task.

    Example:
        >>> top = ReadoutOverArch(spec, field_dims=[16] * 9)
        >>> out = top(pooled, batch.dense)      # {"click": (B,), ..., AUX_LOSS: ()}
    """

    def __init__(self, spec: Spec, field_dims: list[int]) -> None:
        super().__init__()
        m = spec.model
        dim = m.interaction_dim or field_dims[0]
        self.tasks = list(m.tasks)
        self.fields = FieldStack(field_dims, dim, len(spec.features.dense_fields()), m.dense_arch)
        if m.arch == Arch.DYNINT:
            self.pin: nn.Module = DynamicPIN(m.dynint, m.pin, self.fields.num_fields, dim)
        else:
            self.pin = PolynomialInteractionNetwork(m.pin, self.fields.num_fields, dim)
        self.readout = XDeepIntReadout(self.pin.out_fields, len(self.tasks))

    def interaction_weights(self) -> list[nn.Parameter]:
        return self.pin.interaction_weights()

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.readout(self.pin(self.fields(pooled, dense)))
        out = {t: logits[:, i] for i, t in enumerate(self.tasks)}
        out["_aux_loss"] = torch.zeros((), device=pooled.device, dtype=pooled.dtype)
        return out


class MoEOverArch(nn.Module):
    """``moe``: stacked fields -> AdaEnsemble (experts, routers, early exit) -> logits per task.

    Example:
        >>> top = MoEOverArch(spec, field_dims=[16] * 9)
        >>> out = top(pooled, batch.dense)      # {"click": (B,), ..., AUX_LOSS: router losses}
    """

    def __init__(self, spec: Spec, field_dims: list[int]) -> None:
        super().__init__()
        m = spec.model
        dim = m.interaction_dim or field_dims[0]
        self.tasks = list(m.tasks)
        self.fields = FieldStack(field_dims, dim, len(spec.features.dense_fields()), m.dense_arch)
        self.ensemble = AdaEnsemble(m.moe, self.fields.num_fields, dim, len(self.tasks))

    def interaction_weights(self) -> list[nn.Parameter]:
        return []

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, aux = self.ensemble(self.fields(pooled, dense))
        out = {t: logits[:, i] for i, t in enumerate(self.tasks)}
        out["_aux_loss"] = aux
        return out


def build_over_arch(spec: Spec, field_dims: list[int], field_names: list[str] | None = None
                    ) -> nn.Module:
    """The over-arch of ``spec.model.arch`` for pooled features of widths ``field_dims`` (named
    ``field_names``: the two-tower archs split them by side)."""
    arch = spec.model.arch
    if arch in (Arch.RANKTOWER, Arch.DSSM):
        from recsys.models.two_tower import TwoTowerOverArch

        if field_names is None:
            raise ValueError(f"model.arch '{arch}' needs the pooled features' names")
        return TwoTowerOverArch(spec, field_names, field_dims)
    if arch in (Arch.MLP, Arch.DCN, Arch.PIN):
        return DeepOverArch(spec, field_dims)
    if arch in (Arch.XDEEPINT, Arch.DYNINT):
        return ReadoutOverArch(spec, field_dims)
    if arch == Arch.MOE:
        return MoEOverArch(spec, field_dims)
    raise ValueError(f"model.arch '{arch}' has no over-arch")
