"""AdaEnsemble (recsys/modules/moe.py): routers, losses and experts against numpy oracles written
from the equations, sparse dispatch against a dense reference, early exit (deeper layers see only
the rows that continue), annealing, noise, TorchScript parity, backward, and the benchmark."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsys.bench.moe import MoEBenchConfig, run, table
from recsys.modules.moe import (
    EXPERTS,
    AdaEnsemble,
    AttentionExpert,
    CNN1DExpert,
    CrossExpert,
    GatedDenseExpert,
    PolynomialExpert,
    Router,
    SparseMoE,
    annealed_k,
    load_balance_loss,
    router_z_loss,
    top_k_gates,
)

M, D = 8, 8  # fields, dim: n = 64, so routers get a hidden width of n // 16 = 4
N = M * D


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


# ---- router, annealing, losses -------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 5])
def test_router_gates_match_numpy(k: int) -> None:
    torch.manual_seed(1)
    router = Router(N, 5, init_temperature=0.7, noise_eps=0.5).eval()
    x = torch.randn(9, N)
    gates, mask, logits = router(x, k)

    h = np_linear(np.maximum(np_linear(np_(x), router.hidden), 0.0), router.proj)
    e = np_(router.embeddings)
    cos = (h / np.linalg.norm(h, axis=1, keepdims=True)) @ (e / np.linalg.norm(e, axis=1,
                                                                                keepdims=True)).T
    want_logits = cos / 0.7
    want_gates, want_keep = np_top_k_gates(want_logits, k)
    np.testing.assert_allclose(np_(logits), want_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np_(gates), want_gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mask.numpy(), want_keep)
    assert (mask.sum(1) == k).all() and torch.allclose(gates.sum(1), torch.ones(9))


def test_temperature_stays_positive_and_learnable() -> None:
    router = Router(N, 3, init_temperature=2.0)
    assert torch.isclose(router.log_temperature.exp(), torch.tensor(2.0))
    router.log_temperature.data.fill_(-50.0)  # any value of the parameter is a valid T > 0
    assert torch.isfinite(router.eval().logits(torch.randn(2, N))).all()


def test_top_k_gates_keeps_underflowing_winners() -> None:
    gates, mask = top_k_gates(torch.tensor([[0.0, -1e4, -2e4]]), 2)
    assert mask.tolist() == [[True, True, False]]  # dispatched although its gate is 0.0
    assert gates[0, 1] == 0.0


def test_annealing_schedule() -> None:
    assert [annealed_k(s, 5, 3, 10) for s in range(12)] == [5] * 5 + [4] * 5 + [3] * 2
    assert [annealed_k(s, 5, 1, 4) for s in range(6)] == [5, 4, 3, 2, 1, 1]
    assert [annealed_k(s, 5, 2, 0) for s in range(3)] == [2, 2, 2]


def test_step_counter_drives_k_and_is_checkpointed() -> None:
    net = model(experts=list(EXPERTS), top_k=1, anneal_steps=4)
    net.force_exit_depth(0)
    x = torch.randn(6, M, D)
    seen = []
    for _ in range(6):
        net.train()(x)
        seen.append(int(net.expert_load[0].sum()) // 6)  # experts per row at that step
    assert seen == [5, 4, 3, 2, 1, 1]
    net.eval()(x)  # eval: no step, k stays annealed-to
    assert int(net.step) == 6 and int(net.expert_load[0].sum()) == 6
    state = net.state_dict()
    assert "step" in state and "rows_per_depth" not in state  # diagnostics are not checkpointed
    fresh = model(experts=list(EXPERTS), top_k=1, anneal_steps=4)
    fresh.load_state_dict(state)
    assert fresh.current_k() == 1


def test_load_balance_and_z_loss_match_numpy() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(7, 5))
    _, keep = np_top_k_gates(logits, 2)
    prior = np.array([0.2, 0.2, 0.4, 0.1, 0.1])
    f = keep.mean(0)
    p = np_softmax(logits).mean(0)
    t = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    got = load_balance_loss(t, torch.tensor(keep), torch.tensor(prior))
    np.testing.assert_allclose(got.item(), (f * p / prior).sum(), rtol=1e-12)
    # the reference's form: alpha * E^2 * mean(f * P * 1/(E prior)) is the same number
    np.testing.assert_allclose(got.item(), 25 * np.mean(f * p / (5 * prior)), rtol=1e-12)
    # uniform prior = Switch loss E * sum f P
    np.testing.assert_allclose(load_balance_loss(t, torch.tensor(keep)).item(),
                               5 * (f * p).sum(), rtol=1e-12)
    lse = np.log(np.exp(logits).sum(1))
    np.testing.assert_allclose(router_z_loss(t).item(), np.mean(lse ** 2), rtol=1e-12)
    got.backward()  # gradient flows through P only (f is a count)
    assert t.grad is not None and torch.isfinite(t.grad).all()
    empty = torch.zeros(0, 5)
    assert load_balance_loss(empty, empty > 0).item() == 0.0 and router_z_loss(empty).item() == 0.0


# ---- experts ---------------------------------------------------------------------------------------

def _xs(b: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(7)
    return torch.randn(b, N), torch.randn(b, N)


def test_gated_dense_matches_numpy() -> None:
    x, x0 = _xs()
    ex = GatedDenseExpert(N)
    gate = 2 * np_sigmoid(np_linear(np.maximum(np_linear(np_(x0), ex.gate[0]), 0), ex.gate[2]))
    want = np.maximum(np_linear(np_(x), ex.dense), 0) * gate
    np.testing.assert_allclose(np_(ex(x, x0)), want, rtol=1e-5, atol=1e-6)
    assert ex.gate[0].out_features == max(1, N // 16)


def test_cross_and_pin_match_numpy() -> None:
    x, x0 = _xs()
    cross, pin = CrossExpert(N), PolynomialExpert(N)
    np.testing.assert_allclose(np_(cross(x, x0)), np_(x0) * np_linear(np_(x), cross.dense),
                               rtol=1e-5, atol=1e-6)
    assert pin.dense.bias is None
    np.testing.assert_allclose(np_(pin(x, x0)), np_(x) * (np_(x0) @ np_(pin.dense.weight).T),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fields", [1, 2, 8, 38])
def test_cnn_expert_matches_functional_reference(fields: int) -> None:
    torch.manual_seed(0)
    ex = CNN1DExpert(fields, fields * 2)
    x = torch.randn(3, fields * 2)
    positions = max(1, fields // 2)
    h = F.linear(x, ex.squeeze.weight, ex.squeeze.bias).view(3, 1, positions)
    h = F.conv1d(h, ex.conv.weight, ex.conv.bias)  # 'valid'
    h = F.max_pool1d(h, ex.pool)
    want = F.linear(h.reshape(3, -1), ex.out.weight, ex.out.bias)
    torch.testing.assert_close(ex(x, x), want)
    if fields == 38:  # the reference's 608 -> 19 -> (16, 16) -> (16, 8) -> 128 -> 608
        assert ex.conv.kernel_size == (4,) and ex.out.in_features == 128
    torch.testing.assert_close(torch.jit.script(ex)(x, x), ex(x, x))


@pytest.mark.parametrize("fields", [1, 4])
def test_attention_expert_matches_functional_reference(fields: int) -> None:
    torch.manual_seed(0)
    ex = AttentionExpert(fields, D)
    x = torch.randn(3, fields * D)
    f = x.view(3, fields, D)
    out = []
    for head in range(4):
        cols = slice(2 * head, 2 * head + 2)  # hidden 8 over 4 heads
        q = F.gelu(F.linear(f, ex.query.weight, ex.query.bias))[..., cols]
        k = F.gelu(F.linear(f, ex.key.weight, ex.key.bias))[..., cols]
        v = F.gelu(F.linear(f, ex.value.weight, ex.value.bias))[..., cols]
        att = torch.softmax(torch.einsum("bpk,bqk->bpq", q, k) / np.sqrt(2.0), dim=-1)
        out.append(torch.einsum("bpq,bqk->bpk", att, v))
    h = F.gelu(F.linear(torch.cat(out, -1), ex.proj.weight, ex.proj.bias))
    # instance norm: each channel over the fields
    h = (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, unbiased=False, keepdim=True) + 1e-3)
    want = F.linear(h.reshape(3, -1), ex.out.weight, ex.out.bias)
    torch.testing.assert_close(ex.train()(x, x), want)
    torch.testing.assert_close(torch.jit.script(ex.eval())(x, x), want)


def _spread(router: Router) -> None:
    """An untrained router sends most rows the same way; a wider hidden layer spreads them."""
    with torch.no_grad():
        router.hidden.weight.mul_(20.0)
        router.proj.weight.mul_(5.0)


# ---- SparseMoE ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_dispatch_equals_dense_reference(weighted: bool) -> None:
    torch.manual_seed(2)
    moe = SparseMoE(list(EXPERTS), M, D, top_k=2, weight_by_gates=weighted).eval()
    x, x0 = torch.randn(11, N), torch.randn(11, N)
    seen = [0] * 5
    for e, ex in enumerate(moe.experts):
        ex.register_forward_hook(lambda _m, a, _o, e=e: seen.__setitem__(e, seen[e] + a[0].shape[0]))
    _spread(moe.router)
    out, logits, mask = moe(x, x0)
    assert seen == mask.sum(0).tolist()  # each expert computed only its own rows
    assert sum(seen) == 2 * 11 and min(seen) > 0 and max(seen) < 11
    gates, _ = top_k_gates(logits, 2)
    weight = gates if weighted else mask.float()
    dense = sum(ex(x, x0) * weight[:, e:e + 1] for e, ex in enumerate(moe.experts))
    torch.testing.assert_close(out, dense)


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


def test_deeper_layers_see_only_continuing_rows() -> None:
    net = model(seed=3, noise_eps=0.0).eval()
    with torch.no_grad():  # spread the exits: bias the exit router's embeddings apart
        net.exit_router.embeddings.copy_(torch.randn(4, 16))
    x = torch.randn(40, M, D)
    exits = _eval_exit_depths(net, x)
    moe_rows: list[list[int]] = [[] for _ in range(4)]
    est_rows: list[list[int]] = [[] for _ in range(4)]
    for d, block in enumerate(net.blocks):
        block.moe.register_forward_hook(lambda _m, a, _o, d=d: moe_rows[d].append(a[0].shape[0]))
        block.estimator.register_forward_hook(
            lambda _m, a, _o, d=d: est_rows[d].append(a[0].shape[0]))
    net(x)
    counts = torch.bincount(exits, minlength=4).tolist()
    assert len(set(exits.tolist())) >= 2, "the test needs exits at several depths"
    remaining = [40 - sum(counts[:d]) for d in range(4)]
    assert [sum(r) for r in moe_rows] == remaining
    assert all(len(r) <= 1 for r in moe_rows)  # a depth with no rows is not called at all
    assert [sum(r) for r in est_rows] == counts
    assert net.rows_per_depth.tolist() == remaining
    assert net.exits_per_depth.tolist() == counts
    assert net.expert_load.sum(1).tolist() == [3 * r for r in remaining]


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


@pytest.mark.parametrize("weighted", [False, True])
def test_jit_script_parity(weighted: bool) -> None:
    net = model(seed=9, weight_by_gates=weighted).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(16, M, D)
    for depth in (-1, 0, 3):
        net.force_exit_depth(depth)
        scripted.force_exit_depth(depth)
        for got, want in zip(scripted(x), net(x), strict=True):
            torch.testing.assert_close(got, want)
        assert torch.equal(scripted.rows_per_depth, net.rows_per_depth)
    empty = scripted(torch.zeros(0, M, D))
    assert empty[0].shape == (0, 2)


@pytest.mark.parametrize("forced", [-1, 0, 2])
def test_backward_finite_with_empty_depths(forced: int) -> None:
    net = model(seed=10, top_k=1).train()
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


def test_empty_batch_and_shapes() -> None:
    net = model(seed=11)
    logits, aux = net.train()(torch.zeros(0, M, D))
    assert logits.shape == (0, 2) and aux.item() == 0.0
    logits, _ = net(torch.randn(3, N))  # the flat (B, n) layout too
    assert logits.shape == (3, 2)
    with pytest.raises(ValueError):
        net(torch.randn(3, M + 1, D))


def test_autocast_bf16_runs() -> None:
    net = model(seed=12).train()
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
    for d in range(4):
        assert data["layer_calls"][f"depth {d + 1}"] == [1] * (d + 1) + [0] * (3 - d)
        assert data["layer_rows"][f"depth {d + 1}"] == [8] * (d + 1) + [0] * (3 - d)
    assert sum(data["router_exit_counts"]) == 8
    assert data["layer_rows"]["router"][0] == 8
    assert "depth 4 / depth 1" in text and (tmp_path / "moe.md").exists()
