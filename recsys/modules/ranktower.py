"""RankTower pre-ranker (docs/methods.md section 4, arXiv 2407.12385) and the DSSM two-tower baseline.

Both nets share one serving split::

    U = net.user_tower(u)      # (B, m_u, D) -> user representation, once per request
    V = net.item_tower(v)      # (B, m_i, D) -> item representation, precomputable ("item cache")
    s = net.score(U, V)        # (...) logits; the only per-pair work
    net(u, v) == net.score(net.user_tower(u), net.item_tower(v))

The towers never see the other side, so item representations can be computed offline and cached;
``score`` accepts any broadcastable leading dims, and ``score_candidates(user (H, d), items
(N, H, d)) -> (N,)`` scores one user against N cached items. Everything here compiles with
``torch.jit.script`` and creates no tensors of its own (device and dtype follow the inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recsys.modules.mlp import MLP

# CLIP's bound on the logit scale (1/τ <= 100): a learnable τ may otherwise collapse towards 0,
# which blows up the logits and the loss early in training
MIN_TEMPERATURE = 0.01


def _head_mlp(in_features: int, hidden: list[int], out_features: int) -> nn.Sequential:
    """ReLU hidden layers then a plain linear output (no activation: the output is a representation
    or a gate logit, both need the full real line)."""
    body = MLP(in_features, hidden)
    return nn.Sequential(body, nn.Linear(body.out_features, out_features))


def _check_heads(heads: int, head_dim: int) -> None:
    for name, value in (("heads", heads), ("head_dim", head_dim)):
        if value < 1:
            raise ValueError(f"RankTower {name} must be >= 1, got {value}")


class _GatedHead(nn.Module):
    """One head of :class:`MultiHeadGatedTower`: ``MLP_h(x ⊙ 2·σ(MLP_g^h(x)))``."""

    def __init__(self, width: int, hidden: list[int], gate_hidden: list[int],
                 head_dim: int) -> None:
        super().__init__()
        self.gate = _head_mlp(width, gate_hidden, width)
        self.mlp = _head_mlp(width, hidden, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x * (2.0 * torch.sigmoid(self.gate(x))))


class MultiHeadGatedTower(nn.Module):
    """``z_h = MLP_h(x ⊙ 2·σ(MLP_g^h(x)))`` for each head ``h``, ``x`` the flattened fields.

    The gate ``2·σ(·)`` lies in (0, 2) and equals 1 at a zero logit, so each head starts near the
    identity reweighting and learns to amplify or suppress the fields (and dimensions) it uses.

    Args:
        num_fields: number of input fields ``m`` of this side.
        dim: the field embedding dim ``D``.
        heads: H.
        head_dim: d, the width of each head's output.
        hidden: the hidden layers of ``MLP_h``; the gate has one hidden layer of ``hidden[0]``
            units (a single linear when ``hidden`` is empty).

    Example:
        >>> tower = MultiHeadGatedTower(3, 8, heads=2, head_dim=4, hidden=(16,))
        >>> tower(torch.randn(5, 3, 8)).shape
        torch.Size([5, 2, 4])
    """

    def __init__(self, num_fields: int, dim: int, *, heads: int = 4, head_dim: int = 32,
                 hidden: Sequence[int] = (128,)) -> None:
        super().__init__()
        _check_heads(heads, head_dim)
        width = num_fields * dim
        hidden = list(hidden)
        gate_hidden = hidden[:1]
        self.heads = nn.ModuleList(_GatedHead(width, hidden, gate_hidden, head_dim)
                                   for _ in range(heads))
        self.in_features = width
        self.num_heads = heads
        self.head_dim = head_dim

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        """``(B, m, D)`` (or already flat ``(B, m·D)``) -> ``(B, H, d)``."""
        x = fields.flatten(1)
        out: list[torch.Tensor] = []
        for head in self.heads:
            out.append(head(x))
        return torch.stack(out, dim=1)


class _GatedAttend(nn.Module):
    """One direction of :class:`GatedCrossAttention`: queries from ``q``, keys/values from ``kv``."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.w_q = nn.Linear(head_dim, head_dim, bias=False)
        self.w_k = nn.Linear(head_dim, head_dim, bias=False)
        self.w_v = nn.Linear(head_dim, head_dim, bias=False)
        self.gate = nn.Linear(2 * head_dim, head_dim)
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        attn = torch.softmax(self.w_q(q) @ self.w_k(kv).transpose(-1, -2) * self.scale, dim=-1)
        ctx = attn @ self.w_v(kv)
        # residual: a closed gate leaves the tower output as it was
        return q + torch.sigmoid(self.gate(torch.cat([q, ctx], dim=-1))) * ctx


class GatedCrossAttention(nn.Module):
    """Bidirectional gated cross-attention between the H user and H item head vectors.

    ``U' = U + σ(Lin([U; A_uv V W_v])) ⊙ A_uv V W_v`` with ``A_uv = softmax(U W_q (V W_k)ᵀ/√d)``
    (each user head attends over the item heads), and ``V'`` likewise with its own weights.
    Both directions read the *original* U and V. The weights are shared across heads (a head is a
    token here, not a subspace).

    Args:
        head_dim: ``d``.
        heads: ``H`` (the module works for any number of heads; kept for the record and ``repr``).

    Example:
        >>> ca = GatedCrossAttention(4, heads=2)
        >>> [t.shape for t in ca(torch.randn(3, 2, 4), torch.randn(3, 2, 4))]
        [torch.Size([3, 2, 4]), torch.Size([3, 2, 4])]
    """

    def __init__(self, head_dim: int, heads: int) -> None:
        super().__init__()
        self.user_side = _GatedAttend(head_dim)
        self.item_side = _GatedAttend(head_dim)
        self.head_dim = head_dim
        self.heads = heads

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u (..., H, d)``, ``v (..., H, d)`` with broadcastable leading dims -> ``(U', V')``
        of the broadcast shape (e.g. ``u (1, H, d)`` against ``v (N, H, d)``)."""
        # broadcast first, so the gate's concat [U; context] sees matching shapes (views only)
        u, v = torch.broadcast_tensors(u, v)
        return self.user_side(u, v), self.item_side(v, u)


def _softmax_short(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over a short axis (a few heads), written out: ``torch.softmax`` over 4 values per
    row is several times slower on CPU than these elementwise kernels."""
    e = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def max_sim(u: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
            late_interaction: bool = False) -> torch.Tensor:
    """Maximum cosine similarity between the head vectors of ``u`` and ``v``, divided by τ.

    ``cos[..., i, j] = cos(u_i, v_j)``; ``score = max_{i,j} cos / τ`` or, with
    ``late_interaction``, ``Σ_i max_j cos / τ`` (ColBERT-style). A zero vector has cosine 0.

    Args:
        u: ``(..., H_u, d)``.
        v: ``(..., H_v, d)``, leading dims broadcastable with ``u``'s.
        temperature: τ > 0 (a tensor, so that it can be learnable).
        late_interaction: sum over user heads of the best item head instead of the overall max.

    Example:
        >>> u = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> max_sim(u, u, torch.tensor(0.5))
        tensor([2.])
    """
    cos = F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).transpose(-1, -2)
    # late interaction: each user head takes its best item head; otherwise the single best pair
    best = cos.amax(dim=-1).sum(dim=-1) if late_interaction else cos.flatten(-2).amax(dim=-1)
    return best / temperature


class MaxSimilarity(nn.Module):
    """:func:`max_sim` with a learnable temperature (stored as ``log τ``, floored at 0.01).

    Args:
        init_temperature: the initial τ.
        late_interaction: see :func:`max_sim`.

    Example:
        >>> MaxSimilarity(0.07)(torch.randn(4, 2, 8), torch.randn(4, 2, 8)).shape
        torch.Size([4])
    """

    def __init__(self, init_temperature: float = 0.07, late_interaction: bool = False) -> None:
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        # log τ keeps τ positive under any gradient step and makes the step size scale-free
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.min_temperature = MIN_TEMPERATURE
        self.late_interaction = late_interaction

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp_min(self.min_temperature)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return max_sim(u, v, self.temperature(), self.late_interaction)


class RankTowerNet(nn.Module):
    """Multi-head gated towers, gated cross-attention and max-sim: ``(u, v) -> (B,)`` logits.

    Args:
        num_user_fields: ``m_u`` (user and context fields).
        num_item_fields: ``m_i``.
        dim: the field embedding dim ``D`` (the same on both sides).
        heads: H, head vectors per tower.
        head_dim: d, the width of each head vector.
        hidden: the hidden layers of each head's MLP (see :class:`MultiHeadGatedTower`).
        late_interaction: score with ``Σ_i max_j cos`` instead of ``max_{i,j} cos`` (see
            :func:`max_sim`).
        init_temperature: the initial τ of the max-sim (> 0; learned, floored at 0.01).

    Example:
        >>> net = RankTowerNet(3, 2, 8, heads=2, head_dim=4, hidden=(16,))
        >>> u, v = torch.randn(5, 3, 8), torch.randn(5, 2, 8)
        >>> net(u, v).shape
        torch.Size([5])
        >>> net.score_candidates(net.user_tower(u[:1]), net.item_tower(v)).shape
        torch.Size([5])
    """

    def __init__(self, num_user_fields: int, num_item_fields: int, dim: int, *, heads: int = 4,
                 head_dim: int = 32, hidden: Sequence[int] = (128,),
                 late_interaction: bool = False, init_temperature: float = 0.07) -> None:
        super().__init__()
        if not init_temperature > 0:  # before any parameter is drawn
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        self.user_tower = MultiHeadGatedTower(num_user_fields, dim, heads=heads,
                                              head_dim=head_dim, hidden=hidden)
        self.item_tower = MultiHeadGatedTower(num_item_fields, dim, heads=heads,
                                              head_dim=head_dim, hidden=hidden)
        self.cross = GatedCrossAttention(head_dim, heads)
        self.sim = MaxSimilarity(init_temperature, late_interaction)
        self.heads = heads
        self.head_dim = head_dim

    @torch.jit.export
    def score(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """Tower outputs ``(..., H, d)`` (broadcastable leading dims) -> logits ``(...)``."""
        u, v = self.cross(user, item)
        return self.sim(u, v)

    @torch.jit.export
    def prepare_items(self, items: torch.Tensor) -> torch.Tensor:
        """What scoring needs of cached items ``(N, H, d)`` that does not depend on the user:
        ``(N, H, 3d)``, the values of the user's attention, the same through the user gate's
        context half, and the items' half of their own gate. Compute it once with the item cache
        and pass it to :meth:`score_candidates`."""
        d = self.head_dim
        us, it = self.cross.user_side, self.cross.item_side
        # (TorchScript calls no submodule through a local name: weights and F.linear instead)
        w_v = us.w_v.weight
        weights = torch.cat([w_v, us.gate.weight[:, d:] @ w_v, it.gate.weight[:, :d]])
        return items @ weights.t()

    def _user_projections(self, u: torch.Tensor) -> torch.Tensor:
        """Everything scoring needs of the user's heads ``(H, d)``, in one product: ``(H, 5d)``,
        read by :meth:`score_candidates` as [keys' query | queries' key | user gate | values |
        item gate's context half]. Every attention logit is bilinear (``(W_q u)·(W_k v) =
        u·(W_qᵀW_k v)``) and every gate input linear in its context, so the item-side weights
        fold into these user-side vectors and the items keep only their raw vectors and
        :meth:`prepare_items`."""
        d = self.head_dim
        us, it = self.cross.user_side, self.cross.item_side
        w_v = it.w_v.weight.t()
        weights = torch.cat([us.w_q.weight.t() @ us.w_k.weight * us.scale,
                             it.w_k.weight.t() @ it.w_q.weight * it.scale,
                             us.gate.weight[:, :d].t(), w_v, w_v @ it.gate.weight[:, d:].t()], 1)
        zero = torch.zeros_like(us.gate.bias)
        bias = torch.cat([zero, zero, us.gate.bias, zero, it.gate.bias])
        return torch.addmm(bias, u, weights)

    @torch.jit.export
    def score_candidates(self, user: torch.Tensor, items: torch.Tensor,
                         prepared: torch.Tensor | None = None) -> torch.Tensor:
        """One user ``(H, d)`` or ``(1, H, d)`` against N cached items ``(N, H, d)`` -> ``(N,)``.

        The same function as :meth:`score` on N copies of the user (equal up to float rounding),
        arranged for online serving, where one request's few hundred microseconds count: the
        user's side is projected once (:meth:`_user_projections`), the items' user-free
        projections come from ``prepared`` (:meth:`prepare_items` of the same items, cached) or,
        without it, from one matrix product here, both attentions' logits come from one product
        of the raw items, and the max-sim takes its cosines and norms from one Gram product.
        Softmaxes over a few heads run with the candidates on the last axis, where each step is
        one vectorised pass (on the heads' axis each costs several times as much on CPU).
        """
        h, d = self.heads, self.head_dim
        n = items.shape[0]
        if prepared is None:
            prepared = self.prepare_items(items)
        elif prepared.shape[-1] != 3 * d:
            raise ValueError(f"prepared items have {prepared.shape[-1]} values per head; this "
                             f"scorer expects {3 * d} (prepare_items of the same scorer)")
        u = user.reshape(h, d)
        proj = self._user_projections(u)
        # both attentions' logits (N, H_item, 2·H_user), then candidates last: (H_item, 2H, N)
        logits = items.reshape(n * h, d) @ torch.cat([proj[:, :d], proj[:, d:2 * d]]).t()
        by_head = logits.view(n, h, 2 * h).permute(1, 2, 0).contiguous()
        # the user's heads attend over the item's heads (softmax over axis 0) ...
        to_items = _softmax_short(by_head[:, :h], 0).permute(2, 1, 0).contiguous()  # (N, H_u, H_v)
        # ... and the item's heads over the user's (softmax over axis 1)
        to_user = _softmax_short(by_head[:, h:], 1).permute(2, 0, 1).reshape(n * h, h)
        # contexts and gate inputs side by side, (N, H, 2d) each: [context | gate input]
        user_gate = torch.cat([torch.zeros_like(u), proj[:, 2 * d:3 * d]], 1)
        user_ctx = torch.baddbmm(user_gate.unsqueeze(0), to_items, prepared[:, :, :2 * d])
        item_ctx = (to_user @ proj[:, 3 * d:]).view(n, h, 2 * d)
        user_g = user_ctx[:, :, d:].sigmoid_()
        item_g = item_ctx[:, :, d:].add_(prepared[:, :, 2 * d:]).sigmoid_()
        # U' and V' of each pair in one (N, 2H, d) tensor, for one Gram product; written in
        # place when serving (autograd takes no out= arguments, so a graph gets a copy)
        if user_ctx.requires_grad or item_ctx.requires_grad:
            both = torch.cat([torch.addcmul(u, user_g, user_ctx[:, :, :d]),
                              torch.addcmul(items, item_g, item_ctx[:, :, :d])], 1)
        else:
            both = torch.empty(n, 2 * h, d, dtype=items.dtype, device=items.device)
            torch.addcmul(u, user_g, user_ctx[:, :, :d], out=both[:, :h])
            torch.addcmul(items, item_g, item_ctx[:, :, :d], out=both[:, h:])
        gram = torch.bmm(both, both.transpose(1, 2))
        inv_norm = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(1e-24).rsqrt()
        cos = gram[:, :h, h:] * (inv_norm[:, :h].unsqueeze(2) * inv_norm[:, h:].unsqueeze(1))
        best = cos.amax(dim=-1).sum(dim=-1) if self.sim.late_interaction \
            else cos.flatten(1).amax(dim=1)
        return best / self.sim.temperature()

    def forward(self, user_fields: torch.Tensor, item_fields: torch.Tensor) -> torch.Tensor:
        """``u (B, m_u, D)``, ``v (B, m_i, D)`` -> ``(B,)`` logits."""
        return self.score(self.user_tower(user_fields), self.item_tower(item_fields))


class _DSSMTower(nn.Module):
    """Flatten -> MLP -> linear to ``out_dim`` -> L2-normalise (so the cache holds unit vectors)."""

    def __init__(self, in_features: int, hidden: list[int], out_dim: int) -> None:
        super().__init__()
        self.mlp = _head_mlp(in_features, hidden, out_dim)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(fields.flatten(1)), dim=-1)


class DSSMNet(nn.Module):
    """Plain two-tower baseline: cosine of the tower outputs divided by a learnable τ.

    The same ``user_tower`` / ``item_tower`` / ``score`` / ``score_candidates`` / ``forward`` API
    as :class:`RankTowerNet`, so the same serving code runs either; representations are
    ``(B, out_dim)`` instead of ``(B, H, d)``.

    Args:
        num_user_fields: ``m_u``.
        num_item_fields: ``m_i``.
        dim: the field embedding dim ``D``.
        hidden: the hidden layers of each tower.
        out_dim: the representation width.
        init_temperature: the initial τ (stored as ``log τ``, floored at 0.01).

    Example:
        >>> net = DSSMNet(3, 2, 8, hidden=[16], out_dim=4)
        >>> net(torch.randn(5, 3, 8), torch.randn(5, 2, 8)).shape
        torch.Size([5])
    """

    def __init__(self, num_user_fields: int, num_item_fields: int, dim: int, hidden: list[int],
                 out_dim: int, init_temperature: float = 0.07) -> None:
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        self.user_tower = _DSSMTower(num_user_fields * dim, list(hidden), out_dim)
        self.item_tower = _DSSMTower(num_item_fields * dim, list(hidden), out_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.min_temperature = MIN_TEMPERATURE
        self.out_dim = out_dim

    @torch.jit.export
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp_min(self.min_temperature)

    @torch.jit.export
    def score(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """Unit vectors ``(..., out_dim)`` (broadcastable leading dims) -> logits ``(...)``."""
        return (user * item).sum(dim=-1) / self.temperature()

    @torch.jit.export
    def prepare_items(self, items: torch.Tensor) -> torch.Tensor:
        """Nothing to precompute for a dot product: the items themselves."""
        return items

    @torch.jit.export
    def score_candidates(self, user: torch.Tensor, items: torch.Tensor,
                         prepared: torch.Tensor | None = None) -> torch.Tensor:
        """One user ``(out_dim,)`` or ``(1, out_dim)`` against ``(N, out_dim)`` items -> ``(N,)``
        (``prepared`` is accepted for the serving code's sake and not needed)."""
        return self.score(user.reshape(1, self.out_dim), items)

    def forward(self, user_fields: torch.Tensor, item_fields: torch.Tensor) -> torch.Tensor:
        """``u (B, m_u, D)``, ``v (B, m_i, D)`` -> ``(B,)`` logits."""
        return self.score(self.user_tower(user_fields), self.item_tower(item_fields))
