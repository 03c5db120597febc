"""AdaEnsemble (Yan & Li, AdKDD 2023): a sparse mixture of heterogeneous interaction experts,
stacked with per-example early exit (docs/methods.md section 3, following the released TF2 code).

Layout: the reference works on the "bit-level" tensor ``(B, n, 1)`` with ``n = m·D``; here it is
the flat ``(B, n)``. The math is the same: the reference's ``EmbedDense`` (a dense layer across the
n positions of ``(B, n, 1)``) is a Linear on ``(B, n)``, and its estimator's sum over the size-1 last
axis is the identity.

Routers never see the interaction state ``x_l``, only ``x0.detach()``; with the default unweighted
combine (as released) they learn from the auxiliary losses alone, so those must be added to the
training loss (``AdaEnsemble.forward`` returns them summed and weighted).

Two exact executions of the same routing (``dispatch``, :func:`resolve_dispatch`):

* ``"static"``: no op in forward or backward depends on the routing for its shape (no
  ``nonzero``, boolean indexing, ``.item()``), so an accelerator never waits for the host. Each
  expert runs on every row and the (B, E) dispatch mask (or gates) selects its outputs; every
  depth runs on every row and each row takes its logits from its exit depth.
* ``"gather"``: each depth's router and experts compute only the rows still in the stack, each
  expert only the rows routed to it (``nonzero`` + ``index_select`` / ``index_add_``), so a row
  costs its own k experts at each depth up to its exit. Data-dependent shapes: a device sync per
  depth on an accelerator, but none on the CPU, where it is the faster one.
* ``"auto"`` (the default): static on an accelerator, gather on the CPU.

Both give the same outputs, aux losses and routing diagnostics (no capacity, nothing dropped);
with router noise in training, the draws differ (gather draws for fewer rows). See
:class:`AdaEnsemble` for what each computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from recsys.modules.moe_experts import EXPERTS, _check_experts, build_expert
from recsys.modules.moe_routing import (
    Router,
    annealed_k,
    annealed_k_tensor,
    load_balance_loss,
    masked_softmax,
    ranked_mask,
    router_z_loss,
    top_k_mask,
)

# expert dispatch modes (SparseMoE / AdaEnsemble ``dispatch``); see resolve_dispatch
DISPATCH_MODES = ("auto", "static", "gather")


def resolve_dispatch(dispatch: str, device_type: str) -> str:
    """The dispatch that runs for an input on ``device_type``: "auto" is "static" on an accelerator
    (no host-device sync) and "gather" on the CPU (only routed rows computed); the others as given.

    Example:
        >>> resolve_dispatch("auto", "cuda"), resolve_dispatch("auto", "cpu")
        ('static', 'gather')
        >>> resolve_dispatch("static", "cpu")
        'static'
    """
    if dispatch == "auto":
        return "gather" if device_type == "cpu" else "static"
    return dispatch


def _check_dispatch(dispatch: str) -> str:
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"dispatch must be one of {', '.join(DISPATCH_MODES)}, got {dispatch!r}")
    return str(dispatch)


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, rows_i)`` for each rows_i; backward adds every gradient into one zero
    tensor (separate gathers would each allocate a (B, n) gradient, then sum them)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.rows = rows
        ctx.shape = x.shape
        return tuple(x.index_select(0, r) for r in rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        dx: torch.Tensor | None = None
        for r, g in zip(ctx.rows, grads, strict=True):
            if g is not None:
                if dx is None:
                    dx = g.new_zeros(ctx.shape)
                dx.index_add_(0, r, g)
        return (dx,) + (None,) * len(ctx.rows)


@torch.jit.unused
def _gather_rows_eager(x: torch.Tensor, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(_GatherRows.apply(x, *rows))


def gather_rows(x: torch.Tensor, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[x.index_select(0, r) for r in rows]``, whose backward (in eager mode) scatters all the
    gradients into one (B, n) tensor.

    Example:
        >>> [t.tolist() for t in gather_rows(torch.tensor([[1.0], [2.0], [3.0]]),
        ...                                  [torch.tensor([2]), torch.tensor([0, 1])])]
        [[[3.0]], [[1.0], [2.0]]]
    """
    if torch.jit.is_scripting():
        return [x.index_select(0, r) for r in rows]
    return _gather_rows_eager(x, rows)


# Row counts of the gather dispatch's matrix products are rounded up to a multiple of this under
# CPU low precision (see row_bucket).
ROW_BUCKET = 64


@torch.jit.unused
def _eager_row_bucket(x: torch.Tensor) -> int:
    if x.device.type != "cpu":
        return 1
    if torch.is_autocast_enabled("cpu") or x.dtype in (torch.bfloat16, torch.float16):
        return ROW_BUCKET
    return 1


def row_bucket(x: torch.Tensor) -> int:
    """The multiple that the gather dispatch pads each expert's, router's and estimator's row count
    to for ``x``: :data:`ROW_BUCKET` under CPU low precision (bf16/fp16 inputs or CPU autocast), else 1.

    Why: CPU bf16 matrix products run in oneDNN, which builds (JIT-compiles) a kernel for every new
    shape and caches it by shape. Routed row counts change every step, so unpadded each product
    paid for a new kernel: a (1,700 x 432) . (432 x 432) bf16 product took 1.3-1.8 ms with a fresh
    row count against 0.72-0.87 ms with counts rounded to 64 (fp32 runs in MKL, with no such cost,
    and is left unpadded). TorchScript: 1.

    Example:
        >>> row_bucket(torch.randn(2, 3)), row_bucket(torch.randn(2, 3, dtype=torch.bfloat16))
        (1, 64)
    """
    if torch.jit.is_scripting():
        return 1
    return _eager_row_bucket(x)


def pad_rows(rows: torch.Tensor, total: int, bucket: int) -> torch.Tensor:
    """``rows`` (1-d indices) lengthened with copies of its first entry to a multiple of
    ``bucket``, at most ``total`` entries (never shortened; empty stays empty). A caller computes
    on the padded rows and keeps the first ``len(rows)`` results: the copies' results are dropped
    and get no gradient.

    Example:
        >>> pad_rows(torch.tensor([5, 2, 7]), total=10, bucket=4).tolist()
        [5, 2, 7, 5]
        >>> pad_rows(torch.tensor([5, 2, 7]), total=3, bucket=4).tolist()
        [5, 2, 7]
    """
    n = rows.shape[0]
    size = min(-(-n // bucket) * bucket, total)
    if n == 0 or size <= n:
        return rows
    return torch.cat([rows, rows[:1].expand(size - n)])


def first_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of ``t`` (the results of unpadded rows, :func:`pad_rows`): ``t`` itself
    when it has ``n``, since even a full slice records a backward that allocates a zero gradient
    and copies into it.

    Example:
        >>> t = torch.zeros(4, 2)
        >>> first_rows(t, 4) is t, first_rows(t, 3).shape
        (True, torch.Size([3, 2]))
    """
    return t if t.shape[0] == n else t[:n]


# --------------------------------------------------------------------------------------------------
# SparseMoE layer, early-exit stack (the router: recsys.modules.moe_routing)


class SparseMoE(nn.Module):
    """One SparseMoE layer: route each row to k experts (router on ``x0.detach()``) and sum their
    outputs, unweighted (as released) or gate-weighted. No residual here: the stack adds it.

    Two exact dispatches (``dispatch``; "auto" picks by the input's device, :func:`resolve_dispatch`):

    * static: every expert runs on every row and the (B, E) dispatch mask (or the gates, exactly 0
      off the top k) weights its output, so a row's result is the sum over its own k experts
      without data-dependent shapes (no device sync). The price: the experts compute E/k times the
      routed rows.
    * gather: each expert runs only on its rows (``nonzero`` + ``index_select``) and its outputs are
      ``index_add_``-ed back; with ``present``, only on the present ones.

    Args:
        experts: expert kinds (names from :data:`EXPERTS`), in router order.
        num_fields: m.
        dim: D.
        top_k: k when forward gets no k.
        init_temperature, noise_eps: router settings.
        weight_by_gates: multiply each expert's output by its gate.
        dispatch: "auto" (static on an accelerator, gather on the CPU), "static" or "gather".

    Example:
        >>> moe = SparseMoE(["cross", "pin"], num_fields=4, dim=2, top_k=1)
        >>> out, logits, mask = moe(torch.randn(3, 8), torch.randn(3, 8))
        >>> out.shape, mask.sum(1).tolist()
        (torch.Size([3, 8]), [1, 1, 1])
    """

    def __init__(self, experts: Sequence[str], num_fields: int, dim: int, top_k: int,
                 init_temperature: float = 1.0, noise_eps: float = 0.5,
                 weight_by_gates: bool = False, dispatch: str = "auto") -> None:
        super().__init__()
        width = num_fields * dim
        self.top_k = top_k
        self.weight_by_gates = weight_by_gates
        self.dispatch = _check_dispatch(dispatch)
        self.experts = nn.ModuleList(build_expert(e, num_fields, dim)
                                     for e in _check_experts(experts))
        self.reads_x0: list[bool] = [bool(e.uses_x0) for e in self.experts]
        self.router = Router(width, len(self.experts), init_temperature, noise_eps)

    def forward(self, x: torch.Tensor, x0: torch.Tensor, k: torch.Tensor | None = None,
                present: torch.Tensor | None = None, residual: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (combined expert output (B, n), raw router logits (B, E), mask (B, E)).

        k: experts per row as a 0-d long tensor (the annealed k, kept on the device); None: top_k.
        present: (B,) bool, the rows still in the stack; None: every row. Gather dispatch only
            (static computes every row, and its caller masks): the router and the experts run on
            the present rows only; the others get output 0, logits 0 and no expert.
        residual: return ``x +`` the combined output (the stack's next x), summed in place of a
            separate add.
        """
        gather = resolve_dispatch(self.dispatch, x.device.type) == "gather"
        bucket = row_bucket(x) if gather else 1
        b = x.shape[0]
        if gather and present is not None:
            rows_in = present.nonzero().squeeze(1)
            sub = self.router.logits(x0.detach().index_select(0, pad_rows(rows_in, b, bucket)))
            sub = first_rows(sub, rows_in.shape[0])
            sub_mask = top_k_mask(sub, self.top_k) if k is None else ranked_mask(sub, k)
            logits = sub.new_zeros(x0.shape[0], sub.shape[1]).index_copy(0, rows_in, sub)
            mask = torch.zeros(logits.shape, dtype=torch.bool, device=x0.device).index_copy(
                0, rows_in, sub_mask)
        else:
            logits = self.router.logits(x0)
            mask = top_k_mask(logits, self.top_k) if k is None else ranked_mask(logits, k)
        # the weights in x's dtype: under autocast the experts' bf16 outputs are combined into x's
        # dtype by the fused multiply-add itself, with no separate cast
        if self.weight_by_gates:
            weight = masked_softmax(logits, mask).to(x.dtype)
        else:
            weight = mask.to(x.dtype)
        # residual: the sum starts from x, with no separate add (gather adds in place: into a copy)
        out = (x.clone() if gather else x) if residual else torch.zeros_like(x)
        if not gather:
            for e, expert in enumerate(self.experts):
                out = torch.addcmul(out, expert(x, x0), weight[:, e:e + 1])
            return out, logits, mask
        # every (expert, row) pair, sorted by expert, from one nonzero; split per expert on the host
        counts: list[int] = mask.sum(0).tolist()
        rows_of = mask.t().nonzero()[:, 1].split(counts)
        # an expert that every row was routed to (k = E while annealing starts) reads x itself;
        # the others read their rows, padded to a multiple of bucket (results past counts[e] dropped)
        none = rows_of[0][:0]
        gathered = [none if counts[e] == b else pad_rows(rows_of[e], b, bucket)
                    for e in range(len(counts))]
        xs_of = gather_rows(x, gathered)
        if x is x0:  # the first depth: one gather serves both
            x0s_of = xs_of
        else:  # x0's rows for the experts that read it
            x0s_of = gather_rows(x0, [gathered[e] if self.reads_x0[e] else none
                                      for e in range(len(counts))])
        for e, expert in enumerate(self.experts):
            if counts[e] == b and b > 0:
                y = expert(x, x0)
                if self.weight_by_gates:
                    y = y * weight[:, e:e + 1]
                out.add_(y.to(out.dtype))
            elif counts[e] > 0:  # an expert nobody was routed to costs nothing
                y = first_rows(expert(xs_of[e], x0s_of[e] if self.reads_x0[e] else xs_of[e]),
                               counts[e])
                if self.weight_by_gates:
                    y = y * weight[:, e].index_select(0, rows_of[e]).unsqueeze(1)
                out.index_add_(0, rows_of[e], y.to(out.dtype))  # autocast may give bf16
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
    ``logits = Estimator_d(x)`` and leave. Returns the logits and the weighted auxiliary router
    losses (load balance toward ``expert_prior`` / ``exit_prior`` and z-loss, summed over the exit
    router and every layer that ran, each over the rows that reached it).

    Execution (``dispatch``; see :class:`SparseMoE` for the experts), the same result either way:

    * static (the "auto" choice on an accelerator): no host-device sync in forward or backward.
      With the exit router, every row runs through every depth (all E experts) and takes its
      logits from its exit depth's estimator (a ``where``); the aux losses and the diagnostics of a
      depth count only the rows that reached it (masks), and a row gets no gradient from the depths
      past its exit, so the result is that of rows really leaving. The price is compute: training
      (and router-exit inference) pays for every expert and depth on every row.
    * gather (the "auto" choice on the CPU): at each depth, the router runs on the rows that have
      not exited and each expert on the rows routed to it among them (found with ``nonzero``: a
      sync on an accelerator, free on the CPU), so a row costs k experts at each depth up to its
      exit. The rows that left keep their x (no expert adds to it) and are masked as in static;
      each depth's estimator runs on the rows that exit there only.

    ``force_exit_depth(d)`` truncates the stack on the host in both: depths past d never run, and
    inference saves their compute (``recsys bench moe``).

    Args:
        num_fields: m.
        dim: D (every field the same dim).
        num_outputs: logits per row.
        experts: the expert kinds of every layer (names from :data:`EXPERTS`), in router order.
        top_k: experts per row, in [1, len(experts)].
        anneal_steps: top-k annealing: k starts at the number of experts and falls linearly to
            top_k over this many training forwards (0 = top_k from the first step); k is computed
            on the device from ``step``.
        depths: the number of SparseMoE layers (and exit choices).
        init_temperature: the routers' initial cosine temperature T (> 0; learned).
        noise_eps: ε of the routers' multiplicative input noise in training (0 = none).
        weight_by_gates: multiply each expert's output by its gate (default: unweighted sum).
        load_balance_weight: α of the load-balance losses.
        z_loss_weight: weight of the router z-losses.
        expert_prior: target dispatch share of each expert (len(experts) values summing to 1).
        exit_prior: target share of rows exiting at each depth (depths values summing to 1).
        dispatch: "auto" (static on an accelerator, gather on the CPU: :func:`resolve_dispatch`),
            "static" or "gather"; resolved at each forward from the input's device.

    Attributes:
        blocks: ModuleList of ExitBlock (``.moe`` SparseMoE, ``.estimator`` Linear(n, num_outputs)).
        exit_router: Router over the depths.
        step: long buffer (checkpointed), training forwards so far; drives the top-k annealing.
        forced_exit: -1 = use the exit router; d >= 0 = every row exits at depth d (the exit router
            then does not run and adds no loss, and deeper layers do not run). Set with
            ``force_exit_depth``.
        rows_per_depth, exits_per_depth (depths,), expert_load (depths, E): diagnostics of the last
            forward (non-persistent buffers, updated on the device): rows that reached / exited
            each depth and rows of those sent to each expert of each depth.
        rows_computed (depths, E): the rows each expert of each depth computed in the last forward
            (its cost): every row for static dispatch (at the depths that ran), ``expert_load``
            for gather.

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
                 exit_prior: Sequence[float] = (0.1, 0.2, 0.6, 0.1),
                 dispatch: str = "auto") -> None:
        super().__init__()
        experts = _check_experts(experts)
        dispatch = _check_dispatch(dispatch)
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
        self.dispatch = dispatch
        self.blocks = nn.ModuleList(
            ExitBlock(SparseMoE(experts, num_fields, dim, top_k, init_temperature, noise_eps,
                                weight_by_gates, dispatch),
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
        self.register_buffer("rows_computed", torch.zeros(depths, self.num_experts,
                                                          dtype=torch.long), persistent=False)

    @torch.jit.export
    def force_exit_depth(self, depth: int) -> None:
        """Send every row to exit at ``depth`` (0-based); -1 restores the exit router."""
        if depth < -1 or depth >= self.depths:
            raise ValueError("exit depth must be -1 (router) or in [0, depths)")
        self.forced_exit = depth

    @torch.jit.export
    def current_k(self) -> int:
        """Experts per row that the next forward routes to (annealing schedule at ``step``).

        For diagnostics: it reads ``step`` back to the host (forward computes k on the device)."""
        if self.anneal_steps <= 0:
            return self.top_k
        return annealed_k(int(self.step.item()), self.num_experts, self.top_k, self.anneal_steps)

    def forward(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 (B, m, D) or (B, m·D) -> (logits (B, num_outputs), aux loss scalar)."""
        b = x0.shape[0]
        x0 = x0.flatten(1)  # (B, m, D) -> (B, n); also fine for B = 0, unlike reshape(b, -1)
        if x0.shape[1] != self.width:
            raise ValueError("AdaEnsemble expects m*D = " + str(self.width) + " values per row, got "
                             + str(x0.shape[1]))
        k: torch.Tensor | None = None
        if self.anneal_steps > 0:  # k of the step before this forward's increment, on the device
            k = annealed_k_tensor(self.step, self.num_experts, self.top_k, self.anneal_steps)
        if self.training:
            self.step.add_(1)
        aux = torch.zeros((), dtype=x0.dtype, device=x0.device)
        self.rows_per_depth.zero_()
        self.exits_per_depth.zero_()
        self.expert_load.zero_()
        self.rows_computed.zero_()
        gather = resolve_dispatch(self.dispatch, x0.device.type) == "gather"
        bucket = row_bucket(x0) if gather else 1
        forced = self.forced_exit
        exit_at = torch.zeros(0, dtype=torch.long, device=x0.device)
        last = self.depths - 1
        if forced >= 0:
            last = forced  # a host-side int: depths past it never run
            self.rows_per_depth[:forced + 1].fill_(b)
            self.exits_per_depth[forced:forced + 1].fill_(b)
        else:
            exit_logits = self.exit_router.logits(x0)
            exit_at = exit_logits.argmax(dim=1)  # hard top-1: its softmax gate is exactly 1
            depth_ids = torch.arange(self.depths, device=x0.device)
            # one-hot by comparison: F.one_hot reads its range check back to the host
            exit_mask = exit_at.unsqueeze(1) == depth_ids
            aux = aux + self.load_balance_weight * load_balance_loss(exit_logits, exit_mask,
                                                                     self.exit_prior)
            aux = aux + self.z_loss_weight * router_z_loss(exit_logits)
            exits = exit_mask.sum(0)
            self.exits_per_depth.copy_(exits)
            # rows that reach depth d: those exiting at d or deeper
            self.rows_per_depth.copy_(exits.flip(0).cumsum(0).flip(0))

        out = torch.zeros(b, self.num_outputs, dtype=x0.dtype, device=x0.device)
        x = x0
        for d, block in enumerate(self.blocks):
            if d <= last:
                if forced >= 0:
                    x, logits, mask = block.moe(x, x0, k, residual=True)
                    aux = aux + self.load_balance_weight * load_balance_loss(logits, mask,
                                                                             self.expert_prior)
                    aux = aux + self.z_loss_weight * router_z_loss(logits)
                    self.expert_load[d].copy_(mask.sum(0))
                    if d == last:
                        out = block.estimator(x).to(out.dtype)
                else:
                    present = exit_at >= d
                    # gather: the router and the experts compute only the rows still in the stack
                    # (every row at depth 0); the others get no expert and keep their x
                    x, logits, mask = block.moe(x, x0, k, present if gather and d > 0 else None,
                                                residual=True)
                    aux = aux + self.load_balance_weight * load_balance_loss(
                        logits, mask, self.expert_prior, present)
                    aux = aux + self.z_loss_weight * router_z_loss(logits, present)
                    self.expert_load[d].copy_((mask & present.unsqueeze(1)).sum(0))
                    here = exit_at == d
                    if gather:  # the estimator on the rows that exit here only
                        rows = here.nonzero().squeeze(1)
                        est = block.estimator(x.index_select(0, pad_rows(rows, b, bucket)))
                        out = out.index_copy(0, rows,
                                             first_rows(est, rows.shape[0]).to(out.dtype))
                    else:
                        out = torch.where(here.unsqueeze(1), block.estimator(x).to(out.dtype),
                                          out)
                if gather:
                    self.rows_computed[d].copy_(self.expert_load[d])
                else:
                    self.rows_computed[d].fill_(b)
        return out, aux

    def diagnostics(self) -> dict[str, Any]:
        """The last forward's routing as plain lists (eager only: not compiled by jit.script, so a
        scripted model's diagnostics are its buffers)."""
        return {"rows_per_depth": self.rows_per_depth.tolist(),
                "exits_per_depth": self.exits_per_depth.tolist(),
                "expert_load": self.expert_load.tolist(),
                "rows_computed": self.rows_computed.tolist(),
                "step": int(self.step), "k": self.current_k()}
