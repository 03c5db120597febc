"""AdaEnsemble (recsys/modules/moe.py, its experts in moe_experts.py): routers, losses and experts against numpy oracles written
from the equations, both dispatches (static, gather) against a dense reference, against each other
and the whole stack against a per-row loop (route, run the row's experts, exit at its depth), early
exit (no gradient past a row's exit, forced exit truncates the stack), annealing, noise, the
gather dispatch's row padding, the "auto" choice, TorchScript parity, backward, and the benchmark.
The static dispatch's freedom from host-device syncs: tests/test_moe_sync.py."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsys.bench.moe import MoEBenchConfig, run, table
from recsys.models.archs.moe import MoESpec
from recsys.modules.moe import AdaEnsemble, SparseMoE, resolve_dispatch
from recsys.modules.moe_experts import EXPERTS
from recsys.modules.moe_routing import (
    Router,
    load_balance_loss,
    router_z_loss,
    top_k_gates,
    top_k_mask,
)

M, D = 8, 8  # fields, dim: n = 64, so routers get a hidden width of n // 16 = 4
N = M * D
DISPATCHES = ("static", "gather")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: a second intra-op thread only adds contention (10x slower on a busy box)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def np_linear(x: np.ndarray, lin: torch.nn.Linear) -> np.ndarray:
    out = x @ np_(lin.weight).T
    return out + np_(lin.bias) if lin.bias is not None else out


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def np_top_k_gates(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.zeros_like(logits, dtype=bool)
    order = np.argsort(-logits, axis=1)[:, :k]
    np.put_along_axis(keep, order, True, axis=1)
    gates = np.where(keep, np.exp(logits - logits.max(axis=1, keepdims=True)), 0.0)
    return gates / gates.sum(axis=1, keepdims=True), keep


def model(seed: int = 0, **kw: object) -> AdaEnsemble:
    torch.manual_seed(seed)
    return AdaEnsemble(M, D, num_outputs=2, **kw)


def _spread(router: Router) -> None:
    """An untrained router sends most rows the same way; a wider hidden layer spreads them."""
    with torch.no_grad():
        router.hidden.weight.mul_(20.0)
        router.proj.weight.mul_(5.0)


# ---- SparseMoE ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_dispatch_equals_dense_reference(weighted: bool, dispatch: str) -> None:
    torch.manual_seed(2)
    moe = SparseMoE(list(EXPERTS), M, D, top_k=2, weight_by_gates=weighted,
                    dispatch=dispatch).eval()
    x, x0 = torch.randn(11, N), torch.randn(11, N)
    _spread(moe.router)
    out, logits, mask = moe(x, x0)
    routed = mask.sum(0)
    assert (mask.sum(1) == 2).all() and routed.min() > 0 and routed.max() < 11
    gates, _ = top_k_gates(logits, 2)
    weight = gates if weighted else mask.float()
    dense = sum(ex(x, x0) * weight[:, e:e + 1] for e, ex in enumerate(moe.experts))
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    # each row is the sum over its own experts (static: every expert on every row, masked;
    # gather: each expert on its rows only)
    for r in range(11):
        row = sum(moe.experts[e](x[r:r + 1], x0[r:r + 1]) * weight[r, e]
                  for e in mask[r].nonzero().squeeze(1).tolist())
        torch.testing.assert_close(out[r:r + 1], row, rtol=1e-5, atol=1e-5)
    # an annealed k held on the device routes the same as the host-side k
    torch.testing.assert_close(moe(x, x0, torch.tensor(2))[0], out)
    # rows that are not present: the gather dispatch computes nothing for them (0); the static
    # one ignores present (its caller masks)
    present = torch.arange(11) % 3 > 0
    got = moe(x, x0, None, present)[0]
    torch.testing.assert_close(got[present], out[present], rtol=1e-5, atol=1e-5)
    assert (got[~present] == 0).all() if dispatch == "gather" else torch.equal(got, out)
    # the first depth passes x0 as x: one gather serves both inputs
    torch.testing.assert_close(moe(x0, x0)[0], sum(ex(x0, x0) * weight[:, e:e + 1]
                                                   for e, ex in enumerate(moe.experts)),
                               rtol=1e-5, atol=1e-5)


def test_dispatch_auto_is_static_on_accelerators_and_gather_on_cpu() -> None:
    assert [resolve_dispatch("auto", device) for device in ("cuda", "xpu", "mps", "cpu")] == [
        "static", "static", "static", "gather"]
    assert resolve_dispatch("static", "cpu") == "static"
    assert resolve_dispatch("gather", "cuda") == "gather"
    net = model(seed=0)
    assert net.dispatch == "auto" and {b.moe.dispatch for b in net.blocks} == {"auto"}
    net(torch.randn(6, M, D))  # on the CPU: gather, so the experts computed only routed rows
    torch.testing.assert_close(net.rows_computed, net.expert_load)
    with pytest.raises(ValueError, match="dispatch must be one of auto, static, gather"):
        AdaEnsemble(M, D, dispatch="dense")
    with pytest.raises(ValueError, match="dispatch must be one of"):
        SparseMoE(["cross"], M, D, top_k=1, dispatch="sparse")


def test_sparse_moe_with_idle_experts_and_gradients() -> None:
    torch.manual_seed(4)
    moe = SparseMoE(list(EXPERTS), M, D, top_k=1).train()
    x = torch.randn(2, N, requires_grad=True)
    out, logits, mask = moe(x, x.detach())
    assert int((mask.sum(0) == 0).sum()) >= 3  # two rows, five experts
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # unweighted combine + detached input: the router gets no gradient from the output
    assert moe.router.embeddings.grad is None


# ---- the early-exit stack -------------------------------------------------------------------------

def _eval_exit_depths(net: AdaEnsemble, x: torch.Tensor) -> torch.Tensor:
    return net.exit_router.logits(x.flatten(1)).argmax(1)


def _spread_exits(net: AdaEnsemble) -> None:
    """Rows exiting at every depth: the exit router's embeddings apart, its input spread."""
    with torch.no_grad():
        net.exit_router.embeddings.copy_(torch.randn(net.depths, 16, generator=torch.Generator()
                                                     .manual_seed(0)))
    _spread(net.exit_router)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_exit_diagnostics_and_no_gradient_past_the_exit(dispatch: str) -> None:
    net = model(seed=0, noise_eps=0.0, dispatch=dispatch).eval()
    _spread_exits(net)
    x = torch.randn(40, M, D)
    exits = _eval_exit_depths(net, x)
    moe_rows: list[list[int]] = [[] for _ in range(4)]
    for d, block in enumerate(net.blocks):
        block.moe.register_forward_hook(lambda _m, a, _o, d=d: moe_rows[d].append(a[0].shape[0]))
    logits, _ = net(x)
    counts = torch.bincount(exits, minlength=4).tolist()
    assert len(set(exits.tolist())) == 4, "the test needs exits at every depth"
    remaining = [40 - sum(counts[:d]) for d in range(4)]
    assert moe_rows == [[40]] * 4  # every depth's layer is called once, with the whole batch
    assert net.rows_per_depth.tolist() == remaining  # ... and counts the rows that reached it
    assert net.exits_per_depth.tolist() == counts
    assert net.expert_load.sum(1).tolist() == [3 * r for r in remaining]
    if dispatch == "static":  # every expert computed every row
        assert net.rows_computed.tolist() == [[40] * 5] * 4
    else:  # each expert only its rows among those that reached the depth
        assert torch.equal(net.rows_computed, net.expert_load)
    # a row's logits depend on nothing past its exit depth
    first = int((exits == exits.min()).nonzero()[0])
    logits[first].sum().backward()
    deeper = [p for p in net.blocks[int(exits[first]) + 1:].parameters()]
    assert deeper and all(p.grad is None or (p.grad == 0).all() for p in deeper)
    assert net.blocks[int(exits[first])].estimator.weight.grad.abs().sum() > 0


def test_exit_logits_equal_manual_composition() -> None:
    net = model(seed=5).eval()
    x = torch.randn(6, M, D)
    x0 = x.flatten(1)
    h = x0
    for d, block in enumerate(net.blocks):
        h = block.moe(h, x0)[0] + h
        net.force_exit_depth(d)
        logits, _ = net(x)
        torch.testing.assert_close(logits, block.estimator(h))
        assert net.rows_per_depth.tolist() == [6] * (d + 1) + [0] * (3 - d)
    net.force_exit_depth(-1)
    exits = _eval_exit_depths(net, x)
    logits, _ = net(x)
    for d in range(4):
        net.force_exit_depth(d)
        forced, _ = net(x)
        rows = exits == d
        torch.testing.assert_close(logits[rows], forced[rows])
    with pytest.raises(ValueError):
        net.force_exit_depth(4)


def _per_row_reference(net: AdaEnsemble, x: torch.Tensor, k: int,
                       weighted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The method written as a loop, one row at a time (routers without noise): route the row to
    its top-k experts, run only those on the row, add the residual, and stop at the row's exit
    depth; aux losses over the rows that reached each layer (the exit router's over all)."""
    x0 = x.flatten(1)
    exit_logits = net.exit_router.logits(x0)
    exits = exit_logits.argmax(1).tolist() if net.forced_exit < 0 else [net.forced_exit] * len(x0)
    alpha, zeta = net.load_balance_weight, net.z_loss_weight
    aux = torch.zeros(())
    if net.forced_exit < 0:
        exit_mask = F.one_hot(exit_logits.argmax(1), net.depths) > 0
        aux = (alpha * load_balance_loss(exit_logits, exit_mask, net.exit_prior)
               + zeta * router_z_loss(exit_logits))
    rows = []
    for r, exit_at in enumerate(exits):
        h, row0 = x0[r:r + 1], x0[r:r + 1]
        for block in list(net.blocks)[:exit_at + 1]:
            logits = block.moe.router.logits(row0)[0]
            top = logits.topk(k).indices.tolist()
            gates = torch.softmax(logits[top], dim=0)
            y = torch.zeros_like(h)
            for g, e in zip(gates, top, strict=True):
                y = y + block.moe.experts[e](h, row0) * (g if weighted else 1.0)
            h = h + y
        rows.append(net.blocks[exit_at].estimator(h))
    for d, block in enumerate(net.blocks):  # the layers' aux losses over the rows that reached d
        reached = [r for r, e in enumerate(exits) if e >= d]
        if reached:
            logits = block.moe.router.logits(x0[reached])
            mask = top_k_mask(logits, k)
            aux = aux + (alpha * load_balance_loss(logits, mask, net.expert_prior)
                         + zeta * router_z_loss(logits))
    return torch.cat(rows), aux


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("mode", "forced"), [("train", -1), ("eval", -1), ("eval", 1)])
def test_forward_equals_per_row_loop(weighted: bool, mode: str, forced: int,
                                     dispatch: str) -> None:
    """Both dispatches are exact: the per-row loop's logits and aux losses."""
    # noise off so that the loop sees the same routing; training mode still anneals k (5 - 3·7//10
    # = 3 of 5 at step 7 of 10) and counts the step
    net = model(seed=0, noise_eps=0.0, weight_by_gates=weighted, anneal_steps=10, top_k=2,
                load_balance_weight=0.5, z_loss_weight=0.1, dispatch=dispatch
                ).train(mode == "train")
    _spread_exits(net)
    for block in net.blocks:
        _spread(block.moe.router)
    net.step.fill_(7)
    net.force_exit_depth(forced)
    x = torch.randn(24, M, D)
    k = net.current_k()
    assert k == 3
    want, want_aux = _per_row_reference(net, x, k, weighted)
    got, aux = net(x)
    assert int(net.step) == (8 if mode == "train" else 7)
    if forced < 0:
        assert len(set(_eval_exit_depths(net, x).tolist())) == 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, want_aux, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("forced", "noise"), [(-1, 0.0), (2, 0.5)])
def test_dispatches_agree_in_training(weighted: bool, forced: int, noise: float) -> None:
    """Static and gather from the same weights: the same logits, aux loss, gradients (parameters
    and input; None in gather where static has zeros) and diagnostics, with annealing. Router
    noise only with the forced exit: there both draw it for every row (with the learned exit,
    gather draws it for the rows still in the stack only). In float64: the two dispatches sum the
    rows in different orders, and a float32 gradient summed over many rows with cancellation (an
    attention bias) can differ by more than the tolerance through roundoff alone."""
    nets = {d: model(seed=21, weight_by_gates=weighted, anneal_steps=2, noise_eps=noise,
                     dispatch=d).double().train()
            for d in DISPATCHES}
    for net in nets.values():
        _spread_exits(net)
    x = torch.randn(32, M, D, dtype=torch.float64)
    got = {}
    for d, net in nets.items():
        net.force_exit_depth(forced)
        xd = x.clone().requires_grad_()
        torch.manual_seed(5)
        for _ in range(2):  # k: 5 of 5 experts, then 4
            net.zero_grad()
            logits, aux = net(xd)
            (logits.square().sum() + aux).backward()
        got[d] = (logits, aux, xd.grad, net)
    (s_logits, s_aux, s_grad, static), (g_logits, g_aux, g_grad, gather) = got.values()
    torch.testing.assert_close(g_logits, s_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_aux, s_aux, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_grad, s_grad, rtol=1e-4, atol=1e-5)
    for (name, ps), pg in zip(static.named_parameters(), gather.parameters(), strict=True):
        want = ps.grad if ps.grad is not None else torch.zeros_like(ps)
        torch.testing.assert_close(pg.grad if pg.grad is not None else torch.zeros_like(pg), want,
                                   rtol=1e-4, atol=1e-5, msg=name)
    for buf in ("rows_per_depth", "exits_per_depth", "expert_load", "step"):
        assert torch.equal(getattr(static, buf), getattr(gather, buf)), buf
    if forced < 0:
        assert (static.exits_per_depth > 0).sum() >= 3  # rows leave at several depths
    assert (gather.rows_computed <= static.rows_computed).all()
    assert gather.rows_computed.sum() < static.rows_computed.sum()


def _rows_seen(net: AdaEnsemble) -> tuple[list[int], list[torch.utils.hooks.RemovableHandle]]:
    """Records the row count of every expert, router and estimator call of ``net``."""
    seen: list[int] = []
    modules = [m for b in net.blocks for m in (*b.moe.experts, b.moe.router.hidden, b.estimator)]
    handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
               for m in modules]
    return seen, handles


@pytest.mark.parametrize(("forced", "noise"), [(-1, 0.0), (1, 0.5)])
def test_gather_padding_to_a_row_bucket_changes_nothing(monkeypatch: pytest.MonkeyPatch,
                                                        forced: int, noise: float) -> None:
    """Gather with each expert's, router's and estimator's rows padded to a multiple of the bucket
    (as under CPU bf16, where oneDNN builds a kernel per shape) gives the unpadded result: logits,
    aux loss, input and parameter gradients and diagnostics; and the padded calls really ran."""
    import recsys.modules.moe as moe_module

    x = torch.randn(37, M, D, dtype=torch.float64)
    got = {}
    for bucket in (1, 5):
        monkeypatch.setattr(moe_module, "row_bucket", lambda _x, b=bucket: b)
        net = model(seed=21, anneal_steps=2, noise_eps=noise, dispatch="gather").double().train()
        _spread_exits(net)
        net.force_exit_depth(forced)
        seen, handles = _rows_seen(net)
        xd = x.clone().requires_grad_()
        torch.manual_seed(5)
        for _ in range(2):  # k: 5 of 5 experts (every expert reads x itself), then 4
            net.zero_grad()
            logits, aux = net(xd)
            (logits.square().sum() + aux).backward()
        for h in handles:
            h.remove()
        got[bucket] = (logits, aux, xd.grad, net, seen)
    (logits, aux, grad, plain, seen1), (p_logits, p_aux, p_grad, padded, seen5) = got.values()
    assert any(n % 5 for n in seen1 if n < 37)  # unpadded: routed counts that 5 does not divide
    assert all(n % 5 == 0 or n == 37 for n in seen5)  # padded: multiples of 5 or the whole batch
    torch.testing.assert_close(p_logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p_aux, aux, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p_grad, grad, rtol=1e-12, atol=1e-12)
    for (name, p1), p5 in zip(plain.named_parameters(), padded.parameters(), strict=True):
        assert (p1.grad is None) == (p5.grad is None), name
        if p1.grad is not None:
            torch.testing.assert_close(p5.grad, p1.grad, rtol=1e-12, atol=1e-12, msg=name)
    for buf in ("rows_per_depth", "exits_per_depth", "expert_load", "rows_computed", "step"):
        assert torch.equal(getattr(padded, buf), getattr(plain, buf)), buf


def test_row_bucket_only_under_cpu_low_precision() -> None:
    """64 under CPU autocast or bf16 inputs (oneDNN), 1 for fp32 (MKL); a bf16 autocast forward
    runs each gathered expert, router and estimator on a multiple of 64 rows."""
    from recsys.modules.moe import ROW_BUCKET, row_bucket

    x = torch.randn(300, M * D)
    assert row_bucket(x) == 1 and row_bucket(x.bfloat16()) == ROW_BUCKET == 64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert row_bucket(x) == 64
    net = model(seed=3, dispatch="gather").eval()
    seen, _ = _rows_seen(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x.view(300, M, D))
    assert seen and all(n % 64 == 0 or n == 300 for n in seen)
    assert any(n % 64 for n in net.expert_load.flatten().tolist() if n)  # routed counts were not


def test_noise_only_in_training() -> None:
    net = model(seed=6)
    x = torch.randn(8, M, D)
    router = net.blocks[0].moe.router
    assert not torch.equal(router.train().logits(x.flatten(1)), router.logits(x.flatten(1)))
    net.eval()
    a, b = net(x), net(x)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert int(net.step) == 0


def test_aux_loss_is_the_weighted_router_losses() -> None:
    net = model(seed=8, load_balance_weight=0.5, z_loss_weight=0.25).eval()
    net.force_exit_depth(1)
    x = torch.randn(10, M, D)
    _, aux = net(x)
    x0 = x.flatten(1)
    want, h = torch.zeros(()), x0
    for block in list(net.blocks)[:2]:
        y, lg, mask = block.moe(h, x0)
        h = y + h
        want = want + 0.5 * load_balance_loss(lg, mask, net.expert_prior) + 0.25 * router_z_loss(lg)
    torch.testing.assert_close(aux, want)


@pytest.mark.parametrize("dispatch", (*DISPATCHES, "auto"))
@pytest.mark.parametrize("weighted", [False, True])
def test_jit_script_parity(weighted: bool, dispatch: str) -> None:
    net = model(seed=9, weight_by_gates=weighted, dispatch=dispatch).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(16, M, D)
    for depth in (-1, 0, 3):
        net.force_exit_depth(depth)
        scripted.force_exit_depth(depth)
        for got, want in zip(scripted(x), net(x), strict=True):
            torch.testing.assert_close(got, want)
        assert torch.equal(scripted.rows_per_depth, net.rows_per_depth)
        assert torch.equal(scripted.rows_computed, net.rows_computed)
    empty = scripted(torch.zeros(0, M, D))
    assert empty[0].shape == (0, 2)


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("forced", [-1, 0, 2])
def test_backward_finite_with_empty_depths(forced: int, dispatch: str) -> None:
    net = model(seed=10, top_k=1, dispatch=dispatch).train()
    net.force_exit_depth(forced)
    x = torch.randn(3, M, D, requires_grad=True)
    logits, aux = net(x)
    (logits.sum() + aux).backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if forced >= 0:  # deeper layers never ran: no gradient reached them
        assert all(p.grad is None for p in net.blocks[forced + 1:].parameters())
        assert net.exit_router.embeddings.grad is None  # the forced exit skips the router
    else:
        assert net.exit_router.embeddings.grad is not None  # through its aux losses


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_empty_batch_and_shapes(dispatch: str) -> None:
    net = model(seed=11, dispatch=dispatch)
    logits, aux = net.train()(torch.zeros(0, M, D))
    assert logits.shape == (0, 2) and aux.item() == 0.0
    logits, _ = net(torch.randn(3, N))  # the flat (B, n) layout too
    assert logits.shape == (3, 2)
    with pytest.raises(ValueError):
        net(torch.randn(3, M + 1, D))


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_autocast_bf16_runs(dispatch: str) -> None:
    net = model(seed=12, dispatch=dispatch).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = net(torch.randn(8, M, D))
    assert logits.dtype == torch.float32  # experts' bf16 outputs are combined in x0's dtype
    (logits.sum() + aux).backward()


def test_expert_subset() -> None:
    net = AdaEnsemble(M, D, experts=("cross", "pin"), top_k=1, expert_prior=(0.5, 0.5), depths=2,
                      exit_prior=(0.5, 0.5))
    assert [type(e).__name__ for e in net.blocks[0].moe.experts] == ["CrossExpert",
                                                                     "PolynomialExpert"]
    assert net(torch.randn(4, M, D))[0].shape == (4, 1)


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown expert 'mlp'.*gated_dense, cross, pin, cnn"):
        AdaEnsemble(M, D, experts=("cross", "mlp"), top_k=1, expert_prior=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 5\]"):
        AdaEnsemble(M, D, top_k=6)
    with pytest.raises(ValueError, match="exit_prior needs 2"):
        AdaEnsemble(M, D, depths=2)
    with pytest.raises(ValueError, match="unknown expert"):
        SparseMoE(["cross", "dcn"], M, D, top_k=1)


# ---- benchmark -------------------------------------------------------------------------------------

def test_bench_tiny(tmp_path) -> None:
    from recsys.bench import write_result

    cfg = MoEBenchConfig(num_fields=4, dim=2, batch_size=8, repeats=2, warmup=1)
    result = run(cfg)
    text = table(result)
    path = write_result(tmp_path, "moe", result, text)
    data = json.loads(path.read_text())
    assert data["benchmark"] == "moe" and data["width"] == 8
    assert set(data["us_per_example"]) == {"depth 1", "depth 2", "depth 3", "depth 4", "router"}
    assert all(v["best"] > 0 for v in data["us_per_example"].values())
    assert data["ratio_depth4_to_depth1"]["best"] > 0
    assert data["dispatch"] == "gather"  # "auto" on the CPU
    for d in range(4):  # a forced exit truncates the stack
        assert data["layer_calls"][f"depth {d + 1}"] == [1] * (d + 1) + [0] * (3 - d)
        assert data["layer_rows"][f"depth {d + 1}"] == [8] * (d + 1) + [0] * (3 - d)
        # the experts computed each row's k = 3 of 5 (gather), at the depths that ran
        computed = [sum(r) for r in data["expert_rows_computed"][f"depth {d + 1}"]]
        assert computed == [3 * 8] * (d + 1) + [0] * (3 - d)
    exits = data["router_exit_counts"]
    assert sum(exits) == 8
    # the learned exit: every depth's layer is called; the rows reaching each depth, and their
    # experts only, are computed
    assert data["layer_calls"]["router"] == [1] * 4
    assert data["layer_rows"]["router"] == [sum(exits[d:]) for d in range(4)]
    assert data["expert_rows_computed"]["router"] == data["expert_load"]["router"]
    assert "depth 4 / depth 1" in text and (tmp_path / "moe.md").exists()
    static = run(MoEBenchConfig(num_fields=4, dim=2, batch_size=8, repeats=1, warmup=0,
                                moe=MoESpec(dispatch="static")))
    assert static["dispatch"] == "static"
    assert static["expert_rows_computed"]["router"] == [[8] * 5] * 4
