"""RankTower's hybrid cascade objective (docs/methods.md section 4, arXiv 2407.12385).

A pre-ranker sees every retrieved candidate, so its training rows come from the *full* cascade; each
sample space gets its own objective, all computed within a request (``request (B,)`` ids):

* fine-grained: the exposed rows (``stage >= Stage.EXPOSED``), clicks as positives, listwise
  softmax cross-entropy (:func:`fine_grained_loss`);
* distillation: the rows the ranker scored (a finite ``teacher``; ``stage >= Stage.PRERANKED``),
  the student's in-request distribution matched to the ranker's (KL), or the ranker's order
  learned through a differentiable sort (NeuralSort / SoftSort) (:func:`distillation_loss`);
* coarse-grained: every row; for each cascade cut ``s`` in ``COARSE_STAGES`` the rows that passed
  it rank above those that stopped before it (:func:`coarse_grained_loss`).

``cascade_loss`` combines them as ``α·L_distill + β·L_fine + γ·L_coarse``; a 0 weight skips the
term. Every loss is vectorised with segment (scatter) operations or padding: no Python loop runs
over requests. Inputs in half precision are upcast to float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recsys.losses.listwise import segment_listwise_loss
from recsys.losses.stages import Stage as Stage  # re-exported: the stages these losses read

# distillation methods: the teacher's in-request distribution (KL), or its order through a
# differentiable sort (NeuralSort, SoftSort)
DISTILLATIONS = ("kl", "neuralsort", "softsort")

# The cascade cuts of the coarse loss: passed the pre-ranker, passed the ranker, shown. Clicks and
# conversions are left to the fine-grained loss, which weighs them within the exposed rows only.
COARSE_STAGES: tuple[int, ...] = (int(Stage.PRERANKED), int(Stage.RANKED), int(Stage.EXPOSED))


def _float(x: torch.Tensor) -> torch.Tensor:
    # exp / log-sum-exp in bf16/fp16 loses the ranking signal
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_1d(name: str, x: torch.Tensor, b: int) -> None:
    if x.shape != (b,):
        raise ValueError(f"{name} must have shape ({b},), got {tuple(x.shape)}")


def segment_log_softmax(x: torch.Tensor, seg: torch.Tensor, num_seg: int) -> torch.Tensor:
    """Log-softmax of ``x (B,)`` within each segment; ``seg (B,)`` holds ids in ``[0, num_seg)``.

    Example:
        >>> segment_log_softmax(torch.zeros(3), torch.tensor([0, 0, 1]), 2).exp()
        tensor([0.5000, 0.5000, 1.0000])
    """
    # the max is detached: log-softmax is shift-invariant, its gradient would cancel anyway
    seg_max = torch.full((num_seg,), float("-inf"), dtype=x.dtype, device=x.device)
    seg_max = seg_max.scatter_reduce(0, seg, x.detach(), reduce="amax", include_self=True)
    shifted = x - seg_max[seg]
    sum_exp = torch.zeros(num_seg, dtype=x.dtype, device=x.device).index_add(0, seg, shifted.exp())
    return shifted - sum_exp.log()[seg]  # sum_exp >= 1 (the max term): finite


def fine_grained_loss(scores: torch.Tensor, click: torch.Tensor, request: torch.Tensor,
                      stage: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Listwise softmax CE within each request over its exposed rows, clicks as positives.

    Requests with fewer than 2 exposed rows or no click are skipped (see
    :func:`~recsys.losses.listwise.segment_listwise_loss`); a grad-connected 0 when none is valid.

    Args:
        scores: ``(B,)`` pre-ranker logits.
        click: ``(B,)`` labels (0/1 or graded).
        request: ``(B,)`` integer request ids.
        stage: ``(B,)`` the deepest :class:`~recsys.losses.stages.Stage` reached.
        temperature: softmax temperature.

    Example:
        >>> s = torch.tensor([2.0, 0.0, 5.0]); st = torch.tensor([3, 4, 1])
        >>> round(float(fine_grained_loss(s, (st == 4).float(), torch.zeros(3, dtype=torch.long),
        ...                               st)), 4)  # -log softmax([2, 0])[1]; row 3 not exposed
        2.1269
    """
    b = scores.shape[0]
    for name, x in (("click", click), ("request", request), ("stage", stage)):
        _check_1d(name, x, b)
    exposed = stage >= int(Stage.EXPOSED)
    return segment_listwise_loss(scores[exposed], click[exposed].to(scores.dtype),
                                 request[exposed], temperature).loss


def coarse_grained_loss(scores: torch.Tensor, stage: torch.Tensor, request: torch.Tensor,
                        temperature: float = 1.0,
                        stages: Sequence[int] = COARSE_STAGES) -> torch.Tensor:
    """Rows that reached a later stage rank above those that stopped earlier, within a request.

    For each cut ``s`` in ``stages``: softmax CE over all of a request's rows with the rows of
    ``stage >= s`` as (label-normalised) positives. A request counts at cut ``s`` only if it has
    both positives and negatives there (an all-positive list has nothing to rank); the loss at a
    cut is the mean over its valid requests, and the result the mean over the cuts with at least
    one valid request (a grad-connected 0 when there is none).

    Args:
        scores: ``(B,)`` logits.
        stage: ``(B,)`` the deepest :class:`~recsys.losses.stages.Stage` reached.
        request: ``(B,)`` integer request ids.
        temperature: softmax temperature.
        stages: the cuts (default: passed the pre-ranker, passed the ranker, exposed).

    Example:
        >>> s, st = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2, 1, 0])
        >>> r = torch.zeros(3, dtype=torch.long)
        >>> round(float(coarse_grained_loss(s, st, r)), 4)  # cuts 1, 2 valid; cut 3: no positive
        0.8014
    """
    b = scores.shape[0]
    _check_1d("stage", stage, b)
    _check_1d("request", request, b)
    _, inv = torch.unique(request, return_inverse=True)
    num_seg = int(inv.max()) + 1 if b else 0
    dtype = torch.promote_types(scores.dtype, torch.float32)
    losses: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []
    for s in stages:
        passed = stage >= s
        # a request without a negative at this cut is dropped by zeroing its labels (the listwise
        # loss then skips it for lack of a positive); no boolean indexing, no host sync
        negatives = torch.zeros(num_seg, dtype=dtype, device=scores.device).index_add_(
            0, inv, (~passed).to(dtype))
        labels = (passed & (negatives > 0)[inv]).to(dtype)
        result = segment_listwise_loss(scores, labels, inv, temperature)
        losses.append(result.loss)
        valid.append(result.num_groups > 0)
    if not losses:
        return _float(scores).sum() * 0.0
    loss, has = torch.stack(losses), torch.stack(valid)
    return torch.where(has, loss, torch.zeros_like(loss)).sum() / has.sum().clamp_min(1)


def _teacher_rows(scores: torch.Tensor, teacher: torch.Tensor, request: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The rows with a finite teacher score: (student, teacher, compact request ids, #requests)."""
    b = scores.shape[0]
    _check_1d("teacher", teacher, b)
    _check_1d("request", request, b)
    has = torch.isfinite(teacher)
    s, t = _float(scores[has]), _float(teacher[has]).detach()
    _, inv = torch.unique(request[has], return_inverse=True)
    num_seg = int(inv.max()) + 1 if inv.numel() else 0
    return s, t, inv, num_seg


def _kl_distillation(s: torch.Tensor, t: torch.Tensor, seg: torch.Tensor, num_seg: int,
                     temperature: float) -> torch.Tensor:
    log_q = segment_log_softmax(s / temperature, seg, num_seg)
    log_p = segment_log_softmax(t / temperature, seg, num_seg)
    p = log_p.exp()
    kl = torch.zeros(num_seg, dtype=s.dtype, device=s.device).index_add(0, seg, p * (log_p - log_q))
    count = torch.zeros(num_seg, dtype=s.dtype, device=s.device).index_add_(
        0, seg, torch.ones_like(s))
    valid = count >= 2
    # summing over all requests (size-1 ones add an exact 0) keeps an empty batch grad-connected
    return torch.where(valid, kl, torch.zeros_like(kl)).sum() / valid.sum().clamp_min(1)


def pad_by_segment(x: torch.Tensor, seg: torch.Tensor, num_seg: int, fill: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter ``x (B,)`` into a ``(num_seg, n_max)`` matrix, one row per segment, in input order.

    Returns the padded matrix (``fill`` in the padding) and its ``(num_seg, n_max)`` bool mask.

    Example:
        >>> pad_by_segment(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0, 1]), 2, 0.0)[0]
        tensor([[2., 0.],
                [1., 3.]])
    """
    count = torch.zeros(num_seg, dtype=torch.long, device=x.device).index_add_(
        0, seg, torch.ones_like(seg))
    n_max = int(count.max()) if num_seg else 0
    order = torch.argsort(seg, stable=True)
    start = torch.cumsum(count, 0) - count
    pos = torch.empty_like(seg)
    # the position of each row within its segment: its rank in the stable sort minus the start
    pos[order] = torch.arange(seg.numel(), device=x.device) - start[seg[order]]
    padded = torch.full((num_seg, n_max), fill, dtype=x.dtype, device=x.device)
    padded = padded.index_put((seg, pos), x)
    mask = torch.zeros((num_seg, n_max), dtype=torch.bool, device=x.device)
    mask[seg, pos] = True
    return padded, mask


def neuralsort(s: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Log of the NeuralSort relaxed permutation matrix (Grover et al. 2019), descending order.

    ``P̂[i, :] = softmax(((n + 1 - 2i)·s - A_s 1) / τ)`` with ``A_s[j, k] = |s_j - s_k|``, ``i`` the
    1-based rank; row ``i`` is the relaxed one-hot of the item at rank ``i``, and as ``τ -> 0`` it
    tends to the hard sort. Padded per list: ``n`` and ``A_s 1`` count the valid entries only,
    padded columns get probability 0 and padded rows are garbage to be masked by the caller.

    Args:
        s: ``(G, N)`` scores, padded.
        mask: ``(G, N)`` bool, True on valid entries.
        tau: the relaxation temperature ``τ > 0``.

    Returns:
        ``(G, N, N)`` log-probabilities, ``[g, i, j]`` = log P(item j at rank i).

    Example:
        >>> p = neuralsort(torch.tensor([[0.0, 3.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool), 0.01)
        >>> p.exp().argmax(-1)
        tensor([[1, 2, 0]])
    """
    maskf = mask.to(s.dtype)
    s = torch.where(mask, s, torch.zeros_like(s))
    n = maskf.sum(-1, keepdim=True)  # (G, 1)
    a = (s.unsqueeze(-1) - s.unsqueeze(-2)).abs() * maskf.unsqueeze(-2)  # (G, N, N)
    row_sum = a.sum(-1)  # (G, N): Σ_k |s_j - s_k| over valid k
    rank = torch.arange(1, s.shape[-1] + 1, dtype=s.dtype, device=s.device)
    scaling = n + 1 - 2 * rank  # (G, N), indexed by the rank i
    logits = (scaling.unsqueeze(-1) * s.unsqueeze(-2) - row_sum.unsqueeze(-2)) / tau
    logits = logits.masked_fill(~mask.unsqueeze(-2), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def softsort(s: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Log of the SoftSort relaxed permutation matrix (Prillo & Eisenschlos 2020), descending.

    ``P̂[i, :] = softmax(-|sort(s)_i - s| / τ)``; same conventions as :func:`neuralsort`.

    Example:
        >>> p = softsort(torch.tensor([[0.0, 3.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool), 0.01)
        >>> p.exp().argmax(-1)
        tensor([[1, 2, 0]])
    """
    s = torch.where(mask, s, torch.zeros_like(s))
    ranked = torch.sort(s.masked_fill(~mask, float("-inf")), dim=-1, descending=True).values
    # padded rows hold -inf: give them a finite value so that |a - b| stays finite (masked later)
    ranked = torch.where(mask, ranked, torch.zeros_like(ranked))
    logits = -(ranked.unsqueeze(-1) - s.unsqueeze(-2)).abs() / tau
    logits = logits.masked_fill(~mask.unsqueeze(-2), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def _check_distill(method: str) -> str:
    if not isinstance(method, str) or method not in DISTILLATIONS:
        raise ValueError(f"unknown distill method {method!r}; expected one of: "
                         f"{', '.join(DISTILLATIONS)}")
    return str(method)  # a StrEnum member becomes its value


def _sort_distillation(s: torch.Tensor, t: torch.Tensor, seg: torch.Tensor, num_seg: int,
                       tau: float, method: str) -> torch.Tensor:
    s_pad, mask = pad_by_segment(s, seg, num_seg, 0.0)
    t_pad, _ = pad_by_segment(t, seg, num_seg, float("-inf"))
    relax = neuralsort if method == "neuralsort" else softsort
    log_p = relax(s_pad, mask, tau)  # (G, N, N)
    # the teacher's hard permutation: row i is one-hot on the teacher's rank-i item; padding (-inf)
    # sorts last, so the valid ranks 1..n point at valid items
    target = torch.sort(t_pad, dim=-1, descending=True, stable=True).indices  # (G, N)
    row_ce = -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (G, N)
    row_valid = mask  # valid entries are left-aligned, so rank i < n  <=>  mask[g, i]
    row_ce = torch.where(row_valid, row_ce, torch.zeros_like(row_ce))
    n = mask.sum(-1)
    per_list = row_ce.sum(-1) / n.clamp_min(1).to(s.dtype)
    valid = n >= 2
    return torch.where(valid, per_list, torch.zeros_like(per_list)).sum() / valid.sum().clamp_min(1)


def distillation_loss(scores: torch.Tensor, teacher: torch.Tensor, request: torch.Tensor,
                      temperature: float = 1.0, method: str = "kl") -> torch.Tensor:
    """Distil the ranker (teacher) into the pre-ranker within each request.

    Only rows with a finite ``teacher`` take part (the ranker scored them); requests with fewer than
    2 such rows are skipped and the loss is the mean over the others (a grad-connected 0 if none).

    * ``kl``: ``KL(softmax(teacher/T) ‖ softmax(scores/T))`` per request.
    * ``neuralsort`` / ``softsort``: the student's relaxed permutation matrix ``P̂`` (with
      ``τ = temperature``) against the teacher's hard one ``P``: ``-(1/n) Σ_i Σ_j P_ij log P̂_ij``,
      i.e. the mean over ranks of the CE between row ``i`` of ``P̂`` and the teacher's rank-i item.
      Requests are padded to the longest one (memory ``O(#requests · n_max²)``).

    Args:
        scores: ``(B,)`` student logits.
        teacher: ``(B,)`` ranker scores, NaN where the ranker did not score the row.
        request: ``(B,)`` integer request ids.
        temperature: ``T`` of the KL, or the sort relaxation's ``τ``.
        method: one of :data:`DISTILLATIONS`.

    Example:
        >>> r = torch.zeros(3, dtype=torch.long)
        >>> t = torch.tensor([1.0, 1.0, float("nan")])
        >>> float(distillation_loss(torch.tensor([0.0, 0.0, 9.0]), t, r))  # uniform vs uniform
        0.0
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    method = _check_distill(method)
    s, t, seg, num_seg = _teacher_rows(scores, teacher, request)
    if method == "kl":
        loss = _kl_distillation(s, t, seg, num_seg, temperature)
    else:
        loss = _sort_distillation(s, t, seg, num_seg, temperature, method)
    # rows without a teacher were dropped above: keep the loss attached to the full score vector
    return loss + _float(scores).sum() * 0.0


def cascade_loss(scores: torch.Tensor, click: torch.Tensor, request: torch.Tensor,
                 stage: torch.Tensor, teacher: torch.Tensor | None, *,
                 distill_weight: float = 1.0, fine_weight: float = 1.0, coarse_weight: float = 1.0,
                 distill_temperature: float = 1.0, distill: str = "kl",
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``distill_weight·L_distill + fine_weight·L_fine + coarse_weight·L_coarse``.

    A term whose weight is 0 is not computed and is absent from the returned dict (so an ablation
    needs no teacher column when ``distill_weight`` is 0).

    Args:
        scores: ``(B,)`` pre-ranker logits.
        click: ``(B,)`` click labels.
        request: ``(B,)`` integer request ids.
        stage: ``(B,)`` the deepest :class:`~recsys.losses.stages.Stage` reached.
        teacher: ``(B,)`` ranker scores (NaN where absent), or None when distillation is off.
        distill_weight: α, the weight of :func:`distillation_loss`.
        fine_weight: β, the weight of :func:`fine_grained_loss`.
        coarse_weight: γ, the weight of :func:`coarse_grained_loss`.
        distill_temperature: the distillation's temperature ``T`` (KL) or relaxation ``τ``.
        distill: the distillation method, one of :data:`DISTILLATIONS`.

    Returns:
        ``(total, terms)``: ``total`` keeps the graph; ``terms`` maps ``"distill"`` / ``"fine"`` /
        ``"coarse"`` to the detached, unweighted 0-dim loss of each computed term.

    Example:
        >>> s, st = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([4, 3, 0])
        >>> t, r = torch.tensor([2.0, 1.0, float("nan")]), torch.zeros(3, dtype=torch.long)
        >>> total, terms = cascade_loss(s, (st == 4).float(), r, st, t, fine_weight=0)
        >>> sorted(terms)
        ['coarse', 'distill']
    """
    distill = _check_distill(distill)
    total = _float(scores).sum() * 0.0
    terms: dict[str, torch.Tensor] = {}
    if distill_weight:
        if teacher is None:
            raise ValueError("distill_weight > 0 needs teacher scores (the ranker's, NaN where "
                             "absent); set distill_weight to 0 to train without them")
        loss = distillation_loss(scores, teacher, request, distill_temperature, distill)
        total = total + distill_weight * loss
        terms["distill"] = loss.detach()
    if fine_weight:
        loss = fine_grained_loss(scores, click, request, stage)
        total = total + fine_weight * loss
        terms["fine"] = loss.detach()
    if coarse_weight:
        loss = coarse_grained_loss(scores, stage, request)
        total = total + coarse_weight * loss
        terms["coarse"] = loss.detach()
    return total, terms
