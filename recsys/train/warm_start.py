"""Warm starts: ``recsys train SPEC --init-from RUN_DIR`` starts from another run's weights.

Retraining on tomorrow's data from today's model is the production loop; the dataset has usually
grown by then (new users, new items), so rows cannot be copied by position. The rules:

* **dense parameters** (over-arch, heads) are copied where the name and shape match; any other
  is initialised fresh, and the log says which and why;
* **embedding tables** are matched by name (and must keep their dim). Their rows are matched
  through the vocabularies both datasets saved (``dataset.json`` ``vocabularies``): new row ``j``
  takes the old row of the same raw value, id 0 (unknown) takes id 0, and values the old run never
  saw start fresh. A hashed column keeps its rows when the bucket count is unchanged. Without
  vocabularies the ids are taken as stable (hashed ids, fixed codes) and rows match by id, as far
  as both tables reach.
* optimizer state (Adagrad sums, Adam moments, FTRL accumulators) starts fresh: the new run's
  learning-rate schedule starts from step 0.

Every rank applies the mapping to the shards it holds (table-, row- or column-wise, or a
replicated table), so the new run may use any number of processes and any sharding plan.

Example:
    >>> report = warm_start(trainer.model, trainer.spec, trainer.manifest, "runs/day5")
    >>> print(report.summary())
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from recsys.data.schema import MANIFEST, DatasetManifest, VocabInfo, VocabKind
from recsys.errors import RunError
from recsys.run_dir import MODEL_PREFIX, RunDir
from recsys.spec import Spec
from recsys.tables import format_table

log = logging.getLogger("recsys.train")

TABLE_PREFIX, TABLE_SUFFIX = "ebc.embedding_bags.", ".weight"


@dataclass
class TableMatch:
    """How one table's rows were filled: ``matched`` rows came from the source, by ``how``."""

    rows: int
    matched: int
    how: str


@dataclass
class WarmStartReport:
    """What a warm start loaded and what it initialised fresh (logged, and kept in run.json)."""

    source: str
    checkpoint: str
    loaded: list[str] = field(default_factory=list)
    fresh: dict[str, str] = field(default_factory=dict)  # parameter -> why
    tables: dict[str, TableMatch] = field(default_factory=dict)

    def summary(self) -> str:
        rows = [[name, m.rows, m.matched, m.rows - m.matched, m.how]
                for name, m in sorted(self.tables.items())]
        text = (f"warm start from {self.source} ({self.checkpoint}): {len(self.loaded)} dense "
                f"tensor(s) loaded, {len(self.fresh)} initialised fresh, optimizer state fresh")
        if rows:
            text += "\n" + format_table(["table", "rows", "from source", "fresh", "matched by"],
                                        rows)
        if self.fresh:
            text += "\nfresh: " + "; ".join(f"{k} ({why})" for k, why in sorted(self.fresh.items()))
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "checkpoint": self.checkpoint, "loaded": self.loaded,
                "fresh": self.fresh,
                "tables": {k: vars(v) for k, v in sorted(self.tables.items())}}


def warm_start(model: nn.Module, spec: Spec, manifest: DatasetManifest,
               source: str | Path) -> WarmStartReport:
    """Copy the weights of run ``source``'s latest checkpoint into ``model`` (the new run's
    DistributedModelParallel or plain ranker, whose state dict holds the ranker under
    ``model.``) by the rules of this module. A collective: every rank calls it."""
    run = RunDir(source)
    if not run.path.is_dir():
        raise RunError(str(run.path), "--init-from: not a run directory")
    old_spec = run.spec()
    old_ranker, checkpoint = run.trained_ranker("cpu", purpose="warm-start from")
    old = old_ranker.state_dict()
    old_manifest = _manifest_of(old_spec)
    report = WarmStartReport(str(run.path), checkpoint.name)
    state = model.state_dict()
    for key, target in state.items():
        name = key.removeprefix(MODEL_PREFIX)
        if name not in old:
            report.fresh[name] = "not in the source model"
            continue
        if name.startswith(TABLE_PREFIX) and name.endswith(TABLE_SUFFIX):
            table = name[len(TABLE_PREFIX):-len(TABLE_SUFFIX)]
            why = _check_dims(old[name], target)
            if why:
                report.fresh[name] = why
                continue
            rows, how = _row_map(table, spec, manifest, old_spec, old_manifest,
                                 int(old[name].shape[0]), _global_rows(target))
            _copy_rows(target, old[name], rows)
            report.tables[table] = TableMatch(len(rows), int((rows >= 0).sum()), how)
        elif tuple(old[name].shape) == tuple(_global_shape(target)):
            _copy_all(target, old[name])
            report.loaded.append(name)
        else:
            report.fresh[name] = (f"shape {tuple(old[name].shape)} in the source, "
                                  f"{tuple(_global_shape(target))} here")
    model.load_state_dict(state)
    return report


def _manifest_of(spec: Spec) -> DatasetManifest | None:
    """The source run's dataset manifest (for its vocabularies), if it is still there."""
    path = Path(spec.data.path)
    if not (path / MANIFEST).is_file():
        log.warning("warm start: the source run's dataset %s is gone: table rows are matched by "
                    "id", path)
        return None
    return DatasetManifest.load(path)


def _check_dims(old: torch.Tensor, target: Any) -> str | None:
    dim = _global_shape(target)[1]
    if int(old.shape[1]) != int(dim):
        return f"embedding dim {int(old.shape[1])} in the source, {int(dim)} here"
    return None


def _row_map(table: str, spec: Spec, manifest: DatasetManifest, old_spec: Spec,
             old_manifest: DatasetManifest | None, old_rows: int, new_rows: int
             ) -> tuple[np.ndarray, str]:
    """For each row of the new table, the source row it takes (-1: fresh), and how it was
    matched."""
    new_vocab = _table_vocab(table, spec, manifest)
    old_vocab = _table_vocab(table, old_spec, old_manifest) if old_manifest else None
    if new_vocab is not None and old_vocab is not None:
        (new_info, new_root), (old_info, old_root) = new_vocab, old_vocab
        if new_info.kind == VocabKind.HASH or old_info.kind == VocabKind.HASH:
            if new_info.kind == old_info.kind and new_info.hash_buckets == old_info.hash_buckets:
                return _by_id(old_rows, new_rows), "hash (same buckets)"
            return np.full(new_rows, -1, dtype=np.int64), "nothing (hashing changed)"
        return _by_value(new_info, new_root, old_info, old_root, old_rows, new_rows), \
            "vocabulary"
    return _by_id(old_rows, new_rows), "id"


def _table_vocab(table: str, spec: Spec, manifest: DatasetManifest | None
                 ) -> tuple[VocabInfo, Path] | None:
    """The vocabulary of the (first) column that feeds ``table``, with its dataset directory."""
    if manifest is None or not manifest.vocabularies or manifest.root is None:
        return None
    for f in spec.features.sparse_fields():
        if f.table_name == table and f.source_column in manifest.vocabularies:
            return manifest.vocabularies[f.source_column], manifest.root
    return None


def _by_id(old_rows: int, new_rows: int) -> np.ndarray:
    rows = np.full(new_rows, -1, dtype=np.int64)
    n = min(old_rows, new_rows)
    rows[:n] = np.arange(n)
    return rows


def _by_value(new_info: VocabInfo, new_root: Path, old_info: VocabInfo, old_root: Path,
              old_rows: int, new_rows: int) -> np.ndarray:
    """New id ``1 + i`` (the i-th value of the new vocabulary) takes old id ``1 + j`` where the
    old vocabulary's j-th value is the same raw value; id 0 (unknown) takes id 0."""
    new_values = _values(new_root, new_info)
    old_values = _values(old_root, old_info)
    if new_values.type != old_values.type:  # e.g. ids read as integers once, as strings later
        new_values, old_values = new_values.cast(pa.string()), old_values.cast(pa.string())
    at = pc.index_in(new_values, value_set=old_values)  # null where the old run never saw it
    found = at.is_valid().to_numpy(zero_copy_only=False)
    old_ids = at.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    new_ids = np.arange(1, len(new_values) + 1)
    keep = found & (new_ids < new_rows) & (old_ids < old_rows)
    rows = np.full(new_rows, -1, dtype=np.int64)
    rows[0] = 0
    rows[new_ids[keep]] = old_ids[keep]
    return rows


def _values(root: Path, info: VocabInfo) -> pa.Array:
    import pyarrow.parquet as pq

    if info.file is None:
        raise RunError(str(root / MANIFEST), "a vocabulary without its file")
    return pq.read_table(root / info.file).column("value").combine_chunks()


# ---- writing into (possibly sharded) tensors ------------------------------------------------------

def _global_shape(t: Any) -> tuple[int, ...]:
    return tuple(t.size()) if isinstance(t, ShardedTensor) else tuple(t.shape)


def _global_rows(t: Any) -> int:
    return int(_global_shape(t)[0])


def _pieces(t: Any) -> list[tuple[torch.Tensor, int, int]]:
    """(local tensor, row offset, column offset) of each piece of ``t`` this rank holds."""
    if isinstance(t, ShardedTensor):
        return [(s.tensor, int(s.metadata.shard_offsets[0]), int(s.metadata.shard_offsets[1]))
                for s in t.local_shards()]
    return [(t, 0, 0)]


@torch.no_grad()
def _copy_rows(target: Any, source: torch.Tensor, rows: np.ndarray) -> None:
    for local, r0, c0 in _pieces(target):
        mine = rows[r0:r0 + local.shape[0]]
        have = np.flatnonzero(mine >= 0)
        if not len(have):
            continue
        src = source[torch.from_numpy(mine[have]), c0:c0 + local.shape[1]]
        local[torch.from_numpy(have).to(local.device)] = src.to(local.device, local.dtype)


@torch.no_grad()
def _copy_all(target: Any, source: torch.Tensor) -> None:
    for local, r0, c0 in _pieces(target):
        if local.dim() == 0:
            local.copy_(source)
            continue
        piece = source[r0:r0 + local.shape[0]]
        if local.dim() > 1:
            piece = piece[:, c0:c0 + local.shape[1]]
        local.copy_(piece.to(local.device, local.dtype))
