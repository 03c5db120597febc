"""Serving split of a two-tower pre-ranker (RankTower, DSSM): user tower, item tower and online
scorer exported separately, plus the item-representation cache of the item corpus.

``recsys export RUN_DIR --out DIR`` for a two-tower run writes, besides the joint ``model.pt``:

- ``user_tower.pt``: ``forward(dense_user, values, lengths) -> (B, H, d)`` over the user and
  context features only (the manifest's ``user_features`` / ``user_dense``);
- ``item_tower.pt``: the same over the item features (``item_features`` / ``item_dense``);
- ``scorer.pt``: ``forward(user (H, d), items (N, H, d)) -> (N,)`` logits (cross-attention and
  max-sim, or DSSM's dot product): the only part that runs per candidate online;
- ``item_cache.pt``: ``{"item_id": (N,), "repr": (N, H, d)}`` for every item of the run's data.

Each tower gets an EmbeddingBagCollection of its own side's features (a table shared by both sides,
e.g. categories, is copied into both), so a tower never needs the other side's inputs.
"""

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchrec.fx
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.export.inputs import flat_inputs
from recsys.models.ranker import Ranker
from recsys.models.tables import PooledInput, feature_order
from recsys.process_settings import tune_process
from recsys.spec import Side, Spec


def _side_ebc(ebc: EmbeddingBagCollection, keep: set[str]) -> EmbeddingBagCollection:
    """The tables of ``ebc`` that serve a feature in ``keep``, with only those features, and the
    trained weights."""
    configs = []
    for c in ebc.embedding_bag_configs():
        features = [f for f in c.feature_names if f in keep]
        if features:
            configs.append(EmbeddingBagConfig(
                name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
                feature_names=features, pooling=c.pooling))
    side = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    trained = ebc.state_dict()
    side.load_state_dict({k: trained[k] for k in side.state_dict()})
    return side


class TowerModule(nn.Module):
    """One side of a two-tower model as served: its own features in, its representation out."""

    def __init__(self, ebc: EmbeddingBagCollection, inputs: nn.Module, tower: nn.Module,
                 mean: list[str]) -> None:
        super().__init__()
        self.ebc = ebc
        self.stack = copy.deepcopy(inputs.stack)
        self.tower = copy.deepcopy(tower)
        self.keys = feature_order(ebc)
        self.pooled_input = PooledInput(self.keys, mean)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
                ) -> torch.Tensor:
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=values, lengths=lengths)
        return self.tower(self.stack(self.pooled_input(self.ebc(kjt), kjt), dense))


class ScorerModule(nn.Module):
    """The online part: one user's representation against N cached item representations."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = copy.deepcopy(net)

    def forward(self, user: torch.Tensor, items: torch.Tensor,
                prepared: torch.Tensor | None = None) -> torch.Tensor:
        return self.net.score_candidates(user, items, prepared)

    @torch.jit.export
    def prepare(self, items: torch.Tensor) -> torch.Tensor:
        """The user-free part of scoring ``items``, cached beside them (``item_cache.pt``)."""
        return self.net.prepare_items(items)


def _script(module: nn.Module, leaves: list[str]) -> torch.jit.ScriptModule:
    return torch.jit.script(torchrec.fx.symbolic_trace(module.eval(), leaf_modules=leaves))


def split_modules(spec: Spec, ranker: Ranker) -> dict[str, Any]:
    """The scripted user tower, item tower and scorer of a trained two-tower ranker, and the
    feature lists each tower takes."""
    over = ranker.over
    sides = {f.name: f.side for f in spec.features.fields}
    user_keys = {f for f, s in sides.items() if s != Side.ITEM}
    item_keys = {f for f, s in sides.items() if s == Side.ITEM}
    mean = ranker.pooled_input.mean
    user = TowerModule(_side_ebc(ranker.ebc, user_keys), over.user_inputs, over.net.user_tower,
                       mean)
    item = TowerModule(_side_ebc(ranker.ebc, item_keys), over.item_inputs, over.net.item_tower,
                       mean)
    dense = [f for f in spec.features.dense_fields()]
    leaves = ["FieldStack", type(over.net.user_tower).__name__]
    return {
        "user_tower": _script(user, leaves), "item_tower": _script(item, leaves),
        "scorer": torch.jit.script(ScorerModule(over.net).eval()),
        "manifest": {
            "user_features": user.keys, "item_features": item.keys,
            "user_dense": [f.source_column for f in dense if f.side != Side.ITEM],
            "item_dense": [f.source_column for f in dense if f.side == Side.ITEM],
        },
    }


@torch.no_grad()
def item_cache(spec: Spec, item_tower: torch.jit.ScriptModule, keys: list[str],
               dense_columns: list[str]) -> dict[str, torch.Tensor]:
    """Representations of every item that appears in the run's data (first row of each item)."""
    from recsys.datasets import ensure_dataset, make_loader

    manifest = ensure_dataset(spec, progress=False)
    all_dense = [f.source_column for f in spec.features.dense_fields()]
    cols = [all_dense.index(c) for c in dense_columns]
    seen: set[int] = set()
    ids, reprs = [], []
    for split in ("train", "valid", "test"):
        for batch in make_loader(spec, manifest, split, training=False).epoch(0):
            item = batch.sparse["item_id"].values().numpy()
            _, first = np.unique(item, return_index=True)
            fresh = [i for i in first if int(item[i]) not in seen]
            if not fresh:
                continue
            rows = torch.tensor(fresh)
            sub = _rows(batch, rows)
            dense, values, lengths = flat_inputs(sub, keys)
            reprs.append(item_tower(dense[:, cols], values, lengths))
            ids.append(torch.from_numpy(item[fresh]))
            seen.update(int(item[i]) for i in fresh)
    order = torch.argsort(torch.cat(ids))
    return {"item_id": torch.cat(ids)[order], "repr": torch.cat(reprs)[order]}


def _rows(batch: Any, rows: torch.Tensor) -> Any:
    """A Batch with only ``rows`` (dense and KJT)."""
    from recsys.data.batch import Batch

    kjt = batch.sparse
    keys, values, lengths = kjt.keys(), [], []
    for k in keys:
        jt = kjt[k]
        offsets = jt.offsets()
        for r in rows.tolist():
            values.append(jt.values()[offsets[r]:offsets[r + 1]])
        lengths.append(jt.lengths()[rows])
    sub = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values),
                                              lengths=torch.cat(lengths))
    return Batch(dense=batch.dense[rows], sparse=sub, labels={})


def export_split(spec: Spec, ranker: Ranker, out: Path) -> dict[str, Any]:
    """Write the serving split and the item cache into ``out``; returns the manifest entries."""
    parts = split_modules(spec, ranker)
    for name in ("user_tower", "item_tower", "scorer"):
        parts[name].save(str(out / f"{name}.pt"))
    m = parts["manifest"]
    cache = item_cache(spec, parts["item_tower"], m["item_features"], m["item_dense"])
    with torch.no_grad():
        cache["prepared"] = parts["scorer"].prepare(cache["repr"])
    torch.save(cache, out / "item_cache.pt")
    return {**m, "items_cached": int(cache["item_id"].numel()),
            "files": ["user_tower.pt", "item_tower.pt", "scorer.pt", "item_cache.pt"]}


@torch.no_grad()
def time_scoring(scorer: Any, user: torch.Tensor, items: torch.Tensor, repeats: int = 50
                 ) -> dict[str, float]:
    """Milliseconds for ``scorer(user, items)`` (p50 / p99 over ``repeats`` after a warm-up)."""
    for _ in range(5):
        scorer(user, items)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scorer(user, items)
        times.append((time.perf_counter() - start) * 1000)
    return {"candidates": int(items.shape[0]), "p50_ms": float(np.percentile(times, 50)),
            "p99_ms": float(np.percentile(times, 99))}


def time_cached_scoring(out: Path, candidates: int = 1000, repeats: int = 50) -> dict[str, float]:
    """Milliseconds to score ``candidates`` cached items for one user (p50 / p99 of ``repeats``)."""
    tune_process()  # as a serving process has it (recsys serve)
    scorer = torch.jit.load(str(out / "scorer.pt"))
    cache = torch.load(out / "item_cache.pt", weights_only=True)
    reprs = cache["repr"]
    idx = torch.randint(0, reprs.shape[0], (candidates,), generator=torch.Generator().manual_seed(0))
    prepared = cache["prepared"][idx]
    # any (H, d) user: the cost does not depend on its values
    return time_scoring(lambda user, items: scorer(user, items, prepared), reprs[0], reprs[idx],
                        repeats)
