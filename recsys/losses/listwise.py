"""Group-wise listwise losses (docs/methods.md section 5): label-normalised softmax cross-entropy over the
samples of each group, fully vectorised with segment (scatter) operations.

Per group ``g`` with logits ``s`` and labels ``y >= 0`` (binary or graded)::

    L_g = -Σ_{i∈g} (y_i / Σ_{j∈g} y_j) · log softmax(s / τ)_i

Groups of size 1 (the softmax is 1, nothing to rank) and groups with no positive (``Σy = 0``, the
target is undefined) are skipped; the loss is the mean of ``L_g`` over the remaining *valid* groups.

Diagnostics (``num_groups``, ``mean_group_size``, ``covered``) are detached 0-dim tensors on the
logits' device, not Python numbers, so that computing them never forces a host sync of its own; call
``float()`` / ``int()`` on them when logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class ListwiseResult(NamedTuple):
    """What :func:`segment_listwise_loss` returns.

    Attributes:
        loss: scalar, the mean per-group loss over valid groups (a grad-connected 0 when none).
        num_groups: detached 0-dim int64, the number of valid groups.
        mean_group_size: detached 0-dim float, the mean size of the valid groups (0 when none).
        covered: detached 0-dim float, the share of samples that lie in a valid group (0 when B=0).
    """

    loss: torch.Tensor
    num_groups: torch.Tensor
    mean_group_size: torch.Tensor
    covered: torch.Tensor


class LevelStats(NamedTuple):
    """Per-level results of :func:`level_listwise_losses`; every field is a ``(n_levels,)`` tensor.

    ``loss`` keeps the graph; the other fields are detached (see :class:`ListwiseResult`).
    """

    loss: torch.Tensor
    num_groups: torch.Tensor
    mean_group_size: torch.Tensor
    covered: torch.Tensor


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> None:
    if logits.dim() != 1:
        raise ValueError(f"logits must be 1-D (B,), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits shape "
                         f"{tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def level_listwise_losses(logits: torch.Tensor, labels: torch.Tensor,
                          group_columns: Sequence[torch.Tensor], temperature: float = 1.0,
                          ) -> LevelStats:
    """The listwise loss of several groupings of the same batch, in one segment pass.

    Each entry of ``group_columns`` is a ``(B,)`` tensor of arbitrary integer group ids (one
    "level"). The ids of each level are compacted with ``torch.unique`` and offset past those of
    the previous levels, so every (level, group) pair becomes one segment of a single ``(n·B,)``
    problem; no Python loop runs over groups.

    Args:
        logits: ``(B,)`` scores (the same logit the BCE uses).
        labels: ``(B,)`` non-negative relevance (binary or graded); not checked for sign.
        group_columns: one ``(B,)`` integer id tensor per level.
        temperature: softmax temperature ``τ > 0``.

    Example:
        >>> s, y = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([1.0, 0.0, 1.0])
        >>> level_listwise_losses(s, y, [torch.tensor([0, 0, 1])]).num_groups
        tensor([1])
    """
    _check_inputs(logits, labels, temperature)
    n_levels = len(group_columns)
    b = logits.shape[0]
    device = logits.device
    # half-precision logits are upcast: exp/log-sum-exp of bf16 loses the ranking signal
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype) / temperature
    y = labels.to(dtype)

    inverses: list[torch.Tensor] = []
    level_sizes: list[int] = []
    offset = 0
    for col in group_columns:
        if col.shape != (b,):
            raise ValueError(f"group ids must have shape ({b},), got {tuple(col.shape)}")
        uniq, inv = torch.unique(col, return_inverse=True)
        n_seg = uniq.numel()
        inverses.append(inv + offset)
        level_sizes.append(n_seg)
        offset += n_seg
    num_seg = offset
    seg = torch.cat(inverses) if inverses else torch.zeros(0, dtype=torch.long, device=device)
    zz = z.repeat(n_levels)
    yy = y.repeat(n_levels)
    seg_level = torch.repeat_interleave(torch.arange(n_levels, device=device),
                                        torch.tensor(level_sizes, device=device,
                                                     dtype=torch.long),
                                        output_size=num_seg)  # known: no device sync

    ones = torch.ones_like(yy)
    count = torch.zeros(num_seg, dtype=dtype, device=device).index_add_(0, seg, ones)
    pos = torch.zeros(num_seg, dtype=dtype, device=device).index_add_(0, seg, yy.detach())
    valid = (count >= 2) & (pos > 0)

    # stable log-softmax per segment: subtract the segment max. The max is detached: log-softmax
    # is shift-invariant, so its gradient would cancel exactly anyway.
    seg_max = torch.full((num_seg,), float("-inf"), dtype=dtype, device=device)
    seg_max = seg_max.scatter_reduce(0, seg, zz.detach(), reduce="amax", include_self=True)
    shifted = zz - seg_max[seg]
    sum_exp = torch.zeros(num_seg, dtype=dtype, device=device).index_add(0, seg, shifted.exp())
    log_p = shifted - sum_exp.log()[seg]  # sum_exp >= 1 (the max term), so this stays finite

    # target weights y_i / Σy of the valid groups only; where() (not a product) keeps a 0/0 of a
    # skipped group from leaking a NaN into the graph
    in_valid = valid[seg]
    w = torch.where(in_valid, yy / pos.clamp_min(torch.finfo(dtype).tiny)[seg],
                    torch.zeros_like(yy))
    group_loss = -torch.zeros(num_seg, dtype=dtype, device=device).index_add(0, seg, w * log_p)

    def per_level(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_levels, dtype=values.dtype, device=device).index_add_(
            0, seg_level, values)

    valid_f = valid.to(dtype)
    n_valid = per_level(valid_f)
    denom = n_valid.clamp_min(1.0)
    # the sum runs over all segments (invalid ones contribute an exact 0), so an all-skipped
    # level is a grad-connected zero rather than a detached constant
    level_loss = per_level(group_loss) / denom
    with torch.no_grad():
        covered_n = per_level(count * valid_f)
        mean_size = covered_n / denom
        covered = covered_n / max(b, 1)
    return LevelStats(loss=level_loss, num_groups=n_valid.detach().long(),
                      mean_group_size=mean_size, covered=covered)


def segment_listwise_loss(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                          temperature: float = 1.0) -> ListwiseResult:
    """Mean over valid groups of the label-normalised softmax cross-entropy within each group.

    Args:
        logits: ``(B,)`` scores; differentiable, stable for any finite magnitude.
        labels: ``(B,)`` non-negative relevance in [0, 1] or graded.
        groups: ``(B,)`` integer group ids (arbitrary values; need not be contiguous or sorted).
        temperature: softmax temperature ``τ > 0``.

    Example:
        >>> s = torch.tensor([2.0, 0.0, 1.0, 1.0, 5.0])
        >>> y = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
        >>> r = segment_listwise_loss(s, y, torch.tensor([7, 7, 3, 3, 9]))  # group 9: size 1
        >>> int(r.num_groups), round(float(r.covered), 2)
        (2, 0.8)
    """
    stats = level_listwise_losses(logits, labels, [groups], temperature)
    return ListwiseResult(loss=stats.loss[0], num_groups=stats.num_groups[0],
                          mean_group_size=stats.mean_group_size[0], covered=stats.covered[0])


def in_batch_listwise_loss(logits: torch.Tensor, labels: torch.Tensor,
                           temperature: float = 1.0) -> ListwiseResult:
    """The whole batch as one group (the "level 0" of the hierarchical loss).

    Example:
        >>> r = in_batch_listwise_loss(torch.zeros(4), torch.tensor([1.0, 0.0, 0.0, 0.0]))
        >>> round(float(r.loss), 4)  # -log(1/4)
        1.3863
    """
    groups = torch.zeros(logits.shape[:1], dtype=torch.long, device=logits.device)
    return segment_listwise_loss(logits, labels, groups, temperature)
