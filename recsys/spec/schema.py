"""The spec schema: the typed pydantic models of an experiment's TOML file.

A spec has six sections: ``data``, ``features``, ``model``, ``loss``, ``train`` and ``distributed``.
Every key is checked (unknown keys, wrong types and impossible values are errors); ``model`` is a
union discriminated by ``model.arch``, whose sections each arch declares in its own file under
``recsys/models/archs/``. The ``data`` and ``features`` sections are in :mod:`recsys.spec.data`
(re-exported here); this module has the training sections and the whole spec. Reading files, ``--set`` overrides, error messages and TOML output are in
:mod:`recsys.spec.io`.

Example:
    >>> spec = Spec.model_validate({"data": {"path": "data/x"},
    ...     "features": {"fields": [{"name": "u", "side": "user", "kind": "sparse",
    ...                              "num_embeddings": 10}]},
    ...     "model": {"arch": "dcn"}})
    >>> spec.model.arch, spec.model.dcn.num_layers
    ('dcn', 3)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Union

from pydantic import Field, model_validator

from recsys.models.archs import ARCHS, DEFAULT_ARCH
from recsys.spec.data import (
    DataSource,
    DataSpec,
    FeatureKind,
    FeatureSpec,
    FeaturesSpec,
    OOVPolicy,
    Pooling,
    PrepareSpec,
    Side,
    SyntheticSpec,
    TableDataType,
    TableSpec,
)
from recsys.spec.tune import PrunerSpec, SpaceEntry, TuneSpec
from recsys.validation import KeyedError, StrictModel, positive

__all__ = [
    "ARCH_NAMES",
    "CascadeSpec",
    "CodeSource",
    "DataSource",
    "DataSpec",
    "DenseOptimizer",
    "DenseOptimizerSpec",
    "Distillation",
    "DistributedSpec",
    "FTRLOptions",
    "FeatureKind",
    "FeatureSpec",
    "FeaturesSpec",
    "HierarchicalSpec",
    "PrunerSpec",
    "SpaceEntry",
    "TuneSpec",
    "LRSchedule",
    "ListwiseGroup",
    "ListwiseSpec",
    "LossSpec",
    "HEADLINE_METRICS",
    "ModelSpec",
    "OOVPolicy",
    "Pooling",
    "Precision",
    "PrepareSpec",
    "RVQSpec",
    "ShardingType",
    "Side",
    "SparseOptimizer",
    "SparseOptimizerSpec",
    "Spec",
    "SyntheticSpec",
    "TableDataType",
    "TableSharding",
    "TableSpec",
    "TrainSpec",
]

# --------------------------------------------------------------------------------------------------
# enums (string choices in the TOML)


class ShardingType(StrEnum):
    DATA_PARALLEL = "data_parallel"
    TABLE_WISE = "table_wise"
    COLUMN_WISE = "column_wise"
    TABLE_COLUMN_WISE = "table_column_wise"
    ROW_WISE = "row_wise"
    TABLE_ROW_WISE = "table_row_wise"


class SparseOptimizer(StrEnum):
    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAM = "adam"
    GFTRL = "gftrl"  # group-lasso FTRL (no fused FBGEMM kernel: recsys/train/optim.py)


class DenseOptimizer(StrEnum):
    SGD = "sgd"
    ADAGRAD = "adagrad"
    ADAM = "adam"
    ADAMW = "adamw"
    FTRL = "ftrl"


class Precision(StrEnum):
    """The arithmetic of the training forward (``train.precision``); no parameter changes dtype."""

    FP32 = "fp32"
    BF16 = "bf16"  # the forward and the losses under torch.autocast(bfloat16); losses upcast


class LRSchedule(StrEnum):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class Distillation(StrEnum):
    KL = "kl"
    NEURALSORT = "neuralsort"
    SOFTSORT = "softsort"


class ListwiseGroup(StrEnum):
    BATCH = "batch"
    REQUEST = "request"
    USER = "user"


class CodeSource(StrEnum):
    ONLINE = "online"  # RVQ inside the model on stop-gradient user embeddings, updated by EMA
    DATA = "data"  # precomputed codes in the data's rvq_code column (recsys rvq encode)


# --------------------------------------------------------------------------------------------------
# model: one section per arch (recsys.models.archs), a discriminated union on `arch`

# `model.arch` picks the class, so a resolved spec holds the chosen arch's sections only (an MLP's
# spec has no [model.pin]); the classes come from the registry, one file per arch
ModelSpec = Annotated[Union[tuple(a.model for a in ARCHS.values())],  # noqa: UP007
                      Field(discriminator="arch")]
ARCH_NAMES: tuple[str, ...] = tuple(sorted(ARCHS))

# --------------------------------------------------------------------------------------------------
# loss


class RVQSpec(StrictModel):
    levels: int = 3
    codes: int = 32
    ema_decay: float = 0.99
    dead_code_threshold: float = 1.0
    kmeans_init_batches: int = 4
    normalize: bool = True

    @model_validator(mode="after")
    def _check(self) -> RVQSpec:
        for name in ("levels", "codes", "kmeans_init_batches"):
            positive(name, getattr(self, name))
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        return self


class ListwiseSpec(StrictModel):
    weight: float = 0.0  # 0 = off
    group: ListwiseGroup = ListwiseGroup.BATCH
    temperature: float = 1.0


class HierarchicalSpec(StrictModel):
    """Group-wise listwise losses over RVQ user-code prefixes (docs/methods.md section 5)."""

    weight: float = 0.0  # lambda; 0 = off
    level_weights: list[float] | None = None  # None = uniform
    include_level0: bool = False
    temperature: float = 1.0
    all_gather: bool = False
    # online: RVQ in the model; data: the data's rvq_code column (recsys rvq encode), which a
    # features.fields entry named rvq_code (multi_sparse) can also feed to an embedding table
    codes: CodeSource = CodeSource.ONLINE
    rvq: RVQSpec = Field(default_factory=RVQSpec)

    @model_validator(mode="after")
    def _check(self) -> HierarchicalSpec:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        positive("temperature", self.temperature)
        levels = self.rvq.levels + int(self.include_level0)
        if self.level_weights is not None and (
                len(self.level_weights) != levels or min(self.level_weights) < 0):
            raise ValueError(f"level_weights needs {levels} non-negative weights (one per rvq "
                             "level, level 0 first when include_level0), got "
                             f"{self.level_weights}")
        return self


class CascadeSpec(StrictModel):
    """RankTower's hybrid objective (docs/methods.md section 4); a weight of 0 switches a term off."""

    distill_weight: float = 1.0
    fine_weight: float = 1.0
    coarse_weight: float = 1.0
    distill_temperature: float = 1.0
    distill: Distillation = Distillation.KL


class LossSpec(StrictModel):
    bce_weight: float = 1.0
    listwise: ListwiseSpec = Field(default_factory=ListwiseSpec)
    hierarchical: HierarchicalSpec = Field(default_factory=HierarchicalSpec)
    cascade: CascadeSpec = Field(default_factory=CascadeSpec)


# --------------------------------------------------------------------------------------------------
# training and distribution


class FTRLOptions(StrictModel):
    """The FTRL family's extra settings (used only by ``gftrl`` / ``ftrl``; lr is α)."""

    beta: float = 1.0
    l1: float = 0.0  # gftrl: λ1 per row (scaled by sqrt(dim)); ftrl: per coordinate
    l2: float = 0.0
    initial_accumulator: float = 0.1
    # the reference sums the loss over the batch and its l1 values assume that; our loss is the
    # batch mean, so the FTRL gradient is multiplied by the global batch size when this is true
    summed_loss: bool = True

    @model_validator(mode="after")
    def _check(self) -> FTRLOptions:
        for name in ("beta", "l1", "l2", "initial_accumulator"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        return self


class SparseOptimizerSpec(StrictModel):
    name: SparseOptimizer = SparseOptimizer.ROWWISE_ADAGRAD
    lr: float = 0.05
    eps: float = 1e-8
    weight_decay: float = 0.0
    ftrl: FTRLOptions = Field(default_factory=FTRLOptions)

    @model_validator(mode="after")
    def _check(self) -> SparseOptimizerSpec:
        positive("lr", self.lr)
        return self


class DenseOptimizerSpec(StrictModel):
    name: DenseOptimizer = DenseOptimizer.ADAM
    lr: float = 1e-3
    weight_decay: float = 0.0
    ftrl: FTRLOptions = Field(default_factory=FTRLOptions)

    @model_validator(mode="after")
    def _check(self) -> DenseOptimizerSpec:
        positive("lr", self.lr)
        return self


# the metrics train.headline_metric may name, and whether higher is better
HEADLINE_METRICS: dict[str, bool] = {
    "auc": True, "gauc_impressions": True, "gauc_uniform": True, "logloss": False, "ne": False,
    "ece": False}


class TrainSpec(StrictModel):
    seed: int = 0
    # the GLOBAL batch: split evenly over the processes (2048 on 2 processes is 1024 rows each), so
    # that a spec is one experiment whatever the world size; it must divide by the world size
    batch_size: int = 2048
    eval_batch_size: int | None = None  # global too; default batch_size
    epochs: int = 1
    max_steps: int | None = None
    sparse_optimizer: SparseOptimizerSpec = Field(default_factory=SparseOptimizerSpec)
    dense_optimizer: DenseOptimizerSpec = Field(default_factory=DenseOptimizerSpec)
    # an optimizer of its own for the interaction weights W_l of PIN / xDeepInt / DynInt (xDeepInt's
    # interaction selection: ftrl with l1); None = the dense optimizer updates them
    interaction_optimizer: DenseOptimizerSpec | None = None
    warmup_steps: int = 0
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    grad_clip: float | None = None
    eval_every_steps: int | None = None
    early_stopping_patience: int | None = None
    checkpoint_every_steps: int | None = None
    keep_checkpoints: int = 3
    # after training, also score every candidate of the test requests (the data's cascade view) and
    # report the pre-ranking metrics (Recall/NDCG@K against the ranker's top-K and the clicks)
    eval_cascade: bool = True
    # the label the cascade evaluation measures the model's top-K against (beside the ranker's)
    cascade_label: str = "click"
    # the validation metric of the first task that the log reports and early stopping follows;
    # higher is better except for logloss, ne, ece
    headline_metric: str = "auc"
    device: str = "auto"  # auto | cpu | cuda
    # bf16: the training steps' forward (over-arch and losses) under autocast; evaluation,
    # prediction and export stay fp32 (recsys/train/trainer.py)
    precision: Precision = Precision.FP32

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        for name in ("batch_size", "eval_batch_size", "epochs", "max_steps", "eval_every_steps",
                     "checkpoint_every_steps", "keep_checkpoints", "grad_clip"):
            positive(name, getattr(self, name))
        if self.headline_metric not in HEADLINE_METRICS:
            raise ValueError(f"headline_metric must be one of {', '.join(HEADLINE_METRICS)}, "
                             f"got '{self.headline_metric}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got '{self.device}'")
        return self


class TableSharding(StrictModel):
    table: str
    types: list[ShardingType]


class DistributedSpec(StrictModel):
    world_size: int = 1
    backend: str = "auto"  # auto | gloo | nccl
    sharding: list[TableSharding] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> DistributedSpec:
        positive("world_size", self.world_size)
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got '{self.backend}'")
        return self


# --------------------------------------------------------------------------------------------------
# the whole spec


class Spec(StrictModel):
    """A whole experiment: data, features, model, loss, training and distribution."""

    name: str = "experiment"
    description: str = ""
    data: DataSpec
    features: FeaturesSpec
    model: ModelSpec = Field(default_factory=lambda: ARCHS[DEFAULT_ARCH].model())
    loss: LossSpec = Field(default_factory=LossSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    # recsys tune's search space; left out of the resolved spec (and so of its hash) when absent
    tune: TuneSpec | None = Field(default=None, exclude_if=lambda v: v is None)

    @model_validator(mode="before")
    @classmethod
    def _default_arch(cls, raw: Any) -> Any:
        """``model.arch`` may be left out (the default arch): the union needs its tag."""
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict) \
                and "arch" not in raw["model"]:
            raw = {**raw, "model": {"arch": DEFAULT_ARCH, **raw["model"]}}
        return raw

    @model_validator(mode="after")
    def _cross_section(self) -> Spec:
        tables = {t.name: t for t in self.features.resolved_tables()}
        for s in self.distributed.sharding:
            if s.table not in tables:
                raise KeyedError("distributed.sharding",
                                  f"names table '{s.table}', which is not a table of this spec "
                                  f"(known: {', '.join(sorted(tables))})")
        self._check_fp16_tables(tables)
        arch = ARCHS[self.model.arch]
        if arch.stacks_fields:
            dims = {t.embedding_dim for t in tables.values()}
            dim = self.model.interaction_dim
            if dim is None and len(dims) > 1:
                raise KeyedError("model.interaction_dim",
                                 f"tables have different embedding dims {sorted(dims)}; "
                                 f"arch '{arch.name}' needs one: set interaction_dim")
            for key, message in self.model.check_dims(dim or next(iter(dims))):
                raise KeyedError(f"model.{key}", message)
        if self.tune is not None and self.tune.metric not in (None, *HEADLINE_METRICS):
            raise KeyedError("tune.metric", f"must be one of {', '.join(HEADLINE_METRICS)}, "
                             f"got '{self.tune.metric}'")
        unknown = [t for t in self.model.tasks if t not in self.data.labels]
        if unknown:
            raise KeyedError("model.tasks",
                              f"{unknown} are not among data.labels {self.data.labels}")
        return self

    def _check_fp16_tables(self, tables: dict[str, TableSpec]) -> None:
        """fp16 tables may not be data-parallel.

        Sharded tables are updated by FBGEMM's fused optimizers or by sharded group-lasso FTRL,
        which both keep their state in fp32. A data-parallel table is a dense parameter updated by
        a PyTorch optimizer whose state takes the weights' dtype: in fp16, an eps of 1e-8 rounds
        to 0 (rows without a gradient become 0/0 = NaN in unfused Adam and Adagrad), small squared
        gradients underflow and FTRL's summed-loss ones overflow 65504.
        """
        fp16 = {n for n, t in tables.items() if t.data_type == TableDataType.FP16}
        for s in self.distributed.sharding:
            if s.table in fp16 and ShardingType.DATA_PARALLEL in s.types:
                raise KeyedError(f"distributed.sharding[table={s.table}].types",
                                 f"table '{s.table}' is fp16 and may be data_parallel, whose "
                                 "PyTorch optimizer would keep its state in fp16 (NaN or lost "
                                 "updates); list only sharded types for it or make the table "
                                 "fp32 (its data_type)")
