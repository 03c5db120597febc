"""xDeepInt's Polynomial Interaction Network (Yan et al., DLP-KDD 2020; docs/methods.md section 1).

Shapes: ``B`` batch, ``m`` fields, ``D`` embedding dim, ``h`` subspaces, ``M = h·m`` fields after the
subspace split, ``d = D/h`` their dim. ``X0`` is the stacked field embeddings ``(B, m, D)``.

Subspace order: :func:`split_subspaces` is a plain reshape, so rows are *field-major* (row ``i·h + s``
is subspace ``s`` of field ``i``). The reference concatenates subspace-major; the two differ only by
a permutation of the rows and columns of every ``W_l`` (docs/methods.md says either is fine).
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid", "gelu")


def make_activation(name: str) -> nn.Module:
    """The activation module for a PIN activation name, one of :data:`ACTIVATIONS` (``linear`` =
    identity)."""
    modules = {"linear": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
               "gelu": nn.GELU}
    if name not in modules:
        raise ValueError(f"unknown PIN activation '{name}'; expected one of: "
                         f"{', '.join(ACTIVATIONS)}")
    return modules[name]()


def split_subspaces(x: torch.Tensor, h: int) -> torch.Tensor:
    """``(B, m, D) -> (B, h·m, D/h)``: each field becomes ``h`` fields of dim ``D/h`` (field-major).

    Example:
        >>> split_subspaces(torch.randn(2, 3, 8), 4).shape
        torch.Size([2, 12, 2])
    """
    b, m, dim = x.shape
    if h <= 0 or dim % h != 0:
        raise ValueError(f"subspaces h={h} must divide the embedding dim D={dim}")
    return x.reshape(b, m * h, dim // h)


def merge_subspaces(x: torch.Tensor, h: int) -> torch.Tensor:
    """``(B, h·m, d) -> (B, m, h·d)``: the exact inverse of :func:`split_subspaces`.

    Example:
        >>> merge_subspaces(torch.randn(2, 12, 2), 4).shape
        torch.Size([2, 3, 8])
    """
    b, fields, dim = x.shape
    if h <= 0 or fields % h != 0:
        raise ValueError(f"subspaces h={h} must divide the number of fields {fields}")
    return x.reshape(b, fields // h, dim * h)


class VectorDense(nn.Module):
    """A linear map over the field axis shared by every embedding coordinate ("vector-wise").

    ``(B, m, D) -> (B, U, D)``, ``out[:, u, :] = act(Σ_i W[i, u] X[:, i, :] (+ b[u]))``, i.e.
    ``act(Wᵀ X + b)`` with ``W ∈ R^{m×U}`` stored as ``weight`` (shape ``(m, U)``).

    Args:
        in_fields: m, the number of input fields.
        out_fields: U, the number of output fields.
        bias: add a per-output-field bias (broadcast over the embedding axis, as in the reference).
        activation: one of ``linear``, ``relu``, ``tanh``, ``sigmoid``, ``gelu``.

    Example:
        >>> VectorDense(4, 6)(torch.randn(8, 4, 16)).shape
        torch.Size([8, 6, 16])
    """

    def __init__(self, in_fields: int, out_fields: int, bias: bool = False,
                 activation: str = "linear") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_fields, out_fields))
        # glorot uniform, the reference (Keras Dense) default
        nn.init.xavier_uniform_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_fields)) if bias else None
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("bid,iu->bud", x, self.weight)
        bias = self.bias
        if bias is not None:
            out = out + bias[:, None]
        return self.act(out)


class PINLayer(nn.Module):
    """One PIN layer: ``A = φ(VectorDense(dropout(X0)))`` (M -> M fields, no bias), then
    ``X_l = X_{l-1} ⊙ (1 + A)`` (residual) or ``X_l = X_{l-1} ⊙ A`` (plain).

    Args:
        num_fields: M, the number of (subspace-split) fields.
        activation: φ, see :class:`VectorDense`.
        dropout: dropout on X0 before the field mix.
        residual: residual form (the reference default) or plain form.

    Example:
        >>> x0 = torch.randn(8, 6, 4)
        >>> PINLayer(6)(x0, x0).shape
        torch.Size([8, 6, 4])
    """

    def __init__(self, num_fields: int, activation: str = "linear", dropout: float = 0.0,
                 residual: bool = True) -> None:
        super().__init__()
        self.dense = VectorDense(num_fields, num_fields, bias=False, activation=activation)
        self.dropout = nn.Dropout(dropout)
        self.residual = residual

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        a = self.dense(self.dropout(x0))
        return x * (1.0 + a) if self.residual else x * a


class _PINHead(nn.Module):
    """One PIN stack: subspace split -> L layers -> merge. ``(B, m, D)`` ->
    ``(B, m, D)`` (residual) or ``(B, (L+1)·m, D)`` (plain)."""

    def __init__(self, num_fields: int, dim: int, *, num_layers: int, subspaces: int,
                 residual: bool, activation: str, dropout: float) -> None:
        super().__init__()
        h = subspaces
        if dim % h != 0:
            raise ValueError(f"subspaces h={h} must divide the (per-head) embedding dim {dim}")
        self.h = h
        self.residual = residual
        self.layers = nn.ModuleList(
            PINLayer(h * num_fields, activation, dropout, residual) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x0 = split_subspaces(x0, self.h)
        x = x0
        outs = [x0]
        for layer in self.layers:
            x = layer(x, x0)
            outs.append(x)
        # plain form: X_0..X_L stacked on the field axis; each block of M = h·m rows merges back
        # to m rows because the split is a plain (field-major) reshape
        out = x if self.residual else torch.cat(outs, dim=1)
        return merge_subspaces(out, self.h)


class PolynomialInteractionNetwork(nn.Module):
    """PIN: subspace split -> ``num_layers`` PIN layers -> merge back, optionally multi-head.

    Output ``(B, out_fields, out_dim)``:

    - ``heads = 1``: residual ``(B, m, D)`` (``X_L``); plain ``(B, (L+1)·m, D)`` (``X_0..X_L``).
    - ``heads = H > 1``: X0 is projected by a linear ``D -> D`` (no bias) on the embedding axis,
      split into H chunks of ``D/H``, each runs its own PIN stack (subspaces inside each head, so
      ``h`` must divide ``D/H``), and the heads are concatenated on the field axis:
      ``(B, H·m, D/H)`` residual or ``(B, H·(L+1)·m, D/H)`` plain.

    Args:
        num_fields: m.
        dim: D.
        num_layers: L, the number of PIN layers (>= 1).
        subspaces: h, the subspace split of each field (must divide ``D``, or ``D/H`` per head).
        residual: residual form ``X_l = X_{l-1} ⊙ (1 + A)`` (the reference default) or plain
            ``X_l = X_{l-1} ⊙ A`` (then every ``X_0..X_L`` is output).
        activation: φ, one of :data:`ACTIVATIONS`.
        dropout: dropout on X0 before each layer's field mix, in [0, 1).
        heads: H, the number of heads (must divide ``D``).

    Example:
        >>> pin = PolynomialInteractionNetwork(5, 8, num_layers=3, subspaces=2)
        >>> pin(torch.randn(4, 5, 8)).shape, (pin.out_fields, pin.out_dim)
        (torch.Size([4, 5, 8]), (5, 8))
    """

    def __init__(self, num_fields: int, dim: int, *, num_layers: int = 4, subspaces: int = 1,
                 residual: bool = True, activation: str = "linear", dropout: float = 0.0,
                 heads: int = 1) -> None:
        super().__init__()
        for name, value in (("num_fields", num_fields), ("dim", dim), ("num_layers", num_layers),
                            ("subspaces", subspaces)):
            if value < 1:
                raise ValueError(f"PIN {name} must be >= 1, got {value}")
        if heads <= 0 or dim % heads != 0:
            raise ValueError(f"heads={heads} must divide the embedding dim D={dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"PIN dropout must be in [0, 1), got {dropout}")
        make_activation(activation)  # fail early, naming the bad value
        head_dim = dim // heads
        self.dim = dim
        self.head_dim = head_dim
        # the pure (single-head) xDeepInt has no projection
        self.proj = nn.Linear(dim, dim, bias=False) if heads > 1 else nn.Identity()
        self.stacks = nn.ModuleList(
            _PINHead(num_fields, head_dim, num_layers=num_layers, subspaces=subspaces,
                     residual=residual, activation=activation, dropout=dropout)
            for _ in range(heads))
        per_head = num_fields if residual else (num_layers + 1) * num_fields
        self.out_fields: int = heads * per_head
        self.out_dim: int = head_dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        # torch.split would silently drop extra columns: check the width
        if x0.shape[-1] != self.dim:
            raise ValueError(f"expected embedding dim {self.dim}, got input of shape {x0.shape}")
        chunks = torch.split(self.proj(x0), self.head_dim, dim=-1)
        outs = [stack(chunks[i]) for i, stack in enumerate(self.stacks)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def interaction_weights(self) -> list[nn.Parameter]:
        """The field-mixing matrices ``W_l`` of every layer and head (the L1-FTRL group)."""
        return [layer.dense.weight for stack in self.stacks for layer in stack.layers]


class XDeepIntReadout(nn.Module):
    """xDeepInt's readout: VectorDense over the field axis (with bias), then sum over the
    embedding axis: ``(B, num_fields, D) -> (B, num_outputs)`` logits, one per task.

    Args:
        num_fields: fields of the interaction output (``PolynomialInteractionNetwork.out_fields``).
        num_outputs: number of logits (tasks).

    Example:
        >>> XDeepIntReadout(5, 2)(torch.randn(4, 5, 8)).shape
        torch.Size([4, 2])
    """

    def __init__(self, num_fields: int, num_outputs: int = 1) -> None:
        super().__init__()
        self.dense = VectorDense(num_fields, num_outputs, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Σ_d (Σ_i W[i, u] X[:, i, d] + b[u]) = (Σ_d X[:, i, d]) W + D·b: the embedding axis is
        # summed first, so the field mix is a (B, m) x (m, U) product instead of one over every
        # coordinate (the same map, far fewer passes over (B, m, D))
        bias = self.dense.bias
        assert bias is not None
        return x.sum(dim=-1) @ self.dense.weight + x.shape[-1] * bias

