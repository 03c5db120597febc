"""What a dataset holds (its manifest) and what a Batch is built from (the batch schema).

A dataset is a directory with ``dataset.json`` (a :class:`DatasetManifest`) and Parquet shards per view
and split, e.g. ``impressions/train/part-00000.parquet``. Every column has a role: a model feature
(dense, sparse, multi_sparse, with its side and cardinality), a label, a group id, the cascade stage,
the teacher score, an oracle probability, or per-id weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from recsys.errors import DataError
from recsys.losses.stages import Stage as Stage  # defined with the losses; re-exported here
from recsys.quantization.rvq import num_nodes as num_nodes  # defined with the RVQ; re-exported
from recsys.spec import CodeSource, FeatureKind, FeatureSpec, OOVPolicy, Side, Spec

MANIFEST = "dataset.json"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")

# Column names shared by every writer and the loader.
REQUEST_ID = "request_id"
USER_ID = "user_id"
# the user group of GAUC where the user_id feature cannot be one: ids over every row of every split
# (a vocabulary fitted on train maps every user that train never saw to id 0, one "user")
USER_GROUP = "user_group"
STAGE = "stage"
TEACHER = "teacher"
RVQ_CODE = "rvq_code"  # the auxiliary sparse feature: L trie-node ids per row


class ColumnRole(StrEnum):
    DENSE = "dense"
    SPARSE = "sparse"
    MULTI_SPARSE = "multi_sparse"
    LABEL = "label"
    GROUP = "group"
    STAGE = "stage"
    TEACHER = "teacher"
    ORACLE = "oracle"  # the true probability of a label (synthetic data)
    WEIGHTS = "weights"
    OTHER = "other"


class ColumnInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    role: ColumnRole
    side: Side | None = None
    cardinality: int | None = None  # ids lie in [0, cardinality)
    description: str = ""


class VocabKind(StrEnum):
    VOCAB = "vocab"  # a learned vocabulary: raw value -> id in [1, size), id 0 = unknown / rare
    HASH = "hash"  # a stable hash of the raw value into [0, hash_buckets)


class VocabInfo(BaseModel):
    """How the raw values of one id column became its ids (``dataset.json`` ``vocabularies``), so
    that ``predict``, ``serve`` and warm starts map raw values exactly as the preparation did.

    A ``vocab`` column's ids are ``1 + position`` of the raw value in ``file`` (a Parquet file
    with one column ``value``, relative to the dataset directory); raw values seen fewer than
    ``min_count`` times in train, or never, get id 0. A ``hash`` column has no file: its id is
    :func:`recsys.data.vocab.stable_hash` of the raw value modulo ``hash_buckets``.
    """

    model_config = ConfigDict(extra="forbid")

    kind: VocabKind
    size: int  # the table rows the column needs: ids lie in [0, size)
    value_type: str  # "string" or "int64": the raw values' type
    file: str | None = None
    min_count: int = 1
    hash_buckets: int | None = None


class DenseScaling(BaseModel):
    """How a dense column's raw values x became its feature (``dataset.json`` ``dense_scaling``):
    ``none`` x, ``log`` sign(x) log1p(|x|), ``standard`` (x - mean) / std with the train split's
    moments. ``recsys serve`` applies it to the raw values a request sends.

    Example:
        >>> DenseScaling(kind="standard", mean=2.0, std=4.0).apply(np.array([6.0]))
        array([1.])
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["none", "log", "standard"]
    mean: float = 0.0
    std: float = 1.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "log":
            return np.sign(x) * np.log1p(np.abs(x))
        if self.kind == "standard":
            return (x - self.mean) / self.std
        return x

    def describe(self) -> str:
        if self.kind == "log":
            return "sign(x) * log1p(|x|)"
        if self.kind == "standard":
            return f"(x - {self.mean:.6g}) / {self.std:.6g} (train mean / std)"
        return "x as it is"


class DatasetManifest(BaseModel):
    """The contents of ``dataset.json``.

    Example:
        >>> m = DatasetManifest.load("data/quickstart")
        >>> m.files("impressions", "train")[:1]
        [PosixPath('data/quickstart/impressions/train/part-00000.parquet')]
    """

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    source: dict[str, object]
    config_hash: str
    columns: list[ColumnInfo]
    # view -> split -> shard paths relative to the dataset directory
    views: dict[str, dict[str, list[str]]]
    rows: dict[str, dict[str, int]]
    # id column -> how its raw values map to ids (datasets made by `recsys data prepare table`)
    vocabularies: dict[str, VocabInfo] = {}
    # dense column -> how its raw values were scaled (datasets made by `prepare table`)
    dense_scaling: dict[str, DenseScaling] = {}
    root: Path | None = None  # set on load, not stored

    @classmethod
    def load(cls, root: str | Path) -> DatasetManifest:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise DataError(str(root), f"not a dataset directory: {MANIFEST} is missing "
                            "(generate it with `recsys data synth` or `recsys data prepare`)")
        try:
            m = cls.model_validate_json(path.read_text())
        except ValueError as e:
            raise DataError(str(path), f"unreadable dataset manifest: {e}") from None
        if m.format_version != FORMAT_VERSION:
            raise DataError(str(path), f"format_version {m.format_version} is not supported "
                            f"(expected {FORMAT_VERSION}); regenerate the dataset")
        m.root = root
        return m

    def save(self, root: str | Path) -> None:
        root = Path(root)
        tmp = root / (MANIFEST + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2, exclude={"root"}))
        tmp.replace(root / MANIFEST)

    def column(self, name: str) -> ColumnInfo | None:
        return next((c for c in self.columns if c.name == name), None)

    def files(self, view: str, split: str) -> list[Path]:
        assert self.root is not None, "manifest was not loaded from a directory"
        if view not in self.views:
            raise DataError(str(self.root / MANIFEST),
                            f"no view '{view}' (views: {sorted(self.views)})")
        if split not in self.views[view]:
            raise DataError(str(self.root / MANIFEST),
                            f"view '{view}' has no split '{split}' "
                            f"(splits: {sorted(self.views[view])})")
        return [self.root / f for f in self.views[view][split]]


# --------------------------------------------------------------------------------------------------
# the batch schema: which columns become which parts of a Batch


@dataclass(frozen=True)
class SparseColumn:
    key: str  # the KJT key (the feature name)
    column: str
    num_embeddings: int
    oov: OOVPolicy
    multi: bool
    weights: str | None = None


@dataclass(frozen=True)
class BatchSchema:
    """The columns a Batch is made of, in order.

    Example:
        >>> schema = BatchSchema.from_spec(spec)
        >>> schema.sparse_keys
        ['user_id', 'item_id', ...]
    """

    dense: list[str]
    sparse: list[SparseColumn]
    labels: list[str]
    groups: dict[str, str] = field(default_factory=dict)  # "request"/"user" -> column
    stage: str | None = None
    teacher: str | None = None
    oracle: dict[str, str] = field(default_factory=dict)  # label -> probability column
    # the labels whose values must be 0 or 1 (from a spec: every label not in data.graded_labels);
    # the other labels may hold any finite value. Empty here so that hand-made schemas opt in.
    binary_labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [b for b in self.binary_labels if b not in self.labels]
        if unknown:
            raise ValueError(f"binary_labels {unknown} are not among labels {self.labels}")

    @property
    def sparse_keys(self) -> list[str]:
        return [s.key for s in self.sparse]

    @property
    def columns(self) -> list[str]:
        """Every Parquet column the loader reads, without repeats."""
        cols = list(self.dense) + [s.column for s in self.sparse]
        cols += [s.weights for s in self.sparse if s.weights]
        cols += list(self.labels) + list(self.groups.values())
        cols += [c for c in (self.stage, self.teacher) if c] + list(self.oracle.values())
        return list(dict.fromkeys(cols))

    @classmethod
    def from_spec(cls, spec: Spec, manifest: DatasetManifest | None = None) -> BatchSchema:
        """The spec's features plus whatever labels, groups, stage, teacher and oracle columns the
        dataset has (those are optional; features and labels are not)."""
        if manifest is not None:
            spec = with_dataset_sizes(spec, manifest)
        feats = spec.features
        feats.require_sizes()
        sparse = [_sparse_column(f, feats.table_of(f).num_embeddings) for f in feats.sparse_fields()]
        have = {c.name for c in manifest.columns} if manifest else None

        def present(col: str) -> bool:
            return have is None or col in have

        user = USER_GROUP if have is not None and USER_GROUP in have else USER_ID
        groups = {k: c for k, c in (("request", REQUEST_ID), ("user", user)) if present(c)}
        oracle = {lab: f"{lab}_prob" for lab in spec.data.labels if present(f"{lab}_prob")}
        if manifest is not None:
            oracle = {lab: col for lab, col in oracle.items()
                      if manifest.column(col).role == ColumnRole.ORACLE}  # type: ignore[union-attr]
        h = spec.loss.hierarchical
        if h.weight > 0 and h.codes == CodeSource.DATA and RVQ_CODE not in {c.key for c in sparse}:
            # the codes ride along in the KJT for the loss (the embedding collection ignores them)
            sparse.append(SparseColumn(RVQ_CODE, RVQ_CODE, num_nodes(h.rvq.levels, h.rvq.codes),
                                       OOVPolicy.ERROR, multi=True))
        return cls(
            dense=[f.source_column for f in feats.dense_fields()],
            sparse=sparse,
            labels=list(spec.data.labels),
            groups=groups,
            stage=STAGE if present(STAGE) else None,
            teacher=TEACHER if present(TEACHER) else None,
            oracle=oracle,
            binary_labels=tuple(lab for lab in spec.data.labels
                                if lab not in spec.data.graded_labels),
        )

    def with_rvq_code(self, num_nodes: int) -> BatchSchema:
        """The same schema with the auxiliary ``rvq_code`` list column read into the KJT."""
        extra = SparseColumn(RVQ_CODE, RVQ_CODE, num_nodes, OOVPolicy.ERROR, multi=True)
        return replace(self, sparse=[*self.sparse, extra])


def _sparse_column(f: FeatureSpec, num_embeddings: int) -> SparseColumn:
    return SparseColumn(key=f.name, column=f.source_column, num_embeddings=num_embeddings,
                        oov=f.oov, multi=f.kind == FeatureKind.MULTI_SPARSE, weights=f.weights)


def check_spec_against_manifest(spec: Spec, manifest: DatasetManifest) -> None:
    """Fail early, naming the field, when the spec and the dataset disagree."""
    where = str((manifest.root or Path(".")) / MANIFEST)
    expected_role = {FeatureKind.DENSE: ColumnRole.DENSE, FeatureKind.SPARSE: ColumnRole.SPARSE,
                     FeatureKind.MULTI_SPARSE: ColumnRole.MULTI_SPARSE}
    for f in spec.features.fields:
        col = manifest.column(f.source_column)
        if col is None:
            raise DataError(where, f"features.fields[{f.name}]: the dataset has no column "
                            f"'{f.source_column}' (columns: "
                            f"{', '.join(c.name for c in manifest.columns)})")
        if col.role != expected_role[f.kind]:
            raise DataError(where, f"features.fields[{f.name}]: column '{col.name}' holds "
                            f"{col.role} values, the spec declares kind = '{f.kind}'")
        if f.kind != FeatureKind.DENSE and f.oov == OOVPolicy.ERROR and col.cardinality:
            n = spec.features.table_of(f).num_embeddings
            if n is not None and col.cardinality > n:  # None: sized from this very column
                raise DataError(where, f"features.fields[{f.name}]: ids go up to "
                                f"{col.cardinality - 1} but the table has {n} rows: raise "
                                "num_embeddings or set oov = 'hash'")
    for lab in spec.data.labels:
        col = manifest.column(lab)
        if col is None or col.role != ColumnRole.LABEL:
            labels = [c.name for c in manifest.columns if c.role == ColumnRole.LABEL]
            raise DataError(where, f"data.labels: '{lab}' is not a label column of the dataset "
                            f"(labels: {labels})")



def with_dataset_sizes(spec: Spec, manifest: DatasetManifest) -> Spec:
    """``spec`` with every ``num_embeddings = "auto"`` (or left out) filled in from the dataset:
    a field's own table gets its column's cardinality, a shared table the largest cardinality of
    the columns of the features that use it. A spec with every size given comes back as it is.

    Example:
        >>> spec = with_dataset_sizes(load_spec("specs/criteo.toml"), manifest)
        >>> spec.features.field("C1").num_embeddings
        1048577
    """
    feats = spec.features
    if not feats.unsized_tables():
        return spec
    where = str((manifest.root or Path(".")) / MANIFEST)

    def cardinality(f: FeatureSpec, key: str) -> int:
        col = manifest.column(f.source_column)
        if col is None:
            raise DataError(where, f"{key} is 'auto' but the dataset has no column "
                            f"'{f.source_column}' (features.fields[{f.name}])")
        if not col.cardinality:
            raise DataError(where, f"{key} is 'auto' but the dataset does not record the "
                            f"cardinality of column '{col.name}': set num_embeddings")
        return int(col.cardinality)

    fields = [f.model_copy(update={"num_embeddings": cardinality(
                  f, f"features.fields[{f.name}].num_embeddings")})
              if f.kind != FeatureKind.DENSE and f.table is None and f.num_embeddings is None
              else f for f in feats.fields]
    tables = []
    for t in feats.tables:
        if t.num_embeddings is None:
            key = f"features.tables[{t.name}].num_embeddings"
            sizes = [cardinality(f, key) for f in feats.fields if f.table == t.name]
            if not sizes:
                raise DataError(where, f"{key} is 'auto' but no feature uses table '{t.name}'")
            t = t.model_copy(update={"num_embeddings": max(sizes)})
        tables.append(t)
    features = feats.model_copy(update={"fields": fields, "tables": tables})
    return spec.model_copy(update={"features": features})
