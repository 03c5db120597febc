"""PIN / xDeepInt modules against numpy oracles written from the equations of docs/methods.md section 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.modules.pin import (
    PINLayer,
    PolynomialInteractionNetwork,
    VectorDense,
    XDeepIntReadout,
    merge_subspaces,
    split_subspaces,
)

B = 5
ACTS = ["linear", "relu", "tanh", "sigmoid", "gelu"]
_erf = np.vectorize(math.erf)
NP_ACT = {
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "gelu": lambda z: 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0))),
}


def _x(m: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, m, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# ---- numpy oracles ---------------------------------------------------------------------------


def np_split(x: np.ndarray, h: int) -> np.ndarray:
    """Field-major: row i·h + s is coordinates [s·d, (s+1)·d) of field i."""
    b, m, dim = x.shape
    d = dim // h
    out = np.empty((b, m * h, d))
    for i in range(m):
        for s in range(h):
            out[:, i * h + s, :] = x[:, i, s * d:(s + 1) * d]
    return out


def np_merge(x: np.ndarray, h: int) -> np.ndarray:
    b, fields, d = x.shape
    out = np.empty((b, fields // h, h * d))
    for i in range(fields // h):
        for s in range(h):
            out[:, i, s * d:(s + 1) * d] = x[:, i * h + s, :]
    return out


def np_vector_dense(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
                    act: str = "linear") -> np.ndarray:
    """act(Wᵀ X + b): out[:, u, :] = Σ_i W[i, u] X[:, i, :] + b[u]."""
    out = np.einsum("iu,bid->bud", w, x)
    if b is not None:
        out = out + b[None, :, None]
    return NP_ACT[act](out)


def np_pin(x0: np.ndarray, ws: list[np.ndarray], h: int, residual: bool,
           act: str = "linear") -> np.ndarray:
    """The PIN recursion, layer by layer, on the subspace-split fields."""
    x0s = np_split(x0, h)
    x = x0s
    outs = [x0s]
    for w in ws:
        a = np_vector_dense(x0s, w, act=act)
        x = x * (1.0 + a) if residual else x * a
        outs.append(x)
    return np_merge(x if residual else np.concatenate(outs, axis=1), h)


def _weights(pin: PolynomialInteractionNetwork) -> list[np.ndarray]:
    return [_np(w) for w in pin.interaction_weights()]


# ---- subspaces -------------------------------------------------------------------------------


@pytest.mark.parametrize("h", [1, 2, 4, 8])
def test_split_matches_numpy_and_merge_inverts(h: int) -> None:
    x = _x(3, 8)
    s = split_subspaces(x, h)
    assert s.shape == (B, 3 * h, 8 // h)
    np.testing.assert_array_equal(_np(s), np_split(_np(x), h))
    np.testing.assert_array_equal(_np(merge_subspaces(s, h)), _np(x))
    np.testing.assert_array_equal(np_merge(np_split(_np(x), h), h), _np(x))


def test_split_and_merge_errors_name_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"h=3 must divide the embedding dim D=8"):
        split_subspaces(_x(3, 8), 3)
    with pytest.raises(ValueError, match=r"h=2 must divide the number of fields 5"):
        merge_subspaces(_x(5, 4), 2)
    with pytest.raises(ValueError, match=r"h=3 .*8"):
        PolynomialInteractionNetwork(3, 8, subspaces=3)


# ---- VectorDense, layer, network ---------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [False, True])
def test_vector_dense_matches_numpy(act: str, bias: bool) -> None:
    vd = VectorDense(4, 6, bias=bias, activation=act).double()
    if bias:
        torch.nn.init.normal_(vd.bias)
    x = _x(4, 5)
    out = vd(x)
    assert out.shape == (B, 6, 5)
    expected = np_vector_dense(_np(x), _np(vd.weight), _np(vd.bias) if bias else None, act)
    np.testing.assert_allclose(_np(out), expected, rtol=1e-12, atol=1e-12)


def test_unknown_activation_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown PIN activation 'softplus'.*gelu"):
        VectorDense(3, 3, activation="softplus")
    with pytest.raises(ValueError, match="'swish'"):
        PolynomialInteractionNetwork(3, 4, activation="swish")


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("act", ["linear", "tanh"])
def test_pin_layer_matches_numpy(residual: bool, act: str) -> None:
    layer = PINLayer(6, activation=act, residual=residual).double()
    x0, xprev = _x(6, 4, seed=1), _x(6, 4, seed=2)
    a = np_vector_dense(_np(x0), _np(layer.dense.weight), act=act)
    expected = _np(xprev) * (1.0 + a) if residual else _np(xprev) * a
    np.testing.assert_allclose(_np(layer(xprev, x0)), expected, rtol=1e-12, atol=1e-12)


def test_pin_layer_dropout_acts_on_x0_only() -> None:
    # dropout p=1 zeroes X0 in the W path only: A = 0, so the residual layer returns X_{l-1}
    layer = PINLayer(4, dropout=1.0).double().train()
    x0, xprev = _x(4, 3, seed=1), _x(4, 3, seed=2)
    np.testing.assert_array_equal(_np(layer(xprev, x0)), _np(xprev))


@pytest.mark.parametrize("h", [1, 2])
def test_residual_recursion_three_layers(h: int) -> None:
    pin = PolynomialInteractionNetwork(4, 8, num_layers=3, subspaces=h).double()
    x0 = _x(4, 8)
    out = pin(x0)
    assert out.shape == (B, 4, 8) and (pin.out_fields, pin.out_dim) == (4, 8)
    ws = _weights(pin)
    assert len(ws) == 3 and all(w.shape == (4 * h, 4 * h) for w in ws)
    # an explicit loop, independent of np_pin
    x0s = np_split(_np(x0), h)
    x = x0s.copy()
    for w in ws:
        x = x * (1.0 + np.einsum("iu,bid->bud", w, x0s))
    np.testing.assert_allclose(_np(out), np_merge(x, h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ACTS)
def test_plain_form_concatenates_all_layers(act: str) -> None:
    spec = dict(num_layers=3, subspaces=2, residual=False, activation=act)
    pin = PolynomialInteractionNetwork(3, 4, **spec).double()
    x0 = _x(3, 4)
    out = pin(x0)
    assert out.shape == (B, 4 * 3, 4) and (pin.out_fields, pin.out_dim) == (12, 4)
    expected = np_pin(_np(x0), _weights(pin), 2, residual=False, act=act)
    np.testing.assert_allclose(_np(out), expected, rtol=1e-12, atol=1e-12)
    # the first m fields are X0 itself
    np.testing.assert_array_equal(_np(out[:, :3]), _np(x0))


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_residual_linear_pin_is_polynomial_of_degree_l_plus_1(num_layers: int) -> None:
    # m=2, D=1: every output is p(t) = X_L(t·X0) = Σ_{k=1}^{L+1} c_k t^k with c_1 = X0 and
    # c_{L+1} = X0 ⊙ Π_l (W_l X0) (the top-order term)
    pin = PolynomialInteractionNetwork(2, 1, num_layers=num_layers).double()
    x0 = _x(2, 1, seed=3)
    ts = np.linspace(-1.5, 1.5, num_layers + 4)
    values = np.stack([_np(pin(t * x0)).reshape(-1) for t in ts])  # (T, B·2)
    vander = np.vander(ts, num_layers + 3, increasing=True)  # degrees 0..L+2
    coef = np.linalg.solve(vander[: num_layers + 3], values[: num_layers + 3])
    np.testing.assert_allclose(vander[num_layers + 3:] @ coef, values[num_layers + 3:], atol=1e-9)
    x = _np(x0).reshape(B, 2)
    top = x.copy()
    for w in _weights(pin):
        top = top * (x @ w)  # (W X0)[u] = Σ_i W[i, u] x_i
    np.testing.assert_allclose(coef[0], 0.0, atol=1e-9)
    np.testing.assert_allclose(coef[1], x.reshape(-1), atol=1e-9)
    np.testing.assert_allclose(coef[num_layers + 1], top.reshape(-1), atol=1e-9)
    np.testing.assert_allclose(coef[num_layers + 2], 0.0, atol=1e-9)
    assert np.abs(coef[num_layers + 1]).max() > 1e-3


@pytest.mark.parametrize("residual", [True, False])
def test_multi_head_matches_numpy(residual: bool) -> None:
    spec = dict(num_layers=2, subspaces=2, heads=2, residual=residual)
    pin = PolynomialInteractionNetwork(3, 8, **spec).double()
    x0 = _x(3, 8)
    out = pin(x0)
    per_head = 3 if residual else 3 * 3
    assert out.shape == (B, 2 * per_head, 4) and (pin.out_fields, pin.out_dim) == (2 * per_head, 4)
    proj = _np(x0) @ _np(pin.proj.weight).T  # nn.Linear: y = x Pᵀ
    ws = _weights(pin)
    heads = [np_pin(proj[:, :, 4 * k:4 * (k + 1)], ws[2 * k:2 * k + 2], 2, residual)
             for k in range(2)]
    np.testing.assert_allclose(_np(out), np.concatenate(heads, axis=1), rtol=1e-12, atol=1e-12)


def test_multi_head_errors() -> None:
    with pytest.raises(ValueError, match=r"heads=3 must divide the embedding dim D=8"):
        PolynomialInteractionNetwork(3, 8, heads=3)
    with pytest.raises(ValueError, match=r"h=4 must divide the \(per-head\) embedding dim 2"):
        PolynomialInteractionNetwork(3, 8, heads=4, subspaces=4)


def test_xdeepint_readout_matches_numpy() -> None:
    ro = XDeepIntReadout(6, 2).double()
    torch.nn.init.normal_(ro.dense.bias)
    x = _x(6, 4)
    out = ro(x)
    assert out.shape == (B, 2)
    w, b = _np(ro.dense.weight), _np(ro.dense.bias)
    expected = np.einsum("iu,bid->bu", w, _np(x)) + x.shape[2] * b  # bias added per coordinate
    np.testing.assert_allclose(_np(out), expected, rtol=1e-12, atol=1e-12)


def test_interaction_weights_are_the_layer_matrices() -> None:
    pin = PolynomialInteractionNetwork(4, 8, num_layers=3, subspaces=2, heads=2)
    ws = pin.interaction_weights()
    assert len(ws) == 6 and all(isinstance(w, torch.nn.Parameter) for w in ws)
    ids = {id(p) for p in pin.parameters()}
    assert all(id(w) in ids for w in ws)
    assert all(w.shape == (8, 8) for w in ws)  # M = h·m = 8
    assert id(pin.proj.weight) not in {id(w) for w in ws}


# ---- TorchScript, gradients ------------------------------------------------------------------


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("act", ["linear", "gelu"])
def test_script_parity(residual: bool, heads: int, act: str) -> None:
    spec = dict(num_layers=3, subspaces=2, heads=heads, residual=residual, activation=act,
                dropout=0.2)
    pin = PolynomialInteractionNetwork(4, 8, **spec).eval()
    x = torch.randn(B, 4, 8)
    scripted = torch.jit.script(pin)
    torch.testing.assert_close(scripted(x), pin(x), rtol=0, atol=1e-6)
    ro = XDeepIntReadout(pin.out_fields, 3)
    torch.testing.assert_close(torch.jit.script(ro)(pin(x)), ro(pin(x)), rtol=0, atol=1e-6)


def test_wrong_input_width_raises_eager_and_scripted() -> None:
    pin = PolynomialInteractionNetwork(3, 8, subspaces=2, heads=2)
    for module in (pin, torch.jit.script(pin)):
        with pytest.raises(Exception, match="expected embedding dim 8"):
            module(torch.randn(B, 3, 10))


@pytest.mark.parametrize("residual", [True, False])
def test_gradients_flow(residual: bool) -> None:
    spec = dict(num_layers=3, subspaces=2, heads=2, residual=residual, dropout=0.1)
    pin = PolynomialInteractionNetwork(4, 8, **spec).train()
    ro = XDeepIntReadout(pin.out_fields, 1)
    x0 = torch.randn(B, 4, 8, requires_grad=True)
    ro(pin(x0)).sum().backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0
    for name, p in [*pin.named_parameters(), *ro.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
