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
from recsys.models.tables import build_ebc
from recsys.modules.cross import CrossNet
from recsys.modules.mlp import MLP
from recsys.spec import Arch, Spec


@dataclass(frozen=True)
class RankerConfig:
    """What the ranker is built from (a spec's features and model sections)."""

    spec: Spec
    device: str = "meta"  # the EBC's device: meta for planning and DMP, cpu for plain use


class Ranker(nn.Module):
    """EBC -> [pooled embeddings ; dense arch(dense)] -> interaction arch -> heads.

    Example:
        >>> model = Ranker(RankerConfig(spec, device="cpu"))
        >>> logits = model(batch)               # {"click": (B,), ...}
    """

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        spec = config.spec
        m = spec.model
        if m.arch not in (Arch.MLP, Arch.DCN):
            raise ValueError(f"model.arch '{m.arch}' is not available in the ranker yet "
                             "(mlp, dcn)")
        self.tasks = list(m.tasks)
        self.esmm = m.esmm
        if self.esmm and self.tasks != ["click", "conversion"]:
            raise ValueError("model.esmm needs tasks = ['click', 'conversion']")
        self.ebc = build_ebc(spec.features, config.device)
        emb_width = sum(c.embedding_dim for c in self.ebc.embedding_bag_configs()
                        for _ in c.feature_names)
        n_dense = len(spec.features.dense_fields())
        # the dense arch lives on CPU/GPU from the start; only the EBC waits on meta for sharding
        self.dense_arch = MLP(n_dense, m.dense_arch) if n_dense else None
        width = emb_width + (self.dense_arch.out_features if self.dense_arch else 0)
        self.cross = CrossNet(width, m.dcn.num_layers, m.dcn.low_rank) \
            if m.arch == Arch.DCN else None
        self.deep = MLP(width, m.mlp.hidden, m.mlp.dropout)
        self.heads = nn.ModuleDict({t: nn.Linear(self.deep.out_features, 1) for t in self.tasks})

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        pooled = self.ebc(batch.sparse).values()
        parts = [pooled]
        if self.dense_arch is not None:
            parts.append(self.dense_arch(batch.dense))
        x = torch.cat(parts, dim=1)
        if self.cross is not None:
            x = self.cross(x)
        h = self.deep(x)
        return {t: head(h).squeeze(-1) for t, head in self.heads.items()}


def probabilities(logits: dict[str, torch.Tensor], esmm: bool) -> dict[str, torch.Tensor]:
    """Per task probabilities; with ESMM, conversion is pCTR * pCVR."""
    probs = {t: torch.sigmoid(v) for t, v in logits.items()}
    if esmm:
        probs["conversion"] = probs["click"] * probs["conversion"]
    return probs


def ranker_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                esmm: bool) -> torch.Tensor:
    """Sum over tasks of the mean BCE (ESMM: the conversion term is on pCTCVR)."""
    total = logits[next(iter(logits))].new_zeros(())
    for task, logit in logits.items():
        if esmm and task == "conversion":
            total = total + esmm_bce(logits["click"], logit, labels["conversion"])
        else:
            total = total + bce(logit, labels[task])
    return total


class TrainWrapper(nn.Module):
    """What TrainPipelineSparseDist drives: ``batch -> (loss, (loss, logits, labels))``."""

    def __init__(self, model: Ranker) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor],
                                                                dict[str, torch.Tensor]]]:
        logits = self.model(batch)
        loss = ranker_loss(logits, batch.labels, self.model.esmm)
        return loss, (loss.detach(), {k: v.detach() for k, v in logits.items()}, batch.labels)
