"""``recsys spec init DATASET --arch ARCH -o SPEC.toml``: a complete, commented spec for a prepared
dataset, so that nobody copies 39 table sizes out of ``dataset.json`` by hand.

Every feature column of the dataset becomes a field with the side and kind its manifest records
(id lists pool by mean, the usual choice for a bag of ids); table sizes stay ``"auto"`` and are read
from ``dataset.json`` when the spec is used; the labels become the model's tasks; the model, loss,
training and distribution sections are written out in full with their defaults, ready to edit.
The text is validated (and its sizes resolved against the dataset) before it is returned.

Example:
    >>> text = init_spec("data/criteo", arch="dcn")
    >>> print(text.splitlines()[0])
    # Spec for the dataset at data/criteo (criteo), written by `recsys spec init`.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from recsys.data.schema import (
    ColumnInfo,
    ColumnRole,
    DatasetManifest,
    check_spec_against_manifest,
    with_dataset_sizes,
)
from recsys.errors import DataError, UsageError
from recsys.models.archs import ARCHS
from recsys.spec import Spec, spec_to_dict, validate_spec
from recsys.spec.io import _to_toml

FEATURE_KINDS = {ColumnRole.DENSE: "dense", ColumnRole.SPARSE: "sparse",
                 ColumnRole.MULTI_SPARSE: "multi_sparse"}
PREFERRED_VIEW = "impressions"


def init_spec(dataset: str | Path, arch: str = "dcn", *, name: str | None = None,
              labels: list[str] | None = None, view: str | None = None,
              embedding_dim: int = 16) -> str:
    """The TOML text of a spec that trains ``arch`` on the prepared dataset at ``dataset``.

    Args:
        dataset: a prepared dataset directory (``dataset.json`` and shards), written into the
            spec's ``data.path`` as given.
        arch: one of the registered arches (``recsys.models.archs.ARCHS``).
        name: the spec's name (default: the dataset's).
        labels: the label columns to train on, in task order (default: every label column).
        view: the dataset view (default ``impressions`` when the dataset has it, else the first).
        embedding_dim: every table's embedding dim.
    """
    if arch not in ARCHS:
        raise UsageError(f"--arch: unknown arch '{arch}' (known: {', '.join(sorted(ARCHS))})")
    manifest = DatasetManifest.load(dataset)
    where = str(Path(dataset) / "dataset.json")
    chosen_view = _view(manifest, view, where)
    label_names = _labels(manifest, labels, where)
    features = [c for c in manifest.columns if c.role in FEATURE_KINDS]
    if not any(c.role != ColumnRole.DENSE for c in features):
        raise DataError(where, "the dataset has no sparse feature column; a ranker needs at least "
                        "one id feature")
    raw: dict[str, Any] = {
        "name": name or manifest.name,
        "description": f"{arch} on {manifest.name} (written by recsys spec init)",
        "data": {"source": "parquet", "path": str(dataset), "view": chosen_view,
                 "labels": label_names},
        "features": {"embedding_dim": embedding_dim,
                     "fields": [_field(c) for c in features]},
        "model": {"arch": arch, "tasks": label_names},
    }
    spec = validate_spec(raw, f"<spec init {dataset}>")
    # it must also hold against the dataset, sizes included, before anyone trains on it
    check_spec_against_manifest(with_dataset_sizes(spec, manifest), manifest)
    text = _render(spec, manifest, dataset, arch, features)
    validate_spec(tomllib.loads(text), f"<spec init {dataset}>")  # what is written reads back
    return text


def _view(manifest: DatasetManifest, view: str | None, where: str) -> str:
    if view is not None:
        if view not in manifest.views:
            raise DataError(where, f"--view: the dataset has no view '{view}' "
                            f"(views: {', '.join(sorted(manifest.views))})")
        return view
    return PREFERRED_VIEW if PREFERRED_VIEW in manifest.views else sorted(manifest.views)[0]


def _labels(manifest: DatasetManifest, labels: list[str] | None, where: str) -> list[str]:
    known = [c.name for c in manifest.columns if c.role == ColumnRole.LABEL]
    if not known:
        raise DataError(where, "the dataset has no label column")
    if not labels:
        return known
    unknown = [lab for lab in labels if lab not in known]
    if unknown:
        raise DataError(where, f"--labels: {', '.join(unknown)} not among the dataset's label "
                        f"columns ({', '.join(known)})")
    return list(dict.fromkeys(labels))


def _field(col: ColumnInfo) -> dict[str, Any]:
    field: dict[str, Any] = {"name": col.name, "side": str(col.side or "context"),
                             "kind": FEATURE_KINDS[col.role]}
    if col.role == ColumnRole.MULTI_SPARSE:
        field["pooling"] = "mean"
    return field


def _render(spec: Spec, manifest: DatasetManifest, dataset: str | Path, arch: str,
            features: list[ColumnInfo]) -> str:
    d = spec_to_dict(spec)
    rows = manifest.rows.get(spec.data.view, {})
    split_rows = ", ".join(f"{s} {n:,}" for s, n in rows.items())
    lines = [
        f"# Spec for the dataset at {dataset} ({manifest.name}), written by `recsys spec init`.",
        "# Check it with `recsys spec show SPEC`; train with `recsys train SPEC`.",
        f"# The {spec.data.view} view holds {split_rows or 'no'} rows.",
        f"name = {json.dumps(spec.name)}",
        f"description = {json.dumps(spec.description)}",
        "",
        "[data]",
        'source = "parquet"          # a prepared dataset directory (dataset.json + shards)',
        f"path = {json.dumps(str(dataset))}",
        f"view = {json.dumps(spec.data.view)}",
        f"labels = {json.dumps(spec.data.labels)}   # label columns; each is a task below",
        "",
        "[features]",
        f"embedding_dim = {spec.features.embedding_dim}        # every table's dim unless a field "
        "sets its own",
        "# Each sparse field has its own table; num_embeddings is left out, so its size is the",
        "# column's cardinality in dataset.json, read when the spec is used (write a number to "
        "fix it).",
    ]
    for col in features:
        f = spec.features.field(col.name)
        about = col.description or ""
        if col.cardinality:
            about = f"{about}; " if about else ""
            about += f"{col.cardinality:,} ids in dataset.json"
        lines += ["", "[[features.fields]]" + (f"   # {about}" if about else "")]
        lines.append(f"name = {json.dumps(f.name)}")
        lines.append(f"side = {json.dumps(str(f.side))}")
        lines.append(f"kind = {json.dumps(str(f.kind))}")
        if f.pooling is not None:
            lines.append(f"pooling = {json.dumps(str(f.pooling))}       # how a list of ids "
                         "pools: mean or sum")
    sections = [("model", f"the over-arch: {ARCHS[arch].summary}; every setting at its "
                 "default"), ("loss", "the objective's terms (defaults: the task losses only)"),
                ("train", "optimizers, batch (global, over all processes), epochs, evaluation"),
                ("distributed", "processes and sharding (the planner chooses by default)")]
    for key, comment in sections:
        lines += ["", f"# ---- {key}: {comment}", _to_toml({key: d[key]}).strip()]
    return "\n".join(lines) + "\n"
