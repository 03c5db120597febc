"""The five heterogeneous experts of AdaEnsemble (docs/methods.md section 3), each mapping
``(x_l (B, n), x0 (B, n)) -> (B, n)``, and :func:`build_expert`; the routing, dispatch and
early-exit stack that combine them are in :mod:`recsys.modules.moe`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# the expert kinds, in the reference's order (the default router order)
EXPERTS = ("gated_dense", "cross", "pin", "cnn", "attention")

REDUCTION = 16  # hidden width of routers and gates = n // 16, as in the reference



class GatedDenseExpert(nn.Module):
    """``relu(W x_l + b) ⊙ 2·sigmoid(Dense(relu(Dense_{n/16}(x0))))``.

    The gate is 1 at a zero pre-activation, so an untrained gate leaves the dense output unscaled.

    Example:
        >>> GatedDenseExpert(32)(torch.randn(4, 32), torch.randn(4, 32)).shape
        torch.Size([4, 32])
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.uses_x0 = True  # reads x0: the gather dispatch selects its rows too
        hidden = max(1, width // REDUCTION)
        self.dense = nn.Linear(width, width)
        self.gate = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.dense(x)) * (2.0 * torch.sigmoid(self.gate(x0)))


class CrossExpert(nn.Module):
    """DCN-v2 cross without the skip (the SparseMoE residual adds it): ``x0 ⊙ (W x_l + b)``.

    Example:
        >>> CrossExpert(32)(torch.randn(4, 32), torch.randn(4, 32)).shape
        torch.Size([4, 32])
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.uses_x0 = True  # reads x0: the gather dispatch selects its rows too
        self.dense = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return x0 * self.dense(x)


class PolynomialExpert(nn.Module):
    """PIN layer (xDeepInt) without the skip: ``x_l ⊙ (W x0)``, no bias.

    Example:
        >>> PolynomialExpert(32)(torch.randn(4, 32), torch.randn(4, 32)).shape
        torch.Size([4, 32])
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.uses_x0 = True  # reads x0: the gather dispatch selects its rows too
        self.dense = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return x * self.dense(x0)


class CNN1DExpert(nn.Module):
    """Dense to P = m/2 positions -> Conv1D(16 filters, kernel 4, 'valid' as Keras' default) ->
    MaxPool(2, floor) -> flatten -> dense back to n; linear throughout, as in the reference. Uses x_l
    only.

    Tiny sizes: kernel min(4, P) and pool min(2, conv length) keep at least one output position.
    For m=38 this is the reference's 608 -> 19 -> (16 filters, 16) -> (16, 8) -> 128 -> 608.

    The one-channel convolution runs as a matmul of the (B, length, kernel) sliding windows with the
    filters and the pooling as a max over a reshape, channels last: ``conv1d`` / ``max_pool1d`` on
    such tiny shapes cost more than the rest of the expert. ``out`` keeps its (filters, positions)
    input order; its weight is permuted to channels last at forward time.

    Example:
        >>> CNN1DExpert(num_fields=8, width=32)(torch.randn(4, 32), torch.randn(4, 32)).shape
        torch.Size([4, 32])
    """

    def __init__(self, num_fields: int, width: int, filters: int = 16, kernel_size: int = 4,
                 pool_size: int = 2) -> None:
        super().__init__()
        self.uses_x0 = False  # reads x_l only: the gather dispatch skips gathering its x0 rows
        positions = max(1, num_fields // 2)
        self.kernel = min(kernel_size, positions)
        length = positions - self.kernel + 1
        self.pool = min(pool_size, length)
        self.pooled = length // self.pool
        self.filters = filters
        self.squeeze = nn.Linear(width, positions)
        self.conv = nn.Conv1d(1, filters, self.kernel)
        self.out = nn.Linear(filters * self.pooled, width)

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        windows = self.squeeze(x).unfold(1, self.kernel, 1)  # (B, length, kernel)
        h = F.linear(windows, self.conv.weight.squeeze(1), self.conv.bias)  # (B, length, filters)
        h = h[:, :self.pooled * self.pool].reshape(b, self.pooled, self.pool, self.filters)
        h = torch.max(h, dim=2)[0]  # (B, pooled, filters); floor pooling drops the tail
        weight = self.out.weight.view(-1, self.filters, self.pooled).transpose(1, 2)
        return F.linear(h.flatten(1), weight.flatten(1), self.out.bias)


ATTENTION_CHUNK = 256  # (row, head) pairs per chunk of _ChunkedAttention: ~190 KB of weights


def _attention(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
    """``(softmax(q kᵀ) v)ᵀ`` from ``qt``, ``kt``, ``vt`` (N, head_dim, m), q pre-scaled: (N, head_dim,
    m), on the whole batch at once.

    The result is the transposed view of ``att @ vᵀ`` (N, m, head_dim): written so, the gradient
    that reaches the softmax is contiguous, where ``v @ attᵀ`` gave it transposed and softmax's
    backward copied all (N, m, m) of it first (one pass over the largest tensor of the expert)."""
    att = torch.softmax(torch.bmm(qt.transpose(1, 2), kt), dim=-1)  # (N, m, m)
    return torch.bmm(att, vt.transpose(1, 2)).transpose(1, 2)


class _ChunkedAttention(torch.autograd.Function):
    """``softmax(qᵀ k) vᵀ`` per (row, head), transposed layout, in chunks that stay in cache (CPU).

    Inputs ``qt``, ``kt``, ``vt`` (N, head_dim, m), q pre-scaled; output ``(att @ v)ᵀ`` (N, head_dim,
    m). The same products as the plain code, but every (chunk, m, m) intermediate is produced and
    consumed while in cache and every bmm has 2 rows or contracts over 2 (the head dim; MKL is
    slow at 2 output columns), which halves the attention's time on the CPU. Backward reads the
    weights kept by forward (not differentiable twice).
    """

    @staticmethod
    def forward(ctx: Any, qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
        n, _, m = qt.shape
        ot = torch.empty_like(vt)
        att = torch.empty(n, m, m, dtype=qt.dtype, device=qt.device)
        scores = torch.empty(min(n, ATTENTION_CHUNK), m, m, dtype=qt.dtype, device=qt.device)
        for s in range(0, n, ATTENTION_CHUNK):
            e = min(s + ATTENTION_CHUNK, n)
            a = att[s:e]
            torch.bmm(qt[s:e].transpose(1, 2), kt[s:e], out=scores[:e - s])
            torch._softmax(scores[:e - s], -1, False, out=a)  # not in place: that is 2x slower
            torch.bmm(vt[s:e], a.transpose(1, 2), out=ot[s:e])
        ctx.save_for_backward(qt, kt, vt, att)
        return ot

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qt, kt, vt, att = ctx.saved_tensors
        dot = dot.contiguous()
        dqt, dkt, dvt = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        for s in range(0, qt.shape[0], ATTENTION_CHUNK):
            e = min(s + ATTENTION_CHUNK, qt.shape[0])
            a = att[s:e]
            torch.bmm(dot[s:e], a, out=dvt[s:e])
            da = torch.bmm(dot[s:e].transpose(1, 2), vt[s:e])
            ds = torch._softmax_backward_data(da, a, -1, a.dtype)
            torch.bmm(kt[s:e], ds.transpose(1, 2), out=dqt[s:e])
            torch.bmm(qt[s:e], ds, out=dkt[s:e])
        return dqt, dkt, dvt


class AttentionExpert(nn.Module):
    """Multi-head self-attention over the m fields -> instance norm -> dense back to n. Uses x_l only.

    As in the reference: Q, K, V and the output projection are Dense(hidden) + GELU, ``hidden`` is
    the total width split over the heads (8 over 4 heads = 2 per head), scaled dot-product, no
    residual; instance norm normalises each of the ``hidden`` channels over the fields (affine,
    eps 1e-3 as tfa's InstanceNormalization), written out so that one field works in training.

    Speed: Q, K and V are one matmul (their weights concatenated at forward time) and one GELU, and
    the 1/√head_dim scale multiplies q (B·m·hidden values) rather than the scores (B·heads·m²).
    Q, K and V are laid out transposed, (B·heads, head_dim, m), so that each attention bmm has 2
    rows or contracts over 2, never 2 output columns (slow in MKL). On the CPU in eager mode,
    :class:`_ChunkedAttention` computes the attention in cache-sized chunks (in fp32, also under
    autocast); elsewhere (CUDA, TorchScript, torch.compile) the same products run on the whole batch.

    Example:
        >>> AttentionExpert(num_fields=8, dim=4)(torch.randn(2, 32), torch.randn(2, 32)).shape
        torch.Size([2, 32])
    """

    def __init__(self, num_fields: int, dim: int, heads: int = 4, hidden: int = 8,
                 eps: float = 1e-3) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.uses_x0 = False  # reads x_l only: the gather dispatch skips gathering its x0 rows
        self.num_fields = num_fields
        self.dim = dim
        self.heads = heads
        self.hidden = hidden
        self.head_dim = hidden // heads
        self.eps = eps
        self.query = nn.Linear(dim, hidden)
        self.key = nn.Linear(dim, hidden)
        self.value = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm_weight = nn.Parameter(torch.ones(hidden))
        self.norm_bias = nn.Parameter(torch.zeros(hidden))
        self.out = nn.Linear(num_fields * hidden, num_fields * dim)

    @torch.jit.unused
    def _eager_attention(self, qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
        # the chunks are eager mode's way to stay in cache; a compiled graph fuses on its own (and
        # AOT autograd mis-types the chunked backward under CPU autocast)
        if qt.device.type == "cpu" and not torch.compiler.is_compiling():
            if torch.is_autocast_enabled("cpu"):
                # the chunked kernel in fp32 beats the whole-batch products in bf16 on CPU
                with torch.autocast("cpu", enabled=False):
                    return _ChunkedAttention.apply(qt.float(), kt.float(), vt.float())
            return _ChunkedAttention.apply(qt, kt, vt)
        return _attention(qt, kt, vt)

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        b, m = x.shape[0], self.num_fields
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.gelu(F.linear(x.view(b, m, self.dim), weight, bias))  # (B, m, 3·hidden)
        # (3, B·heads, head_dim, m): one copy
        t = qkv.view(b, m, 3, self.heads, self.head_dim).permute(2, 0, 3, 4, 1)
        # unbind, not t[0], t[1], t[2]: in backward, one stack of the three gradients instead of
        # three zero-filled (3, B·heads, head_dim, m) tensors added together
        qt, kt, vt = t.reshape(3, b * self.heads, self.head_dim, m).unbind(0)
        qt = qt * (1.0 / math.sqrt(self.head_dim))
        if torch.jit.is_scripting():
            ot = _attention(qt, kt, vt)
        else:
            ot = self._eager_attention(qt, kt, vt)
        # (B·heads, head_dim, m) -> (B, m, heads·head_dim): one copy, whichever layout ot has
        h = ot.transpose(1, 2).reshape(b, self.heads, m, self.head_dim).transpose(1, 2)
        h = F.gelu(self.proj(h.reshape(b, m, self.hidden)))
        centred = h - h.mean(dim=1, keepdim=True)
        var = centred.square().mean(dim=1, keepdim=True)
        h = centred * torch.rsqrt(var + self.eps) * self.norm_weight + self.norm_bias
        return self.out(h.flatten(1))


def _check_experts(experts: Sequence[str]) -> list[str]:
    """The expert names as plain strings; a ValueError names an unknown one and the known ones."""
    if isinstance(experts, str):  # a lone name would otherwise be split into letters
        experts = [experts]
    out = []
    for kind in experts:
        if not isinstance(kind, str) or kind not in EXPERTS:
            raise ValueError(f"unknown expert {kind!r}; expected one of: {', '.join(EXPERTS)}")
        out.append(str(kind))  # a StrEnum member becomes its value
    if not out:
        raise ValueError(f"experts must name at least one of: {', '.join(EXPERTS)}")
    return out



def build_expert(kind: str, num_fields: int, dim: int) -> nn.Module:
    """The expert of one kind (one of :data:`EXPERTS`) for m = num_fields fields of dim D.

    Example:
        >>> type(build_expert("cross", 4, 2)).__name__
        'CrossExpert'
    """
    width = num_fields * dim
    (kind,) = _check_experts([kind])
    if kind == "gated_dense":
        return GatedDenseExpert(width)
    if kind == "cross":
        return CrossExpert(width)
    if kind == "pin":
        return PolynomialExpert(width)
    if kind == "cnn":
        return CNN1DExpert(num_fields, width)
    return AttentionExpert(num_fields, dim)
