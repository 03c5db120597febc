"""AdaEnsemble's static dispatch (the "auto" choice on an accelerator) never waits for the host:
no aten op of its forward or backward needs a value on the host (recorded with a dispatch mode on
the CPU, a check that itself catches the syncing ops), and on CUDA nothing raises under
``torch.cuda.set_sync_debug_mode("error")``. The models and sizes are test_moe.py's."""

from __future__ import annotations

import pytest
import torch
from test_moe import D, M, model
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose result shape depends on the data, or that read a value back to the host: each is a
# device sync on a GPU
SYNCING_OPS = ("aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::masked_select",
               "aten::is_nonzero", "aten::equal", "aten::allclose", "aten::masked_scatter",
               "aten::_unique", "aten::unique", "aten::_unique2", "aten::unique_dim",
               "aten::unique_consecutive", "aten::unique_dim_consecutive")


class _AtenOps(TorchDispatchMode):
    """Records the aten ops that run inside (forward, and backward on the CPU autograd thread), and
    which of them sync: the ones above, ``repeat_interleave`` with tensor repeats and indexing
    with a boolean mask."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.syncing: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()  # "aten::packet.overload"
        packet = name.split(".")[0]
        self.ops.add(packet)
        indices = [i for a in args if isinstance(a, (list, tuple)) for i in a
                   if isinstance(i, torch.Tensor)]
        if packet in SYNCING_OPS or packet.startswith("aten::unique"):
            self.syncing.append(name)
        elif name in ("aten::repeat_interleave.Tensor", "aten::repeat_interleave.self_Tensor"):
            self.syncing.append(name)  # tensor repeats: the output length is data
        elif packet in ("aten::index", "aten::_unsafe_index", "aten::index_put",
                        "aten::_index_put_impl", "aten::index_put_") and any(
                i.dtype == torch.bool for i in indices):
            self.syncing.append(name + " (bool mask)")
        return func(*args, **(kwargs or {}))


def test_sync_op_recorder_catches_the_syncing_ops() -> None:
    x = torch.randn(6, 3)
    with _AtenOps() as rec:
        rows = (x[:, 0] > 0).nonzero()
        _ = x[x[:, 1] > 0], x.sum().item(), torch.unique(rows), bool(x.sum() > 0)
        _ = torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]))
    for op in ("aten::nonzero", "aten::_local_scalar_dense", "aten::index.Tensor (bool mask)",
               "aten::repeat_interleave.Tensor"):
        assert any(s.startswith(op) for s in rec.syncing), (op, rec.syncing)
    assert any("unique" in s for s in rec.syncing)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("forced", [-1, 1])
def test_forward_and_backward_never_sync(weighted: bool, forced: int) -> None:
    """The static dispatch, the one "auto" runs on CUDA (and any accelerator): in training
    (annealing k, learned or forced exit, router noise) and eval, no op of forward and backward
    needs a value on the host. (The gather dispatch, "auto" on the CPU, fails by design: nonzero
    per depth, the expert counts read on the host.)"""
    net = model(seed=13, weight_by_gates=weighted, anneal_steps=5, dispatch="static")
    net.force_exit_depth(forced)
    x = torch.randn(16, M, D, requires_grad=True)
    with _AtenOps() as rec:
        for _ in range(2):
            logits, aux = net.train()(x)
            (logits.sum() + aux).backward()
        with torch.no_grad():
            net.eval()(x)
    assert not rec.syncing, sorted(set(rec.syncing))
    # the recorder saw forward (sort: the annealed ranks) and backward
    assert {"aten::sort", "aten::addmm", "aten::threshold_backward"} <= rec.ops
    assert int(net.step) == 2
    with _AtenOps() as rec:  # the recorder catches the gather dispatch
        model(seed=13, dispatch="gather")(x)
    assert "aten::nonzero" in rec.syncing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("weighted", [False, True])
def test_no_sync_on_cuda(weighted: bool) -> None:
    """CUDA's own check: any host-device sync inside ``set_sync_debug_mode("error")`` raises. The
    default dispatch ("auto") is static on CUDA."""
    net = model(seed=14, weight_by_gates=weighted, anneal_steps=5).cuda()
    x = torch.randn(64, M, D, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for forced in (-1, 2):
            net.force_exit_depth(forced)
            logits, aux = net.train()(x)
            (logits.sum() + aux).backward()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits, aux = net(x)
            (logits.float().sum() + aux).backward()
            with torch.no_grad():
                net.eval()(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(net.step) == 4 and torch.isfinite(x.grad).all()


@pytest.mark.slow
def test_static_dispatch_compiles_to_one_graph() -> None:
    """The static dispatch traces as one graph (``torch.compile(fullgraph=True)`` raises at any
    graph break) in training, with annealing k, router noise and a forced exit, also under bf16
    autocast, and in eval; and
    the compiled steps equal eager ones, logits, router losses, every gradient and the routing
    counters (noise off, so that both sides route alike). aot_eager: the trace and autograd
    split that a GPU compile uses, without needing a C++ compiler."""
    torch._dynamo.reset()
    x = torch.randn(24, M, D)
    try:
        noisy = torch.compile(model(seed=15, anneal_steps=5, dispatch="static"),
                              backend="aot_eager", fullgraph=True)
        noisy.force_exit_depth(1)
        logits, aux = noisy.train()(x)
        (logits.sum() + aux).backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as a bf16 run would (CUDA's too)
            logits, aux = noisy(x)
        (logits.float().sum() + aux).backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in noisy.parameters())

        eager, twin = (model(seed=16, anneal_steps=3, noise_eps=0.0, dispatch="static")
                       for _ in range(2))
        compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
        outs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"eager": [], "compiled": []}
        for name, net in (("eager", eager), ("compiled", compiled)):
            for _ in range(4):  # k anneals 5 -> 3 over these steps
                net.zero_grad()
                logits, aux = net.train()(x)
                (logits.square().sum() + aux).backward()
                outs[name].append((logits.detach(), aux.detach()))
            with torch.no_grad():
                outs[name].append((net.eval()(x)[0], torch.zeros(())))
        for (a, b), (c, d) in zip(outs["eager"], outs["compiled"], strict=True):
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(d, b, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(eager.named_parameters(), twin.parameters(), strict=True):
            assert p.grad is not None and q.grad is not None, name
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        for name, buf in eager.named_buffers():
            torch.testing.assert_close(twin.get_buffer(name), buf, msg=name)
        assert int(twin.step) == 4 and int(twin.rows_computed.sum()) > 0
    finally:
        torch._dynamo.reset()
