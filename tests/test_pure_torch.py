"""The pure-torch layers (issue 14, item 3): ``recsys.modules``, ``recsys.losses`` and
``recsys.quantization.rvq`` import nothing but torch, numpy and the standard library.

A fresh interpreter blocks torchrec, fbgemm_gpu, pydantic and pyarrow (any import of them, or of a
submodule, raises ImportError), imports every module of those packages, and runs a forward and a
backward pass of every layer and loss on small random inputs, checking that the gradients are
finite. It fails if one of the blocked packages was imported anyway, if any import of one was
attempted from recsys code (even one that a ``try`` swallowed), or if the subprocess fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import import_blocker

REPO = Path(__file__).resolve().parents[1]

SCRIPT = import_blocker("the pure-torch layers must not import it") + r'''
import importlib
import pkgutil

import torch  # noqa: E402

import recsys  # noqa: E402
import recsys.losses  # noqa: E402
import recsys.modules  # noqa: E402

names = ["recsys.quantization.rvq"]
for pkg in (recsys.modules, recsys.losses):
    names += [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
for name in names:
    importlib.import_module(name)
print("imported:", ", ".join(sorted(names)))

from recsys.losses import cascade, hierarchical, listwise, pointwise  # noqa: E402
from recsys.modules.cross import CrossNet  # noqa: E402
from recsys.modules.dynint import ACTIVATION_MODES, PARAMETER_MODES, DynamicPIN  # noqa: E402
from recsys.modules.mlp import MLP  # noqa: E402
from recsys.modules.moe import AdaEnsemble  # noqa: E402
from recsys.modules.moe_experts import EXPERTS  # noqa: E402
from recsys.modules.pin import PolynomialInteractionNetwork, XDeepIntReadout  # noqa: E402
from recsys.modules.ranktower import DSSMNet, RankTowerNet  # noqa: E402
from recsys.quantization import rvq  # noqa: E402

torch.manual_seed(0)
B, M, D = 6, 3, 8
checked = []


def check(name, module, *inputs, loss=None):
    """Forward on fresh leaf copies of ``inputs``, backward, finite gradients everywhere."""
    leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = module(*leaves)
    value = loss(out) if loss is not None else out.pow(2).sum()
    assert torch.isfinite(value).all(), name
    value.backward()
    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
    grads = [x.grad for x in leaves if x.requires_grad] + [p.grad for p in params]
    grads = [g for g in grads if g is not None]
    assert grads, f"{name}: no gradient at all"
    assert all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradient"
    checked.append(name)


x_fields = torch.randn(B, M, D)
check("MLP", MLP(M * D, [16, 4], dropout=0.1).train(), x_fields.flatten(1))
check("CrossNet", CrossNet(M * D, 2), x_fields.flatten(1))
check("CrossNet low rank", CrossNet(M * D, 2, low_rank=3), x_fields.flatten(1))
for residual in (True, False):
    for heads in (1, 2):
        pin = PolynomialInteractionNetwork(M, D, num_layers=2, subspaces=2, residual=residual,
                                           activation="tanh", dropout=0.1, heads=heads).train()
        readout = XDeepIntReadout(pin.out_fields, 2)
        check(f"PIN residual={residual} heads={heads}", torch.nn.Sequential(pin, readout),
              x_fields)
for a in ACTIVATION_MODES:
    for p in PARAMETER_MODES:
        dyn = DynamicPIN(M, D, num_layers=2, subspaces=2, dropout=0.1, activation_mode=a,
                         parameter_mode=p, rank=2, num_basis=3, stop_gradient_gate=a == "A2")
        check(f"DynamicPIN {a} {p}", dyn.train(), x_fields)
moe = AdaEnsemble(M, D, num_outputs=2, experts=EXPERTS, top_k=2, anneal_steps=3).train()
check("AdaEnsemble", moe, x_fields, loss=lambda out: out[0].pow(2).sum() + out[1])
moe.eval()
check("AdaEnsemble eval", moe, x_fields, loss=lambda out: out[0].pow(2).sum() + out[1])
u, v = torch.randn(B, M, D), torch.randn(B, 2, D)
for late in (False, True):
    net = RankTowerNet(M, 2, D, heads=2, head_dim=4, hidden=(16,), late_interaction=late)
    check(f"RankTowerNet late={late}", net, u, v)
    cached = net.score_candidates(net.user_tower(u[:1]), net.item_tower(v))
    assert cached.shape == (B,) and torch.isfinite(cached).all()
check("DSSMNet", DSSMNet(M, 2, D, hidden=[16], out_dim=4), u, v)

# ResidualVQ: no gradient flows through the codes (inputs are detached), so the checks are the
# k-means initialisation, one EMA step and the encodings
vq = rvq.ResidualVQ(D, levels=2, codes=4, kmeans_init_batches=1, distributed=False)
emb = torch.randn(64, D, requires_grad=True)
vq.update(emb)
assert vq.is_initialized
out = vq.update(emb)  # an EMA step
q = vq.quantize(emb)
assert q.codes.shape == (64, 2) and not q.reconstruction.requires_grad
assert torch.isfinite(vq.codebooks).all() and torch.isfinite(q.reconstruction).all()
ids = vq.prefix_ids(q.codes)
assert int(ids.max()) < rvq.num_nodes(2, 4) == vq.num_nodes
assert torch.isfinite(rvq.code_perplexity(q.codes, 4)).all()
fitted = rvq.fit_offline(torch.randn(200, D), iters=1, batch_size=50, levels=2, codes=4)
assert fitted.encode(torch.randn(3, D)).shape == (3, 2)
checked.append("ResidualVQ")

# losses: logits (B,), labels, request ids, stages, teacher scores (NaN where absent)
n = 12
logits = torch.randn(n)
click = (torch.rand(n) < 0.4).float()
click[0], click[1] = 1.0, 0.0
request = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
stage = torch.tensor([4, 3, 1, 0, 5, 3, 2, 0, 4, 3, 3, 1])
teacher = torch.where(stage >= int(cascade.Stage.PRERANKED), torch.randn(n),
                      torch.full((n,), float("nan")))
codes = torch.stack([request, request * 2 + (torch.arange(n) % 2)], dim=1)


def check_loss(name, fn):
    s = logits.clone().requires_grad_(True)
    value = fn(s)
    assert torch.isfinite(value), name
    value.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all(), name
    checked.append(name)


check_loss("bce", lambda s: pointwise.bce(s, click))
check_loss("esmm_bce", lambda s: pointwise.esmm_bce(s, s.flip(0), click))
check_loss("in_batch_listwise_loss", lambda s: listwise.in_batch_listwise_loss(s, click).loss)
check_loss("segment_listwise_loss",
           lambda s: listwise.segment_listwise_loss(s, click, request, 0.5).loss)
check_loss("level_listwise_losses",
           lambda s: listwise.level_listwise_losses(s, click, [codes[:, 0], codes[:, 1]]).loss.sum())
check_loss("hierarchical_listwise_loss", lambda s: hierarchical.hierarchical_listwise_loss(
    *hierarchical.gather_for_groups(s, click, codes), include_level0=True).loss)
check_loss("fine_grained_loss", lambda s: cascade.fine_grained_loss(s, click, request, stage))
check_loss("coarse_grained_loss", lambda s: cascade.coarse_grained_loss(s, stage, request))
for method in cascade.DISTILLATIONS:
    check_loss(f"distillation_loss {method}",
               lambda s, m=method: cascade.distillation_loss(s, teacher, request, 0.7, m))
    check_loss(f"cascade_loss {method}", lambda s, m=method: cascade.cascade_loss(
        s, click, request, stage, teacher, distill_weight=0.5, fine_weight=2.0,
        coarse_weight=0.25, distill_temperature=1.5, distill=m)[0])

leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, f"blocked packages were imported: {leaked}"
assert not attempts, f"recsys code tried to import blocked packages: {attempts}"
print("checked:", ", ".join(checked))
print("PURE-TORCH OK")
'''


def test_layers_and_losses_need_only_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert "PURE-TORCH OK" in proc.stdout, report
    for name in ("recsys.modules.pin", "recsys.modules.dynint", "recsys.modules.moe",
                 "recsys.modules.ranktower", "recsys.losses.cascade", "recsys.quantization.rvq"):
        assert name in proc.stdout, report
    for name in ("DynamicPIN A3 B4", "AdaEnsemble", "RankTowerNet", "ResidualVQ",
                 "cascade_loss softsort", "hierarchical_listwise_loss"):
        assert name in proc.stdout, report
