"""FTRL-Proximal (per coordinate, L1/L2) and group-lasso FTRL (one group per embedding row).

Both keep, per weight, the accumulated squared gradient ``n`` and the FTRL state ``z``; the weight
itself is a closed-form function of ``(z, n)``, which is why L1 produces exact zeros:

- FTRL-Proximal (McMahan et al. 2013, TensorFlow's ``Ftrl`` with ``lr_power = -0.5``)::

      σ = (sqrt(n + g²) − sqrt(n)) / lr ;  n += g² ;  z += g − σ w
      w = 0 if |z| ≤ l1 else (sign(z) l1 − z) / ((β + sqrt(n)) / lr + 2 l2)

- group-lasso FTRL (xDeepInt's embedding optimizer, docs/methods.md section 1), row i of a table of
  width D::

      σ, n, z as above (elementwise)
      w_i = 0 if ||z_i|| ≤ l1 sqrt(D) else z_i (l1 sqrt(D) / ||z_i|| − 1) / ((β + sqrt(n_i)) / lr + l2)

  Only the rows touched in a step are updated (their gradient rows are non-zero); the others keep
  their value. Because a row's weight is a function of its own state, this sparse update is exact.

The reference trains with the loss summed over the batch, and the L1 thresholds are calibrated for
that. Our losses are batch means, so both optimizers multiply the gradient by ``grad_scale`` (the
trainer sets it to the global batch size when the spec asks for the summed-loss convention).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def _check(name: str, value: float, minimum: float = 0.0, strict: bool = False) -> None:
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be {op} {minimum}, got {value}")


class _FTRLBase(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float, beta: float, l1: float, l2: float,
                 initial_accumulator: float, grad_scale: float) -> None:
        _check("lr", lr, strict=True)
        for name, value in (("beta", beta), ("l1", l1), ("l2", l2),
                            ("initial_accumulator", initial_accumulator)):
            _check(name, value)
        _check("grad_scale", grad_scale, strict=True)
        defaults = {"lr": lr, "beta": beta, "l1": l1, "l2": l2,
                    "initial_accumulator": initial_accumulator, "grad_scale": grad_scale}
        super().__init__(params, defaults)

    def _state(self, p: torch.Tensor, initial: float) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["n"] = torch.full_like(p, initial, memory_format=torch.preserve_format)
            state["z"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["n"], state["z"]

    @staticmethod
    def _accumulate(w: torch.Tensor, g: torch.Tensor, n: torch.Tensor, z: torch.Tensor,
                    lr: float) -> torch.Tensor:
        """The shared part: update ``n`` and ``z`` in place; returns the new ``sqrt(n)``."""
        new_n = n + g * g
        sqrt_new = new_n.sqrt()
        sigma = (sqrt_new - n.sqrt()) / lr
        z.add_(g - sigma * w)
        n.copy_(new_n)
        return sqrt_new


class FTRL(_FTRLBase):
    """Per-coordinate FTRL-Proximal with L1 and L2 (exact zeros where ``|z| <= l1``).

    Args:
        params: parameters (dense gradients).
        lr: the learning rate α.
        beta, l1, l2: FTRL-Proximal's β and regularisation strengths.
        initial_accumulator: starting value of ``n`` (TensorFlow's default 0.1).
        grad_scale: the gradient is multiplied by this before the update.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> opt = FTRL([w], lr=0.1, l1=0.5)
        >>> w.grad = torch.tensor([1.0, 0.1, -2.0]); opt.step()
        >>> (w == 0).tolist()
        [False, True, False]
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, beta: float = 1.0,
                 l1: float = 0.0, l2: float = 0.0, initial_accumulator: float = 0.1,
                 grad_scale: float = 1.0) -> None:
        super().__init__(params, lr, beta, l1, l2, initial_accumulator, grad_scale)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, beta, l1, l2 = group["lr"], group["beta"], group["l1"], group["l2"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad * group["grad_scale"]
                n, z = self._state(p, group["initial_accumulator"])
                sqrt_n = self._accumulate(p, g, n, z, lr)
                quadratic = (beta + sqrt_n) / lr + 2.0 * l2
                w = (torch.sign(z) * l1 - z) / quadratic
                p.copy_(torch.where(z.abs() <= l1, torch.zeros_like(w), w))
        return loss


class GroupFTRL(_FTRLBase):
    """Group-lasso FTRL over the rows of embedding tables: whole rows become exactly zero.

    A parameter is either a 2-D table ``(rows, D)`` or a flat buffer holding several tables one after
    the other (TorchRec's batched data-parallel tables); for the latter give ``layout``, the
    ``(rows, D)`` of each table in order, in the parameter's group.

    Args:
        params: parameters or parameter groups (a group may carry ``layout``).
        lr: the learning rate α.
        beta, l1, l2: β, the group-lasso strength λ1 (scaled by sqrt(D) per row) and λ2.
        initial_accumulator: starting value of ``n``.
        grad_scale: the gradient is multiplied by this before the update.

    Example:
        >>> table = torch.nn.Parameter(torch.ones(4, 2))
        >>> opt = GroupFTRL([table], lr=0.1, l1=1.0)
        >>> table.grad = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [0.0, 0.0]])
        >>> opt.step()
        >>> (table == 0).all(dim=1).tolist()  # row 1 shrunk to zero, rows 0 and 3 untouched
        [False, True, False, False]
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, beta: float = 1.0,
                 l1: float = 0.0, l2: float = 0.0, initial_accumulator: float = 0.1,
                 grad_scale: float = 1.0) -> None:
        super().__init__(params, lr, beta, l1, l2, initial_accumulator, grad_scale)

    @staticmethod
    def tables(p: torch.Tensor, layout: list[tuple[int, int]] | None) -> list[torch.Tensor]:
        """2-D views of the tables held by ``p``."""
        if layout is None:
            if p.dim() != 2:
                raise ValueError(f"GroupFTRL needs 2-D tables or a layout, got shape "
                                 f"{tuple(p.shape)}")
            return [p]
        total = sum(r * d for r, d in layout)
        if p.numel() != total:
            raise ValueError(f"layout {layout} holds {total} values, the parameter has "
                             f"{p.numel()}")
        flat, views, start = p.view(-1), [], 0
        for rows, dim in layout:
            views.append(flat[start:start + rows * dim].view(rows, dim))
            start += rows * dim
        return views

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            layout = group.get("layout")
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
                n, z = self._state(p, group["initial_accumulator"])
                for w, g, n_t, z_t in zip(self.tables(p, layout), self.tables(grad, layout),
                                          self.tables(n, layout), self.tables(z, layout),
                                          strict=True):
                    self._update_rows(w, g * group["grad_scale"], n_t, z_t, group)
        return loss

    def _update_rows(self, w: torch.Tensor, g: torch.Tensor, n: torch.Tensor, z: torch.Tensor,
                     group: dict[str, Any]) -> None:
        rows = (g != 0).any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        group_ftrl_rows(w, n, z, rows, g[rows], lr=group["lr"], beta=group["beta"],
                        l1=group["l1"], l2=group["l2"])


@torch.no_grad()
def group_ftrl_rows(w: torch.Tensor, n: torch.Tensor, z: torch.Tensor, rows: torch.Tensor,
                    g: torch.Tensor, *, lr: float, beta: float, l1: float, l2: float) -> None:
    """One group-lasso FTRL step on ``rows`` of a table, in place: the update of :class:`GroupFTRL`
    given each touched row's whole (summed) gradient, so that callers which know the touched rows
    (the sharded tables' backward, recsys.train.sharded_ftrl) skip the scan of a dense gradient.

    Args:
        w, n, z: the table ``(rows, D)`` and its FTRL state, same shape (w may be half precision:
            the update runs in n's dtype and is cast back).
        rows: ``(U,)`` distinct row indices.
        g: ``(U, D)`` the gradient of each of those rows (already scaled).

    Example:
        >>> w, n, z = torch.ones(3, 2), torch.full((3, 2), 0.1), torch.zeros(3, 2)
        >>> group_ftrl_rows(w, n, z, torch.tensor([1]), torch.tensor([[0.1, 0.0]]),
        ...                 lr=0.1, beta=1.0, l1=1.0, l2=0.0)
        >>> (w == 0).all(dim=1).tolist()
        [False, True, False]
    """
    # index_select / index_copy_: a row gather with a tensor index (w[rows]) is 3-4x slower on
    # the CPU, and a step touches tens of thousands of rows
    w_r = w.index_select(0, rows).to(n.dtype)
    n_r, z_r = n.index_select(0, rows), z.index_select(0, rows)
    g = g.to(n.dtype)
    sqrt_n = _FTRLBase._accumulate(w_r, g, n_r, z_r, lr)
    threshold = l1 * math.sqrt(w.shape[1])
    norm = z_r.norm(dim=1, keepdim=True)
    shrink = threshold / norm.clamp_min(torch.finfo(norm.dtype).tiny) - 1.0
    new_w = z_r * shrink / ((beta + sqrt_n) / lr + l2)
    new_w = torch.where(norm <= threshold, torch.zeros_like(new_w), new_w)
    w.index_copy_(0, rows, new_w.to(w.dtype))
    n.index_copy_(0, rows, n_r)
    z.index_copy_(0, rows, z_r)


def zero_fraction(tensors: Iterable[torch.Tensor]) -> float:
    """The fraction of weights that are exactly zero."""
    zeros = total = 0
    for t in tensors:
        zeros += int((t == 0).sum())
        total += t.numel()
    return zeros / total if total else 0.0


def zero_row_fraction(tables: Iterable[torch.Tensor]) -> float:
    """The fraction of embedding rows that are exactly zero (the feature sparse ratio)."""
    zeros = total = 0
    for t in tables:
        zeros += int((t == 0).all(dim=1).sum())
        total += t.shape[0]
    return zeros / total if total else 0.0
