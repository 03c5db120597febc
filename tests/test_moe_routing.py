"""AdaEnsemble's routing (recsys/modules/moe_routing.py) against numpy oracles: the router's gates,
its temperature, top-k (on the host and on the device), annealing, the step counter, and the load
balance and z losses over all rows or the present ones. The stack is in tests/test_moe.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_moe import D, M, N, model, np_, np_linear, np_softmax, np_top_k_gates

from recsys.modules.moe_experts import EXPERTS
from recsys.modules.moe_routing import (
    Router,
    annealed_k,
    annealed_k_tensor,
    input_noise,
    load_balance_loss,
    ranked_mask,
    router_z_loss,
    top_k_gates,
    top_k_mask,
)

# ---- router, annealing, losses -------------------------------------------------------------------


def test_input_noise_is_uniform_fresh_and_seeded() -> None:
    """x ⊙ U(1−ε, 1+ε): within the bounds, mean 1 and variance ε²/3 (200k draws), a new draw per
    call, and the same draws after the same torch.manual_seed."""
    x = torch.full((400, 500), 2.0)
    torch.manual_seed(3)
    a, b = input_noise(x, 0.5) / 2, input_noise(x, 0.5) / 2
    torch.manual_seed(3)
    assert torch.equal(input_noise(x, 0.5) / 2, a)
    assert not torch.equal(a, b)
    assert float(a.min()) >= 0.5 and float(a.max()) <= 1.5
    assert float(a.mean()) == pytest.approx(1.0, abs=0.005)
    assert float(a.var()) == pytest.approx(0.25 / 3, rel=0.02)
    assert len(torch.unique(a)) > 50_000  # fine-grained: 2^16 levels on the CPU

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


@pytest.mark.parametrize(("top_k", "anneal"), [(3, 10), (1, 4), (2, 0), (5, 3), (1, 1)])
def test_annealed_k_on_the_device_matches_the_host_schedule(top_k: int, anneal: int) -> None:
    steps = range(anneal + 3)
    got = [int(annealed_k_tensor(torch.tensor(s), 5, top_k, anneal)) for s in steps]
    assert got == [annealed_k(s, 5, top_k, anneal) for s in steps]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_ranked_mask_equals_top_k(k: int) -> None:
    logits = torch.randn(50, 5, generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(ranked_mask(logits, torch.tensor(k)), top_k_mask(logits, k))
    ties = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])  # stable: ties go to the lower index
    assert ranked_mask(ties, torch.tensor(2)).tolist() == [[True, True, False, False, False]]


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


def test_masked_losses_are_the_losses_of_the_present_rows() -> None:
    torch.manual_seed(3)
    logits = torch.randn(9, 5, requires_grad=True)
    mask = top_k_mask(logits, 2)
    present = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 0]) > 0
    prior = torch.tensor([0.2, 0.2, 0.4, 0.1, 0.1])
    rows = present.nonzero().squeeze(1)  # the reference may index: only the module must not
    want = load_balance_loss(logits[rows], mask[rows], prior) + router_z_loss(logits[rows])
    got = load_balance_loss(logits, mask, prior, present) + router_z_loss(logits, present)
    torch.testing.assert_close(got, want)
    got.backward()
    assert logits.grad is not None and (logits.grad[~present] == 0).all()
    # a row that is not present adds nothing, even a non-finite one
    bad = logits.detach().clone()
    bad[1] = float("inf")
    torch.testing.assert_close(load_balance_loss(bad, mask, prior, present)
                               + router_z_loss(bad, present), want.detach())
    none = torch.zeros(9, dtype=torch.bool)
    assert load_balance_loss(logits, mask, prior, none).item() == 0.0
    assert router_z_loss(logits, none).item() == 0.0


