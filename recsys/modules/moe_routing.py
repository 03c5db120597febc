"""AdaEnsemble's routing (docs/methods.md section 3): the noisy cosine :class:`Router`, top-k
selection (with k on the host or, while it anneals, on the device), gates, and the router losses
(load balance and z-loss), each over all rows or only the rows still present at a depth. The
dispatch and early-exit stack that use them are in :mod:`recsys.modules.moe`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recsys.modules.moe_experts import REDUCTION

PROJECTION = 16  # width of the router's sample embedding h and of the expert embeddings e_e


def annealed_k(step: int, num_experts: int, top_k: int, anneal_steps: int) -> int:
    """Experts kept per row at a training step: num_experts at step 0, falling linearly (floored to
    whole experts) to top_k at step anneal_steps and after; top_k throughout when anneal_steps is 0.

    Example:
        >>> [annealed_k(s, 5, 3, 4) for s in range(6)]
        [5, 5, 4, 4, 3, 3]
    """
    if anneal_steps <= 0 or step >= anneal_steps:
        return top_k
    return num_experts - (num_experts - top_k) * step // anneal_steps


def annealed_k_tensor(step: torch.Tensor, num_experts: int, top_k: int,
                      anneal_steps: int) -> torch.Tensor:
    """:func:`annealed_k` computed on step's device (0-d long): nothing is read back to the host.

    Example:
        >>> [int(annealed_k_tensor(torch.tensor(s), 5, 3, 4)) for s in range(6)]
        [5, 5, 4, 4, 3, 3]
    """
    if anneal_steps <= 0:
        return torch.full_like(step, top_k)
    done = step.clamp(0, anneal_steps)  # at and after anneal_steps: top_k
    return num_experts - torch.div((num_experts - top_k) * done, anneal_steps,
                                   rounding_mode="floor")


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, E) bool: each row's k largest logits (k clamped to [1, E]); k known on the host."""
    k = min(max(k, 1), logits.shape[1])
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    return mask.scatter_(1, logits.topk(k, dim=1).indices, True)


def ranked_mask(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, E) bool: each row's k largest logits, for a k held on the device (0-d long tensor).

    ``topk`` needs k on the host, which would be a device sync per forward while k anneals; here
    each choice's rank in its row (a stable sort: ties go to the lower index) is compared with k.
    The same selection as :func:`top_k_mask` for distinct logits.

    Example:
        >>> ranked_mask(torch.tensor([[0.1, 0.9, 0.5], [3.0, 1.0, 2.0]]), torch.tensor(2)).tolist()
        [[False, True, True], [True, False, True]]
    """
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape)
    return torch.empty_like(order).scatter_(1, order, ranks) < k


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of each row over its True entries, 0 elsewhere."""
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)


def top_k_gates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row's k largest logits, softmax over them, 0 elsewhere.

    Returns (gates (B, E) with rows summing to 1, dispatch mask (B, E) bool with k True per row).
    The mask comes from the top-k indices, not from ``gates > 0``, so a kept expert whose gate
    underflows to 0 (a tiny learned temperature) is still dispatched.

    Example:
        >>> gates, mask = top_k_gates(torch.tensor([[0.0, 2.0, 1.0]]), 2)
        >>> mask.tolist(), [round(g, 3) for g in gates[0].tolist()]
        ([[False, True, True]], [0.0, 0.731, 0.269])
    """
    mask = top_k_mask(logits, k)
    return masked_softmax(logits, mask), mask


def _row_mean(values: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 0 of values (B, ...) over the rows where present (B,) is True (all: None).

    ``where``, not a multiply: a row that is not present adds exactly 0 (and gets no gradient) even
    where its value is not finite. No present row: 0.
    """
    if present is None:
        return values.mean(0)
    keep = present.view([-1] + [1] * (values.dim() - 1))
    total = torch.where(keep, values, torch.zeros_like(values)).sum(0)
    return total / present.sum().clamp_min(1).to(total.dtype)


def load_balance_loss(logits: torch.Tensor, dispatch_mask: torch.Tensor,
                      prior: torch.Tensor | None = None,
                      present: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_e f_e · P_e / prior_e`` (unweighted; the caller multiplies by α).

    f_e is the fraction of the rows dispatched to e (a count: no gradient), P_e the mean full-softmax
    probability of e (gradient flows into the logits). The minimum pushes dispatch toward the prior.
    A uniform prior (the default) gives the Switch-Transformer loss ``E · Σ_e f_e P_e``. Zero-prior
    entries are clamped to 1e-6 rather than dividing by zero. No rows: 0.

    Args:
        logits: raw router logits (B, E).
        dispatch_mask: (B, E) bool, True where the row was sent to the expert.
        prior: (E,) target dispatch shares summing to 1, or None for uniform.
        present: (B,) bool, the rows that count (those that reached the layer): f and P are means
            over them and the others get no gradient. None: every row.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, 0.0]])
        >>> mask = top_k_mask(logits, 1)
        >>> present = torch.tensor([True, True, False])  # balanced over the first two rows: 1
        >>> round(float(load_balance_loss(logits, mask, present=present)), 4)
        1.0
        >>> round(float(load_balance_loss(logits, mask)), 4)  # all three: 2 of 3 on the first
        1.1096
    """
    num = logits.shape[1]
    if logits.shape[0] == 0:
        return logits.sum()
    f = _row_mean(dispatch_mask.to(logits.dtype), present)
    p = _row_mean(torch.softmax(logits, dim=1), present)
    if prior is None:
        prior = torch.full((num,), 1.0 / num, dtype=logits.dtype, device=logits.device)
    return (f * p / prior.clamp_min(1e-6)).sum()


def router_z_loss(logits: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_batch(logsumexp(logits)²)``: keeps router logits small (0 for no rows). With present
    (B,) bool: the mean over the rows where it is True."""
    if logits.shape[0] == 0:
        return logits.sum()
    return _row_mean(torch.logsumexp(logits, dim=1).square(), present)


def input_noise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x ⊙ U(1−ε, 1+ε)``, a fresh draw per element (the routers' training noise); on the CPU
    the uniform takes 2^16 evenly spaced values.

    Example:
        >>> y = input_noise(torch.ones(3, 4), 0.5)
        >>> bool(((y >= 0.5) & (y <= 1.5)).all())
        True
    """
    if x.device.type == "cpu" and not torch.jit.is_scripting():
        noisy = _input_noise_cpu(x, eps)
        if noisy is not None:
            return noisy
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


@torch.jit.unused
def _input_noise_cpu(x: torch.Tensor, eps: float) -> torch.Tensor | None:
    # torch's CPU generator (mt19937) takes about 5 ns a value: the routers' noise was 7% of an
    # AdaEnsemble training step (B x 432 values each). numpy's SFC64 gives raw 64-bit words at
    # about 1.3 ns each; each word gives four 16-bit draws v, signed, and the noise is
    # 1 + 2ε·v/2^16: uniform on [1 − ε, 1 + ε) in 2^16 steps of 2ε/2^16 (1.5e-5 at ε = 0.5), fine
    # enough for a router's exploration noise, and one fused multiply-add on x. (With 24-bit draws
    # it took 2.5x as long: 1.3-1.9 against 0.47-0.53 ms for 2,048 x 432 values.) Its seed comes
    # from torch's generator, so torch.manual_seed still decides the draw.
    # (numpy is imported here: the pure-torch layers must import with torch alone; without it,
    # None: torch's own draw.) Under torch.compile, torch's draw too: numpy's generator cannot be
    # traced, and a graph break per router would split a compiled model at every depth.
    if torch.compiler.is_compiling():
        return None
    try:
        import numpy as np
    except ImportError:
        return None
    seed = int(torch.randint(0, 2**62, (1,)).numpy()[0])  # (.numpy(): no aten op, no sync)
    words = np.random.SFC64(seed).random_raw((x.numel() + 3) // 4)
    v = torch.from_numpy(words.view(np.int16)[:x.numel()]).view(x.shape)  # [-2^15, 2^15)
    return torch.addcmul(x, x, v.to(x.dtype), value=2.0 * eps / 2**16)


class Router(nn.Module):
    """Noisy cosine router: ``logit_e = cos(h, e_e) / T`` with
    ``h = Dense_16(relu(Dense_{n/16}(x ⊙ U(1−ε, 1+ε))))``, noise in training only.

    T is learned as log T so that it stays positive (the reference learns T itself).

    Args:
        width: n, the router input width.
        num_choices: E, experts (or depths for the exit router).
        init_temperature: T at init.
        noise_eps: ε of the multiplicative input noise (0 = none).

    Example:
        >>> gates, mask, logits = Router(32, 5)(torch.randn(4, 32), k=3)
        >>> gates.shape, int(mask.sum())
        (torch.Size([4, 5]), 12)
    """

    def __init__(self, width: int, num_choices: int, init_temperature: float = 1.0,
                 noise_eps: float = 0.5) -> None:
        super().__init__()
        self.noise_eps = noise_eps
        self.hidden = nn.Linear(width, max(1, width // REDUCTION))
        self.proj = nn.Linear(max(1, width // REDUCTION), PROJECTION)
        self.embeddings = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_choices,
                                                                           PROJECTION)))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits (B, E) of x (detached here: routing never back-propagates into its input)."""
        x = x.detach()
        if self.training and self.noise_eps > 0:
            x = input_noise(x, self.noise_eps)
        h = self.proj(torch.relu(self.hidden(x)))
        cos = F.normalize(h, dim=1) @ F.normalize(self.embeddings, dim=1).t()
        return cos / self.log_temperature.exp()

    def forward(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (gates (B, E), dispatch mask (B, E) bool, raw logits (B, E))."""
        logits = self.logits(x)
        gates, mask = top_k_gates(logits, k)
        return gates, mask, logits
