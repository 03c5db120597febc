"""From a spec to loaders: the spec's batch sizes, seed, shuffle window and workers reach the
loader, and training and evaluation read what they should."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.datasets import ensure_dataset, make_loader
from recsys.errors import SpecError
from recsys.spec import Spec


def _spec(tiny_spec: Spec, **train: object) -> Spec:
    return tiny_spec.model_copy(update={"train": tiny_spec.train.model_copy(update=train)})


def test_training_and_evaluation_loaders_follow_the_spec(tiny_spec: Spec, tiny_dataset) -> None:
    spec = _spec(tiny_spec, batch_size=64, eval_batch_size=100, seed=5)
    manifest = ensure_dataset(spec, progress=False)
    assert manifest.root == tiny_dataset.root
    train = make_loader(spec, manifest, "train", rank=1, world_size=2)
    # train.batch_size is the global batch: each of 2 ranks reads half
    assert (train.batch_size, train.seed, train.shuffle, train.drop_last) == (32, 5, True, True)
    assert (train.rank, train.world_size) == (1, 2)
    assert train.window_batches == spec.data.shuffle_window_batches
    rows = manifest.rows[spec.data.view]["train"]
    assert len(train) == rows // 2 // 32

    test = make_loader(spec, manifest, "test", training=False)
    assert (test.batch_size, test.shuffle, test.drop_last) == (100, False, False)
    with pytest.raises(SpecError, match="train.batch_size: 64 is the global batch"):
        make_loader(spec, manifest, "train", rank=0, world_size=3)
    request_ids = np.concatenate([b.groups["request"].numpy() for b in test.epoch(0)])
    assert len(request_ids) == manifest.rows[spec.data.view]["test"]  # every row, once
    assert np.all(np.diff(request_ids) >= 0)  # file order: requests were written in order
