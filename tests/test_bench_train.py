"""recsys bench train: the plain PyTorch ranker is the sharded one (a known-answer step), batches
survive the trip to a side's subprocess, and the command writes both sides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.bench.plain import PlainRanker, PlainSide, plain_state_from_sharded
from recsys.bench.train import (
    ShardedSide,
    TrainBenchConfig,
    load_batches,
    random_batches,
    save_batches,
    stress_spec,
)
from recsys.cli import main
from recsys.data.batch import Batch
from recsys.models.archs import AUX_LOSS
from recsys.spec import Spec, only_arch_sections, validate_spec
from recsys.sysinfo import tensor_bytes
from recsys.train.distributed import init_distributed, seed_everything, shutdown


def _equivalence_spec(arch: str) -> Spec:
    """Tiny tables, a shared mean-pooled table with id lists, two tasks, SGD on both sides."""
    return validate_spec(only_arch_sections({
        "name": "equivalence",
        "data": {"source": "parquet", "path": "<none>", "labels": ["click", "conversion"]},
        "features": {
            "embedding_dim": 4,
            "tables": [{"name": "shared", "num_embeddings": 9}],
            "fields": [
                {"name": "a", "side": "user", "kind": "sparse", "num_embeddings": 11},
                {"name": "b", "side": "item", "kind": "sparse", "num_embeddings": 7,
                 "embedding_dim": 8},
                {"name": "hist", "side": "user", "kind": "multi_sparse", "table": "shared",
                 "pooling": "mean"},
                {"name": "cat", "side": "item", "kind": "sparse", "table": "shared"},
                {"name": "d0", "side": "user", "kind": "dense"},
                {"name": "d1", "side": "item", "kind": "dense"},
            ],
        },
        "model": {"arch": arch, "tasks": ["click", "conversion"], "dense_arch": [6],
                  "mlp": {"hidden": [16, 8]}, "dcn": {"num_layers": 2}},
        "train": {"batch_size": 6, "seed": 5,
                  "sparse_optimizer": {"name": "sgd", "lr": 0.5},
                  "dense_optimizer": {"name": "sgd", "lr": 0.5}},
    }))


def _hand_batch() -> Batch:
    """Six rows; ``hist`` has bags of 0 to 3 ids (an empty one included), ids repeat."""
    rng = np.random.default_rng(1)
    b = 6
    hist_lengths = [2, 0, 3, 1, 3, 2]
    keys = ["a", "b", "hist", "cat"]
    values = [rng.integers(0, 11, b), rng.integers(0, 7, b),
              rng.integers(0, 9, sum(hist_lengths)), rng.integers(0, 9, b)]
    lengths = [[1] * b, [1] * b, hist_lengths, [1] * b]
    kjt = KeyedJaggedTensor(keys=keys, values=torch.from_numpy(np.concatenate(values)),
                            lengths=torch.tensor(sum(lengths, []), dtype=torch.int32))
    return Batch(dense=torch.from_numpy(rng.standard_normal((b, 2), dtype=np.float32)),
                 sparse=kjt,
                 labels={"click": torch.tensor([1.0, 0, 0, 1, 0, 1]),
                         "conversion": torch.tensor([1.0, 0, 0, 0, 0, 1])})


@pytest.mark.parametrize("arch", ["mlp", "dcn"])
def test_one_sgd_step_is_the_same_on_both_sides(arch: str) -> None:
    """Same initial weights (the sharded model's, copied into the plain one), one SGD step on the
    same batch: the same loss and the same updated weights, dense and embedding, within 1e-5."""
    spec = _equivalence_spec(arch)
    batch = _hand_batch()
    seed_everything(spec.train.seed, 0)
    ctx = init_distributed("cpu")
    try:
        sharded = ShardedSide.build(spec, ctx.device, total_steps=1)
        initial = plain_state_from_sharded(sharded.model.state_dict())
        plain = PlainSide.build(spec)
        plain.model.load_state_dict(initial)
        with torch.no_grad():
            logits_before = plain.model(batch)
        sharded_loss = float(sharded.step(iter([batch])))
        after = plain_state_from_sharded(sharded.model.state_dict())
    finally:
        shutdown()
    plain_loss = float(plain.step(batch))
    assert sharded_loss == pytest.approx(plain_loss, abs=1e-5)
    assert set(logits_before) == {"click", "conversion", AUX_LOSS}
    assert float(logits_before[AUX_LOSS]) == 0.0  # only AdaEnsemble has router losses
    plain_after = plain.model.state_dict()
    assert set(after) == set(plain_after)
    moved = 0
    for name, value in after.items():
        torch.testing.assert_close(plain_after[name], value, atol=1e-5, rtol=0, msg=name)
        moved += not torch.equal(value, initial[name])
    # the step changed every tensor that took a gradient: dense layers and all four tables
    assert moved == len(after)


def test_plain_ranker_pools_in_the_collections_order() -> None:
    spec = _equivalence_spec("mlp")
    model = PlainRanker(spec)
    assert list(model.embedding_bags) == ["shared", "a", "b"]
    assert model._lookups == [("shared", "hist"), ("shared", "cat"), ("a", "a"), ("b", "b")]
    assert model.embedding_bags["shared"].mode == "mean"
    assert model.embedding_bags["a"].mode == "sum"


def test_plain_optimizers_follow_the_spec() -> None:
    spec = stress_spec(2, 50, dim=4, dense=1, batch_size=8)  # defaults: rowwise_adagrad, adam
    side = PlainSide.build(spec)
    assert isinstance(side.sparse, torch.optim.Adagrad)
    assert isinstance(side.dense, torch.optim.Adam)
    assert side.sparse.param_groups[0]["lr"] == spec.train.sparse_optimizer.lr
    assert len(side.sparse.param_groups[0]["params"]) == 2
    side.step(random_batches(spec, 1)[0])
    # Adagrad: one accumulator per weight of each table, plus a step counter
    tables = 2 * 50 * 4 * 4
    assert tables <= side.optimizer_state_bytes() - tensor_bytes(dict(side.dense.state)) \
        <= tables + 64


def test_stress_spec_and_random_batches() -> None:
    spec = stress_spec(3, 1000, dim=8, dense=2, batch_size=16,
                       overrides=["train.sparse_optimizer.name=sgd"])
    assert spec.name == "stress-3x1000"
    assert spec.train.sparse_optimizer.name == "sgd"
    batches = random_batches(spec, 2, seed=4)
    b = batches[0]
    assert b.dense.shape == (16, 2) and b.sparse.keys() == ["sparse_0", "sparse_1", "sparse_2"]
    assert int(b.sparse.values().max()) < 1000 and int(b.sparse.lengths().sum()) == 48
    again = random_batches(spec, 2, seed=4)
    assert torch.equal(again[1].sparse.values(), batches[1].sparse.values())
    with pytest.raises(ValueError, match="tables"):
        stress_spec(0, 10)


def test_batches_round_trip(tmp_path: Path) -> None:
    batch = _hand_batch()
    save_batches([batch, batch], tmp_path / "b.pt")
    back = load_batches(tmp_path / "b.pt")
    assert len(back) == 2
    for name in ("values", "lengths"):
        assert torch.equal(getattr(back[1].sparse, name)(), getattr(batch.sparse, name)())
    assert back[0].sparse.keys() == batch.sparse.keys()
    assert torch.equal(back[0].dense, batch.dense)
    assert torch.equal(back[0].labels["conversion"], batch.labels["conversion"])


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="steps"):
        TrainBenchConfig(steps=0)


@pytest.mark.slow
def test_command_on_a_tiny_stress_config(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "train", "--tables", "3", "--rows", "1000", "--steps", "5",
               "--warmup", "1", "--repeats", "1", "--batch-size", "256",
               "--out", str(tmp_path)])
    assert rc == 0
    result: dict[str, Any] = json.loads((tmp_path / "train.json").read_text())
    assert set(result["samples_per_s"]) == {"sharded", "plain"}
    assert all(v > 0 for v in result["samples_per_s"].values())
    assert result["ratio"] > 0
    assert result["tables"] == 3 and result["batch_size"] == 256
    for side in ("sharded", "plain"):
        assert result["peak_rss_bytes"][side] > result["param_state_bytes"][side] > 0
        assert len(result["runs"][side]) == 1
    table = (tmp_path / "train.md").read_text()
    assert "| side" in table and "ratio vs plain" in table
    assert "samples/s" in capsys.readouterr().out
