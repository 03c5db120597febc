"""Hierarchical group-wise listwise loss (docs/methods.md section 5, arXiv 2506.12756).

Users carry RVQ codes ``[c_1..c_L]``; the level-l column of ``codes`` holds the trie-node id of
the prefix ``(c_1..c_l)``, so samples sharing that value form a level-l group (shallow levels:
loosely similar users, deep levels: near-identical users, i.e. progressively harder negatives).
The loss is ``Σ_l w_l L_l`` with ``L_l`` the listwise loss of :mod:`recsys.losses.listwise` over
the level-l groups; optional level 0 is the whole batch.

Level weights: by default ``w_l = 1 / n_levels`` for every level used (``n_levels = L``, plus one
with level 0), i.e. the *mean* of the level losses, so that ``λ`` in ``BCE + λ·Σ w_l L_l`` keeps
the same scale whatever ``L`` is. A level with no valid group contributes 0 (weights are not
renormalised).

Global groups: :func:`gather_for_groups` all-gathers ``(logits, labels, codes)`` across ranks so
that groups span the global batch. Codes must mean the same on every rank (shared codebooks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from recsys.losses.listwise import level_listwise_losses


class HierarchicalResult(NamedTuple):
    """What :func:`hierarchical_listwise_loss` returns; per-level fields are ``(n_levels,)``.

    Attributes:
        loss: scalar ``Σ_l w_l L_l`` (keeps the graph).
        levels: the level numbers, in order (``0`` first when level 0 is included, then ``1..L``).
        weights: the weights ``w_l`` used, as Python floats.
        level_loss: detached ``L_l`` per level.
        num_groups: detached int64, valid groups per level.
        mean_group_size: detached float, mean size of the valid groups per level.
        covered: detached float, share of samples in a valid group, per level.
    """

    loss: torch.Tensor
    levels: tuple[int, ...]
    weights: tuple[float, ...]
    level_loss: torch.Tensor
    num_groups: torch.Tensor
    mean_group_size: torch.Tensor
    covered: torch.Tensor

    def to_dict(self, prefix: str = "listwise") -> dict[str, float]:
        """Flat Python floats for logging, e.g. ``{"listwise/l1/loss": ...}`` (one host sync)."""
        out = {f"{prefix}/loss": float(self.loss.detach())}
        stats = torch.stack([self.level_loss, self.num_groups.to(self.level_loss.dtype),
                             self.mean_group_size, self.covered]).cpu().tolist()
        for i, level in enumerate(self.levels):
            for name, row in zip(("loss", "num_groups", "mean_group_size", "covered"), stats,
                                 strict=True):
                out[f"{prefix}/l{level}/{name}"] = row[i]
        return out


def hierarchical_listwise_loss(logits: torch.Tensor, labels: torch.Tensor, codes: torch.Tensor,
                               level_weights: Sequence[float] | None = None,
                               include_level0: bool = False, temperature: float = 1.0,
                               ) -> HierarchicalResult:
    """``Σ_l w_l L_l``: the listwise loss within the groups of each code level, in one segment pass.

    Args:
        logits: ``(B,)`` scores (the same logit as the BCE).
        labels: ``(B,)`` non-negative relevance (binary or graded).
        codes: ``(B, L)`` integer trie-node ids; column ``l-1`` is the level-l prefix id. Only
            equality within a column matters, so ids need not be contiguous.
        level_weights: one weight per level used, level 0 first when ``include_level0`` (so
            ``L + include_level0`` floats); None for uniform ``1 / n_levels``.
        include_level0: also rank within the whole batch, as level 0 with its own weight.
        temperature: softmax temperature ``τ > 0``.

    Example:
        >>> codes = torch.tensor([[0, 10], [0, 10], [0, 11], [1, 12]])
        >>> r = hierarchical_listwise_loss(torch.randn(4), torch.tensor([1., 0., 1., 1.]), codes)
        >>> r.levels, r.weights, r.num_groups.tolist()
        ((1, 2), (0.5, 0.5), [1, 1])
    """
    if codes.dim() != 2 or codes.shape[0] != logits.shape[0]:
        raise ValueError(f"codes must have shape (B={logits.shape[0]}, L), "
                         f"got {tuple(codes.shape)}")
    num_code_levels = codes.shape[1]
    levels = tuple(range(0 if include_level0 else 1, num_code_levels + 1))
    if not levels:
        raise ValueError("no level to rank in: codes has 0 columns and include_level0 is False")
    if level_weights is None:
        weights = tuple(1.0 / len(levels) for _ in levels)
    else:
        weights = tuple(float(w) for w in level_weights)
        if len(weights) != len(levels):
            raise ValueError(f"level_weights has {len(weights)} entries but there are "
                             f"{len(levels)} levels {levels} (level 0 first when included)")

    columns = [codes[:, i] for i in range(num_code_levels)]
    if include_level0:
        columns.insert(0, torch.zeros_like(codes[:, 0]) if num_code_levels
                       else torch.zeros(logits.shape[:1], dtype=torch.long, device=logits.device))
    stats = level_listwise_losses(logits, labels, columns, temperature)
    w = torch.tensor(weights, dtype=stats.loss.dtype, device=stats.loss.device)
    return HierarchicalResult(loss=(w * stats.loss).sum(), levels=levels, weights=weights,
                              level_loss=stats.loss.detach(), num_groups=stats.num_groups,
                              mean_group_size=stats.mean_group_size, covered=stats.covered)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` (exact, unlike s·x − (s−1)·x)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _all_gather_padded(x: torch.Tensor, sizes: list[int], rank: int,
                       group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's ``x`` (dim 0 of length ``sizes[r]``) in rank order; this rank's
    slice is ``x`` itself, so autograd reaches it, the others are constants."""
    max_b = max(sizes)
    padded = x.detach().new_zeros((max_b, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    # all_gather wants equal shapes on every rank: pad to the largest batch, trim after
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    pieces = [x if r == rank else part[:n] for r, (part, n) in enumerate(zip(parts, sizes,
                                                                              strict=True))]
    return torch.cat(pieces)


def gather_for_groups(logits: torch.Tensor, labels: torch.Tensor, codes: torch.Tensor, *,
                      scale_grad: bool = True, group: dist.ProcessGroup | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather ``(logits, labels, codes)`` across ranks so that groups span the global batch.

    The result is every rank's rows concatenated in rank order (batch sizes may differ: the sizes
    are all-gathered first and the tensors padded). Only this rank's slice carries gradient; the
    other ranks' rows are constants here and get their gradient on their own rank, where the same
    global loss is computed.

    Gradient scale: every rank computes the same global loss ``L``, and rank r's backward yields
    ``∂L/∂s_r`` for its own logits only. DDP then *averages* parameter gradients over the ``W``
    ranks, which would give ``(1/W)·∂L/∂θ``. With ``scale_grad=True`` (default) the gradient
    reaching the local logits is multiplied by ``W`` (the forward value is unchanged), so after
    DDP's averaging the parameter gradient equals that of ONE process computing the loss on the
    concatenated global batch, and the logged loss is that global loss on every rank. This matches
    the convention of the local BCE, whose DDP-averaged gradient is that of the global-batch mean.
    Pass ``scale_grad=False`` when gradients are summed (not averaged) across ranks.

    With no initialised process group, or a world size of 1, the inputs come back unchanged.

    Args:
        logits: ``(B_r,)`` this rank's scores.
        labels: ``(B_r,)`` this rank's labels.
        codes: ``(B_r, L)`` (or ``(B_r,)``) this rank's group ids.
        scale_grad: multiply the local gradient by the world size (see above).
        group: the process group (None: the default group).

    Example:
        >>> s, y, c = torch.zeros(3), torch.ones(3), torch.zeros(3, 2, dtype=torch.long)
        >>> gather_for_groups(s, y, c)[0] is s  # no process group: unchanged
        True
    """
    if not (dist.is_available() and dist.is_initialized()):
        return logits, labels, codes
    world = dist.get_world_size(group)
    if world == 1:
        return logits, labels, codes
    rank = dist.get_rank(group)
    n = torch.tensor([logits.shape[0]], dtype=torch.long, device=logits.device)
    all_n = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(all_n, n, group=group)
    sizes = [int(t) for t in all_n]
    local = _ScaleGrad.apply(logits, float(world)) if scale_grad else logits
    return (_all_gather_padded(local, sizes, rank, group),
            _all_gather_padded(labels, sizes, rank, group),
            _all_gather_padded(codes, sizes, rank, group))
