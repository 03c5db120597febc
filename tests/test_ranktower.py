"""RankTower modules and its cascade losses against numpy oracles, naive per-request loops, hand
arithmetic, the serving split (cached towers == joint forward) and TorchScript parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.data.schema import Stage
from recsys.losses.cascade import (
    COARSE_STAGES,
    DISTILLATIONS,
    cascade_loss,
    coarse_grained_loss,
    distillation_loss,
    fine_grained_loss,
    neuralsort,
    softsort,
)
from recsys.modules.ranktower import (
    DSSMNet,
    GatedCrossAttention,
    MultiHeadGatedTower,
    RankTowerNet,
    max_sim,
)

HEADS, HEAD_DIM, HIDDEN = 3, 5, (16, 8)
TOWER = {"heads": HEADS, "head_dim": HEAD_DIM, "hidden": HIDDEN}
M_U, M_I, D = 4, 3, 6


def _net(late: bool = False) -> RankTowerNet:
    torch.manual_seed(0)
    return RankTowerNet(M_U, M_I, D, **TOWER, late_interaction=late,
                        init_temperature=0.2).double().eval()


def _dssm() -> DSSMNet:
    torch.manual_seed(0)
    return DSSMNet(M_U, M_I, D, hidden=[16], out_dim=7).double().eval()


def _fields(b: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, M_U, D, generator=g, dtype=torch.float64),
            torch.randn(b, M_I, D, generator=g, dtype=torch.float64))


# ---- modules -------------------------------------------------------------------------------------


def _np_cos(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    un = u / np.linalg.norm(u, axis=-1, keepdims=True)
    vn = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return np.einsum("bid,bjd->bij", un, vn)


@pytest.mark.parametrize("late", [False, True])
def test_max_sim_matches_numpy(late: bool) -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    v = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    got = max_sim(u, v, torch.tensor(0.07, dtype=torch.float64), late)
    cos = _np_cos(u.numpy(), v.numpy())
    want = (cos.max(-1).sum(-1) if late else cos.reshape(5, -1).max(-1)) / 0.07
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_max_sim_hand_case() -> None:
    u = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    v = torch.tensor([[[1.0, 1.0], [0.0, -1.0]]])  # cos: [[.707, 0], [.707, -1]]
    assert float(max_sim(u, v, torch.tensor(0.5))) == pytest.approx(math.sqrt(0.5) / 0.5)
    assert float(max_sim(u, v, torch.tensor(0.5), True)) == pytest.approx(2 * math.sqrt(0.5) / 0.5)


def _np_attend(side: torch.nn.Module, q: np.ndarray, kv: np.ndarray) -> np.ndarray:
    w = {n: p.detach().numpy() for n, p in side.named_parameters()}
    d = q.shape[-1]
    a = np.einsum("bid,bjd->bij", q @ w["w_q.weight"].T, kv @ w["w_k.weight"].T) / math.sqrt(d)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ctx = a @ (kv @ w["w_v.weight"].T)
    gate_in = np.concatenate([q, ctx], -1) @ w["gate.weight"].T + w["gate.bias"]
    return q + ctx / (1 + np.exp(-gate_in))


def test_cross_attention_matches_numpy() -> None:
    torch.manual_seed(0)
    ca = GatedCrossAttention(5, heads=3).double()
    g = torch.Generator().manual_seed(2)
    u = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    v = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    u2, v2 = ca(u, v)
    assert u2.shape == v2.shape == (4, 3, 5)
    np.testing.assert_allclose(u2.detach().numpy(), _np_attend(ca.user_side, u.numpy(), v.numpy()),
                               rtol=1e-10, atol=1e-12)
    # the other direction has its own weights and reads the original U
    np.testing.assert_allclose(v2.detach().numpy(), _np_attend(ca.item_side, v.numpy(), u.numpy()),
                               rtol=1e-10, atol=1e-12)


def test_gated_tower_shapes_and_formula() -> None:
    torch.manual_seed(0)
    tower = MultiHeadGatedTower(M_U, D, **TOWER).double()
    u, _ = _fields(7)
    z = tower(u)
    assert z.shape == (7, HEADS, HEAD_DIM)
    x = u.flatten(1)
    for h, head in enumerate(tower.heads):
        want = head.mlp(x * 2 * torch.sigmoid(head.gate(x)))
        torch.testing.assert_close(z[:, h], want, rtol=0, atol=0)
    assert head.gate[0].out_features == HIDDEN[0]  # the gate: one hidden layer
    flat = MultiHeadGatedTower(2, 3, heads=2, head_dim=4, hidden=[])
    assert flat(torch.randn(5, 2, 3)).shape == (5, 2, 4)  # hidden=[]: plain linear heads


@pytest.mark.parametrize("late", [False, True])
def test_cached_towers_equal_joint_forward(late: bool) -> None:
    net = _net(late)
    u, v = _fields(9)
    with torch.no_grad():
        joint = net(u, v)
        user, items = net.user_tower(u), net.item_tower(v)  # the "item cache"
        assert user.shape == items.shape == (9, HEADS, HEAD_DIM) and joint.shape == (9,)
        torch.testing.assert_close(net.score(user, items), joint, rtol=0, atol=1e-6)
        # one user against all 9 cached items == the joint forward on 9 copies of that user
        for cand_user in (user[2], user[2:3]):
            got = net.score_candidates(cand_user, items)
            want = net(u[2:3].expand(9, -1, -1), v)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            # the items' user-free part computed once and cached: the same scores
            prepared = net.prepare_items(items)
            assert prepared.shape == (9, HEADS, 3 * HEAD_DIM)
            torch.testing.assert_close(net.score_candidates(cand_user, items, prepared), got,
                                       rtol=0, atol=1e-12)
        assert float(net.sim.temperature()) == pytest.approx(0.2)



def test_score_candidates_with_gradients_and_a_foreign_cache() -> None:
    """With autograd on, the scorer takes its copying path: the same scores, and gradients
    reach the user; a cache prepared for another layout is refused by name."""
    net = _net()
    u, v = _fields(9)
    user, items = net.user_tower(u), net.item_tower(v)
    with torch.no_grad():
        served = net.score_candidates(user[2], items)
    leaf = user[2].detach().requires_grad_()
    got = net.score_candidates(leaf, items.detach())
    torch.testing.assert_close(got, served, rtol=0, atol=1e-12)
    got.sum().backward()
    assert leaf.grad is not None and bool(leaf.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match=f"expects {3 * HEAD_DIM}"):
        net.score_candidates(user[2], items, torch.zeros(9, HEADS, 4 * HEAD_DIM,
                                                         dtype=torch.float64))

def test_dssm_cached_towers_equal_joint_forward() -> None:
    net = _dssm()
    u, v = _fields(9)
    with torch.no_grad():
        user, items = net.user_tower(u), net.item_tower(v)
        assert user.shape == items.shape == (9, 7)
        torch.testing.assert_close(user.norm(dim=-1), torch.ones(9, dtype=torch.float64))
        joint = net(u, v)
        torch.testing.assert_close(joint, (user * items).sum(-1) / net.temperature(),
                                   rtol=1e-12, atol=0)
        torch.testing.assert_close(net.score(user, items), joint, rtol=0, atol=1e-6)
        torch.testing.assert_close(net.score_candidates(user[4], items),
                                   net(u[4:5].expand(9, -1, -1), v), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [_net, lambda: _net(True), _dssm])
def test_torchscript_parity(make) -> None:  # noqa: ANN001
    net = make()
    scripted = torch.jit.script(net)
    u, v = _fields(6, seed=3)
    with torch.no_grad():
        for name in ("user_tower", "item_tower"):
            x = u if name == "user_tower" else v
            torch.testing.assert_close(getattr(scripted, name)(x), getattr(net, name)(x),
                                       rtol=0, atol=1e-12)
        user, items = net.user_tower(u), net.item_tower(v)
        torch.testing.assert_close(scripted.score(user, items), net.score(user, items),
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(scripted.score_candidates(user[0], items),
                                   net.score_candidates(user[0], items), rtol=0, atol=1e-12)
        prepared = scripted.prepare_items(items)
        torch.testing.assert_close(scripted.score_candidates(user[0], items, prepared),
                                   net.score_candidates(user[0], items), rtol=0, atol=1e-12)
        torch.testing.assert_close(scripted(u, v), net(u, v), rtol=0, atol=1e-12)


# ---- cascade batches and naive oracles ------------------------------------------------------------


def cascade_batch(seed: int) -> dict[str, torch.Tensor]:
    """Requests of varying sizes (shuffled rows, arbitrary ids) with every stage; request 555 never
    passed the pre-ranker (no teacher, no exposure), 777 has exposures but no click, 888 is a
    singleton, and 999 reached the ranker with one row only."""
    rng = np.random.default_rng(seed)
    scores, stage, request = [], [], []
    for rid, n in zip([-3, 10**9, 42, 7, 13, 21], rng.integers(4, 12, 6), strict=True):
        st = rng.choice([0, 1, 2, 3, 4, 5], size=n, p=[0.3, 0.2, 0.15, 0.15, 0.15, 0.05])
        stage.append(st)
        request.append(np.full(n, rid))
    stage += [np.zeros(5, int), np.array([0, 1, 3, 3]), np.array([4]), np.array([0, 0, 1])]
    request += [np.full(5, 555), np.full(4, 777), np.full(1, 888), np.full(3, 999)]
    stage_a, request_a = np.concatenate(stage), np.concatenate(request)
    b = len(stage_a)
    perm = rng.permutation(b)
    stage_a, request_a = stage_a[perm], request_a[perm]
    scores = rng.normal(size=b) * 2
    teacher = np.where(stage_a >= Stage.PRERANKED, rng.normal(size=b) * 2, np.nan)
    click = (stage_a >= Stage.CLICKED).astype(np.float64)
    return {"scores": torch.tensor(scores, requires_grad=True), "stage": torch.tensor(stage_a),
            "request": torch.tensor(request_a), "teacher": torch.tensor(teacher),
            "click": torch.tensor(click)}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def _ce(s: np.ndarray, y: np.ndarray, tau: float) -> float:
    return float(-(y / y.sum() * _log_softmax(s / tau)).sum())


def naive_fine(b: dict[str, np.ndarray], tau: float) -> float:
    losses = []
    for r in np.unique(b["request"]):
        idx = (b["request"] == r) & (b["stage"] >= Stage.EXPOSED)
        if idx.sum() >= 2 and b["click"][idx].sum() > 0:
            losses.append(_ce(b["scores"][idx], b["click"][idx], tau))
    return float(np.mean(losses)) if losses else 0.0


def naive_coarse(b: dict[str, np.ndarray], tau: float) -> float:
    per_stage = []
    for s in COARSE_STAGES:
        losses = []
        for r in np.unique(b["request"]):
            idx = b["request"] == r
            y = (b["stage"][idx] >= s).astype(float)
            if 0 < y.sum() < len(y):
                losses.append(_ce(b["scores"][idx], y, tau))
        if losses:
            per_stage.append(np.mean(losses))
    return float(np.mean(per_stage)) if per_stage else 0.0


def naive_kl(b: dict[str, np.ndarray], t: float) -> float:
    losses = []
    for r in np.unique(b["request"]):
        idx = (b["request"] == r) & ~np.isnan(b["teacher"])
        if idx.sum() >= 2:
            log_p, log_q = _log_softmax(b["teacher"][idx] / t), _log_softmax(b["scores"][idx] / t)
            losses.append(float((np.exp(log_p) * (log_p - log_q)).sum()))
    return float(np.mean(losses)) if losses else 0.0


def np_neuralsort(s: np.ndarray, tau: float) -> np.ndarray:
    """Straight from Grover et al. (2019), eq. (5), one unpadded list."""
    n = len(s)
    a_1 = np.abs(s[:, None] - s[None, :]).sum(1)
    rows = [((n + 1 - 2 * i) * s - a_1) / tau for i in range(1, n + 1)]
    return np.exp(np.array([_log_softmax(r) for r in rows]))


def np_softsort(s: np.ndarray, tau: float) -> np.ndarray:
    srt = np.sort(s)[::-1]
    return np.exp(np.array([_log_softmax(-np.abs(x - s) / tau) for x in srt]))


def naive_sort_distill(b: dict[str, np.ndarray], tau: float, relax) -> float:  # noqa: ANN001
    losses = []
    for r in np.unique(b["request"]):
        idx = (b["request"] == r) & ~np.isnan(b["teacher"])
        if idx.sum() >= 2:
            p_hat = relax(b["scores"][idx], tau)
            target = np.argsort(-b["teacher"][idx], kind="stable")
            hard = np.eye(len(target))[target]  # row i one-hot on the teacher's rank-i item
            losses.append(float(-(hard * np.log(p_hat)).sum() / len(target)))
    return float(np.mean(losses)) if losses else 0.0


def _np(b: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in b.items()}


# ---- losses --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_fine_and_coarse_match_naive_loops(seed: int, tau: float) -> None:
    b = cascade_batch(seed)
    fine = fine_grained_loss(b["scores"], b["click"], b["request"], b["stage"], tau)
    coarse = coarse_grained_loss(b["scores"], b["stage"], b["request"], tau)
    assert float(fine.detach()) == pytest.approx(naive_fine(_np(b), tau), rel=1e-10)
    assert float(coarse.detach()) == pytest.approx(naive_coarse(_np(b), tau), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", DISTILLATIONS)
def test_distillation_matches_naive_loop(seed: int, method: str) -> None:
    b = cascade_batch(seed)
    tau = 0.7
    got = distillation_loss(b["scores"], b["teacher"], b["request"], tau, method)
    if method == "kl":
        want = naive_kl(_np(b), tau)
    else:
        relax = np_neuralsort if method == "neuralsort" else np_softsort
        want = naive_sort_distill(_np(b), tau, relax)
    assert want > 0
    assert float(got.detach()) == pytest.approx(want, rel=1e-10)
    got.backward()
    assert torch.isfinite(b["scores"].grad).all()
    no_teacher = torch.isnan(b["teacher"])
    assert (b["scores"].grad[no_teacher] == 0).all()  # rows the ranker never saw get no gradient


def test_kl_distillation_hand_case() -> None:
    # teacher uniform over 2 rows, student softmax([0, ln 3] / 1) = [1/4, 3/4]; with T = 2 the
    # student logits are doubled so the distributions stay the same
    # KL = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3)
    nan = float("nan")
    for t in (1.0, 2.0):
        scores = torch.tensor([0.0, t * math.log(3), 5.0, 1.0, 2.0])
        teacher = torch.tensor([4.0, 4.0, nan, 1.0, nan])  # request 1: a single teacher row
        request = torch.tensor([0, 0, 0, 1, 1])
        got = distillation_loss(scores, teacher, request, temperature=t)
        assert float(got) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)


def test_relaxed_sorts_are_stochastic_and_approach_the_hard_sort() -> None:
    s = torch.tensor([[0.3, 2.0, -1.0, 1.0, 0.0], [0.5, -2.0, 1.5, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    hard = [[1, 3, 0, 4, 2], [2, 0, 1]]
    for relax, oracle in ((neuralsort, np_neuralsort), (softsort, np_softsort)):
        for tau in (1.0, 0.1, 1e-3):
            p = relax(s, mask, tau).exp()
            torch.testing.assert_close(p[0].sum(-1), torch.ones(5, dtype=torch.float64))
            torch.testing.assert_close(p[1, :3].sum(-1), torch.ones(3, dtype=torch.float64))
            assert (p[1, :, 3:] == 0).all()  # padded columns get no mass
            # padding changes nothing: the padded list equals the same list unpadded
            np.testing.assert_allclose(p[1, :3, :3].numpy(), oracle(s[1, :3].numpy(), tau),
                                       rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(p[0].numpy(), oracle(s[0].numpy(), tau), rtol=1e-9,
                                       atol=1e-12)
        p = relax(s, mask, 1e-3).exp()
        torch.testing.assert_close(p[0], torch.eye(5, dtype=torch.float64)[hard[0]])
        torch.testing.assert_close(p[1, :3, :3], torch.eye(3, dtype=torch.float64)[hard[1]])
        assert float(relax(s, mask, 1.0).exp()[0].max()) < 0.99  # a real relaxation at τ = 1


def test_cascade_loss_combines_and_skips_terms() -> None:
    b = cascade_batch(4)
    args = (b["scores"], b["click"], b["request"], b["stage"], b["teacher"])
    total, terms = cascade_loss(*args, distill_weight=0.5, fine_weight=2.0, coarse_weight=0.25,
                                distill_temperature=1.5, distill="neuralsort")
    parts = {"distill": distillation_loss(b["scores"], b["teacher"], b["request"], 1.5,
                                          "neuralsort"),
             "fine": fine_grained_loss(b["scores"], b["click"], b["request"], b["stage"]),
             "coarse": coarse_grained_loss(b["scores"], b["stage"], b["request"])}
    parts = {k: v.detach() for k, v in parts.items()}
    assert set(terms) == set(parts) and not any(t.requires_grad for t in terms.values())
    for k, v in parts.items():
        assert float(terms[k]) == pytest.approx(float(v), rel=1e-12)
    assert float(total.detach()) == pytest.approx(
        0.5 * float(parts["distill"]) + 2 * float(parts["fine"]) + 0.25 * float(parts["coarse"]),
        rel=1e-12)
    total.backward()
    assert torch.isfinite(b["scores"].grad).all() and b["scores"].grad.abs().sum() > 0

    # a zero weight skips the term: no teacher needed without distillation
    total, terms = cascade_loss(b["scores"], b["click"], b["request"], b["stage"], None,
                                distill_weight=0.0, coarse_weight=0.0)
    assert set(terms) == {"fine"} and float(total.detach()) == pytest.approx(float(parts["fine"]))
    with pytest.raises(ValueError, match="teacher"):
        cascade_loss(*args[:4], None)
    with pytest.raises(ValueError, match=r"distill method 'listnet'.*kl, neuralsort, softsort"):
        cascade_loss(*args, distill="listnet")
    total, terms = cascade_loss(*args, distill_weight=0, fine_weight=0, coarse_weight=0)
    assert terms == {} and float(total.detach()) == 0 and total.requires_grad


@pytest.mark.parametrize("method", DISTILLATIONS)
def test_degenerate_batches_give_a_grad_connected_zero(method: str) -> None:
    scores = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    request = torch.tensor([0, 0, 1])
    nan = float("nan")
    stage, click = torch.zeros(3, dtype=torch.long), torch.zeros(3)
    total, terms = cascade_loss(scores, click, request, stage, torch.full((3,), nan),
                                distill=method)
    assert all(float(t) == 0 for t in terms.values()) and set(terms) == {"distill", "fine",
                                                                          "coarse"}
    total.backward()
    assert (scores.grad == 0).all()
    # ties everywhere (equal scores, equal teacher) stay finite
    s = torch.zeros(4, requires_grad=True)
    loss = distillation_loss(s, torch.ones(4), torch.zeros(4, dtype=torch.long), 0.1, method)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_ranktower_trains_end_to_end_with_finite_gradients() -> None:
    torch.manual_seed(0)
    net = RankTowerNet(M_U, M_I, D, **TOWER, init_temperature=0.2)
    b = cascade_batch(5)
    u, v = torch.randn(len(b["stage"]), M_U, D), torch.randn(len(b["stage"]), M_I, D)
    scores = net(u, v)
    total, _ = cascade_loss(scores, b["click"], b["request"], b["stage"], b["teacher"].float(),
                            distill="softsort")
    total.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert net.sim.log_temperature.grad.abs() > 0
