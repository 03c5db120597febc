"""Mean-pooled tables are summed by the EBC and divided by PooledInput: the same pooled values and
the same table gradients as TorchRec's own mean pooling, with one pooling group per step."""

from __future__ import annotations

import torch
from conftest import tiny_spec_dict
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.models.tables import PooledInput, embedding_bag_configs, mean_pooled_features
from recsys.spec import validate_spec

# (table, rows, dim, features, pooling): the mean tables sit between sum ones, so the divided
# columns are in the middle and at the end of the over-arch input
TABLES = [("user", 7, 3, ["user_id"], PoolingType.SUM),
          ("genre", 5, 2, ["genres", "liked_genres"], PoolingType.MEAN),
          ("hour", 4, 4, ["hour"], PoolingType.SUM),
          ("tag", 6, 2, ["tags"], PoolingType.MEAN)]
KEYS = [f for t in TABLES for f in t[3]]
MEAN = [f for t in TABLES if t[4] == PoolingType.MEAN for f in t[3]]


def _ebc(pooling: PoolingType | None) -> EmbeddingBagCollection:
    torch.manual_seed(0)
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=f,
                           pooling=pooling or p) for n, r, d, f, p in TABLES])


def _kjt() -> KeyedJaggedTensor:
    # 3 rows; bags of 0 to 4 ids, an empty bag in each mean feature
    lengths = {"user_id": [1, 1, 1], "genres": [2, 0, 3], "liked_genres": [4, 1, 0],
               "hour": [1, 1, 1], "tags": [0, 2, 1]}
    rows = {"user": 7, "genre": 5, "hour": 4, "tag": 6}
    table = {f: t[0] for t in TABLES for f in t[3]}
    g = torch.Generator().manual_seed(1)
    values = [torch.randint(0, rows[table[k]], (sum(lengths[k]),), generator=g) for k in KEYS]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=KEYS, values=torch.cat(values),
        lengths=torch.tensor([n for k in KEYS for n in lengths[k]], dtype=torch.int32))


def test_summed_and_divided_equals_torchrec_mean_pooling_with_its_gradients() -> None:
    kjt = _kjt()
    reference, summed = _ebc(None), _ebc(PoolingType.SUM)
    summed.load_state_dict(reference.state_dict())
    pool = PooledInput(KEYS, MEAN)
    expected = reference(kjt).values()  # config order = KEYS
    got = pool(summed(kjt), kjt)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert got[1, 3:5].abs().sum() == 0  # an empty mean bag pools to 0, as TorchRec's
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    for name, prm in reference.named_parameters():
        torch.testing.assert_close(dict(summed.named_parameters())[name].grad, prm.grad,
                                   rtol=1e-6, atol=1e-7, msg=name)
    # in another order than the EBC's (as a sharding plan gives): regrouped and divided at once
    order = list(reversed(KEYS))
    by_key = reference(kjt).to_dict()
    torch.testing.assert_close(PooledInput(order, MEAN)(summed(kjt), kjt),
                               torch.cat([by_key[k] for k in order], dim=1), rtol=1e-6, atol=1e-7)


def test_without_mean_features_it_is_the_plain_regroup() -> None:
    kjt = _kjt()
    ebc = _ebc(PoolingType.SUM)
    order = list(reversed(KEYS))
    got = PooledInput(order, [])(ebc(kjt), kjt)
    pooled = ebc(kjt).to_dict()
    torch.testing.assert_close(got, torch.cat([pooled[k] for k in order], dim=1))


def test_a_spec_mixing_sum_and_mean_tables_builds_one_pooling_group(tmp_path) -> None:
    # (the tiny spec's mean features also go through every export test: tests/test_export.py)
    spec = validate_spec(tiny_spec_dict(tmp_path))
    assert mean_pooled_features(spec.features) == ["user_hist_categories", "item_category"]
    assert {c.pooling for c in embedding_bag_configs(spec.features)} == {PoolingType.SUM}
