"""Group-wise listwise losses against naive per-group loops, hand arithmetic, and a 2-rank gather."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from recsys.losses.hierarchical import gather_for_groups, hierarchical_listwise_loss
from recsys.losses.listwise import in_batch_listwise_loss, segment_listwise_loss

# ---- oracles -------------------------------------------------------------------------------------


def naive_numpy(logits: np.ndarray, labels: np.ndarray, groups: np.ndarray, tau: float
                ) -> tuple[float, int, float, float]:
    """Straight from the equation, float64, one group at a time: (loss, groups, mean size, covered)."""
    losses, sizes = [], []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        s, y = logits[idx].astype(np.float64) / tau, labels[idx].astype(np.float64)
        if len(idx) < 2 or y.sum() == 0:
            continue
        log_p = s - (s.max() + np.log(np.exp(s - s.max()).sum()))
        losses.append(-(y / y.sum() * log_p).sum())
        sizes.append(len(idx))
    if not losses:
        return 0.0, 0, 0.0, 0.0
    return float(np.mean(losses)), len(losses), float(np.mean(sizes)), sum(sizes) / len(groups)


def naive_torch(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, tau: float
                ) -> torch.Tensor:
    """The same loop in torch, for an autograd gradient oracle."""
    losses = []
    for g in groups.unique().tolist():
        idx = (groups == g).nonzero().squeeze(1)
        y = labels[idx]
        if len(idx) < 2 or float(y.sum()) == 0:
            continue
        losses.append(-(y / y.sum() * torch.log_softmax(logits[idx] / tau, 0)).sum())
    return torch.stack(losses).mean() if losses else logits.sum() * 0


def random_batch(seed: int, b: int = 80, graded: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits/labels and arbitrary (huge, negative, unsorted) group ids with singletons and
    an all-negative group."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, generator=g, dtype=torch.float64) * 3
    if graded:
        labels = torch.randint(0, 4, (b,), generator=g).double() * (torch.rand(b, generator=g) < 0.4)
    else:
        labels = (torch.rand(b, generator=g) < 0.3).double()
    ids = torch.tensor([-7, 0, 3, 10**12, 42, 99, -(10**9), 5, 6, 1234567])
    groups = ids[torch.randint(0, len(ids), (b,), generator=g)]
    groups[:3] = torch.tensor([777, 888, 999])  # singletons (ids not used elsewhere)
    groups[3:7] = 31337
    labels[3:7] = 0  # an all-negative group of size 4
    return logits, labels, groups


# ---- segment loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("graded", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_segment_loss_matches_naive_loop(tau: float, graded: bool, seed: int) -> None:
    logits, labels, groups = random_batch(seed, graded=graded)
    got = segment_listwise_loss(logits, labels, groups, temperature=tau)
    loss, n, size, covered = naive_numpy(logits.numpy(), labels.numpy(), groups.numpy(), tau)
    assert n > 0 and covered < 1  # the case is not degenerate
    assert float(got.loss) == pytest.approx(loss, rel=1e-12)
    assert int(got.num_groups) == n
    assert float(got.mean_group_size) == pytest.approx(size, rel=1e-12)
    assert float(got.covered) == pytest.approx(covered, rel=1e-12)
    # diagnostics are detached 0-dim tensors
    for t in (got.num_groups, got.mean_group_size, got.covered):
        assert t.dim() == 0 and not t.requires_grad


@pytest.mark.parametrize("tau", [0.5, 1.7])
@pytest.mark.parametrize("graded", [False, True])
def test_segment_gradient_matches_naive_autograd(tau: float, graded: bool) -> None:
    logits, labels, groups = random_batch(3, graded=graded)
    a = logits.clone().requires_grad_()
    segment_listwise_loss(a, labels, groups, temperature=tau).loss.backward()
    b = logits.clone().requires_grad_()
    naive_torch(b, labels, groups, tau).backward()
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert a.grad[:7].abs().max() == 0  # singletons and the all-negative group get no gradient


def test_hand_computed_two_groups() -> None:
    # group 5: s = [1, 0], y = [1, 0]  -> -log(e / (e + 1)) = log(1 + e^-1) = 0.3132617
    # group 2: s = [0, 0, ln 2], y = [1, 1, 0] -> softmax = [1/4, 1/4, 1/2],
    #          loss = -(1/2·log(1/4) + 1/2·log(1/4)) = log 4 = 1.3862944
    # mean over the 2 groups = (0.3132617 + 1.3862944) / 2 = 0.8497780
    logits = torch.tensor([1.0, 0.0, 0.0, 0.0, math.log(2.0)])
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([5, 5, 2, 2, 2])
    got = segment_listwise_loss(logits, labels, groups)
    assert float(got.loss) == pytest.approx((math.log(1 + math.exp(-1)) + math.log(4)) / 2,
                                            rel=1e-6)
    assert float(got.loss) == pytest.approx(0.8497780, abs=1e-6)
    assert (int(got.num_groups), float(got.mean_group_size), float(got.covered)) == (2, 2.5, 1.0)
    # temperature 2 on group 5 alone: log(1 + e^-0.5) = 0.4740770
    alone = segment_listwise_loss(logits[:2], labels[:2], groups[:2], temperature=2.0)
    assert float(alone.loss) == pytest.approx(0.4740770, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_for_logits_of_magnitude_100(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    logits = (torch.where(torch.rand(40, generator=g) < 0.5, 100.0, -100.0)
              + torch.randn(40, generator=g)).to(dtype)
    labels = (torch.rand(40, generator=g) < 0.4).to(dtype)
    groups = torch.randint(0, 5, (40,), generator=g)
    for tau in (0.05, 1.0):
        x = logits.clone().requires_grad_()
        got = segment_listwise_loss(x, labels, groups, temperature=tau)
        got.loss.backward()
        assert x.grad is not None
        assert torch.isfinite(got.loss) and torch.isfinite(x.grad).all()
        expected = naive_numpy(logits.double().numpy(), labels.double().numpy(),
                               groups.numpy(), tau)[0]
        assert float(got.loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_half_precision_logits_are_upcast() -> None:
    logits, labels, groups = random_batch(4)
    got = segment_listwise_loss(logits.bfloat16(), labels, groups)
    assert got.loss.dtype == torch.float32
    ref = naive_numpy(logits.bfloat16().double().numpy(), labels.numpy(), groups.numpy(), 1.0)[0]
    assert float(got.loss) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("case", ["empty", "singletons", "no_positive"])
def test_no_valid_group_gives_zero_loss_and_zero_gradient(case: str) -> None:
    b = {"empty": 0, "singletons": 6, "no_positive": 6}[case]
    logits = torch.randn(b, requires_grad=True)
    labels = torch.zeros(b) if case == "no_positive" else torch.ones(b)
    groups = torch.arange(b) if case == "singletons" else torch.zeros(b, dtype=torch.long)
    got = segment_listwise_loss(logits, labels, groups)
    assert float(got.loss.detach()) == 0 and got.loss.requires_grad
    got.loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros(b))
    assert (int(got.num_groups), float(got.mean_group_size), float(got.covered)) == (0, 0.0, 0.0)
    hier = hierarchical_listwise_loss(logits, labels, groups[:, None].repeat(1, 2),
                                      include_level0=True)
    # level 0 (the whole batch) is a valid group of the singletons case, and only of that one
    assert (float(hier.loss.detach()) > 0) == (case == "singletons")


def test_in_batch_is_one_group() -> None:
    logits, labels, _ = random_batch(6)
    got = in_batch_listwise_loss(logits, labels, temperature=0.8)
    ref = segment_listwise_loss(logits, labels, torch.full((len(logits),), 3), temperature=0.8)
    assert float(got.loss) == pytest.approx(float(ref.loss), rel=1e-14)
    assert (int(got.num_groups), float(got.covered)) == (1, 1.0)


def test_bad_inputs_raise() -> None:
    s, y, g = torch.zeros(4), torch.ones(4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        segment_listwise_loss(s, y, g, temperature=0.0)
    with pytest.raises(ValueError, match="labels shape"):
        segment_listwise_loss(s, y[:3], g)
    with pytest.raises(ValueError, match="group ids"):
        segment_listwise_loss(s, y, g[:3])
    with pytest.raises(ValueError, match="level_weights"):
        hierarchical_listwise_loss(s, y, g[:, None].repeat(1, 3), level_weights=[1.0, 1.0, 1.0],
                                   include_level0=True)
    with pytest.raises(ValueError, match="codes"):
        hierarchical_listwise_loss(s, y, g)


# ---- hierarchical --------------------------------------------------------------------------------


def trie_codes(seed: int, b: int, branching: int = 3, depth: int = 3) -> torch.Tensor:
    """``(b, depth)`` trie-node ids of random RVQ codes: column l is a scrambled id of (c_1..c_l)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, branching, (b, depth), generator=g)
    prefix = torch.zeros(b, dtype=torch.long)
    cols = []
    for lvl in range(depth):
        prefix = prefix * branching + c[:, lvl]
        cols.append(prefix * 7919 + 10**6 * (lvl + 1))  # arbitrary, distinct per level
    return torch.stack(cols, 1)


@pytest.mark.parametrize("include_level0", [False, True])
@pytest.mark.parametrize("weights", [None, "custom"])
def test_hierarchical_is_weighted_sum_of_segment_losses(include_level0: bool,
                                                        weights: str | None) -> None:
    logits, labels, _ = random_batch(7, b=120, graded=True)
    codes = trie_codes(7, 120)
    n_levels = 3 + include_level0
    level_weights = [0.5, 2.0, 0.25, 1.5][:n_levels] if weights else None
    logits_a = logits.clone().requires_grad_()
    got = hierarchical_listwise_loss(logits_a, labels, codes, level_weights=level_weights,
                                     include_level0=include_level0, temperature=0.6)
    w = level_weights or [1.0 / n_levels] * n_levels
    assert got.weights == pytest.approx(w)
    assert got.levels == ((0, 1, 2, 3) if include_level0 else (1, 2, 3))

    logits_b = logits.clone().requires_grad_()
    columns = [codes[:, i] for i in range(3)]
    if include_level0:
        columns.insert(0, torch.zeros(120, dtype=torch.long))
    refs = [segment_listwise_loss(logits_b, labels, col, temperature=0.6) for col in columns]
    expected = sum(wl * r.loss for wl, r in zip(w, refs, strict=True))
    assert isinstance(expected, torch.Tensor)
    assert float(got.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    for i, r in enumerate(refs):
        assert float(got.level_loss[i]) == pytest.approx(float(r.loss.detach()), rel=1e-12)
        assert int(got.num_groups[i]) == int(r.num_groups)
        assert float(got.mean_group_size[i]) == pytest.approx(float(r.mean_group_size))
        assert float(got.covered[i]) == pytest.approx(float(r.covered))
    got.loss.backward()
    expected.backward()
    torch.testing.assert_close(logits_a.grad, logits_b.grad, rtol=1e-10, atol=1e-12)

    logged = got.to_dict("rank")
    assert logged["rank/loss"] == pytest.approx(float(got.loss.detach()))
    assert logged[f"rank/l{got.levels[-1]}/num_groups"] == int(got.num_groups[-1])


def test_hierarchical_groups_nest() -> None:
    logits, labels, _ = random_batch(8, b=200)
    codes = trie_codes(8, 200, branching=4)
    got = hierarchical_listwise_loss(logits, labels, codes, include_level0=True)
    # a level-(l+1) group lies inside one level-l group
    for lvl in range(2):
        pairs = torch.unique(codes[:, lvl:lvl + 2], dim=0)
        assert len(pairs) == len(codes[:, lvl + 1].unique())
    # so a sample in a valid deep group is in a valid shallow one: coverage cannot grow with depth
    assert float(got.covered[0]) == 1.0
    assert all(float(got.covered[i]) >= float(got.covered[i + 1]) for i in range(3))
    assert int(got.num_groups[0]) == 1 and int(got.num_groups[3]) > int(got.num_groups[1])


# ---- all-gather across ranks ---------------------------------------------------------------------


TAU = 0.7
SCENARIOS = {"unequal": 7, "rank0_empty": 0}  # rank 0 gets rows [0, split), rank 1 the rest


def _loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, codes: torch.Tensor,
                    **gather_kw: Any) -> tuple[float, list[torch.Tensor], Any]:
    """Loss and parameter gradients; under a process group the gradients are averaged over the
    ranks exactly as DDP does (all-reduce sum, then / world size). DDP itself is not used: its
    first construction imports torch._dynamo, which costs ~6 s per process on a small CPU box."""
    model.zero_grad()
    logits = model(x).squeeze(-1)
    gathered = gather_for_groups(logits, y, codes, **gather_kw)
    res = hierarchical_listwise_loss(*gathered, include_level0=True, temperature=TAU)
    res.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    if dist.is_initialized():
        for gr in grads:
            dist.all_reduce(gr)
            gr /= dist.get_world_size()
    return float(res.loss.detach()), grads, gathered


def _rank_main(rank: int, init: str, data_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        data = torch.load(data_path)
        out: dict[str, Any] = {}
        for name, split in SCENARIOS.items():
            lo, hi = (0, split) if rank == 0 else (split, len(data["x"]))
            model = nn.Linear(data["x"].shape[1], 1).double()
            model.load_state_dict(data["state"])
            for scale in (True, False):
                loss, grads, gathered = _loss_and_grads(
                    model, data["x"][lo:hi], data["y"][lo:hi], data["codes"][lo:hi],
                    scale_grad=scale)
                out[name, scale] = (loss, grads, [t.detach() for t in gathered])
        torch.save(out, Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_without_process_group_is_identity() -> None:
    s, y, c = torch.zeros(3), torch.ones(3), torch.zeros(3, 2, dtype=torch.long)
    got = gather_for_groups(s, y, c)
    assert got[0] is s and got[1] is y and got[2] is c


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_ranks_gathered_equal_one_process_on_concatenated_batch(tmp_path: Path) -> None:
    import multiprocessing as mp

    g = torch.Generator().manual_seed(9)
    n, d = 20, 4
    data = {"x": torch.randn(n, d, generator=g, dtype=torch.float64),
            "y": (torch.rand(n, generator=g) < 0.4).double(),
            "codes": trie_codes(9, n, branching=2, depth=2),
            "state": nn.Linear(d, 1).double().state_dict()}
    torch.save(data, tmp_path / "data.pt")

    ctx = mp.get_context("spawn")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_rank_main,
                         args=(r, init, str(tmp_path / "data.pt"), str(tmp_path)))
             for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=100)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]

    model = nn.Linear(d, 1).double()
    model.load_state_dict(data["state"])
    loss, grads, _ = _loss_and_grads(model, data["x"], data["y"], data["codes"])
    assert loss > 0 and any(float(gr.abs().max()) > 0 for gr in grads)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name in SCENARIOS:
            # the gathered batch is the concatenation in rank order, on every rank
            _, _, (s, y, c) = got[name, True]
            torch.testing.assert_close(y, data["y"])
            torch.testing.assert_close(c, data["codes"])
            assert s.shape == (n,)
            # default (scale_grad=True): rank-averaged gradient == one process on the whole batch
            got_loss, got_grads, _ = got[name, True]
            assert got_loss == pytest.approx(loss, rel=1e-12)
            for a, b in zip(got_grads, grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            # without the scaling the ranks' mean leaves 1/world of it (so the convention matters)
            unscaled_loss, unscaled, _ = got[name, False]
            assert unscaled_loss == pytest.approx(loss, rel=1e-12)
            for a, b in zip(unscaled, grads, strict=True):
                torch.testing.assert_close(a, b / 2, rtol=1e-10, atol=1e-12)
