"""The ranker: sharded embeddings -> dense arch -> interaction arch -> one head per task.

``forward(batch)`` returns a logit per task. With ``model.esmm`` and tasks ``[click, conversion]``
the conversion head is the CVR tower and :func:`probabilities` returns pCTCVR = pCTR * pCVR for
``conversion`` (the label is click-and-convert on impressions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.losses.pointwise import bce, esmm_bce
from recsys.models.over_arch import AUX_LOSS, build_over_arch
from recsys.models.tables import build_ebc
from recsys.spec import Spec


@dataclass(frozen=True)
class RankerConfig:
    """What the ranker is built from (a spec's features and model sections)."""

    spec: Spec
    device: str = "meta"  # the EBC's device: meta for planning and DMP, cpu for plain use


class Ranker(nn.Module):
    """EBC -> over-arch (dense arch, interaction arch, heads; see recsys.models.over_arch).

    ``forward`` returns one logit per task and, under :data:`AUX_LOSS`, the over-arch's auxiliary
    loss (a scalar; zero except for AdaEnsemble).

    Example:
        >>> model = Ranker(RankerConfig(spec, device="cpu"))
        >>> logits = model(batch)               # {"click": (B,), ..., AUX_LOSS: ()}
    """

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        spec = config.spec
        self.tasks = list(spec.model.tasks)
        self.esmm = spec.model.esmm
        if self.esmm and self.tasks != ["click", "conversion"]:
            raise ValueError("model.esmm needs tasks = ['click', 'conversion']")
        self.ebc = build_ebc(spec.features, config.device)
        field_dims = [c.embedding_dim for c in self.ebc.embedding_bag_configs()
                      for _ in c.feature_names]
        # the over-arch is built on CPU/GPU from the start; only the EBC waits on meta for DMP
        self.over = build_over_arch(spec, field_dims)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.over(self.ebc(batch.sparse).values(), batch.dense)


def probabilities(logits: dict[str, torch.Tensor], esmm: bool) -> dict[str, torch.Tensor]:
    """Per task probabilities; with ESMM, conversion is pCTR * pCVR."""
    probs = {t: torch.sigmoid(v) for t, v in logits.items() if t != AUX_LOSS}
    if esmm:
        probs["conversion"] = probs["click"] * probs["conversion"]
    return probs


def ranker_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                tasks: list[str], esmm: bool) -> torch.Tensor:
    """Sum over ``tasks`` of the mean BCE (ESMM: the conversion term is on pCTCVR).

    ``logits`` is only indexed by the task names, never iterated: under the training pipeline's
    fx trace the over-arch is a leaf module and its output an opaque proxy."""
    losses = []
    for task in tasks:
        if esmm and task == "conversion":
            losses.append(esmm_bce(logits["click"], logits[task], labels["conversion"]))
        else:
            losses.append(bce(logits[task], labels[task]))
    return torch.stack(losses).sum()


class TrainWrapper(nn.Module):
    """What TrainPipelineSparseDist drives: ``batch -> (loss, (loss, logits, labels))``."""

    def __init__(self, model: Ranker) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor],
                                                                dict[str, torch.Tensor]]]:
        logits = self.model(batch)
        tasks = self.model.tasks
        loss = ranker_loss(logits, batch.labels, tasks, self.model.esmm) + logits[AUX_LOSS]
        return loss, (loss.detach(), {t: logits[t].detach() for t in tasks}, batch.labels)
