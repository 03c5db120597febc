"""DynInt: PIN with instance-dependent interactions (Yan et al., DLP-KDD 2022; docs/methods.md section 2).

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

from recsys.modules.dynint_fused import FieldMixStack, mix_stack
from recsys.modules.pin import VectorDense, make_activation, merge_subspaces, split_subspaces

# the dynamic activation modes: none = the static PIN activation, A1 = gate the new interaction
# term per row (default), A2 = gate the layer output, A3 = per-bit gate in the A1 position
ACTIVATION_MODES = ("none", "A1", "A2", "A3")
# the dynamic parameter modes: none = static W, B1 = row/column scaling of W (default), B2 = static
# plus generated low rank, B3 = generated low rank only, B4 = mixture of basis matrices
PARAMETER_MODES = ("none", "B1", "B2", "B3", "B4")


def _check_mode(option: str, value: str, allowed: tuple[str, ...]) -> str:
    # a StrEnum member (e.g. from a config) is a str equal to its value: keep the plain string
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown DynInt {option} {value!r}; expected one of: "
                         f"{', '.join(allowed)}")
    return str(value)


def _generator(in_features: int, out_features: int, zero_last: bool = False) -> nn.Sequential:
    """The 2-layer MLP of gates and parameter generators (hidden = in/16, as in AdaEnsemble)."""
    hidden = max(1, in_features // 16)
    net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))
    if zero_last:
        nn.init.zeros_(net[2].weight)
        nn.init.zeros_(net[2].bias)
    return net


# The mixes and layers below take the fields LAST: ``(B, d, M)``, the transpose of PIN's
# ``(B, M, d)``. A field mix ``W X0`` is then one plain matrix product ``x @ W`` over B·d rows, and
# the per-row, per-field gates and scales ``(B, 1, M)`` broadcast along a contiguous axis, which
# CPU kernels vectorise (a ``(B, M, 1)`` broadcast over a short d does not). DynamicPIN transposes
# once on the way in and once on the way out. VectorDense's weight is ``(in, out)``, so
# ``x @ dense.weight`` is its forward in this layout (these VectorDenses have no bias and a linear
# activation).


class _StaticMix(nn.Module):
    """``W X0`` with a static W (parameter mode NONE)."""

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        self.dense = VectorDense(num_fields, num_fields)

    def forward(self, x0: torch.Tensor, flat: torch.Tensor,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        out = x0 @ self.dense.weight
        return out if scale is None else out * scale


class _ScaledMix(nn.Module):
    """B1: ``diag(r(x)) W diag(c(x)) X0 = r ⊙ (W (c ⊙ X0))``.

    r, c = 2·sigmoid(generator) with a zero-initialised last layer, so r = c = 1 exactly at init
    and B1 starts as the static PIN (and r, c stay positive and bounded, like the gates)."""

    def __init__(self, num_fields: int, numel: int) -> None:
        super().__init__()
        self.num_fields = num_fields
        self.dense = VectorDense(num_fields, num_fields)
        self.gen = _generator(numel, 2 * num_fields, zero_last=True)

    def forward(self, x0: torch.Tensor, flat: torch.Tensor,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        r, c = (2.0 * torch.sigmoid(self.gen(flat))).unsqueeze(1).split(self.num_fields, dim=2)
        if scale is not None:  # folded into r: (B, 1, M), not another pass over (B, d, M)
            r = r * scale
        return r * ((c * x0) @ self.dense.weight)


class _LowRankMix(nn.Module):
    """B2 (``static``): ``(W + U Vᵀ) X0``; B3: ``U Vᵀ X0``, as ``U (Vᵀ X0)`` (rank k, no M×M)."""

    def __init__(self, num_fields: int, numel: int, rank: int, static: bool) -> None:
        super().__init__()
        self.num_fields = num_fields
        self.rank = rank
        self.dense = VectorDense(num_fields, num_fields) if static else None
        self.gen = _generator(numel, 2 * num_fields * rank)

    def forward(self, x0: torch.Tensor, flat: torch.Tensor,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        # unbind, not two selects: the gradient is one stack, not two zero-filled (B, 2, M, k)
        u, v = self.gen(flat).reshape(flat.shape[0], 2, self.num_fields, self.rank).unbind(1)
        out = (x0 @ v) @ u.transpose(1, 2)  # (B, d, M) @ (B, M, k) @ (B, k, M)
        if self.dense is not None:
            out = out + x0 @ self.dense.weight
        return out if scale is None else out * scale


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

    def forward(self, x0: torch.Tensor, flat: torch.Tensor,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        pi = torch.softmax(self.gen(flat), dim=-1)
        b, d, m = x0.shape
        j = self.basis.shape[0]
        # every basis in one product: (B·d, M) @ (M, J·M) -> (B, d, J, M), then mixed by π
        per_basis = (x0.reshape(b * d, m) @ self.basis.permute(1, 0, 2).reshape(m, j * m)
                     ).view(b, d, j, m)
        out = (per_basis * pi[:, None, :, None]).sum(dim=2)
        return out if scale is None else out * scale


def _generator_outputs(gens: list[nn.Sequential], flat: torch.Tensor,
                       layers: nn.ModuleList) -> dict[int, torch.Tensor]:
    """Each generator's output (by ``id``) on ``flat`` (a stop-gradient gate's on ``flat.detach()``), the
    first layers of all the generators that read the same input computed as one product: one
    ``(B, m·D) x (m·D, Σ hidden)`` matrix product instead of one thin product per generator, and
    one gradient for ``flat`` instead of a sum of them. The parameters stay per generator."""
    detached = {id(layer.gate) for layer in layers if layer.stop_gradient and layer.gate is not None}
    outs: dict[int, torch.Tensor] = {}
    for stop in (False, True):
        group = [g for g in gens if (id(g) in detached) == stop]
        if not group:
            continue
        x = flat.detach() if stop else flat
        first = [g[0] for g in group]
        hidden = torch.relu(torch.addmm(torch.cat([f.bias for f in first]), x,
                                        torch.cat([f.weight for f in first]).t()))
        # split, not slices: its backward is one concatenation, where each slice's allocated a
        # zero (B, Σ hidden) gradient, and autograd then added those up
        pieces = hidden.split([f.out_features for f in first], dim=1)
        for g, piece in zip(group, pieces, strict=True):
            outs[id(g)] = g[2](piece)
    return outs


def _make_mix(mode: str, num_fields: int, numel: int, rank: int, num_basis: int) -> nn.Module:
    mode = _check_mode("parameter_mode", mode, PARAMETER_MODES)
    if mode == "none":
        return _StaticMix(num_fields)
    if mode == "B1":
        return _ScaledMix(num_fields, numel)
    if mode in ("B2", "B3"):
        return _LowRankMix(num_fields, numel, rank, static=mode == "B2")
    return _BasisMix(num_fields, numel, num_basis)  # B4


class _DynamicLayer(nn.Module):
    """One DynInt layer: ``A = φ(W_l(x) dropout(X0))``, then the gated residual update.

    ``num_fields`` and ``dim`` are M and d, i.e. after the subspace split.

    Example:
        >>> layer = _DynamicLayer(6, 4, activation_mode="A3", parameter_mode="B2")
        >>> x0 = torch.randn(2, 6, 4)                 # (B, M, d)
        >>> layer(x0.mT, x0.mT, x0.flatten(1)).shape  # fields last: (B, d, M)
        torch.Size([2, 4, 6])
    """

    def __init__(self, num_fields: int, dim: int, *, activation: str = "linear",
                 dropout: float = 0.0, activation_mode: str = "A1", parameter_mode: str = "B1",
                 rank: int = 4, num_basis: int = 4, stop_gradient_gate: bool = False) -> None:
        super().__init__()
        numel = num_fields * dim
        self.num_fields = num_fields
        self.dropout = nn.Dropout(dropout)
        self.act = make_activation(activation)
        mode = _check_mode("activation_mode", activation_mode, ACTIVATION_MODES)
        self.mix = _make_mix(parameter_mode, num_fields, numel, rank, num_basis)
        # default nn.Linear init for the gate, as the AdaEnsemble gated layers: 2·sigmoid keeps it
        # near 1 at start
        gate_width = numel if mode == "A3" else num_fields
        self.gate = None if mode == "none" else _generator(numel, gate_width)
        self.gate_output = mode == "A2"
        self.gate_into_mix = mode == "A1" and activation == "linear"
        self.stop_gradient = stop_gradient_gate

    def forward(self, x: torch.Tensor, x0: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        x0 = self.dropout(x0)
        if self.gate is not None:
            gate_in = flat.detach() if self.stop_gradient else flat
            g = 2.0 * torch.sigmoid(self.gate(gate_in))
            # (B, 1, M) per row (A1, A2) or (B, d, M) per bit (A3; the gate's output is in the
            # (M, d) order of flatten(X0))
            g = g.view(x.shape[0], self.num_fields, -1).transpose(1, 2)
            if self.gate_into_mix:
                # φ is the identity and g one scale per row and field: g ⊙ (W(x) X0) is the mix
                # scaled (B1 folds it into its own row scale); then x ⊙ (1 + ·) in one pass
                return torch.addcmul(x, x, self.mix(x0, flat, g))
            a = self.act(self.mix(x0, flat))
            if self.gate_output:
                return g * torch.addcmul(x, x, a)
            return torch.addcmul(x, x, g * a)
        return torch.addcmul(x, x, self.act(self.mix(x0, flat)))


class DynamicPIN(nn.Module):
    """DynInt: the residual PIN recursion with a dynamic activation and/or dynamic parameters.

    ``(B, m, D) -> (B, m, D)`` (``X_L`` merged back from the subspaces), like the residual,
    single-head :class:`~recsys.modules.pin.PolynomialInteractionNetwork`.

    Args:
        num_fields: m.
        dim: D.
        num_layers: L (>= 1).
        subspaces: h, must divide ``D``.
        residual: must be True (DynInt is defined on the residual recursion); the argument exists
            so that a PIN configuration passes through unchanged and a plain one is refused.
        activation: φ, one of :data:`~recsys.modules.pin.ACTIVATIONS`.
        dropout: dropout on X0 before each layer's field mix, in [0, 1).
        activation_mode: one of :data:`ACTIVATION_MODES`.
        parameter_mode: one of :data:`PARAMETER_MODES`.
        rank: k of the low-rank modes B2 and B3 (>= 1).
        num_basis: J, basis matrices of mode B4 (>= 1).
        stop_gradient_gate: the gates read a detached ``flatten(X0)``.

    Example:
        >>> dyn = DynamicPIN(5, 8, num_layers=2, subspaces=2, activation_mode="A2",
        ...                  parameter_mode="B4")
        >>> dyn(torch.randn(4, 5, 8)).shape, (dyn.out_fields, dyn.out_dim)
        (torch.Size([4, 5, 8]), (5, 8))
    """

    def __init__(self, num_fields: int, dim: int, *, num_layers: int = 4, subspaces: int = 1,
                 residual: bool = True, activation: str = "linear", dropout: float = 0.0,
                 activation_mode: str = "A1", parameter_mode: str = "B1", rank: int = 4,
                 num_basis: int = 4, stop_gradient_gate: bool = False) -> None:
        super().__init__()
        if not residual:
            raise ValueError("DynamicPIN implements the residual single-head PIN; got "
                             f"residual={residual}")
        h = subspaces
        if h <= 0 or dim % h != 0:
            raise ValueError(f"subspaces h={h} must divide the embedding dim D={dim}")
        for name, value in (("num_fields", num_fields), ("num_layers", num_layers),
                            ("rank", rank), ("num_basis", num_basis)):
            if value < 1:
                raise ValueError(f"DynInt {name} must be >= 1, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"DynInt dropout must be in [0, 1), got {dropout}")
        _check_mode("activation_mode", activation_mode, ACTIVATION_MODES)
        _check_mode("parameter_mode", parameter_mode, PARAMETER_MODES)
        make_activation(activation)
        self.h = h
        self.dim = dim
        # the modes whose layers scale a static mix run as one autograd node (dynint_fused);
        # ``fused = False`` takes the layer-by-layer path (the reference the tests compare with)
        self.fusable = (activation == "linear" and activation_mode in ("none", "A1")
                        and parameter_mode in ("none", "B1"))
        self.fused = True
        self.dropout = dropout
        self.layers = nn.ModuleList(
            _DynamicLayer(h * num_fields, dim // h, activation=activation, dropout=dropout,
                          activation_mode=activation_mode, parameter_mode=parameter_mode,
                          rank=rank, num_basis=num_basis, stop_gradient_gate=stop_gradient_gate)
            for _ in range(num_layers))
        self.out_fields: int = num_fields
        self.out_dim: int = dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        if x0.shape[-1] != self.dim:
            raise ValueError(f"expected embedding dim {self.dim}, got input of shape {x0.shape}")
        # generators and gates read the whole instance; the split is a reshape, so flattening the
        # split X0 gives the same vector as flattening X0
        flat = x0.reshape(x0.shape[0], -1)
        x0 = split_subspaces(x0, self.h).transpose(1, 2).contiguous()  # fields last
        if (self.fused and self.fusable and (self.dropout == 0.0 or not self.training)
                and not torch.jit.is_scripting()):
            x = self._fused_stack(x0, flat)
        else:
            x = x0
            for layer in self.layers:
                x = layer(x, x0, flat)
        return merge_subspaces(x.transpose(1, 2), self.h)

    @torch.jit.unused
    def _fused_stack(self, x0: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """The recursion through :class:`~recsys.modules.dynint_fused.FieldMixStack`: each layer's
        row scale ``s = r ⊙ G`` and column scale ``c`` from its generators, every generator's
        first layer computed in one product."""
        gens: list[nn.Sequential] = []
        for layer in self.layers:
            if layer.gate is not None:
                gens.append(layer.gate)
            if isinstance(layer.mix, _ScaledMix):
                gens.append(layer.mix.gen)
        outs = _generator_outputs(gens, flat, self.layers)
        per_layer: list[torch.Tensor | None] = []
        for layer in self.layers:
            mix = layer.mix
            row = col = None
            if isinstance(mix, _ScaledMix):
                row, col = (2.0 * torch.sigmoid(outs[id(mix.gen)])).split(mix.num_fields, dim=1)
            if layer.gate is not None:
                g = 2.0 * torch.sigmoid(outs[id(layer.gate)])
                row = g if row is None else row * g
            per_layer.extend((mix.dense.weight, col, row))
        if torch.is_grad_enabled():
            return FieldMixStack.apply(x0, len(self.layers), *per_layer)
        return mix_stack(x0, per_layer[0::3], per_layer[1::3], per_layer[2::3])

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
