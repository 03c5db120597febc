"""The ranker: sharded embeddings -> dense arch -> interaction arch -> one head per task.

``forward(batch)`` returns a logit per task. With ``model.esmm`` and tasks ``[click, conversion]``
the conversion head is the CVR tower and :func:`probabilities` returns pCTCVR = pCTR * pCVR for
``conversion`` (the label is click-and-convert on impressions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.models.archs import build_over_arch
from recsys.models.objective import OnlineUserCodes, RankingObjective
from recsys.models.tables import PooledInput, build_ebc, mean_pooled_features, over_arch_fields
from recsys.spec import CodeSource, Side, Spec


@dataclass(frozen=True)
class RankerConfig:
    """What the ranker is built from (a spec's features and model sections)."""

    spec: Spec
    device: str = "meta"  # the EBC's device: meta for planning and DMP, cpu for plain use


class Ranker(nn.Module):
    """EBC -> over-arch (dense arch, interaction arch, heads: the arch's file in
    recsys/models/archs/).

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
        # the over-arch's input order, fixed by the spec (never by a sharding plan): the EBC's
        # tables and features in their config order, which over_arch_fields reads too
        fields = over_arch_fields(spec.features)
        self.feature_order: list[str] = list(fields.names)
        self.pooled_input = PooledInput(self.feature_order, mean_pooled_features(spec.features))
        # the over-arch is built on CPU/GPU from the start; only the EBC waits on meta for DMP
        self.over = build_over_arch(spec.model, fields)
        h = spec.loss.hierarchical
        self.user_codes: OnlineUserCodes | None = None
        if h.weight > 0 and h.codes == CodeSource.ONLINE:
            self.user_codes = OnlineUserCodes(h.rvq, _user_columns(spec, self.ebc))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        pooled = self.pooled_input(self.ebc(batch.sparse), batch.sparse)
        outputs = self.over(pooled, batch.dense)
        if self.user_codes is not None:
            outputs = _merged(outputs, self.user_codes(pooled))
        return outputs


def _user_columns(spec: Spec, ebc: nn.Module) -> list[int]:
    """The columns of the pooled embeddings that hold user-side features."""
    user = {f.name for f in spec.features.sparse_fields() if f.side == Side.USER}
    columns, start = [], 0
    for cfg in ebc.embedding_bag_configs():
        for feature in cfg.feature_names:
            if feature in user:
                columns.extend(range(start, start + cfg.embedding_dim))
            start += cfg.embedding_dim
    if not columns:
        raise ValueError("loss.hierarchical with online codes needs user-side sparse features "
                         "(features.fields with side = 'user')")
    return columns


def _merged(outputs: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]
            ) -> dict[str, torch.Tensor]:
    """Both dicts as one (an fx-wrapped call: the pipeline's trace does not look inside)."""
    return {**outputs, **extra}


torch.fx.wrap("_merged")


def probabilities(logits: dict[str, torch.Tensor], esmm: bool) -> dict[str, torch.Tensor]:
    """Per task probabilities; with ESMM, conversion is pCTR * pCVR. Keys starting with ``_``
    (auxiliary outputs) are not tasks."""
    probs = {t: torch.sigmoid(v) for t, v in logits.items() if not t.startswith("_")}
    if esmm:
        probs["conversion"] = probs["click"] * probs["conversion"]
    return probs


class StepOutput(NamedTuple):
    """What :class:`TrainWrapper` returns beside the loss, by name: the loss (detached), the logit
    per task (detached), the labels, and ``stats``, detached scalars of the objective's terms and
    diagnostics for the log."""

    loss: torch.Tensor
    logits: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]


class TrainWrapper(nn.Module):
    """What TrainPipelineSparseDist drives: ``batch -> (loss, StepOutput)``.

    Example:
        >>> loss, out = TrainWrapper(model, spec)(batch)
        >>> out.logits["click"].shape, sorted(out.stats)[:1]
        (torch.Size([2048]), ['loss/aux'])
    """

    def __init__(self, model: Ranker, spec: Spec) -> None:
        super().__init__()
        self.model = model
        self.objective = RankingObjective(spec)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        outputs = self.model(batch)
        loss, stats = self.objective(outputs, batch)
        logits = {t: outputs[t].detach() for t in self.model.tasks}
        return loss, StepOutput(loss.detach(), logits, batch.labels, stats)
