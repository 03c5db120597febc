"""The spec's embedding tables as TorchRec configs, and the EmbeddingBagCollection built from them."""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.models.archs import Fields
from recsys.spec import FeaturesSpec, Pooling, TableDataType

# the weights' storage; FBGEMM's fused kernels (CPU and CUDA) and TorchRec's plain and quantized
# EBCs all read fp16 rows and pool into fp32
_DATA_TYPE = {TableDataType.FP32: DataType.FP32, TableDataType.FP16: DataType.FP16}


def embedding_bag_configs(features: FeaturesSpec) -> list[EmbeddingBagConfig]:
    """One EmbeddingBagConfig per table that some feature looks up, with those features and the
    table's weight data type (``features.data_type`` unless the table sets its own).

    Every table pools by sum here, mean-pooled ones too: :class:`PooledInput` divides those
    features by their bag's length. TorchRec runs one FBGEMM kernel (and one backward, one
    optimizer update) per pooling mode, so a spec mixing sum and mean tables would pay for two
    groups on every step; the division gives the same pooled values and the same gradients.

    Example:
        >>> [c.name for c in embedding_bag_configs(spec.features)]
        ['category', 'user_id', ...]
    """
    features.require_sizes()
    users: dict[str, list[str]] = {}
    for f in features.sparse_fields():
        users.setdefault(f.table_name, []).append(f.name)
    return [
        EmbeddingBagConfig(name=t.name, num_embeddings=t.num_embeddings,
                           embedding_dim=int(t.embedding_dim or features.embedding_dim),
                           feature_names=users[t.name], pooling=PoolingType.SUM,
                           data_type=_DATA_TYPE[t.data_type or features.data_type])
        for t in features.resolved_tables() if t.name in users
    ]


def mean_pooled_features(features: FeaturesSpec) -> list[str]:
    """The sparse features whose table pools by mean (``pooling = "mean"``).

    Example:
        >>> mean_pooled_features(spec.features)
        ['user_hist_categories']
    """
    tables = {t.name: t for t in features.resolved_tables()}
    return [f.name for f in features.sparse_fields()
            if tables[f.table_name].pooling == Pooling.MEAN]


def over_arch_fields(features: FeaturesSpec) -> Fields:
    """What the over-arch sees: the pooled features in the model's order (:func:`feature_order`)
    with their widths and sides, and the dense features' sides.

    Example:
        >>> over_arch_fields(spec.features).names[:2]
        ['user_id', 'user_age']
    """
    configs = embedding_bag_configs(features)
    side = {f.name: f.side.value for f in features.fields}
    names = [f for c in configs for f in c.feature_names]
    return Fields(dims=[c.embedding_dim for c in configs for _ in c.feature_names], names=names,
                  sides=[side[n] for n in names],
                  dense_sides=[f.side.value for f in features.dense_fields()])


def build_ebc(features: FeaturesSpec, device: str | torch.device = "meta"
              ) -> EmbeddingBagCollection:
    """The EmbeddingBagCollection of the spec's tables; on ``meta`` by default, so that nothing
    is allocated until the sharder (or ``init_on(...)``) places it.

    Example:
        >>> ebc = build_ebc(spec.features)            # meta: planning and DMP
        >>> ebc = build_ebc(spec.features, "cpu")     # materialised: plain single-process use
    """
    return EmbeddingBagCollection(tables=embedding_bag_configs(features), device=torch.device(device))


def feature_order(ebc: torch.nn.Module) -> list[str]:
    """The model's feature order: table after table as the spec declares them, each table's
    features in its config's order. The over-arch is trained and served on this order.

    Example:
        >>> feature_order(build_ebc(spec.features))
        ['user_id', 'user_age', ...]
    """
    return [f for c in ebc.embedding_bag_configs() for f in c.feature_names]


class PooledInput(torch.nn.Module):
    """The EBC's output as the over-arch's input: ``(B, sum of dims)`` in ``keys`` order
    (:func:`pooled_in_order`), each feature of ``mean`` divided by its bag's length (0 for an
    empty bag, as FBGEMM's mean pooling gives). The lengths come from the KJT the EBC read.

    Example:
        >>> pool = PooledInput(["user_id", "genres"], mean=["genres"])
        >>> pool(ebc(kjt), kjt).shape
        torch.Size([B, 32])
    """

    def __init__(self, keys: list[str], mean: list[str]) -> None:
        super().__init__()
        self.keys = list(keys)
        self.mean = [k for k in keys if k in set(mean)]

    def forward(self, pooled: KeyedTensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        if len(self.mean) == 0:
            return pooled_in_order(pooled, self.keys)
        counts = torch.stack([sparse[k].lengths() for k in self.mean], dim=1).clamp(min=1)
        return pooled_in_order(pooled, self.keys, self.mean, counts)


def pooled_in_order(pooled: KeyedTensor, keys: list[str], mean: list[str] | None = None,
                    counts: torch.Tensor | None = None) -> torch.Tensor:
    """The pooled embeddings as one ``(B, sum of dims)`` tensor with the features in ``keys``
    order, whatever order the EBC produced them in; with ``mean`` and ``counts`` (``(B,
    len(mean))`` bag lengths, at least 1), each feature of ``mean`` divided by its column of
    ``counts`` on the way.

    A sharded EBC returns its features grouped by shard (table-wise, column-wise, ... groups in
    an order that depends on the sharding plan), a plain or quantized one in config order: taking
    ``pooled.values()`` by position would make the over-arch's input depend on the plan, so a
    model trained on N processes would score differently on one. The regrouping is by key.

    Where the EBC's order already is ``keys`` (a plain EBC, and many plans) and nothing is
    divided, its values are used as they are; otherwise one split and one concatenation.
    ``KeyedTensor.regroup`` does the same for any number of KeyedTensors at about three times the
    cost (and a permutation kernel in the backward), which shows at small batches.
    """
    have = pooled.keys()
    if counts is None and have == keys:
        return pooled.values()
    parts = torch.split(pooled.values(), pooled.length_per_key(), dim=1)
    index = {k: i for i, k in enumerate(have)}
    column: dict[str, int] = {}
    if mean is not None:
        column = {k: j for j, k in enumerate(mean)}
    out: list[torch.Tensor] = []
    for k in keys:
        part = parts[index[k]]
        if counts is not None and k in column:
            j = column[k]
            part = part / counts[:, j:j + 1].to(part.dtype)
        out.append(part)
    return torch.cat(out, dim=1)


# one call in a traced graph (TorchRec's pipeline and the export trace the ranker): the order test
# above is plain Python on the keys, which a symbolic trace cannot follow
torch.fx.wrap("pooled_in_order")
