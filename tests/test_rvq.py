"""Residual VQ (recsys/quantization/rvq.py): greedy encoding, EMA step with Laplace smoothing,
k-means initialisation, dead-code re-seeding, trie prefix ids, offline fitting, and 2 ranks."""

from __future__ import annotations

import io
import itertools
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recsys.quantization import (
    LAPLACE_EPS,
    ResidualVQ,
    code_perplexity,
    ema_step,
    fit_offline,
    kmeans,
    num_nodes,
    prefix_ids,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_codebooks(spec: dict[str, Any], books: torch.Tensor,
                    count: torch.Tensor | None = None, **kwargs: Any) -> ResidualVQ:
    """An RVQ already 'initialised' with the given codebooks (and counts, default 1)."""
    rvq = ResidualVQ(books.shape[-1], **spec, **kwargs)
    rvq.codebooks.copy_(books)
    rvq.ema_count.copy_(torch.ones(books.shape[:2]) if count is None else count)
    rvq.ema_sum.copy_(books * rvq.ema_count.unsqueeze(-1))
    rvq.initialized.fill_(True)
    return rvq


def _clusters(centres: torch.Tensor, rows: int, gen: torch.Generator, noise: float = 0.05,
              labels_from: int | None = None) -> torch.Tensor:
    k = centres.shape[0] if labels_from is None else labels_from
    labels = torch.randint(k, (rows,), generator=gen)
    return centres[labels] + noise * torch.randn(rows, centres.shape[1], generator=gen)


# ---- encoding ------------------------------------------------------------------------------------

def test_each_level_takes_the_nearest_codeword_of_its_residual() -> None:
    spec = dict(levels=3, codes=5, normalize=False)
    g = _gen(0)
    rvq = _with_codebooks(spec, torch.randn(3, 5, 4, generator=g))
    x = torch.randn(64, 4, generator=g)
    out = rvq.quantize(x)
    assert out.codes.dtype == torch.int64 and out.codes.shape == (64, 3)
    books = rvq.codebooks.double().numpy()
    r = x.double().numpy()
    recon = np.zeros_like(r)
    for level in range(3):
        np.testing.assert_allclose(out.residuals[:, level].numpy(), r, atol=1e-5)
        dist2 = np.array([[((row - c) ** 2).sum() for c in books[level]] for row in r])
        chosen = dist2.argmin(1)
        np.testing.assert_array_equal(out.codes[:, level].numpy(), chosen)
        r = r - books[level][chosen]
        recon = recon + books[level][chosen]
    np.testing.assert_allclose(out.reconstruction.numpy(), recon, atol=1e-5)
    assert torch.equal(rvq.encode(x), out.codes) and torch.equal(rvq(x), out.codes)


def test_normalize_flag_and_input_dtypes() -> None:
    g = _gen(1)
    books = torch.randn(2, 4, 6, generator=g)
    x = torch.randn(32, 6, generator=g) * 5

    on = _with_codebooks(dict(levels=2, codes=4, normalize=True), books)
    out = on.quantize(x)
    torch.testing.assert_close(out.residuals[:, 0].norm(dim=1), torch.ones(32))
    assert torch.equal(on.encode(3.7 * x), out.codes)  # scale-free once normalised
    assert on.encode(x.double()).dtype == torch.int64
    assert on.quantize(x.bfloat16()).residuals.dtype == torch.float32

    off = _with_codebooks(dict(levels=2, codes=4, normalize=False), books)
    assert torch.equal(off.quantize(x).residuals[:, 0], x)
    with pytest.raises(ValueError, match=r"expects \(B, 6\)"):
        off.encode(torch.randn(3, 5))


def test_encode_and_prefix_ids_are_scriptable() -> None:
    rvq = _with_codebooks(dict(levels=2, codes=4), torch.randn(2, 4, 8, generator=_gen(2)))
    scripted = torch.jit.script(rvq)
    x = torch.randn(10, 8, generator=_gen(3))
    assert torch.equal(scripted.encode(x), rvq.encode(x))
    assert torch.equal(scripted(x), rvq(x))
    assert torch.equal(scripted.prefix_ids(rvq.encode(x)), rvq.prefix_ids(rvq.encode(x)))


# ---- prefix ids ----------------------------------------------------------------------------------

def test_prefix_ids_nest_and_are_unique_across_levels() -> None:
    k, levels = 3, 3
    codes = torch.tensor(list(itertools.product(range(k), repeat=levels)))  # every leaf of the trie
    ids = prefix_ids(codes, k)
    assert num_nodes(levels, k) == 3 + 9 + 27
    # every node appears, nothing else: ids are exactly 0 .. num_nodes − 1
    assert set(ids.flatten().tolist()) == set(range(num_nodes(levels, k)))
    # level l lives in [K + … + K^{l−1}, K + … + K^l): disjoint across levels
    for level, (lo, hi) in enumerate([(0, 3), (3, 12), (12, 39)]):
        assert lo <= int(ids[:, level].min()) and int(ids[:, level].max()) < hi
    for i, j in itertools.combinations(range(len(codes)), 2):
        for level in range(levels):
            same_prefix = torch.equal(codes[i, : level + 1], codes[j, : level + 1])
            assert bool(ids[i, level] == ids[j, level]) == same_prefix
            if ids[i, level] == ids[j, level]:  # nesting
                assert torch.equal(ids[i, :level], ids[j, :level])
    rvq = ResidualVQ(2, levels=levels, codes=k)
    assert torch.equal(rvq.prefix_ids(codes), ids) and rvq.num_nodes == 39
    assert num_nodes(3, 32) == 32 + 32**2 + 32**3
    with pytest.raises(ValueError, match="int64"):
        num_nodes(13, 32)


# ---- EMA step ------------------------------------------------------------------------------------

def test_update_uses_the_pre_update_assignment_and_follows_the_ema_formula() -> None:
    spec = dict(levels=2, codes=3, ema_decay=0.9, dead_code_threshold=0.0, normalize=False)
    g = _gen(4)
    count0 = torch.rand(2, 3, generator=g) * 5 + 0.5
    rvq = _with_codebooks(spec, torch.randn(2, 3, 4, generator=g), count0)
    rvq.ema_sum.add_(torch.randn(2, 3, 4, generator=g))  # sums that are not C·count
    sum0 = rvq.ema_sum.double().numpy().copy()
    x = torch.randn(40, 4, generator=g)
    before = rvq.quantize(x)
    out = rvq.update(x)
    assert torch.equal(out.codes, before.codes)
    torch.testing.assert_close(out.residuals, before.residuals)

    d, k = 0.9, 3
    for level in range(2):
        codes = before.codes[:, level].numpy()
        r = before.residuals[:, level].double().numpy()
        onehot = np.eye(k)[codes]
        n, s = onehot.sum(0), onehot.T @ r
        count = d * count0[level].double().numpy() + (1 - d) * n
        total = d * sum0[level] + (1 - d) * s
        mass = count.sum()
        smoothed = (count + LAPLACE_EPS) / (mass + k * LAPLACE_EPS) * mass
        np.testing.assert_allclose(rvq.ema_count[level].numpy(), count, rtol=1e-6)
        np.testing.assert_allclose(rvq.ema_sum[level].numpy(), total, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rvq.codebooks[level].numpy(), total / smoothed[:, None],
                                   rtol=1e-5, atol=1e-6)
    # the pure function is the same step
    c, t, b = ema_step(torch.ones(3), torch.ones(3, 2), torch.tensor([2.0, 0.0, 1.0]),
                       torch.ones(3, 2), decay=0.5)
    torch.testing.assert_close(c, torch.tensor([1.5, 0.5, 1.0]))
    torch.testing.assert_close(b, t / ((c + LAPLACE_EPS) / (3 + 3 * LAPLACE_EPS) * 3).unsqueeze(1))


def test_empty_batch_update_only_decays() -> None:
    rvq = _with_codebooks(dict(levels=2, codes=3, ema_decay=0.5, dead_code_threshold=0.0),
                          torch.randn(2, 3, 4, generator=_gen(5)))
    out = rvq.update(torch.zeros(0, 4))
    assert out.codes.shape == (0, 2)
    torch.testing.assert_close(rvq.ema_count, torch.full((2, 3), 0.5))


# ---- k-means initialisation ----------------------------------------------------------------------

def test_kmeans_init_recovers_well_separated_centres() -> None:
    k, dim = 8, 16
    g = _gen(6)
    centres = torch.randn(k, dim, generator=g) * 5
    spec = dict(levels=2, codes=k, kmeans_init_batches=3, normalize=False)
    rvq = ResidualVQ(dim, **spec)
    for step in range(3):
        out = rvq.update(_clusters(centres, 200, g))
        if step < 2:  # collecting: nothing initialised, codes are placeholders
            assert not rvq.is_initialized and not out.codes.any()
    assert rvq.is_initialized and bool(rvq.initialized.all())
    assert int(rvq.init_sample_rows) == 600 and int(rvq.init_rows_seen) == 600

    gap = torch.cdist(centres, rvq.codebooks[0])  # (centre, codeword)
    match = gap.argmin(1)
    assert sorted(match.tolist()) == list(range(k))  # a permutation
    assert float(gap.min(1).values.max()) < 0.05
    # counts: cluster sizes scaled to one batch (200 of the 600 sample rows)
    torch.testing.assert_close(rvq.ema_count.sum(1), torch.full((2,), 200.0))
    torch.testing.assert_close(rvq.ema_sum, rvq.codebooks * rvq.ema_count.unsqueeze(-1))
    ppl = code_perplexity(rvq.encode(_clusters(centres, 4000, g)), k)
    assert float(ppl[0]) > 0.98 * k
    assert rvq.diagnostics(_clusters(centres, 500, g))["perplexity_l1"] > 0.95 * k


def test_init_sample_is_bounded_and_spread_over_the_init_batches() -> None:
    rvq = ResidualVQ(1, levels=1, codes=2, kmeans_init_batches=3, normalize=False,
                     init_sample_size=60)
    batches = [torch.arange(200, dtype=torch.float32).unsqueeze(1) + 1000 * b for b in range(3)]
    for b in batches:
        rvq.update(b)
    assert int(rvq.init_sample_rows) == 60 and int(rvq.init_rows_seen) == 600
    for b in range(3):  # 20 evenly strided rows of each batch
        torch.testing.assert_close(rvq.init_sample[20 * b: 20 * (b + 1)], batches[b][::10])


def test_kmeans_with_fewer_distinct_rows_than_codes() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    centres, assign = kmeans(x, 4, 5, _gen(0))
    assert centres.shape == (4, 2) and torch.isfinite(centres).all()
    assert torch.equal(centres[assign], x)


# ---- dead codes ----------------------------------------------------------------------------------

def test_unused_code_expires_and_is_reseeded_from_batch_residuals() -> None:
    spec = dict(levels=2, codes=4, ema_decay=0.5, dead_code_threshold=1.0, normalize=False)
    g = _gen(7)
    level0 = torch.cat([torch.randn(3, 6, generator=g) * 3, torch.full((1, 6), 100.0)])
    books = torch.stack([level0, 0.1 * torch.randn(4, 6, generator=g)])
    count = torch.tensor([[4.0] * 4, [100.0] * 4])
    rvq = _with_codebooks(spec, books, count)
    for step in range(3):
        x = _clusters(level0[:3], 50, g)  # code 3 of level 0 is never the nearest
        before = rvq.quantize(x)
        assert not (before.codes[:, 0] == 3).any()
        rvq.update(x)
        if step < 2:  # 4 -> 2 -> 1: not below the threshold yet
            assert float(rvq.ema_count[0, 3]) == 4.0 * 0.5 ** (step + 1)
            assert float(rvq.codebooks[0, 3].min()) > 99.0
    # 1 -> 0.5 < 1: re-seeded with a level-0 residual row of the last batch
    new = rvq.codebooks[0, 3]
    assert (before.residuals[:, 0] == new).all(1).any()
    assert float(rvq.ema_count[0, 3]) == 1.0
    assert torch.equal(rvq.ema_sum[0, 3], new)
    assert rvq.dead_codes().tolist() == [0, 0]


# ---- state and offline fitting -------------------------------------------------------------------

def test_state_dict_round_trip_encodes_and_continues_identically() -> None:
    spec = dict(levels=2, codes=4, kmeans_init_batches=2, ema_decay=0.5, dead_code_threshold=3.0)
    g = _gen(8)
    rvq = ResidualVQ(8, **spec, init_sample_size=256)
    for _ in range(5):
        rvq.update(torch.randn(40, 8, generator=g))
    expected = {"codebooks", "ema_count", "ema_sum", "initialized", "num_updates", "init_sample",
                "init_sample_rows", "init_rows_seen"}
    assert set(rvq.state_dict()) == expected
    assert all(rvq.state_dict()[k].dtype == torch.float32
               for k in ("codebooks", "ema_count", "ema_sum", "init_sample"))
    buf = io.BytesIO()
    torch.save(rvq.state_dict(), buf)
    buf.seek(0)
    fresh = ResidualVQ(8, **spec, init_sample_size=256)
    fresh.load_state_dict(torch.load(buf))
    assert fresh.is_initialized
    x = torch.randn(30, 8, generator=g)
    assert torch.equal(fresh.encode(x), rvq.encode(x))
    for _ in range(3):  # including dead-code draws, seeded by the update count
        batch = torch.randn(25, 8, generator=g)
        rvq.update(batch)
        fresh.update(batch)
    for name, value in rvq.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    # the k-means sample size is a collection knob: another size still loads
    other = ResidualVQ(8, **spec)
    other.load_state_dict(rvq.state_dict())
    assert other.init_sample.shape == (256, 8) and torch.equal(other.encode(x), rvq.encode(x))


def test_update_ignores_autocast() -> None:
    rvq = _with_codebooks(dict(levels=2, codes=4, dead_code_threshold=0.0),
                          torch.randn(2, 4, 8, generator=_gen(11)))
    twin = _with_codebooks(dict(levels=2, codes=4, dead_code_threshold=0.0),
                           rvq.codebooks.clone())
    x = torch.randn(64, 8, generator=_gen(12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = rvq.encode(x)
        rvq.update(x)
    assert torch.equal(codes, twin.encode(x))
    twin.update(x)
    assert rvq.codebooks.dtype == torch.float32 and torch.equal(rvq.codebooks, twin.codebooks)


def test_fit_offline_is_deterministic_and_levels_reduce_the_error() -> None:
    g = _gen(9)
    coarse = torch.randn(8, 8, generator=g) * 4
    x = _clusters(coarse, 1000, g, noise=1.0)
    spec = dict(levels=3, codes=8, normalize=False)
    a = fit_offline(x, iters=2, batch_size=200, seed=3, **spec)
    b = fit_offline(x, iters=2, batch_size=200, seed=3, **spec)
    c = fit_offline(x, iters=2, batch_size=200, seed=4, **spec)
    assert torch.equal(a.codebooks, b.codebooks) and torch.equal(a.ema_count, b.ema_count)
    assert not torch.equal(a.codebooks, c.codebooks)
    assert a.is_initialized and int(a.num_updates) == 2 * 5
    diag = a.diagnostics(x)
    errors = [diag[f"recon_error_l{level}"] for level in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2] == diag["recon_error"]
    assert errors[0] < 0.2
    assert all(diag[f"dead_codes_l{level}"] == 0 for level in (1, 2, 3))
    assert diag["perplexity_l1"] > 7.0 and diag["used_codes_l1"] == 8


# ---- two ranks -----------------------------------------------------------------------------------

DIST_SPEC: dict[str, Any] = dict(levels=2, codes=4, ema_decay=0.5, dead_code_threshold=2.0,
                                  kmeans_init_batches=2, normalize=True)
DIST_SIZES = ([30, 17, 25, 40, 22, 31, 28, 19], [50, 44, 9, 0, 36, 41, 27, 33])
DIST_CENTRES = torch.randn(4, 8, generator=_gen(10)) * 3


def _dist_batches(rank: int) -> list[torch.Tensor]:
    g = _gen(100 + rank)
    # all four clusters while the k-means samples, then only two: codes of the others expire
    return [_clusters(DIST_CENTRES, n, g, noise=0.3, labels_from=4 if t < 2 else 2)
            for t, n in enumerate(DIST_SIZES[rank])]


def _count_reseeds(rvq: ResidualVQ, log: list[int]) -> None:
    inner = rvq._reseed_dead

    def wrapped(residuals: torch.Tensor) -> None:
        log.append(int(rvq.dead_codes().sum()))
        inner(residuals)

    rvq._reseed_dead = wrapped  # type: ignore[method-assign]


def _rank_main(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on a small CPU box: no thread oversubscription
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        rvq = ResidualVQ(8, **DIST_SPEC, init_sample_size=64)
        reseeds: list[int] = []
        _count_reseeds(rvq, reseeds)
        codes = [rvq.update(batch).codes for batch in _dist_batches(rank)]
        torch.save({"state": rvq.state_dict(), "reseeds": reseeds, "codes": codes},
                   Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_ranks_hold_identical_codebooks_equal_to_one_process_on_the_union(
        tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, value in got[0]["state"].items():
        assert torch.equal(value, got[1]["state"][name]), name  # bitwise, every buffer
    assert got[0]["state"]["initialized"].all()
    assert got[0]["reseeds"] == got[1]["reseeds"] and sum(got[0]["reseeds"]) > 0

    # one process fed the concatenated batches: same sample, same k-means, same re-seed rows;
    # the EMA sums differ only by the order of float additions
    ref = ResidualVQ(8, **DIST_SPEC, init_sample_size=64)
    reseeds: list[int] = []
    _count_reseeds(ref, reseeds)
    both = zip(_dist_batches(0), _dist_batches(1), strict=True)
    codes = [ref.update(torch.cat([a, b])).codes for a, b in both]
    assert reseeds == got[0]["reseeds"]
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(got[0]["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for t, c in enumerate(codes):
        assert torch.equal(torch.cat([got[0]["codes"][t], got[1]["codes"][t]]), c)
