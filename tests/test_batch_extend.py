"""Appending the auxiliary rvq_code feature to a Batch's KJT (the hook the RVQ trainer uses)."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import Batch


def _batch(weighted: bool = False) -> Batch:
    kjt = KeyedJaggedTensor(keys=["user", "hist"], values=torch.tensor([3, 1, 4, 1, 5]),
                            lengths=torch.tensor([1, 1, 0, 3], dtype=torch.int32),
                            weights=torch.tensor([1.0, 1.0, 0.5, 0.25, 2.0]) if weighted else None)
    return Batch(dense=torch.zeros(2, 1), sparse=kjt, labels={"click": torch.tensor([0.0, 1.0])})


def test_codes_are_appended_as_the_last_key_and_the_rest_is_unchanged() -> None:
    batch = _batch()
    codes = torch.tensor([[1, 5, 21], [2, 9, 40]])  # L = 3 trie-node ids per row
    out = batch.with_sparse_feature("rvq_code", codes.flatten(),
                                    torch.full((2,), 3, dtype=torch.int32))
    assert out.sparse.keys() == ["user", "hist", "rvq_code"]
    per_key = out.sparse.to_dict()
    assert [t.tolist() for t in per_key["rvq_code"].to_dense()] == [[1, 5, 21], [2, 9, 40]]
    assert [t.tolist() for t in per_key["hist"].to_dense()] == [[], [4, 1, 5]]
    assert [t.tolist() for t in per_key["user"].to_dense()] == [[3], [1]]
    assert out.labels is batch.labels and batch.sparse.keys() == ["user", "hist"]


def test_weighted_batches_get_unit_weights_for_the_codes() -> None:
    out = _batch(weighted=True).with_sparse_feature(
        "rvq_code", torch.tensor([7, 8]), torch.ones(2, dtype=torch.int32))
    assert out.sparse.weights().tolist() == [1.0, 1.0, 0.5, 0.25, 2.0, 1.0, 1.0]


def test_mismatched_lengths_and_duplicate_keys_are_refused() -> None:
    batch = _batch()
    with pytest.raises(ValueError, match="lengths summing to 4 for 3 values"):
        batch.with_sparse_feature("rvq_code", torch.tensor([1, 2, 3]),
                                  torch.tensor([2, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="already has"):
        batch.with_sparse_feature("user", torch.tensor([1, 2]), torch.ones(2, dtype=torch.int32))
