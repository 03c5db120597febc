"""Read a dataset back through the loader and summarise it (what ``recsys data inspect`` prints)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recsys.data.loader import ParquetLoader
from recsys.data.parquet import ParquetSplit
from recsys.data.schema import BatchSchema, DatasetManifest, Stage
from recsys.progress import progress_bar
from recsys.tables import format_table


@dataclass
class SplitSummary:
    split: str
    rows: int = 0
    batches: int = 0
    positives: dict[str, float] = field(default_factory=dict)
    oracle: dict[str, float] = field(default_factory=dict)
    requests: int = 0
    users: int = 0
    stages: dict[str, int] = field(default_factory=dict)
    ids_seen: dict[str, int] = field(default_factory=dict)
    mean_length: dict[str, float] = field(default_factory=dict)


def summarise_split(split: ParquetSplit, name: str, batch_size: int = 8192,
                    progress: bool = True) -> SplitSummary:
    """One pass over a split in file order, every row, accumulating counts per column."""
    schema = split.schema
    loader = ParquetLoader(split, batch_size, shuffle=False, drop_last=False)
    out = SplitSummary(name)
    label_sum = dict.fromkeys(schema.labels, 0.0)
    oracle_sum = dict.fromkeys(schema.oracle, 0.0)
    id_counts = {s.key: np.zeros(s.num_embeddings, dtype=np.int64) for s in schema.sparse}
    value_total = dict.fromkeys(id_counts, 0)
    stage_counts = np.zeros(len(Stage), dtype=np.int64)
    groups: dict[str, set[int]] = {k: set() for k in schema.groups}
    for batch in progress_bar(loader.epoch(0), total=len(loader), desc=f"reading {name}", unit="batch",
                      disable=not progress, leave=False):
        out.rows += batch.batch_size
        out.batches += 1
        for k, v in batch.labels.items():
            label_sum[k] += float(v.sum())
        for k, v in batch.oracle.items():
            oracle_sum[k] += float(v.sum())
        for k, v in groups.items():
            v.update(np.unique(batch.groups[k].numpy()).tolist())
        if batch.stage is not None:
            stage_counts += np.bincount(batch.stage.numpy(), minlength=len(Stage))[: len(Stage)]
        for key, jt in batch.sparse.to_dict().items():
            values = jt.values().numpy()
            value_total[key] += len(values)
            spec = next(s for s in schema.sparse if s.key == key)
            id_counts[key] += np.bincount(np.mod(values, spec.num_embeddings),
                                          minlength=spec.num_embeddings)
    n = max(out.rows, 1)
    out.positives = {k: v / n for k, v in label_sum.items()}
    out.oracle = {k: v / n for k, v in oracle_sum.items()}
    out.requests = len(groups.get("request", ()))
    out.users = len(groups.get("user", ()))
    if schema.stage:
        out.stages = {s.name.lower(): int(stage_counts[s]) for s in Stage}
    out.ids_seen = {k: int((c > 0).sum()) for k, c in id_counts.items()}
    out.mean_length = {k: value_total[k] / n for k in id_counts}
    return out


def format_summary(manifest: DatasetManifest, view: str, schema: BatchSchema,
                   summaries: list[SplitSummary]) -> str:
    """Tables: rows and labels per split, stage shares (cascade data), and ids per feature."""
    labels = list(schema.labels)
    head = ["split", "rows", "requests", "users", *[f"{k} rate" for k in labels],
            *[f"{k} oracle" for k in schema.oracle]]
    rows = [[s.split, s.rows, s.requests, s.users, *[s.positives[k] for k in labels],
             *[s.oracle[k] for k in schema.oracle]]
            for s in summaries]
    parts = [f"dataset {manifest.root} ({manifest.name}), view '{view}'",
             format_table(head, rows)]
    if any(s.stages for s in summaries):
        names = [s.name.lower() for s in Stage]
        parts.append("deepest cascade stage reached (share of rows)")
        parts.append(format_table(["split", *names], [
            [s.split, *[s.stages[k] / max(s.rows, 1) for k in names]] for s in summaries]))
    train = summaries[0]
    parts.append(f"sparse features ({train.split})")
    parts.append(format_table(["feature", "table rows", "ids seen", "ids per row"], [
        [c.key, c.num_embeddings, train.ids_seen[c.key], train.mean_length[c.key]]
        for c in schema.sparse]))
    return "\n\n".join(parts)
