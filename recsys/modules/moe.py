"""AdaEnsemble (Yan & Li, AdKDD 2023): a sparse mixture of heterogeneous interaction experts,
stacked with per-example early exit (docs/methods.md section 3, following the released TF2 code).

Layout: the reference works on the "bit-level" tensor ``(B, n, 1)`` with ``n = m·D``; here it is
the flat ``(B, n)``. The math is the same: the reference's ``EmbedDense`` (a dense layer across the
n positions of ``(B, n, 1)``) is a Linear on ``(B, n)``, and its estimator's sum over the size-1 last
axis is the identity.

Routers never see the interaction state ``x_l``, only ``x0.detach()``; with the default unweighted
combine (as released) they learn from the auxiliary losses alone, so those must be added to the
training loss (``AdaEnsemble.forward`` returns them summed and weighted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# the expert kinds, in the reference's order (the default router order)
EXPERTS = ("gated_dense", "cross", "pin", "cnn", "attention")

REDUCTION = 16  # hidden width of routers and gates = n // 16, as in the reference
PROJECTION = 16  # width of the router's sample embedding h and of the expert embeddings e_e


def annealed_k(step: int, num_experts: int, top_k: int, anneal_steps: int) -> int:
    """Experts kept per row at a training step: num_experts at step 0, falling linearly (floored to
    whole experts) to top_k at step anneal_steps and after; top_k throughout when anneal_steps is 0.

    Example:
        >>> [annealed_k(s, 5, 3, 4) for s in range(6)]
        [5, 5, 4, 4, 3, 3]
    """
    if anneal_steps <= 0 or step >= anneal_steps:
        return top_k
    return num_experts - (num_experts - top_k) * step // anneal_steps


def top_k_gates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row's k largest logits, softmax over them, 0 elsewhere.

    Returns (gates (B, E) with rows summing to 1, dispatch mask (B, E) bool with k True per row).
    The mask comes from the top-k indices, not from ``gates > 0``, so a kept expert whose gate
    underflows to 0 (a tiny learned temperature) is still dispatched.
    """
    k = min(max(k, 1), logits.shape[1])
    idx = logits.topk(k, dim=1).indices
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    mask.scatter_(1, idx, True)
    gates = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
    return gates, mask


def load_balance_loss(logits: torch.Tensor, dispatch_mask: torch.Tensor,
                      prior: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_e f_e · P_e / prior_e`` (unweighted; the caller multiplies by α).

    f_e is the fraction of the rows dispatched to e (a count: no gradient), P_e the mean full-softmax
    probability of e (gradient flows into the logits). The minimum pushes dispatch toward the prior.
    A uniform prior (the default) gives the Switch-Transformer loss ``E · Σ_e f_e P_e``. Zero-prior
    entries are clamped to 1e-6 rather than dividing by zero. No rows: 0.

    Args:
        logits: raw router logits (B, E).
        dispatch_mask: (B, E) bool, True where the row was sent to the expert.
        prior: (E,) target dispatch shares summing to 1, or None for uniform.
    """
    num = logits.shape[1]
    if logits.shape[0] == 0:
        return logits.sum()
    f = dispatch_mask.to(logits.dtype).mean(0)
    p = torch.softmax(logits, dim=1).mean(0)
    if prior is None:
        prior = torch.full((num,), 1.0 / num, dtype=logits.dtype, device=logits.device)
    return (f * p / prior.clamp_min(1e-6)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean_batch(logsumexp(logits)²)``: keeps router logits small (0 for no rows)."""
    if logits.shape[0] == 0:
        return logits.sum()
    return torch.logsumexp(logits, dim=1).square().mean()


# --------------------------------------------------------------------------------------------------
# experts: each maps (x_l (B, n), x0 (B, n)) -> (B, n)


class GatedDenseExpert(nn.Module):
    """``relu(W x_l + b) ⊙ 2·sigmoid(Dense(relu(Dense_{n/16}(x0))))``.

    The gate is 1 at a zero pre-activation, so an untrained gate leaves the dense output unscaled.

    Example:
        >>> GatedDenseExpert(32)(torch.randn(4, 32), torch.randn(4, 32)).shape
        torch.Size([4, 32])
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        hidden = max(1, width // REDUCTION)
        self.dense = nn.Linear(width, width)
        self.gate = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.dense(x)) * (2.0 * torch.sigmoid(self.gate(x0)))


class CrossExpert(nn.Module):
    """DCN-v2 cross without the skip (the SparseMoE residual adds it): ``x0 ⊙ (W x_l + b)``.

    Example:
        >>> CrossExpert(32)(torch.randn(4, 32), torch.randn(4, 32)).shape
        torch.Size([4, 32])
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return x0 * self.dense(x)


class PolynomialExpert(nn.Module):
    """PIN layer (xDeepInt) without the skip: ``x_l ⊙ (W x0)``, no bias.

    Example:
        >>> PolynomialExpert(32)(torch.randn(4, 32), torch.randn(4, 32)).shape
        torch.Size([4, 32])
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return x * self.dense(x0)


class CNN1DExpert(nn.Module):
    """Dense to P = m/2 positions -> Conv1D(16 filters, kernel 4, 'valid' as Keras' default) ->
    MaxPool(2, floor) -> flatten -> dense back to n; linear throughout, as in the reference. Uses x_l
    only.

    Tiny sizes: kernel min(4, P) and pool min(2, conv length) keep at least one output position.
    For m=38 this is the reference's 608 -> 19 -> (16 filters, 16) -> (16, 8) -> 128 -> 608.

    Example:
        >>> CNN1DExpert(num_fields=8, width=32)(torch.randn(4, 32), torch.randn(4, 32)).shape
        torch.Size([4, 32])
    """

    def __init__(self, num_fields: int, width: int, filters: int = 16, kernel_size: int = 4,
                 pool_size: int = 2) -> None:
        super().__init__()
        positions = max(1, num_fields // 2)
        kernel = min(kernel_size, positions)
        length = positions - kernel + 1
        self.pool = min(pool_size, length)
        self.squeeze = nn.Linear(width, positions)
        self.conv = nn.Conv1d(1, filters, kernel)
        self.out = nn.Linear(filters * (length // self.pool), width)

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.squeeze(x).unsqueeze(1))  # (B, filters, length)
        h = F.max_pool1d(h, self.pool)
        return self.out(h.flatten(1))


class AttentionExpert(nn.Module):
    """Multi-head self-attention over the m fields -> instance norm -> dense back to n. Uses x_l only.

    As in the reference: Q, K, V and the output projection are Dense(hidden) + GELU, ``hidden`` is
    the total width split over the heads (8 over 4 heads = 2 per head), scaled dot-product, no
    residual; instance norm normalises each of the ``hidden`` channels over the fields (affine,
    eps 1e-3 as tfa's InstanceNormalization), written out so that one field works in training.

    Example:
        >>> AttentionExpert(num_fields=8, dim=4)(torch.randn(2, 32), torch.randn(2, 32)).shape
        torch.Size([2, 32])
    """

    def __init__(self, num_fields: int, dim: int, heads: int = 4, hidden: int = 8,
                 eps: float = 1e-3) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.num_fields = num_fields
        self.dim = dim
        self.heads = heads
        self.head_dim = hidden // heads
        self.eps = eps
        self.query = nn.Linear(dim, hidden)
        self.key = nn.Linear(dim, hidden)
        self.value = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm_weight = nn.Parameter(torch.ones(hidden))
        self.norm_bias = nn.Parameter(torch.zeros(hidden))
        self.out = nn.Linear(num_fields * hidden, num_fields * dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], self.num_fields, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        f = x.view(b, self.num_fields, self.dim)
        q = self._heads(F.gelu(self.query(f)))
        k = self._heads(F.gelu(self.key(f)))
        v = self._heads(F.gelu(self.value(f)))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        h = (att @ v).transpose(1, 2).reshape(b, self.num_fields, self.heads * self.head_dim)
        h = F.gelu(self.proj(h))
        mean = h.mean(dim=1, keepdim=True)
        var = (h - mean).square().mean(dim=1, keepdim=True)
        h = (h - mean) / torch.sqrt(var + self.eps) * self.norm_weight + self.norm_bias
        return self.out(h.flatten(1))


def _check_experts(experts: Sequence[str]) -> list[str]:
    """The expert names as plain strings; a ValueError names an unknown one and the known ones."""
    if isinstance(experts, str):  # a lone name would otherwise be split into letters
        experts = [experts]
    out = []
    for kind in experts:
        if not isinstance(kind, str) or kind not in EXPERTS:
            raise ValueError(f"unknown expert {kind!r}; expected one of: {', '.join(EXPERTS)}")
        out.append(str(kind))  # a StrEnum member becomes its value
    if not out:
        raise ValueError(f"experts must name at least one of: {', '.join(EXPERTS)}")
    return out


def build_expert(kind: str, num_fields: int, dim: int) -> nn.Module:
    """The expert of one kind (one of :data:`EXPERTS`) for m = num_fields fields of dim D.

    Example:
        >>> type(build_expert("cross", 4, 2)).__name__
        'CrossExpert'
    """
    width = num_fields * dim
    (kind,) = _check_experts([kind])
    if kind == "gated_dense":
        return GatedDenseExpert(width)
    if kind == "cross":
        return CrossExpert(width)
    if kind == "pin":
        return PolynomialExpert(width)
    if kind == "cnn":
        return CNN1DExpert(num_fields, width)
    return AttentionExpert(num_fields, dim)


# --------------------------------------------------------------------------------------------------
# router, SparseMoE layer, early-exit stack


class Router(nn.Module):
    """Noisy cosine router: ``logit_e = cos(h, e_e) / T`` with
    ``h = Dense_16(relu(Dense_{n/16}(x ⊙ U(1−ε, 1+ε))))``, noise in training only.

    T is learned as log T so that it stays positive (the reference learns T itself).

    Args:
        width: n, the router input width.
        num_choices: E, experts (or depths for the exit router).
        init_temperature: T at init.
        noise_eps: ε of the multiplicative input noise (0 = none).

    Example:
        >>> gates, mask, logits = Router(32, 5)(torch.randn(4, 32), k=3)
        >>> gates.shape, int(mask.sum())
        (torch.Size([4, 5]), 12)
    """

    def __init__(self, width: int, num_choices: int, init_temperature: float = 1.0,
                 noise_eps: float = 0.5) -> None:
        super().__init__()
        self.noise_eps = noise_eps
        self.hidden = nn.Linear(width, max(1, width // REDUCTION))
        self.proj = nn.Linear(max(1, width // REDUCTION), PROJECTION)
        self.embeddings = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_choices,
                                                                           PROJECTION)))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits (B, E) of x (detached here: routing never back-propagates into its input)."""
        x = x.detach()
        if self.training and self.noise_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.noise_eps, 1.0 + self.noise_eps)
        h = self.proj(torch.relu(self.hidden(x)))
        cos = F.normalize(h, dim=1) @ F.normalize(self.embeddings, dim=1).t()
        return cos / self.log_temperature.exp()

    def forward(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (gates (B, E), dispatch mask (B, E) bool, raw logits (B, E))."""
        logits = self.logits(x)
        gates, mask = top_k_gates(logits, k)
        return gates, mask, logits


class SparseMoE(nn.Module):
    """One SparseMoE layer: route each row to k experts (router on ``x0.detach()``); each expert
    runs on only its rows (index_select), outputs are index_add-ed back. Combine unweighted (as
    released) or gate-weighted. No residual here: the stack adds it.

    Args:
        experts: expert kinds (names from :data:`EXPERTS`), in router order.
        num_fields: m.
        dim: D.
        top_k: default k when forward gets k <= 0.
        init_temperature, noise_eps: router settings.
        weight_by_gates: multiply each expert's output by its gate.

    Example:
        >>> moe = SparseMoE(["cross", "pin"], num_fields=4, dim=2, top_k=1)
        >>> out, logits, mask = moe(torch.randn(3, 8), torch.randn(3, 8))
        >>> out.shape, mask.sum(1).tolist()
        (torch.Size([3, 8]), [1, 1, 1])
    """

    def __init__(self, experts: Sequence[str], num_fields: int, dim: int, top_k: int,
                 init_temperature: float = 1.0, noise_eps: float = 0.5,
                 weight_by_gates: bool = False) -> None:
        super().__init__()
        width = num_fields * dim
        self.top_k = top_k
        self.weight_by_gates = weight_by_gates
        self.experts = nn.ModuleList(build_expert(e, num_fields, dim)
                                     for e in _check_experts(experts))
        self.router = Router(width, len(self.experts), init_temperature, noise_eps)

    def forward(self, x: torch.Tensor, x0: torch.Tensor,
                k: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (combined expert output (B, n), raw router logits (B, E), mask (B, E))."""
        gates, mask, logits = self.router(x0, k if k > 0 else self.top_k)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = mask[:, e].nonzero().squeeze(1)
            if rows.numel() > 0:  # an expert nobody was routed to costs nothing
                y = expert(x.index_select(0, rows), x0.index_select(0, rows))
                if self.weight_by_gates:
                    y = y * gates[:, e].index_select(0, rows).unsqueeze(1)
                out = out.index_add(0, rows, y.to(out.dtype))  # autocast may give bf16
        return out, logits, mask


class ExitBlock(nn.Module):
    """One depth of the stack: its SparseMoE layer and the estimator of the rows that exit there."""

    def __init__(self, moe: SparseMoE, width: int, num_outputs: int) -> None:
        super().__init__()
        self.moe = moe
        self.estimator = nn.Linear(width, num_outputs)


class AdaEnsemble(nn.Module):
    """Early-exit stack of SparseMoE layers with a hard top-1 exit router.

    ``g = exit_router(x0.detach())`` picks each row's depth; for d = 0..depths-1 the rows still
    present run ``x = SparseMoE_d(x, x0) + x``, the rows whose exit is d produce
    ``logits = Estimator_d(x)`` and leave: deeper layers never run for them, in training and in
    inference. Returns the logits and the weighted auxiliary router losses (load balance toward
    ``expert_prior`` / ``exit_prior`` and z-loss, summed over the exit router and every layer that
    ran, each over the rows it saw).

    Args:
        num_fields: m.
        dim: D (every field the same dim).
        num_outputs: logits per row.
        experts: the expert kinds of every layer (names from :data:`EXPERTS`), in router order.
        top_k: experts per row, in [1, len(experts)].
        anneal_steps: top-k annealing: k starts at the number of experts and falls linearly to
            top_k over this many training forwards (0 = top_k from the first step).
        depths: the number of SparseMoE layers (and exit choices).
        init_temperature: the routers' initial cosine temperature T (> 0; learned).
        noise_eps: ε of the routers' multiplicative input noise in training (0 = none).
        weight_by_gates: multiply each expert's output by its gate (default: unweighted sum).
        load_balance_weight: α of the load-balance losses.
        z_loss_weight: weight of the router z-losses.
        expert_prior: target dispatch share of each expert (len(experts) values summing to 1).
        exit_prior: target share of rows exiting at each depth (depths values summing to 1).

    Attributes:
        blocks: ModuleList of ExitBlock (``.moe`` SparseMoE, ``.estimator`` Linear(n, num_outputs)).
        exit_router: Router over the depths.
        step: long buffer (checkpointed), training forwards so far; drives the top-k annealing.
        forced_exit: -1 = use the exit router; d >= 0 = every row exits at depth d (the exit router
            then does not run and adds no loss). Set with ``force_exit_depth``.
        rows_per_depth, exits_per_depth (depths,), expert_load (depths, E): diagnostics of the last
            forward (non-persistent buffers): rows that entered / exited each depth and rows sent
            to each expert of each depth.

    Example:
        >>> model = AdaEnsemble(4, 4, num_outputs=1)
        >>> logits, aux = model(torch.randn(8, 4, 4))
        >>> logits.shape, aux.shape, int(model.exits_per_depth.sum())
        (torch.Size([8, 1]), torch.Size([]), 8)
        >>> small = AdaEnsemble(4, 4, experts=("cross", "pin"), top_k=1, expert_prior=(0.5, 0.5),
        ...                     depths=2, exit_prior=(0.5, 0.5))
        >>> small(torch.randn(8, 4, 4))[0].shape
        torch.Size([8, 1])
    """

    def __init__(self, num_fields: int, dim: int, num_outputs: int = 1, *,
                 experts: Sequence[str] = EXPERTS, top_k: int = 3, anneal_steps: int = 0,
                 depths: int = 4, init_temperature: float = 1.0, noise_eps: float = 0.5,
                 weight_by_gates: bool = False, load_balance_weight: float = 1.0,
                 z_loss_weight: float = 1e-3,
                 expert_prior: Sequence[float] = (0.2, 0.2, 0.4, 0.1, 0.1),
                 exit_prior: Sequence[float] = (0.1, 0.2, 0.6, 0.1)) -> None:
        super().__init__()
        experts = _check_experts(experts)
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k must be in [1, {len(experts)}] (the number of experts), "
                             f"got {top_k}")
        if depths < 1:
            raise ValueError(f"depths must be >= 1, got {depths}")
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        if anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {anneal_steps}")
        for name, prior, n in (("expert_prior", expert_prior, len(experts)),
                               ("exit_prior", exit_prior, depths)):
            if len(prior) != n or min(prior) < 0 or abs(sum(prior) - 1.0) > 1e-6:
                raise ValueError(f"{name} needs {n} non-negative weights summing to 1, "
                                 f"got {list(prior)}")
        width = num_fields * dim
        self.width = width
        self.num_outputs = num_outputs
        self.num_experts = len(experts)
        self.depths = depths
        self.top_k = top_k
        self.anneal_steps = anneal_steps
        self.load_balance_weight = load_balance_weight
        self.z_loss_weight = z_loss_weight
        self.forced_exit: int = -1
        self.blocks = nn.ModuleList(
            ExitBlock(SparseMoE(experts, num_fields, dim, top_k, init_temperature, noise_eps,
                                weight_by_gates),
                      width, num_outputs)
            for _ in range(depths))
        self.exit_router = Router(width, depths, init_temperature, noise_eps)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # priors are configuration, not state: not checkpointed, so the settings in force win on
        # resume
        self.register_buffer("expert_prior", torch.tensor(list(expert_prior)), persistent=False)
        self.register_buffer("exit_prior", torch.tensor(list(exit_prior)), persistent=False)
        self.register_buffer("rows_per_depth", torch.zeros(depths, dtype=torch.long),
                             persistent=False)
        self.register_buffer("exits_per_depth", torch.zeros(depths, dtype=torch.long),
                             persistent=False)
        self.register_buffer("expert_load", torch.zeros(depths, self.num_experts,
                                                        dtype=torch.long), persistent=False)

    @torch.jit.export
    def force_exit_depth(self, depth: int) -> None:
        """Send every row to exit at ``depth`` (0-based); -1 restores the exit router."""
        if depth < -1 or depth >= self.depths:
            raise ValueError("exit depth must be -1 (router) or in [0, depths)")
        self.forced_exit = depth

    @torch.jit.export
    def current_k(self) -> int:
        """Experts per row that the next forward routes to (annealing schedule at ``step``)."""
        if self.anneal_steps <= 0:
            return self.top_k  # no read of the step buffer: no device sync per forward
        return annealed_k(int(self.step.item()), self.num_experts, self.top_k, self.anneal_steps)

    def forward(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 (B, m, D) or (B, m·D) -> (logits (B, num_outputs), aux loss scalar)."""
        b = x0.shape[0]
        x0 = x0.flatten(1)  # (B, m, D) -> (B, n); also fine for B = 0, unlike reshape(b, -1)
        if x0.shape[1] != self.width:
            raise ValueError("AdaEnsemble expects m*D = " + str(self.width) + " values per row, got "
                             + str(x0.shape[1]))
        k = self.current_k()
        if self.training:
            self.step.add_(1)
        aux = torch.zeros((), dtype=x0.dtype, device=x0.device)
        if self.forced_exit >= 0:
            exit_at = torch.full((b,), self.forced_exit, dtype=torch.long, device=x0.device)
        else:
            exit_logits = self.exit_router.logits(x0)
            exit_at = exit_logits.argmax(dim=1)  # hard top-1: its softmax gate is exactly 1
            exit_mask = F.one_hot(exit_at, self.depths) > 0
            aux = aux + self.load_balance_weight * load_balance_loss(exit_logits, exit_mask,
                                                                     self.exit_prior)
            aux = aux + self.z_loss_weight * router_z_loss(exit_logits)

        out = torch.zeros(b, self.num_outputs, dtype=x0.dtype, device=x0.device)
        rows = torch.arange(b, device=x0.device)  # original row of each row still in the stack
        x = x0
        x0_rows = x0
        self.rows_per_depth.zero_()
        self.exits_per_depth.zero_()
        self.expert_load.zero_()
        for d, block in enumerate(self.blocks):
            if rows.numel() > 0:  # no row left: this depth and all deeper ones are skipped
                self.rows_per_depth[d] = rows.numel()
                y, logits, mask = block.moe(x, x0_rows, k)
                x = y + x
                aux = aux + self.load_balance_weight * load_balance_loss(logits, mask,
                                                                         self.expert_prior)
                aux = aux + self.z_loss_weight * router_z_loss(logits)
                self.expert_load[d] = mask.sum(0)
                here = exit_at == d
                leave = here.nonzero().squeeze(1)
                if leave.numel() > 0:  # else every row continues: nothing to re-index
                    self.exits_per_depth[d] = leave.numel()
                    out = out.index_add(0, rows.index_select(0, leave),
                                        block.estimator(x.index_select(0, leave)).to(out.dtype))
                    stay = (~here).nonzero().squeeze(1)
                    x = x.index_select(0, stay)
                    x0_rows = x0_rows.index_select(0, stay)
                    rows = rows.index_select(0, stay)
                    exit_at = exit_at.index_select(0, stay)
        return out, aux

    def diagnostics(self) -> dict[str, Any]:
        """The last forward's routing as plain lists (eager only: not compiled by jit.script, so a
        scripted model's diagnostics are its buffers)."""
        return {"rows_per_depth": self.rows_per_depth.tolist(),
                "exits_per_depth": self.exits_per_depth.tolist(),
                "expert_load": self.expert_load.tolist(),
                "step": int(self.step), "k": self.current_k()}
