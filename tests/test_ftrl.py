"""FTRL-Proximal and group-lasso FTRL against numpy oracles written from the equations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.optim.ftrl import FTRL, GroupFTRL, zero_fraction, zero_row_fraction


def gftrl_oracle(w: np.ndarray, g: np.ndarray, n: np.ndarray, z: np.ndarray, alpha: float,
                 beta: float, l1: float, l2: float) -> tuple[np.ndarray, ...]:
    """One group-lasso FTRL step on the touched rows (docs/methods.md section 1), row by row."""
    w, n, z = w.copy(), n.copy(), z.copy()
    dim = w.shape[1]
    for i in range(w.shape[0]):
        if not np.any(g[i] != 0):
            continue  # untouched rows keep weight and state
        sigma = (np.sqrt(n[i] + g[i] ** 2) - np.sqrt(n[i])) / alpha
        n[i] = n[i] + g[i] ** 2
        z[i] = z[i] + g[i] - sigma * w[i]
        norm = np.linalg.norm(z[i])
        if norm <= l1 * np.sqrt(dim):
            w[i] = 0.0
        else:
            w[i] = z[i] * (l1 * np.sqrt(dim) / norm - 1.0) / ((beta + np.sqrt(n[i])) / alpha + l2)
    return w, n, z


def ftrl_oracle(w: np.ndarray, g: np.ndarray, n: np.ndarray, z: np.ndarray, lr: float,
                beta: float, l1: float, l2: float) -> tuple[np.ndarray, ...]:
    """One FTRL-Proximal step, coordinate by coordinate (TensorFlow's Ftrl, lr_power -0.5)."""
    w, n, z = w.copy().ravel(), n.copy().ravel(), z.copy().ravel()
    for j, gj in enumerate(g.ravel()):
        sigma = (np.sqrt(n[j] + gj**2) - np.sqrt(n[j])) / lr
        n[j] += gj**2
        z[j] += gj - sigma * w[j]
        if abs(z[j]) <= l1:
            w[j] = 0.0
        else:
            w[j] = (np.sign(z[j]) * l1 - z[j]) / ((beta + np.sqrt(n[j])) / lr + 2 * l2)
    return w.reshape(g.shape), n.reshape(g.shape), z.reshape(g.shape)


def test_group_ftrl_steps_match_the_oracle_and_leave_untouched_rows() -> None:
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(6, 4))
    table = torch.nn.Parameter(torch.tensor(w0))
    hp = {"alpha": 0.1, "beta": 1.0, "l1": 0.3, "l2": 0.5}
    opt = GroupFTRL([table], lr=hp["alpha"], beta=hp["beta"], l1=hp["l1"], l2=hp["l2"],
                    initial_accumulator=0.1, grad_scale=2.0)
    w, n, z = w0.copy(), np.full_like(w0, 0.1), np.zeros_like(w0)
    for step in range(4):
        g = rng.normal(size=w0.shape)
        g[[step % 6, 5]] = 0.0  # rows without gradient this step (row 5 never touched)
        table.grad = torch.tensor(g)
        opt.step()
        w, n, z = gftrl_oracle(w, 2.0 * g, n, z, **hp)
        np.testing.assert_allclose(table.detach().numpy(), w, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(opt.state[table]["z"].numpy(), z, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(table.detach().numpy()[5], w0[5])


def test_group_ftrl_zeroes_whole_rows_and_more_with_larger_l1() -> None:
    torch.manual_seed(0)
    fractions = []
    for l1 in (0.0, 0.5, 5.0):
        table = torch.nn.Parameter(torch.randn(50, 8))
        opt = GroupFTRL([table], lr=0.05, l1=l1)
        for _ in range(5):
            table.grad = torch.randn(50, 8) * torch.linspace(0.01, 2.0, 50)[:, None]
            opt.step()
        rows_zero = (table == 0).all(dim=1)
        assert torch.equal((table == 0).any(dim=1), rows_zero)  # zeros come in whole rows
        fractions.append(zero_row_fraction([table.detach()]))
    assert fractions[0] == 0.0 < fractions[1] < fractions[2] <= 1.0


def test_group_ftrl_on_a_flat_buffer_of_two_tables_equals_two_tables() -> None:
    rng = np.random.default_rng(1)
    a0, b0 = rng.normal(size=(3, 2)), rng.normal(size=(4, 3))
    flat = torch.nn.Parameter(torch.tensor(np.concatenate([a0.ravel(), b0.ravel()])))
    a, b = torch.nn.Parameter(torch.tensor(a0)), torch.nn.Parameter(torch.tensor(b0))
    flat_opt = GroupFTRL([{"params": [flat], "layout": [(3, 2), (4, 3)]}], lr=0.2, l1=0.2)
    split_opt = GroupFTRL([a, b], lr=0.2, l1=0.2)
    for _ in range(3):
        ga, gb = rng.normal(size=(3, 2)), rng.normal(size=(4, 3))
        ga[1] = 0.0
        flat.grad = torch.tensor(np.concatenate([ga.ravel(), gb.ravel()]))
        a.grad, b.grad = torch.tensor(ga), torch.tensor(gb)
        flat_opt.step()
        split_opt.step()
    expected = torch.cat([a.detach().ravel(), b.detach().ravel()])
    torch.testing.assert_close(flat.detach(), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="layout"):
        GroupFTRL([{"params": [flat], "layout": [(3, 2)]}], lr=0.1).step()


def test_ftrl_steps_match_the_oracle() -> None:
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=(3, 5)) * 0.1
    weight = torch.nn.Parameter(torch.tensor(w0))
    hp = {"lr": 0.05, "beta": 1.0, "l1": 0.4, "l2": 0.1}
    opt = FTRL([weight], **hp, initial_accumulator=0.1, grad_scale=3.0)
    w, n, z = w0.copy(), np.full_like(w0, 0.1), np.zeros_like(w0)
    for _ in range(4):
        g = rng.normal(size=w0.shape)
        weight.grad = torch.tensor(g)
        opt.step()
        w, n, z = ftrl_oracle(w, 3.0 * g, n, z, **hp)
        np.testing.assert_allclose(weight.detach().numpy(), w, rtol=1e-12, atol=1e-12)
    assert 0.0 < zero_fraction([weight.detach()]) < 1.0


def test_bad_hyper_parameters_are_named() -> None:
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="l1 must be >= 0"):
        FTRL(p, l1=-1.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        GroupFTRL(p, lr=0.0)
    with pytest.raises(ValueError, match="2-D tables"):
        GroupFTRL.tables(torch.zeros(4), None)
