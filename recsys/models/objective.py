"""The training objective of the ranker, and the online user codes it groups by.

Total loss (docs/methods.md section 5)::

    bce_weight · Σ_tasks BCE  +  over-arch auxiliary loss (AdaEnsemble's routers)
      + listwise.weight · L_listwise(groups: batch | request | user)
      + hierarchical.weight · Σ_l w_l · L_listwise(groups: user-code prefix of level l)

Every listwise term is on the first task's logit (the same logit as its BCE). The user codes come
either from :class:`OnlineUserCodes` (RVQ over stop-gradient user embeddings inside the model) or
from the batch's ``rvq_code`` feature (codes precomputed offline, ``loss.hierarchical.codes =
"data"``).

Both modules are leaves of the training pipeline's fx trace (they hold no sharded module), so their
data-dependent steps (k-means initialisation, group construction) are free to branch.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.data.batch import Batch
from recsys.data.schema import RVQ_CODE
from recsys.losses.cascade import cascade_loss
from recsys.losses.hierarchical import gather_for_groups, hierarchical_listwise_loss
from recsys.losses.listwise import in_batch_listwise_loss, segment_listwise_loss
from recsys.losses.pointwise import bce, esmm_bce
from recsys.models.archs import AUX_LOSS, arch_of
from recsys.quantization.rvq import ResidualVQ, code_perplexity
from recsys.spec import CodeSource, ListwiseGroup, RVQSpec, Spec

# keys of the model's output dict that are not tasks start with "_" (never evaluated as metrics)
RVQ_CODES = "_rvq_codes"
STAT_PREFIX = "_stat/"


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


def _float32(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's outputs with half-precision tensors upcast to fp32 (ids stay as they are).

    Under ``train.precision = "bf16"`` the over-arch returns bf16 logits. Autocast runs BCE in
    fp32 by itself but not ESMM's log-space terms (``logsigmoid``, ``log1p(-exp(x))``), which
    would keep 8 bits of mantissa; the listwise and cascade losses upcast on their own. One cast
    here puts every term in fp32 whatever each loss does. A no-op in fp32 training."""
    return {k: v.float() if v.is_floating_point() else v for k, v in outputs.items()}


class OnlineUserCodes(nn.Module):
    """RVQ codes of each row's user, from the model's own pooled user-side embeddings.

    The user representation is the concatenation of the user-side pooled features, detached (the
    codes never push gradients into the embeddings). In training every call is one RVQ update
    (k-means on the first batches, then EMA; collectives across ranks keep the codebooks
    identical); in eval the codebooks are only read. Until the k-means initialisation is done,
    every row gets an id of its own, so no group forms and the hierarchical loss is zero.

    Args:
        spec: the RVQ settings.
        user_columns: the columns of the pooled embedding tensor that belong to user features.

    Example:
        >>> codes = OnlineUserCodes(RVQSpec(), user_columns=list(range(64)))
        >>> ids, stats = codes(pooled)           # ids (B, L): trie-node id per level
    """

    def __init__(self, spec: RVQSpec, user_columns: list[int]) -> None:
        super().__init__()
        self.register_buffer("columns", torch.tensor(user_columns, dtype=torch.long),
                             persistent=False)
        self.rvq = ResidualVQ(len(user_columns), **spec.model_dump())
        self.levels, self.num_codes = spec.levels, spec.codes

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        user = pooled.detach().index_select(1, self.columns)
        ready = self.rvq.is_initialized  # codes of an update come from the codebooks before it
        out = self.rvq.update(user) if self.training else self.rvq.quantize(user)
        if ready:
            ids = self.rvq.prefix_ids(out.codes)
        else:
            rows = torch.arange(user.shape[0], device=user.device) + self.rvq.num_nodes
            ids = rows[:, None].expand(-1, self.levels)
        result = {RVQ_CODES: ids}
        if ready:
            x = out.residuals[:, 0]
            err = (x - out.reconstruction).pow(2).sum(1).mean() / x.pow(2).sum(1).mean()
            result[f"{STAT_PREFIX}rvq/recon_error"] = err.detach()
            for level, ppl in enumerate(code_perplexity(out.codes, self.num_codes), start=1):
                result[f"{STAT_PREFIX}rvq/perplexity_l{level}"] = ppl.detach()
        return result


class RankingObjective(nn.Module):
    """The loss of one batch from the model's outputs: BCE per task, the auxiliary loss, and the
    listwise and hierarchical group-wise terms the spec switches on.

    ``forward(outputs, batch)`` returns ``(loss, stats)``: ``stats`` holds detached scalars for the
    log (each term, and per level the number and mean size of valid groups and the share of rows
    in one).

    Example:
        >>> objective = RankingObjective(spec)
        >>> loss, stats = objective(model(batch), batch)
    """

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.tasks = list(spec.model.tasks)
        self.esmm = spec.model.esmm
        self.loss = spec.loss
        self.first = self.tasks[0]
        # archs such as RankTower learn from the whole cascade (docs/methods.md section 4)
        self.cascade = arch_of(spec.model).cascade_view
        self.arch = spec.model.arch
        self.cascade_label = spec.train.cascade_label
        # the cascade loss's keyword arguments are the section's keys (built once, not per step)
        self.cascade_options = spec.loss.cascade.model_dump(mode="json")

    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        spec = self.loss
        outputs = _float32(outputs)
        bce_loss = ranker_loss(outputs, batch.labels, self.tasks, self.esmm)
        loss = spec.bce_weight * bce_loss + outputs[AUX_LOSS]
        stats = {"loss/bce": bce_loss.detach(), "loss/aux": outputs[AUX_LOSS].detach()}
        stats.update({k[len(STAT_PREFIX):]: v for k, v in outputs.items()
                      if k.startswith(STAT_PREFIX)})
        logits, labels = outputs[self.first], batch.labels[self.first]
        if self.cascade:
            if batch.stage is None or "request" not in batch.groups:
                raise ValueError(f"model.arch '{self.arch}' trains on the cascade view: the data "
                                 "needs stage and request_id columns (data.view = 'cascade')")
            term, parts = cascade_loss(logits, batch.labels[self.cascade_label],
                                       batch.groups["request"], batch.stage, batch.teacher,
                                       **self.cascade_options)
            loss = loss + term
            stats.update({f"loss/cascade_{k}": v for k, v in parts.items()})
        if spec.listwise.weight > 0:
            lw = spec.listwise
            if lw.group == ListwiseGroup.BATCH:
                res = in_batch_listwise_loss(logits, labels, lw.temperature)
            else:
                res = segment_listwise_loss(logits, labels, batch.groups[lw.group.value],
                                            lw.temperature)
            loss = loss + lw.weight * res.loss
            stats.update({"loss/listwise": res.loss.detach(), "listwise/groups": res.num_groups,
                          "listwise/covered": res.covered})
        if spec.hierarchical.weight > 0:
            h = spec.hierarchical
            codes = self._codes(outputs, batch)
            if h.all_gather:
                logits, labels, codes = gather_for_groups(logits, labels, codes)
            res = hierarchical_listwise_loss(logits, labels, codes, h.level_weights,
                                             h.include_level0, h.temperature)
            loss = loss + h.weight * res.loss
            stats["loss/hierarchical"] = res.loss.detach()
            for i, level in enumerate(res.levels):
                stats[f"hgr/l{level}/groups"] = res.num_groups[i]
                stats[f"hgr/l{level}/mean_size"] = res.mean_group_size[i]
                stats[f"hgr/l{level}/covered"] = res.covered[i]
        return loss, stats

    def _codes(self, outputs: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        if self.loss.hierarchical.codes == CodeSource.ONLINE:
            return outputs[RVQ_CODES]
        # precomputed: L trie-node ids per row in the batch's rvq_code feature
        return batch.sparse[RVQ_CODE].values().view(-1, self.loss.hierarchical.rvq.levels)
