"""Pointwise losses: binary cross-entropy per task, and the ESMM form for conversion."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy from logits (numerically stable)."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def esmm_log_probs(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log pCTCVR and log(1 - pCTCVR) for pCTCVR = sigmoid(ctr) * sigmoid(cvr), in log space."""
    log_p = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    # log(1 - e^x) for x <= 0, accurate on both sides of log(1/2)
    log_not_p = torch.where(log_p > -0.6931, torch.log(-torch.expm1(log_p)),
                            torch.log1p(-torch.exp(log_p)))
    return log_p, log_not_p


def esmm_bce(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor,
             conversion: torch.Tensor) -> torch.Tensor:
    """BCE of pCTCVR = pCTR * pCVR against the click-and-convert label (Ma et al. 2018): trained
    on every impression, so pCVR never sees the click-only sample space bias."""
    log_p, log_not_p = esmm_log_probs(ctr_logit, cvr_logit)
    y = conversion.to(log_p.dtype)
    return -(y * log_p + (1 - y) * log_not_p).mean()
