"""DynInt: PIN with instance-dependent interactions (Yan et al., DLP-KDD 2022; METHODS.md section 2).

The static recursion (residual PIN, on subspace-split fields, ``M = h·m`` fields of dim ``d = D/h``)
is ``X_l = X_{l-1} ⊙ (1 + φ(W_l X0))``. ``W_l`` is written as a matrix acting on the field axis,
``(W X0)[:, u] = Σ_i W[u, i] X0[:, i]``; it is stored transposed, as ``VectorDense.weight``
``(in = i, out = u)``.

Dynamic activation (gate ``G_l = 2·sigmoid(MLP_l(flatten(X0)))``, ``(B, M)`` or per bit ``(B, M, d)``):

- ``A1``: ``X_l = X_{l-1} ⊙ (1 + G_l ⊙ φ(W_l X0))``
- ``A2``: ``X_l = G_l ⊙ X_{l-1} ⊙ (1 + φ(W_l X0))``
- ``A3``: as A1 with a per-bit gate ``(B, M, d)``

Dynamic parameter (generators: 2-layer MLPs on ``flatten(X0)``); ``W_l(x) X0`` is computed without
ever building the ``(B, M, M)`` matrix ``W_l(x)``:

- ``B1``: ``diag(r) W diag(c)``      -> ``r ⊙ (W (c ⊙ X0))``; generator output ``[r (M), c (M)]``
- ``B2``: ``W + U Vᵀ``               -> ``W X0 + U (Vᵀ X0)``; generator output ``[U (M·k), V (M·k)]``,
  each reshaped row-major to ``(M, k)``
- ``B3``: ``U Vᵀ``                   -> ``U (Vᵀ X0)``; as B2 without W
- ``B4``: ``Σ_j π_j W^{(j)}``, ``π = softmax(MLP(x))`` -> ``Σ_j π_j (W^{(j)} X0)``

Generator / gate MLPs: ``Linear(m·D, max(1, m·D // 16)) -> ReLU -> Linear(·, out)``, one per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.modules.pin import VectorDense, make_activation, merge_subspaces, split_subspaces
from recsys.spec import DynamicActivation, DynamicParameter, DynIntSpec, PINSpec


def _generator(in_features: int, out_features: int, zero_last: bool = False) -> nn.Sequential:
    """The 2-layer MLP of gates and parameter generators (hidden = in/16, as in AdaEnsemble)."""
    hidden = max(1, in_features // 16)
    net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))
    if zero_last:
        nn.init.zeros_(net[2].weight)
        nn.init.zeros_(net[2].bias)
    return net


class _StaticMix(nn.Module):
    """``W X0`` with a static W (parameter mode NONE)."""

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        self.dense = VectorDense(num_fields, num_fields)

    def forward(self, x0: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        return self.dense(x0)


class _ScaledMix(nn.Module):
    """B1: ``diag(r(x)) W diag(c(x)) X0 = r ⊙ (W (c ⊙ X0))``.

    r, c = 2·sigmoid(generator) with a zero-initialised last layer, so r = c = 1 exactly at init
    and B1 starts as the static PIN (and r, c stay positive and bounded, like the gates)."""

    def __init__(self, num_fields: int, numel: int) -> None:
        super().__init__()
        self.num_fields = num_fields
        self.dense = VectorDense(num_fields, num_fields)
        self.gen = _generator(numel, 2 * num_fields, zero_last=True)

    def forward(self, x0: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        rc = 2.0 * torch.sigmoid(self.gen(flat))
        r = rc[:, : self.num_fields, None]
        c = rc[:, self.num_fields :, None]
        return r * self.dense(c * x0)


class _LowRankMix(nn.Module):
    """B2 (``static``): ``(W + U Vᵀ) X0``; B3: ``U Vᵀ X0``, as ``U (Vᵀ X0)`` (rank k, no M×M)."""

    def __init__(self, num_fields: int, numel: int, rank: int, static: bool) -> None:
        super().__init__()
        self.num_fields = num_fields
        self.rank = rank
        self.dense = VectorDense(num_fields, num_fields) if static else None
        self.gen = _generator(numel, 2 * num_fields * rank)

    def forward(self, x0: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        uv = self.gen(flat).reshape(flat.shape[0], 2, self.num_fields, self.rank)
        u, v = uv[:, 0], uv[:, 1]
        out = torch.einsum("bik,bkd->bid", u, torch.einsum("bjk,bjd->bkd", v, x0))
        if self.dense is not None:
            out = out + self.dense(x0)
        return out


class _BasisMix(nn.Module):
    """B4: ``Σ_j π_j(x) W^{(j)} X0`` with ``π = softmax(generator(x))``.

    All J bases are applied to X0 in one einsum (``(B, J, M, d)``, no loop over j), then mixed by
    π; the per-instance ``(B, M, M)`` matrix is never formed."""

    def __init__(self, num_fields: int, numel: int, num_basis: int) -> None:
        super().__init__()
        # (J, in, out): the same orientation as VectorDense.weight
        self.basis = nn.Parameter(torch.empty(num_basis, num_fields, num_fields))
        for w in self.basis.data:
            nn.init.xavier_uniform_(w)
        self.gen = _generator(numel, num_basis)

    def forward(self, x0: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        pi = torch.softmax(self.gen(flat), dim=-1)
        per_basis = torch.einsum("bid,jiu->bjud", x0, self.basis)
        return torch.einsum("bj,bjud->bud", pi, per_basis)


def _make_mix(spec: DynIntSpec, num_fields: int, numel: int) -> nn.Module:
    mode = spec.parameter_mode
    if mode == DynamicParameter.NONE:
        return _StaticMix(num_fields)
    if mode == DynamicParameter.B1:
        return _ScaledMix(num_fields, numel)
    if mode in (DynamicParameter.B2, DynamicParameter.B3):
        return _LowRankMix(num_fields, numel, spec.rank, static=mode == DynamicParameter.B2)
    if mode == DynamicParameter.B4:
        return _BasisMix(num_fields, numel, spec.num_basis)
    raise ValueError(f"unknown DynInt parameter_mode '{mode}'")


class _DynamicLayer(nn.Module):
    """One DynInt layer: ``A = φ(W_l(x) dropout(X0))``, then the gated residual update."""

    def __init__(self, spec: DynIntSpec, pin: PINSpec, num_fields: int, dim: int) -> None:
        super().__init__()
        numel = num_fields * dim
        self.num_fields = num_fields
        self.dropout = nn.Dropout(pin.dropout)
        self.act = make_activation(pin.activation)
        self.mix = _make_mix(spec, num_fields, numel)
        mode = spec.activation_mode
        if mode not in (DynamicActivation.NONE, DynamicActivation.A1, DynamicActivation.A2,
                        DynamicActivation.A3):
            raise ValueError(f"unknown DynInt activation_mode '{mode}'")
        # default nn.Linear init for the gate, as the AdaEnsemble gated layers: 2·sigmoid keeps it
        # near 1 at start
        gate_width = numel if mode == DynamicActivation.A3 else num_fields
        self.gate = None if mode == DynamicActivation.NONE else _generator(numel, gate_width)
        self.gate_output = mode == DynamicActivation.A2
        self.stop_gradient = spec.stop_gradient_gate

    def forward(self, x: torch.Tensor, x0: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        a = self.act(self.mix(self.dropout(x0), flat))
        if self.gate is not None:
            gate_in = flat.detach() if self.stop_gradient else flat
            # (B, M, 1) per row (A1, A2) or (B, M, d) per bit (A3)
            g = (2.0 * torch.sigmoid(self.gate(gate_in))).reshape(x.shape[0], self.num_fields, -1)
            if self.gate_output:
                return g * x * (1.0 + a)
            return x * (1.0 + g * a)
        return x * (1.0 + a)


class DynamicPIN(nn.Module):
    """DynInt: the residual PIN recursion with a dynamic activation and/or dynamic parameters.

    ``(B, m, D) -> (B, m, D)`` (``X_L`` merged back from the subspaces), like the residual,
    single-head :class:`~recsys.modules.pin.PolynomialInteractionNetwork`.

    Args:
        spec: the DynIntSpec (activation_mode, parameter_mode, rank, num_basis, stop_gradient_gate).
        pin: the PINSpec for num_layers, subspaces, activation φ and dropout; it must be residual
            and single-head (DynInt is defined on that recursion).
        num_fields: m.
        dim: D.

    Example:
        >>> dyn = DynamicPIN(DynIntSpec(), PINSpec(num_layers=2, subspaces=2), 5, 8)
        >>> dyn(torch.randn(4, 5, 8)).shape, (dyn.out_fields, dyn.out_dim)
        (torch.Size([4, 5, 8]), (5, 8))
    """

    def __init__(self, spec: DynIntSpec, pin: PINSpec, num_fields: int, dim: int) -> None:
        super().__init__()
        if not pin.residual or pin.heads != 1:
            raise ValueError("DynamicPIN implements the residual single-head PIN; got "
                             f"residual={pin.residual}, heads={pin.heads}")
        h = pin.subspaces
        if h <= 0 or dim % h != 0:
            raise ValueError(f"subspaces h={h} must divide the embedding dim D={dim}")
        self.h = h
        self.dim = dim
        self.layers = nn.ModuleList(
            _DynamicLayer(spec, pin, h * num_fields, dim // h) for _ in range(pin.num_layers))
        self.out_fields: int = num_fields
        self.out_dim: int = dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        if x0.shape[-1] != self.dim:
            raise ValueError(f"expected embedding dim {self.dim}, got input of shape {x0.shape}")
        # generators and gates read the whole instance; the split is a reshape, so flattening the
        # split X0 gives the same vector as flattening X0
        flat = x0.reshape(x0.shape[0], -1)
        x0 = split_subspaces(x0, self.h)
        x = x0
        for layer in self.layers:
            x = layer(x, x0, flat)
        return merge_subspaces(x, self.h)

    def interaction_weights(self) -> list[nn.Parameter]:
        """The static ``W_l`` (modes NONE, B1, B2) and the B4 basis tensors ``(J, M, M)``; B3 has
        no static interaction matrix (its W_l(x) is wholly generated), so none."""
        out: list[nn.Parameter] = []
        for layer in self.layers:
            mix = layer.mix
            if isinstance(mix, _BasisMix):
                out.append(mix.basis)
            elif getattr(mix, "dense", None) is not None:
                out.append(mix.dense.weight)
        return out
