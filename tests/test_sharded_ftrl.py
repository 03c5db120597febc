"""Group-lasso FTRL on sharded tables (recsys/train/sharded_ftrl.py) against GroupFTRL on the dense
gradient of a plain torch EmbeddingBag model: the same weights and state after every step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from recsys.optim.ftrl import GroupFTRL
from recsys.train.sharded_ftrl import FTRLSettings, ShardedGroupFTRL

SETTINGS = FTRLSettings(lr=0.5, beta=1.0, l1=4.0, l2=0.01, initial_accumulator=0.1,
                        grad_scale=3.0)
# two tables, one with two features; table "b" is narrower (the per-table path)
TABLES = [("a", 13, 4, ["fa1", "fa2"]), ("b", 9, 4, ["fb"])]


def _configs(pooling: PoolingType, dims: dict[str, int] | None = None) -> list[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=(dims or {}).get(n, d),
                               feature_names=f, pooling=pooling) for n, r, d, f in TABLES]


def _batch(step: int, batch: int = 5) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(step)
    keys = [f for *_, feats in TABLES for f in feats]
    rows = {f: r for _, r, _, feats in TABLES for f in feats}
    lengths = torch.randint(0, 4, (len(keys), batch), generator=g)
    values = torch.cat([torch.randint(0, rows[k], (int(lengths[i].sum()),), generator=g)
                        for i, k in enumerate(keys)])
    weights = torch.rand(values.numel(), generator=g) + 0.5
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths.flatten(), weights=weights)


def _loss(pooled: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return sum((v * torch.randn(v.shape, generator=g)).sum() + v.square().sum() * 0.1
               for _, v in sorted(pooled.items()))


@pytest.mark.parametrize("pooling,dims,weighted", [
    (PoolingType.SUM, None, False),
    (PoolingType.MEAN, None, False),
    (PoolingType.SUM, {"b": 8}, True),  # mixed widths: table by table
])
def test_sharded_gftrl_equals_group_ftrl_on_the_dense_gradient(
        tmp_path: Path, pooling: PoolingType, dims: dict[str, int] | None,
        weighted: bool) -> None:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        reference = EmbeddingBagCollection(tables=_configs(pooling, dims), is_weighted=weighted)
        start = {k: v.clone() for k, v in reference.state_dict().items()}
        model = EmbeddingBagCollection(tables=_configs(pooling, dims), is_weighted=weighted,
                                       device=torch.device("meta"))
        apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.0})
        sharders = [EmbeddingBagCollectionSharder()]
        constraints = {n: ParameterConstraints(sharding_types=["table_wise"]) for n, *_ in TABLES}
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"),
                                           constraints=constraints)
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan,
                                       sharders=sharders)
        dmp.load_state_dict({"module." + k if not k.startswith("module.") else k: v
                             for k, v in start.items()}, strict=False)
        sharded_state = {k.removeprefix("module."): v for k, v in dmp.state_dict().items()}
        for k, v in start.items():  # both sides start from the same weights
            sharded_state[k].local_shards()[0].tensor.copy_(v)
        optimizer = ShardedGroupFTRL(dmp, SETTINGS)
        ref_opt = GroupFTRL(reference.parameters(), lr=SETTINGS.lr, beta=SETTINGS.beta,
                            l1=SETTINGS.l1, l2=SETTINGS.l2,
                            initial_accumulator=SETTINGS.initial_accumulator,
                            grad_scale=SETTINGS.grad_scale)
        for step in range(4):
            kjt = _batch(step)
            if not weighted:
                kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(),
                                        lengths=kjt.lengths())
            _loss(dmp(kjt).to_dict(), step).backward()
            optimizer.step()
            ref_opt.zero_grad()
            _loss(reference(kjt).to_dict(), step).backward()
            ref_opt.step()
        state = {k.removeprefix("module."): v for k, v in dmp.state_dict().items()}
        saved = optimizer.state_dict()["state"]
        zero_rows = 0
        for name, *_ in TABLES:
            key = f"embedding_bags.{name}.weight"
            got = state[key].local_shards()[0].tensor
            want = reference.embedding_bags[name].weight.detach()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            ref_n = ref_opt.state[reference.embedding_bags[name].weight]["n"]
            opt_key = next(k for k in saved if k.endswith(key))
            torch.testing.assert_close(saved[opt_key]["n"].local_shards()[0].tensor, ref_n)
            zero_rows += int((want == 0).all(dim=1).sum())
            assert not torch.equal(want, start[key])  # training moved the weights
        # l1 selected some rows, not all: both branches of the update are covered
        assert 0 < zero_rows < sum(rows for _, rows, *_ in TABLES)
    finally:
        dist.destroy_process_group()
