"""DynInt's field-mix recursion in one autograd node, for the modes whose layers are scalings of a
static mix (docs/methods.md section 2):

``x_l = x_{l-1} ⊙ (1 + s_l ⊙ ((c_l ⊙ X0) W_l))``,  ``l = 1..L``,  ``x_0 = X0``

with ``c_l`` (B1's column scale ``c``) and ``s_l`` (B1's row scale ``r`` times A1's gate ``G``) one
value per row and field, or absent (= 1). That covers the static recursion, A1, B1 and A1 + B1
(the default) with a linear φ.

Why hand-written: on these shapes ``(B, d, M)`` with a short ``d``, each layer is a few
memory-bound passes, and autograd's generic formulas add passes a hand-written backward does not
need: ``addcmul``'s backward multiplies each factor by its scalar ``value`` (two full passes),
broadcast products reduce through extra temporaries, and ``X0``'s gradient is summed over the
layers out of place. :class:`FieldMixStack` saves, per layer, ``x_{l-1}``, ``v = (c ⊙ X0) W`` and
``a = s ⊙ v``, recomputes ``c ⊙ X0`` in the backward, and accumulates ``X0``'s gradient in place:
about a third fewer passes over ``(B, d, M)`` per layer, forward and backward, with the same
result (``tests/test_dynint.py`` compares values and gradients with the autograd path).

Tensors are fields-last, ``(B, d, M)``: a field mix is one matrix product over ``B·d`` rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def mix_stack(x0: torch.Tensor, weights: Sequence[torch.Tensor],
              cols: Sequence[torch.Tensor | None], rows: Sequence[torch.Tensor | None],
              saved: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``x_L`` of the recursion (no autograd graph of its own). ``x0``: ``(B, d, M)``; ``weights``:
    ``(M, M)`` each, ``(in, out)``; ``cols`` / ``rows``: ``(B, M)`` or None. With ``saved``,
    appends ``x_{l-1}, v_l, a_l`` of each layer (what the backward needs).

    Example:
        >>> x0 = torch.randn(2, 4, 3)
        >>> out = mix_stack(x0, [torch.eye(3)], [None], [None])
        >>> torch.allclose(out, x0 * (1 + x0))
        True
    """
    x = x0
    for w, c, s in zip(weights, cols, rows, strict=True):
        u = x0 if c is None else x0 * c.unsqueeze(1)
        v = torch.matmul(u, w)
        a = v if s is None else v * s.unsqueeze(1)
        if saved is not None:
            saved.extend((x, v, a))
        x = torch.addcmul(x, x, a)
    return x


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if a.dtype == dtype and b.dtype == dtype:
        return torch.matmul(a, b)
    return torch.matmul(a.to(dtype), b.to(dtype))


class FieldMixStack(torch.autograd.Function):
    """:func:`mix_stack` with a hand-written backward. ``apply(x0, num_layers, W_1, c_1, s_1, W_2,
    ...)``; ``c_l`` / ``s_l`` may be None.

    Example:
        >>> x0 = torch.randn(2, 4, 3, requires_grad=True)
        >>> w = torch.randn(3, 3, requires_grad=True)
        >>> FieldMixStack.apply(x0, 1, w, None, None).sum().backward()
        >>> x0.grad.shape, w.grad.shape
        (torch.Size([2, 4, 3]), torch.Size([3, 3]))
    """

    @staticmethod
    def forward(ctx: Any, x0: torch.Tensor, num_layers: int,
                *per_layer: torch.Tensor | None) -> torch.Tensor:
        weights, cols, rows = per_layer[0::3], per_layer[1::3], per_layer[2::3]
        saved: list[torch.Tensor] = []
        out = mix_stack(x0, weights, cols, rows, saved)  # type: ignore[arg-type]
        ctx.num_layers = num_layers
        ctx.save_for_backward(x0, *per_layer, *saved)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        layers = ctx.num_layers
        tensors = ctx.saved_tensors
        x0, per_layer, saved = tensors[0], tensors[1:1 + 3 * layers], tensors[1 + 3 * layers:]
        fields = x0.shape[-1]
        grads: list[torch.Tensor | None] = [None] * (3 * layers)
        # the gradient arrives in the caller's layout (a transpose of the output's, when the
        # caller transposes back to fields-second): one copy here, not one per product below
        gy = grad.contiguous()
        gx0: torch.Tensor | None = None
        for layer in reversed(range(layers)):
            w, c, s = per_layer[3 * layer:3 * layer + 3]
            x_prev, v, a = saved[3 * layer:3 * layer + 3]
            ga = gy * x_prev                       # d loss / d a_l
            gy = torch.addcmul(gy, gy, a)          # d loss / d x_{l-1} = gy ⊙ (1 + a_l)
            if s is not None:
                grads[3 * layer + 2] = (ga * v).sum(dim=1).to(s.dtype)
                ga.mul_(s.unsqueeze(1))            # now d loss / d v_l
            u = x0 if c is None else x0 * c.unsqueeze(1)
            # the products in the forward's precision (lower under autocast, like autograd's)
            grads[3 * layer] = _mm(u.reshape(-1, fields).t(), ga.reshape(-1, fields),
                                   v.dtype).to(w.dtype)
            gu = _mm(ga, w.t(), v.dtype).to(ga.dtype)  # d loss / d (c ⊙ X0)
            if c is None:
                gx0 = gu if gx0 is None else gx0.add_(gu)
            else:
                grads[3 * layer + 1] = (gu * x0).sum(dim=1).to(c.dtype)
                if gx0 is None:
                    gx0 = gu.mul_(c.unsqueeze(1))
                else:
                    gx0.addcmul_(gu, c.unsqueeze(1))
        assert gx0 is not None  # num_layers >= 1
        gx0.add_(gy)  # x_0 = X0: the recursion's own start
        return (gx0.to(x0.dtype), None, *grads)
