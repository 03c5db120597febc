"""DynInt (DynamicPIN) against numpy oracles of the equations in docs/methods.md section 2.

The oracles materialise the per-instance matrix W_l(x) of shape (B, M, M); the module must not
(test_never_materialises_b_m_m checks every intermediate tensor)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import OutputShapes
from test_pin import np_merge, np_split

from recsys.modules.dynint import ACTIVATION_MODES, PARAMETER_MODES, DynamicPIN
from recsys.modules.pin import PolynomialInteractionNetwork

B, M_FIELDS, DIM, H, LAYERS, RANK, BASIS = 5, 3, 8, 2, 3, 2, 3
A_MODES = list(ACTIVATION_MODES)
B_MODES = list(PARAMETER_MODES)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _x0(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, M_FIELDS, DIM, dtype=torch.float64, generator=g)


def _make(a: str, p: str, stop_gradient: bool = False, activation: str = "linear",
          dropout: float = 0.0, randomize: bool = True) -> DynamicPIN:
    torch.manual_seed(0)
    dyn = DynamicPIN(M_FIELDS, DIM, num_layers=LAYERS, subspaces=H, activation=activation,
                     dropout=dropout, activation_mode=a, parameter_mode=p, rank=RANK,
                     num_basis=BASIS, stop_gradient_gate=stop_gradient).double().eval()
    if randomize:  # move B1's zero-initialised generators away from r = c = 1
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for prm in dyn.parameters():
                prm.copy_(0.5 * torch.randn(prm.shape, dtype=prm.dtype, generator=g))
    return dyn


# ---- numpy oracle ------------------------------------------------------------------------------


def np_sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def np_mlp(flat: np.ndarray, seq: torch.nn.Sequential) -> np.ndarray:
    """Linear -> ReLU -> Linear with the module's weights."""
    w1, b1, w2, b2 = _np(seq[0].weight), _np(seq[0].bias), _np(seq[2].weight), _np(seq[2].bias)
    return np.maximum(flat @ w1.T + b1, 0.0) @ w2.T + b2


def np_w_of_x(layer: torch.nn.Module, p: str, flat: np.ndarray, m: int) -> np.ndarray:
    """The per-instance matrix W_l(x), (B, M, M), acting as (W X0)[u] = Σ_i W[u, i] X0[i]."""
    mix = layer.mix
    n = flat.shape[0]
    if p in ("none", "B1", "B2"):
        w_static = _np(mix.dense.weight).T  # VectorDense stores (in, out)
    if p == "none":
        return np.broadcast_to(w_static, (n, m, m))
    if p == "B1":
        rc = 2.0 * np_sigmoid(np_mlp(flat, mix.gen))
        r, c = rc[:, :m], rc[:, m:]
        # diag(r) W diag(c)
        return np.stack([np.diag(r[b]) @ w_static @ np.diag(c[b]) for b in range(n)])
    if p in ("B2", "B3"):
        uv = np_mlp(flat, mix.gen)
        u = uv[:, : m * RANK].reshape(n, m, RANK)
        v = uv[:, m * RANK:].reshape(n, m, RANK)
        low = u @ v.transpose(0, 2, 1)  # U Vᵀ
        return w_static[None] + low if p == "B2" else low
    pi = np.exp(np_mlp(flat, mix.gen))
    pi = pi / pi.sum(axis=1, keepdims=True)
    bases = _np(mix.basis).transpose(0, 2, 1)  # (J, out, in)
    return np.einsum("bj,juv->buv", pi, bases)


def np_dynint(dyn: DynamicPIN, x0: np.ndarray, a: str, p: str, act=lambda z: z) -> np.ndarray:
    n = x0.shape[0]
    flat = x0.reshape(n, -1)
    x0s = np_split(x0, H)
    m, d = x0s.shape[1], x0s.shape[2]
    x = x0s
    for layer in dyn.layers:
        w = np_w_of_x(layer, p, flat, m)
        assert w.shape == (n, m, m)
        term = act(np.einsum("buv,bvd->bud", w, x0s))  # φ(W_l(x) X0)
        if a == "none":
            x = x * (1.0 + term)
            continue
        g = 2.0 * np_sigmoid(np_mlp(flat, layer.gate))
        if a == "A1":
            x = x * (1.0 + g[:, :, None] * term)
        elif a == "A2":
            x = g[:, :, None] * x * (1.0 + term)
        else:
            x = x * (1.0 + g.reshape(n, m, d) * term)
    return np_merge(x, H)


# ---- known answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "p"), list(itertools.product(A_MODES, B_MODES)))
def test_matches_numpy_oracle(a: str, p: str) -> None:
    dyn = _make(a, p)
    x0 = _x0()
    out = dyn(x0)
    assert out.shape == (B, M_FIELDS, DIM) and (dyn.out_fields, dyn.out_dim) == (M_FIELDS, DIM)
    np.testing.assert_allclose(_np(out), np_dynint(dyn, _np(x0), a, p), rtol=1e-10, atol=1e-10)


def test_activation_phi_and_eval_dropout() -> None:
    dyn = _make("A1", "B1", activation="tanh", dropout=0.3)
    x0 = _x0(2)
    expected = np_dynint(dyn, _np(x0), "A1", "B1", act=np.tanh)
    np.testing.assert_allclose(_np(dyn(x0)), expected, rtol=1e-10, atol=1e-10)


def test_b1_at_init_is_static_pin() -> None:
    # r = c = 2·sigmoid(0) = 1 exactly (zero-initialised last layer): B1 == static PIN
    dyn = _make("none", "B1", randomize=False)
    pin = PolynomialInteractionNetwork(M_FIELDS, DIM, num_layers=LAYERS, subspaces=H)
    pin = pin.double()
    with torch.no_grad():
        for w_pin, w_dyn in zip(pin.interaction_weights(), dyn.interaction_weights(), strict=True):
            w_pin.copy_(w_dyn)
    x0 = _x0(3)
    flat = x0.reshape(B, -1)
    for layer in dyn.layers:
        assert torch.equal(layer.mix.gen(flat), torch.zeros(B, 2 * M_FIELDS * H, dtype=x0.dtype))
    torch.testing.assert_close(dyn(x0), pin(x0), rtol=0, atol=1e-12)


def test_interaction_weights_per_mode() -> None:
    m = M_FIELDS * H
    for p in B_MODES:
        ws = _make("A1", p).interaction_weights()
        shapes = {tuple(w.shape) for w in ws}
        if p == "B3":
            assert ws == []
        elif p == "B4":
            assert len(ws) == LAYERS and shapes == {(BASIS, m, m)}
        else:
            assert len(ws) == LAYERS and shapes == {(m, m)}


def test_rejects_plain_or_multi_head_pin() -> None:
    with pytest.raises(ValueError, match="residual=False"):
        DynamicPIN(3, 8, residual=False)
    with pytest.raises(TypeError, match="heads"):  # single-head only: there is no such option
        DynamicPIN(3, 8, heads=2)
    with pytest.raises(ValueError, match=r"h=3 must divide the embedding dim D=8"):
        DynamicPIN(3, 8, subspaces=3)


def test_unknown_modes_are_named_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"activation_mode 'A4'.*none, A1, A2, A3"):
        DynamicPIN(3, 8, activation_mode="A4")
    with pytest.raises(ValueError, match=r"parameter_mode 'b1'.*none, B1, B2, B3, B4"):
        DynamicPIN(3, 8, parameter_mode="b1")
    with pytest.raises(ValueError, match="'swish'"):
        DynamicPIN(3, 8, activation="swish")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        DynamicPIN(3, 8, parameter_mode="B2", rank=0)


# ---- gradients ---------------------------------------------------------------------------------


def test_stop_gradient_gate_blocks_gradient_into_x0() -> None:
    # A2 with W = 0: X_L = (Π_l G_l) ⊙ X0, so d Σ X_L / d X0 = Π_l G_l exactly when the gate input
    # is detached, and differs when it is not
    grads = {}
    for stop in (True, False):
        dyn = _make("A2", "none", stop_gradient=stop)
        with torch.no_grad():
            for w in dyn.interaction_weights():
                w.zero_()
        x0 = _x0(4).requires_grad_(True)
        dyn(x0).sum().backward()
        grads[stop] = x0.grad
        gate_grads = [prm.grad for prm in dyn.layers[0].gate.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in gate_grads)  # the gate still learns
    flat = _np(_x0(4)).reshape(B, -1)
    prod = np.ones((B, M_FIELDS * H))
    for layer in dyn.layers:
        prod = prod * 2.0 * np_sigmoid(np_mlp(flat, layer.gate))
    expected = np_merge(np.broadcast_to(prod[:, :, None], (B, M_FIELDS * H, DIM // H)), H)
    np.testing.assert_allclose(_np(grads[True]), expected, rtol=1e-10, atol=1e-12)
    assert np.abs(_np(grads[False]) - expected).max() > 1e-6


@pytest.mark.parametrize("p", B_MODES)
def test_gradients_flow(p: str) -> None:
    dyn = _make("A3", p, dropout=0.1).train()
    x0 = _x0(5).requires_grad_(True)
    dyn(x0).pow(2).sum().backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all()
    for name, prm in dyn.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name


@pytest.mark.parametrize(("a", "p", "stop"), list(itertools.product(["none", "A1"], ["none", "B1"],
                                                                    [False, True])))
def test_fused_stack_matches_the_layer_by_layer_path(a: str, p: str, stop: bool) -> None:
    """The modes that scale a static mix run as one hand-written autograd node (dynint_fused);
    its outputs and every gradient equal autograd's through the layers, in float64."""
    dyn = _make(a, p, stop_gradient=stop).train()
    assert dyn.fusable
    weights = torch.randn(B, M_FIELDS, DIM, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(9))
    got = {}
    for fused in (True, False):
        dyn.fused = fused
        dyn.zero_grad()
        x0 = _x0(7).requires_grad_(True)
        out = dyn(x0)
        (out * weights).sum().backward()
        got[fused] = (out.detach(), x0.grad,
                      {n: prm.grad for n, prm in dyn.named_parameters()})
    torch.testing.assert_close(got[True][0], got[False][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[True][1], got[False][1], rtol=1e-10, atol=1e-12)
    for name, grad in got[False][2].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(got[True][2][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_fused_stack_passes_gradcheck() -> None:
    from recsys.modules.dynint_fused import FieldMixStack

    g = torch.Generator().manual_seed(3)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(True)

    x0, m = t(3, 2, 4), 4
    args = (t(m, m), t(3, m), t(3, m), t(m, m), None, t(3, m), t(m, m), t(3, m), None)
    assert torch.autograd.gradcheck(lambda *a: FieldMixStack.apply(x0, 3, *a), args)
    assert torch.autograd.gradcheck(lambda x: FieldMixStack.apply(x, 3, *args), (x0,))


def test_only_scaled_static_mixes_fuse() -> None:
    fusable = {(a, p) for a, p in itertools.product(A_MODES, B_MODES)
               if DynamicPIN(3, 8, subspaces=2, activation_mode=a, parameter_mode=p).fusable}
    assert fusable == {("none", "none"), ("none", "B1"), ("A1", "none"), ("A1", "B1")}
    assert not DynamicPIN(3, 8, activation="relu").fusable  # φ must be linear


# ---- no (B, M, M) tensor, TorchScript -----------------------------------------------------------


@pytest.mark.parametrize("p", B_MODES)
def test_never_materialises_b_m_m(p: str) -> None:
    # h = D: M = 8·4 = 32 fields of dim 1, so B·M·M = 5120 dwarfs every legitimate intermediate
    # (B·J·M·d = 480, the J×M×M basis = 3072)
    dyn = DynamicPIN(4, 8, num_layers=2, subspaces=8, activation_mode="A3", parameter_mode=p,
                     rank=RANK, num_basis=BASIS)
    x0 = torch.randn(B, 4, 8)
    with OutputShapes() as rec:
        dyn(x0)
    biggest = max(rec.calls, key=lambda r: math.prod(r[1]))
    assert math.prod(biggest[1]) < B * 32 * 32, biggest


@pytest.mark.parametrize(("a", "p"), list(itertools.product(A_MODES, B_MODES)))
def test_script_parity(a: str, p: str) -> None:
    dyn = _make(a, p, stop_gradient=True, activation="gelu", dropout=0.2).float().eval()
    x0 = _x0(6).float()
    torch.testing.assert_close(torch.jit.script(dyn)(x0), dyn(x0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_generator_outputs_backward_allocates_no_zero_gradients(fused: bool) -> None:
    """The generators' shared first layer and B1's (r, c) are split, not sliced: in backward, one
    concatenation each, where every slice's backward allocated a zero gradient of the whole
    tensor (a pass over (B, Σ hidden) per generator on a GPU)."""
    dyn = _make("A1", "B1").float()
    dyn.fused = fused
    x0 = _x0(3).float().requires_grad_()
    out = dyn(x0)
    with torch.profiler.profile() as prof:
        out.square().sum().backward()
    names = {e.name for e in prof.events()}
    assert "aten::slice_backward" not in names, sorted(n for n in names if "slice" in n)
    assert x0.grad is not None and all(p.grad is not None for p in dyn.parameters())
