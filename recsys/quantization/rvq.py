"""Residual vector quantisation (RVQ) of user embeddings into hierarchical codes (docs/methods.md section 5).

Shapes: ``B`` batch, ``L`` levels, ``K`` codes per level, ``D`` embedding dim.

Encoding is greedy: ``r_1 = x`` (L2-normalised when ``normalize``), ``c_l = argmin_k ||r_l − C_l[k]||²``,
``r_{l+1} = r_l − C_l[c_l]``; the reconstruction is ``Σ_l C_l[c_l]``. The codebooks are not trained by
gradient: :meth:`ResidualVQ.update` runs k-means on the first batches, then one EMA step per call
with re-seeding of dead codes. The code prefix ``(c_1..c_l)`` names a node of the code trie
(:func:`prefix_ids`); the hierarchical loss groups a batch by these ids.

Choices (all documented where they are made):

* One update = one EMA step of the whole encoder: every level's assignment and residual come from
  the codebooks *as they were before the call*, i.e. exactly what :meth:`ResidualVQ.quantize` gave
  before it; the statistics of all levels are then reduced and applied at once (one collective).
* Initialisation: the first ``kmeans_init_batches`` calls only collect (normalised) inputs into a
  bounded sample; the last of them fits the levels one after the other on that sample (level l on
  the residuals left by the already fitted levels < l), so that all levels start together.
* Counts after k-means: each code's cluster size scaled to one (global) batch,
  ``n_k · mean_batch_rows / sample_rows``, which is where the EMA of the per-batch counts would
  settle if batches looked like the sample; ``ema_sum = C · ema_count``.
* Laplace smoothing (VQ-VAE): ``N = Σ_k ema_count_k``, ``ñ_k = (ema_count_k + ε) / (N + K·ε) · N``,
  ``C_k = ema_sum_k / ñ_k`` with ``ε = 1e-5``; ``ema_count`` itself is stored unsmoothed.
* Dead codes: after the EMA step, codes with ``ema_count < dead_code_threshold`` are replaced by
  random rows of that level's input residuals of the current (global) batch, with
  ``ema_count = dead_code_threshold`` and ``ema_sum = row · dead_code_threshold``.

Several processes: when ``torch.distributed`` is initialised with world size > 1, every rank must
call :meth:`ResidualVQ.update` the same number of times (a rank with no rows passes a ``(0, D)``
tensor); batch sizes may differ. Per call: init calls all-gather the rows (sizes, then padded rows)
and broadcast rank 0's k-means result; EMA calls all-reduce (sum) the packed counts and sums; when
some code is dead (a decision every rank takes identically from its identical counts) the ranks
all-gather their batch sizes, draw the same global row indices from a generator seeded by
``(seed, num_updates)``, and all-reduce a zero-filled matrix into which only the owner of each row
wrote it. Every rank therefore holds bitwise identical codebooks after every update.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

LAPLACE_EPS = 1e-5


def num_nodes(levels: int, codes: int) -> int:
    """The number of nodes ``K + K² + … + K^L`` of the user-code trie: the range of the ids that
    :func:`prefix_ids` gives (and of the ``rvq_code`` column).

    Example:
        >>> num_nodes(3, 32)
        33824
    """
    total = sum(codes**level for level in range(1, levels + 1))
    if total >= 2**63:
        raise ValueError(f"K={codes}, L={levels}: {total} trie nodes do not fit in int64")
    return total


class RVQOutput(NamedTuple):
    """What :meth:`ResidualVQ.quantize` returns.

    ``codes`` ``(B, L)`` int64; ``residuals`` ``(B, L, D)``, the input residual of each level
    (``residuals[:, 0]`` is the normalised input); ``reconstruction`` ``(B, D)``, the sum of the chosen
    codewords (the final residual is ``residuals[:, 0] − reconstruction``).
    """

    codes: torch.Tensor
    residuals: torch.Tensor
    reconstruction: torch.Tensor


def prefix_ids(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``(B, L)`` codes -> ``(B, L)`` trie-node ids of the prefixes ``(c_1..c_l)``.

    Level ``l`` (1-based) gets ``offset_l + (c_1·K^{l−1} + … + c_l)`` with
    ``offset_l = K + K² + … + K^{l−1}`` (``offset_1 = 0``), so ids are ``0 .. num_nodes(L, K) − 1``,
    disjoint across levels, and two rows share the level-l id iff they share ``c_1..c_l``.

    Example:
        >>> prefix_ids(torch.tensor([[1, 2], [1, 0]]), 3)
        tensor([[1, 8],
                [1, 6]])
    """
    out = torch.empty_like(codes)
    value = torch.zeros_like(codes[:, 0])
    offset = 0
    width = 1
    for level in range(codes.shape[1]):
        value = value * num_codes + codes[:, level]
        out[:, level] = value + offset
        width = width * num_codes
        offset = offset + width
    return out


def code_perplexity(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``(B, L)`` codes -> ``(L,)`` perplexity ``exp(−Σ_k p_k log p_k)`` of each level's histogram.

    It is K when the batch uses every code equally, 1 when it uses a single code.

    Example:
        >>> code_perplexity(torch.tensor([[0, 1], [1, 1], [2, 1], [3, 1]]), 4)
        tensor([4., 1.])
    """
    hist = F.one_hot(codes, num_codes).sum(0).to(torch.float64)  # (L, K)
    p = hist / hist.sum(1, keepdim=True).clamp_min(1.0)
    # 0·log 0 = 0
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
    return entropy.exp().to(torch.float32)


def ema_step(count: torch.Tensor, total: torch.Tensor, n: torch.Tensor, s: torch.Tensor,
             decay: float, eps: float = LAPLACE_EPS
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One EMA codebook step; returns the new ``(count, total, codebook)``.

    ``count ← d·count + (1−d)·n``, ``total ← d·total + (1−d)·s``, then with ``N = Σ_k count_k``:
    ``ñ_k = (count_k + eps)/(N + K·eps)·N`` and ``codebook_k = total_k / ñ_k`` (VQ-VAE Laplace smoothing,
    which keeps an unused code finite).

    Args:
        count: ``(..., K)`` EMA cluster sizes.
        total: ``(..., K, D)`` EMA sums of the assigned vectors.
        n: ``(..., K)`` rows assigned to each code in this batch.
        s: ``(..., K, D)`` sum of the rows assigned to each code in this batch.
        decay: the EMA decay ``d``.
        eps: the Laplace smoothing constant.

    Example:
        >>> c, t, cb = ema_step(torch.ones(2), torch.ones(2, 3), torch.tensor([2., 0.]),
        ...                     torch.full((2, 3), 4.), decay=0.5)
        >>> c
        tensor([1.5000, 0.5000])
    """
    count = decay * count + (1.0 - decay) * n
    total = decay * total + (1.0 - decay) * s
    mass = count.sum(-1, keepdim=True)
    smoothed = (count + eps) / (mass + count.shape[-1] * eps) * mass
    # only an all-zero level (never after an initialisation) reaches the clamp
    codebook = total / smoothed.clamp_min(torch.finfo(smoothed.dtype).tiny).unsqueeze(-1)
    return count, total, codebook


def _nearest(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    # ||x||² is the same for every code, so the argmin needs only ||c||² − 2 x·c
    return torch.argmin((centres * centres).sum(1) - 2.0 * x @ centres.T, dim=1)


def _sq_dist_to(x: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    return (x - point).pow(2).sum(1)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeding then ``iters`` Lloyd steps; returns ``(centres (k, D), assignment (N,))``.

    The assignment is to the final centres. A cluster that empties keeps its previous centre. With
    fewer distinct rows than ``k`` the extra centres repeat rows (they end with no members, and the
    EMA update re-seeds them as dead codes). Random draws use ``generator`` (a CPU generator), so the
    result is deterministic for a given generator state on a given device.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> c, a = kmeans(torch.cat([torch.zeros(5, 2), torch.ones(5, 2)]), 2, 10, g)
        >>> sorted(c[:, 0].tolist())
        [0.0, 1.0]
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one row")
    first = int(torch.randint(n, (1,), generator=generator))
    picks = [first]
    d2 = _sq_dist_to(x, x[first])
    for _ in range(1, k):
        weights = d2.clamp_min(0).double().cpu()
        if float(weights.sum()) > 0:
            pick = int(torch.multinomial(weights, 1, generator=generator))
        else:  # every row is already a centre
            pick = int(torch.randint(n, (1,), generator=generator))
        picks.append(pick)
        d2 = torch.minimum(d2, _sq_dist_to(x, x[pick]))
    centres = x[torch.tensor(picks, device=x.device)].clone()
    for _ in range(iters):
        onehot = F.one_hot(_nearest(x, centres), k).to(x.dtype)  # (N, k)
        counts = onehot.sum(0)
        sums = onehot.T @ x
        centres = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1).unsqueeze(1),
                              centres)
    return centres, _nearest(x, centres)


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResidualVQ(nn.Module):
    """Greedy residual VQ with EMA codebooks, k-means initialisation and dead-code re-seeding.

    All state is in float32 buffers (``codebooks (L, K, D)``, ``ema_count (L, K)``,
    ``ema_sum (L, K, D)``, ``initialized (L,)`` bool, ``num_updates ()``, and the k-means sample
    ``init_sample (S, D)`` with ``init_sample_rows ()`` and ``init_rows_seen ()``), so it follows
    ``.to(device)`` and goes into ``state_dict``. Inputs of any float dtype are cast to float32.
    ``forward``/``encode``/``quantize``/``prefix_ids`` are TorchScript-able; ``update`` is not.

    Args:
        dim: D, the embedding dim.
        levels: L, the number of residual levels.
        codes: K, the codes per level.
        ema_decay: the EMA decay of the codebook statistics, in [0, 1).
        dead_code_threshold: codes whose EMA count falls below it are re-seeded.
        kmeans_init_batches: update calls whose rows are collected for the k-means initialisation
            (0 is taken as 1).
        normalize: L2-normalise the inputs first.
        kmeans_iters: Lloyd iterations of the initialisation.
        init_sample_size: S, rows kept for the k-means initialisation (spread evenly over the init
            batches). A state_dict with another S loads (the buffer takes the checkpoint's size).
        seed: seeds the k-means and re-seeding draws (with the update count, so a resumed run draws
            what the uninterrupted one would).
        distributed: synchronise across the default process group when it has > 1 rank; False
            keeps this instance process-local (e.g. offline fitting).

    Example:
        >>> rvq = ResidualVQ(8, levels=2, codes=4, kmeans_init_batches=1)
        >>> out = rvq.update(torch.randn(64, 8))      # k-means initialisation
        >>> rvq.is_initialized, rvq.encode(torch.randn(5, 8)).shape
        (True, torch.Size([5, 2]))
        >>> rvq.prefix_ids(rvq.encode(torch.randn(5, 8))).max() < rvq.num_nodes
        tensor(True)
    """

    def __init__(self, dim: int, *, levels: int = 3, codes: int = 32, ema_decay: float = 0.99,
                 dead_code_threshold: float = 1.0, kmeans_init_batches: int = 4,
                 normalize: bool = True, kmeans_iters: int = 15, init_sample_size: int = 8192,
                 seed: int = 0, distributed: bool = True) -> None:
        super().__init__()
        if levels < 1 or codes < 1 or dim < 1:
            raise ValueError(f"RVQ needs levels, codes and dim >= 1, got L={levels}, "
                             f"K={codes}, D={dim}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"RVQ ema_decay must be in [0, 1), got {ema_decay}")
        if kmeans_init_batches < 0:
            raise ValueError(f"RVQ kmeans_init_batches must be >= 0, got {kmeans_init_batches}")
        if init_sample_size < 1:
            raise ValueError(f"init_sample_size must be >= 1, got {init_sample_size}")
        self.levels = levels
        self.num_codes = codes
        self.dim = dim
        self.normalize = normalize
        self.decay = float(ema_decay)
        self.dead_code_threshold = float(dead_code_threshold)
        self.kmeans_init_batches = max(1, kmeans_init_batches)
        self.kmeans_iters = kmeans_iters
        self.seed = seed
        self.distributed = distributed
        self.num_nodes = num_nodes(levels, codes)
        L, K = levels, codes
        self.register_buffer("codebooks", torch.zeros(L, K, dim))
        self.register_buffer("ema_count", torch.zeros(L, K))
        self.register_buffer("ema_sum", torch.zeros(L, K, dim))
        self.register_buffer("initialized", torch.zeros(L, dtype=torch.bool))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("init_sample", torch.zeros(init_sample_size, dim))
        self.register_buffer("init_sample_rows", torch.zeros((), dtype=torch.int64))
        self.register_buffer("init_rows_seen", torch.zeros((), dtype=torch.int64))

    # ---- encoding (TorchScript-able) -------------------------------------------------------------

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"RVQ expects (B, {self.dim}) inputs, got {list(x.shape)}")
        # codes are grouping labels only: no gradient flows into the model through them
        x = x.detach().to(self.codebooks.dtype)
        if self.normalize:
            x = F.normalize(x, dim=1)
        return x

    def _quantize_prepared(self, x: torch.Tensor) -> RVQOutput:
        r = x
        recon = torch.zeros_like(x)
        codes: list[torch.Tensor] = []
        residuals: list[torch.Tensor] = []
        for level in range(self.levels):
            book = self.codebooks[level]
            residuals.append(r)
            idx = _nearest(r, book)
            q = book.index_select(0, idx)
            recon = recon + q
            r = r - q
            codes.append(idx)
        return RVQOutput(torch.stack(codes, 1), torch.stack(residuals, 1), recon)

    @torch.jit.unused
    def _quantize_full_precision(self, x: torch.Tensor) -> RVQOutput:
        # under autocast the distance matmul would run in bf16/fp16 and flip near-tie argmins
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._quantize_prepared(self._prepare(x))

    @torch.jit.export
    def quantize(self, x: torch.Tensor) -> RVQOutput:
        """``(B, D)`` -> :class:`RVQOutput` (codes, per-level input residuals, reconstruction)."""
        if torch.jit.is_scripting():
            return self._quantize_prepared(self._prepare(x))
        return self._quantize_full_precision(x)

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` -> ``(B, L)`` int64 codes (greedy residual argmin)."""
        return self.quantize(x).codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The codes of :meth:`encode`."""
        return self.encode(x)

    @torch.jit.export
    def prefix_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` codes -> ``(B, L)`` trie-node ids in ``[0, num_nodes)`` (:func:`prefix_ids`)."""
        return prefix_ids(codes, self.num_codes)

    # ---- training-time update ----------------------------------------------------------------------

    @property
    def is_initialized(self) -> bool:
        """True once the k-means initialisation has run (all levels start together)."""
        return bool(self.initialized.all())

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> RVQOutput:
        """One training step of the codebooks on ``x`` ``(B, D)``; returns the assignment it used.

        Before initialisation the call collects ``x`` (and the last init call runs k-means); the
        returned output then comes from the codebooks after the call (all-zero codes on the
        collecting calls: check :attr:`is_initialized` before using them). Afterwards it returns
        :meth:`quantize` of ``x`` with the codebooks as they were *before* the EMA step. Every rank
        must call it the same number of times (see the module docstring).
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._update(self._prepare(x))

    def _update(self, x: torch.Tensor) -> RVQOutput:
        self.num_updates += 1
        if not self.is_initialized:
            self._collect(x)
            if (int(self.num_updates) >= self.kmeans_init_batches
                    and int(self.init_sample_rows) > 0):
                n = int(self.init_sample_rows)
                mean_rows = float(self.init_rows_seen) / float(self.num_updates)
                self._kmeans_init(self.init_sample[:n], mean_rows)
            return self._quantize_prepared(x)
        out = self._quantize_prepared(x)
        self._ema_update(out)
        return out

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # the k-means sample is only a collection buffer: take the checkpoint's size, whatever
        # init_sample_size this instance was built with
        sample = state_dict.get(prefix + "init_sample")
        if (isinstance(sample, torch.Tensor) and sample.dim() == 2
                and sample.shape[1] == self.dim and sample.shape != self.init_sample.shape):
            self.init_sample = torch.zeros_like(sample, dtype=self.init_sample.dtype,
                                                device=self.init_sample.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _sync(self) -> bool:
        return self.distributed and _world()[1] > 1

    def _generator(self, tag: int) -> torch.Generator:
        # the same on every rank (num_updates is), and the same after a resume from a checkpoint
        seed = (self.seed * 1_000_003 + int(self.num_updates) * 1_009 + tag) % (2**63)
        return torch.Generator().manual_seed(seed)

    def _batch_sizes(self, rows: int, device: torch.device) -> list[int]:
        if not self._sync():
            return [rows]
        size = torch.tensor([rows], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(_world()[1])]
        dist.all_gather(sizes, size)
        return [int(s) for s in sizes]

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows in rank order (identical on every rank); ``x`` itself without sync."""
        if not self._sync():
            return x
        sizes = self._batch_sizes(x.shape[0], x.device)
        longest = max(sizes)
        if longest == 0:
            return x
        # all_gather needs equal shapes: pad to the longest batch, then cut each part back
        padded = torch.zeros(longest, x.shape[1], dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    def _collect(self, x: torch.Tensor) -> None:
        rows = self._gather_rows(x)
        self.init_rows_seen += rows.shape[0]
        start = int(self.init_sample_rows)
        room = self.init_sample.shape[0] - start
        # share the room left evenly over the init calls left, so that every init batch is sampled
        calls_left = max(1, self.kmeans_init_batches - int(self.num_updates) + 1)
        take = min(rows.shape[0], room, math.ceil(room / calls_left))
        if take <= 0:
            return
        idx = torch.arange(take, device=rows.device) * rows.shape[0] // take  # evenly strided
        self.init_sample[start: start + take] = rows[idx]
        self.init_sample_rows += take

    def _kmeans_init(self, sample: torch.Tensor, mean_batch_rows: float) -> None:
        """Fit the levels in order on ``sample`` (level l on the residuals of levels < l)."""
        r = sample.to(self.codebooks.dtype)
        for level in range(self.levels):
            centres, assign = kmeans(r, self.num_codes, self.kmeans_iters, self._generator(level))
            # per-batch scale: where the EMA of the batch counts settles if batches resemble the sample
            counts = torch.bincount(assign, minlength=self.num_codes).to(r.dtype)
            counts = counts * (mean_batch_rows / r.shape[0])
            self.codebooks[level] = centres
            self.ema_count[level] = counts
            self.ema_sum[level] = centres * counts.unsqueeze(1)
            r = r - centres[assign]
        if self._sync():
            # every rank ran k-means on the same sample; rank 0's result makes them bitwise equal
            for buf in (self.codebooks, self.ema_count, self.ema_sum):
                dist.broadcast(buf, src=0)
        self.initialized.fill_(True)

    def _ema_update(self, out: RVQOutput) -> None:
        onehot = F.one_hot(out.codes, self.num_codes).to(self.codebooks.dtype)  # (B, L, K)
        n = onehot.sum(0)  # (L, K)
        s = torch.einsum("blk,bld->lkd", onehot, out.residuals)  # (L, K, D)
        if self._sync():
            # one collective for all levels: counts ride along as an extra column of the sums
            stats = torch.cat([s, n.unsqueeze(-1)], dim=-1)
            dist.all_reduce(stats)
            s, n = stats[..., :-1], stats[..., -1]
        count, total, books = ema_step(self.ema_count, self.ema_sum, n, s, self.decay)
        self.ema_count.copy_(count)
        self.ema_sum.copy_(total)
        self.codebooks.copy_(books)
        self._reseed_dead(out.residuals)

    def _reseed_dead(self, residuals: torch.Tensor) -> None:
        """Replace codes with ``ema_count < threshold`` by random rows of their level's residuals."""
        dead = self.ema_count < self.dead_code_threshold  # identical on every rank
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        levels, codes = dead.nonzero(as_tuple=True)
        sizes = self._batch_sizes(residuals.shape[0], residuals.device)
        total = sum(sizes)
        if total == 0:  # no rows anywhere: nothing to re-seed from
            return
        gen = self._generator(self.levels + 1)
        levels_cpu = levels.cpu()
        rows = torch.empty(num_dead, dtype=torch.int64)
        for level in levels_cpu.unique().tolist():
            at = (levels_cpu == level).nonzero().squeeze(1)
            # distinct rows within a level where the batch has enough of them
            if total >= at.numel():
                rows[at] = torch.randperm(total, generator=gen)[: at.numel()]
            else:
                rows[at] = torch.randint(total, (at.numel(),), generator=gen)
        rank = _world()[0] if self._sync() else 0
        offset = sum(sizes[:rank])
        mine = ((rows >= offset) & (rows < offset + residuals.shape[0])).nonzero().squeeze(1)
        picked = torch.zeros(num_dead, self.dim, dtype=residuals.dtype, device=residuals.device)
        mine_dev = mine.to(residuals.device)
        picked[mine_dev] = residuals[(rows[mine] - offset).to(residuals.device), levels[mine_dev]]
        if self._sync():
            # each row is written by its owner only, so the sum is that row, exactly, everywhere
            dist.all_reduce(picked)
        self.codebooks[levels, codes] = picked
        self.ema_count[levels, codes] = self.dead_code_threshold
        self.ema_sum[levels, codes] = picked * self.dead_code_threshold

    # ---- diagnostics -----------------------------------------------------------------------------

    def dead_codes(self) -> torch.Tensor:
        """``(L,)`` number of codes whose EMA count is below the dead-code threshold."""
        return (self.ema_count < self.dead_code_threshold).sum(1)

    @torch.no_grad()
    def diagnostics(self, x: torch.Tensor) -> dict[str, float]:
        """Code usage and reconstruction quality on a (local) batch; no collectives.

        Keys, for each level ``l = 1..L``: ``perplexity_l{l}`` (:func:`code_perplexity`),
        ``used_codes_l{l}`` (distinct codes in the batch), ``dead_codes_l{l}`` (:meth:`dead_codes`),
        ``recon_error_l{l}`` (mean ||residual after l levels||² / mean ||x||²); and ``recon_error``,
        the same after all L levels.
        """
        out = self.quantize(x)
        x0 = out.residuals[:, 0]
        scale = x0.pow(2).sum(1).mean().clamp_min(torch.finfo(x0.dtype).tiny)
        after = torch.cat([out.residuals[:, 1:], (x0 - out.reconstruction).unsqueeze(1)], dim=1)
        errors = (after.pow(2).sum(2).mean(0) / scale).tolist()
        ppl = code_perplexity(out.codes, self.num_codes).tolist()
        dead = self.dead_codes().tolist()
        result: dict[str, float] = {}
        for level in range(self.levels):
            tag = f"l{level + 1}"
            result[f"perplexity_{tag}"] = float(ppl[level])
            result[f"used_codes_{tag}"] = float(out.codes[:, level].unique().numel())
            result[f"dead_codes_{tag}"] = float(dead[level])
            result[f"recon_error_{tag}"] = float(errors[level])
        result["recon_error"] = float(errors[-1])
        return result


def fit_offline(x: torch.Tensor, iters: int, batch_size: int, seed: int = 0, *, levels: int = 3,
                codes: int = 32, ema_decay: float = 0.99, dead_code_threshold: float = 1.0,
                normalize: bool = True, sample_size: int = 65536,
                kmeans_iters: int = 15) -> ResidualVQ:
    """Fit an RVQ to a frozen embedding table: k-means on (a sample of) ``x``, then EMA epochs.

    Deterministic given ``seed`` (on a given device). Process-local even under torch.distributed.

    Args:
        x: ``(N, D)`` embeddings (any float dtype, any device; the RVQ ends up on that device).
        iters: EMA epochs over ``x`` after the k-means (0 = k-means only).
        batch_size: rows per EMA step; also the batch scale of the initial EMA counts.
        seed: seeds the sample, the epoch shuffles, the k-means and the dead-code draws.
        levels, codes, ema_decay, dead_code_threshold, normalize: as :class:`ResidualVQ`
            (there is no ``kmeans_init_batches``: the k-means runs on ``x`` directly).
        sample_size: at most this many random rows of ``x`` go into the k-means.
        kmeans_iters: Lloyd iterations per level.

    Example:
        >>> rvq = fit_offline(torch.randn(500, 8), iters=2, batch_size=100, seed=0, levels=2,
        ...                   codes=4)
        >>> rvq.encode(torch.randn(3, 8)).shape
        torch.Size([3, 2])
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"fit_offline expects a non-empty (N, D) table, got {list(x.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    rvq = ResidualVQ(x.shape[1], levels=levels, codes=codes, ema_decay=ema_decay,
                     dead_code_threshold=dead_code_threshold, normalize=normalize,
                     kmeans_iters=kmeans_iters, init_sample_size=1, seed=seed,
                     distributed=False).to(x.device)
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randperm(n, generator=gen)[:sample_size].to(x.device)
    rvq._kmeans_init(rvq._prepare(x[sample]), float(min(batch_size, n)))
    for _ in range(iters):
        order = torch.randperm(n, generator=gen).to(x.device)
        for start in range(0, n, batch_size):
            rvq.update(x[order[start: start + batch_size]])
    return rvq
