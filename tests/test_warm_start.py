"""Warm starts (``recsys train SPEC --init-from RUN_DIR``): tables matched by name, rows by id or
through the datasets' vocabularies, dense layers by name and shape, and what was loaded logged."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.cli import main
from recsys.errors import RunError
from recsys.run_dir import RunDir
from recsys.spec import dump_toml, validate_spec
from recsys.train.distributed import init_distributed, shutdown
from recsys.train.run import run_training
from recsys.train.trainer import Trainer
from tests.conftest import tiny_spec_dict


def _raw(root: Path, **train) -> dict:
    raw = tiny_spec_dict(root)
    raw["train"].update({"max_steps": 20, "eval_cascade": False, **train})
    return raw


@pytest.fixture(scope="module")
def source_run(tiny_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("warm") / "source"
    run_training(validate_spec(_raw(tiny_dataset.root)), run, progress=False)
    return run


def _local(t) -> torch.Tensor:
    return (t.local_shards()[0].tensor if hasattr(t, "local_shards") else t).detach().clone()


def test_weights_come_from_the_source_and_what_differs_starts_fresh(
        tiny_dataset, source_run: Path, caplog) -> None:
    raw = _raw(tiny_dataset.root)
    raw["model"]["mlp"] = {"hidden": [32, 16]}  # the tower changes shape: it starts fresh
    raw["features"]["fields"] = [f for f in raw["features"]["fields"] if f["name"] != "device"]
    hour = next(f for f in raw["features"]["fields"] if f["name"] == "hour")
    hour["num_embeddings"] = 30  # the table grew: its 24 old rows are matched by id
    spec = validate_spec(raw)
    source, _ = RunDir(source_run).trained_ranker("cpu")
    old = source.state_dict()
    ctx = init_distributed("cpu")
    try:
        trainer = Trainer(spec, ctx, progress=False)
        fresh_hour = _local(trainer.model.state_dict()["model.ebc.embedding_bags.hour.weight"])
        with caplog.at_level(logging.INFO, logger="recsys.train"):
            trainer.warm_start(source_run)
        state = trainer.model.state_dict()
    finally:
        shutdown()
    for table in ("user_id", "item_id", "category", "user_age"):
        key = f"ebc.embedding_bags.{table}.weight"
        torch.testing.assert_close(_local(state[f"model.{key}"]), old[key], rtol=0, atol=0)
    hour_now = _local(state["model.ebc.embedding_bags.hour.weight"])
    torch.testing.assert_close(hour_now[:24], old["ebc.embedding_bags.hour.weight"])
    torch.testing.assert_close(hour_now[24:], fresh_hour[24:])  # new rows keep their init
    report = trainer.warm_started
    assert report["tables"]["hour"] == {"rows": 30, "matched": 24, "how": "id"}
    assert report["tables"]["user_id"]["matched"] == report["tables"]["user_id"]["rows"]
    fresh = report["fresh"]
    assert any(k.startswith("over.deep") and "shape" in why for k, why in fresh.items())
    loaded = set(report["loaded"])
    dense_arch = [k for k in old if k.startswith("over.inputs.dense_arch")]
    assert dense_arch and set(dense_arch) <= loaded  # the unchanged dense arch is copied
    for k in dense_arch:
        torch.testing.assert_close(_local(state[f"model.{k}"]), old[k], rtol=0, atol=0)
    log = caplog.text
    assert "warm start from" in log and "hour" in log and "fresh" in log


def test_init_from_on_the_command_line_and_its_errors(tiny_dataset, source_run: Path,
                                                      tmp_path: Path, capsys) -> None:
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(dump_toml(validate_spec(_raw(tiny_dataset.root, max_steps=2))))
    run = tmp_path / "warm"
    assert main(["train", str(spec_path), "--run-dir", str(run), "--no-progress",
                 "--init-from", str(source_run)]) == 0
    assert "warm start from" in (run / "train.log").read_text()
    assert main(["train", str(spec_path), "--run-dir", str(tmp_path / "x"), "--no-progress",
                 "--init-from", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(RunError, match="own directory"):
        run_training(validate_spec(_raw(tiny_dataset.root)), run, init_from=run, overwrite=True)


def test_row_maps_follow_vocabularies(tmp_path: Path) -> None:
    """New id 1 + i takes the old id of the same raw value; unseen values start fresh."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.data.schema import VocabInfo, VocabKind
    from recsys.train.warm_start import _by_value

    old_root, new_root = tmp_path / "old", tmp_path / "new"
    for root, values in ((old_root, ["b", "a", "c"]), (new_root, ["a", "d", "b", "c", "e"])):
        (root / "vocab").mkdir(parents=True)
        pq.write_table(pa.table({"value": values}), root / "vocab" / "u.parquet")
    info = {"old": VocabInfo(kind=VocabKind.VOCAB, size=4, value_type="string",
                             file="vocab/u.parquet"),
            "new": VocabInfo(kind=VocabKind.VOCAB, size=6, value_type="string",
                             file="vocab/u.parquet")}
    rows = _by_value(info["new"], new_root, info["old"], old_root, old_rows=4, new_rows=6)
    # new ids: a=1 d=2 b=3 c=4 e=5; old ids: b=1 a=2 c=3
    np.testing.assert_array_equal(rows, [0, 2, -1, 1, 3, -1])
    # a copy with the old table's rows by that map
    old_w = torch.arange(4, dtype=torch.float32)[:, None].repeat(1, 2)
    new_w = torch.full((6, 2), -1.0)
    from recsys.train.warm_start import _copy_rows

    _copy_rows(new_w, old_w, rows)
    assert new_w[:, 0].tolist() == [0, 2, -1, 1, 3, -1]


def test_a_source_with_another_dim_starts_the_table_fresh(tiny_dataset, source_run) -> None:
    raw = copy.deepcopy(_raw(tiny_dataset.root))
    next(f for f in raw["features"]["fields"] if f["name"] == "hour")["embedding_dim"] = 4
    ctx = init_distributed("cpu")
    try:
        trainer = Trainer(validate_spec(raw), ctx, progress=False)
        trainer.warm_start(source_run)
    finally:
        shutdown()
    assert "embedding dim 8 in the source, 4 here" in trainer.warm_started["fresh"][
        "ebc.embedding_bags.hour.weight"]


def _events(rng: np.random.Generator, rows: int, users: int, items: int, bias_u: np.ndarray,
            bias_i: np.ndarray) -> dict:
    """Clicks that depend on who and what only: what a model learns in its id embeddings."""
    u = rng.integers(0, users, rows)
    i = rng.integers(0, items, rows)
    p = 1 / (1 + np.exp(-(bias_u[u] + bias_i[i] - 0.5)))
    return {"user": [f"u{k}" for k in u], "item": [f"i{k}" for k in i],
            "clicked": (rng.random(rows) < p).astype(np.int8)}


@pytest.mark.slow
def test_warm_start_on_day_six_beats_a_cold_start(tmp_path: Path) -> None:
    """Days 1-5 train a model; day 6 brings new users and items (the vocabularies grow and
    reorder). Warm-started from the days 1-5 run, a short run on day 6 scores day 6's test
    rows better than the same run from scratch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.data.adapters import prepare
    from recsys.spec import PrepareSpec, load_spec
    from recsys.spec_init import init_spec

    rng = np.random.default_rng(0)
    bias_u, bias_i = rng.normal(0, 1.5, 340), rng.normal(0, 1.5, 170)
    pq.write_table(pa.table(_events(rng, 15_000, 300, 150, bias_u, bias_i)),
                   tmp_path / "days1-5.parquet")
    day6 = _events(rng, 4000, 340, 170, bias_u, bias_i)  # 40 new users, 20 new items
    day6["fold"] = ["train"] * 1200 + ["valid"] * 200 + ["test"] * 2600
    pq.write_table(pa.table(day6), tmp_path / "day6.parquet")
    options = {"label": "clicked", "user": "user", "item": "item"}
    prepare("table", tmp_path / "days1-5.parquet", tmp_path / "d15",
            PrepareSpec(input="x", split="random", **options), progress=False)
    d6 = prepare("table", tmp_path / "day6.parquet", tmp_path / "d6",
                 PrepareSpec(input="x", split="column:fold", **options), progress=False)

    def spec(dataset: Path, name: str, *overrides: str):
        path = tmp_path / f"{name}.toml"
        path.write_text(init_spec(dataset, "mlp", name=name))
        return load_spec(path, ["model.mlp.hidden=[16]", "train.sparse_optimizer.lr=0.1",
                                "train.eval_cascade=false", *overrides])

    run_training(spec(tmp_path / "d15", "days", "train.batch_size=256", "train.epochs=4"),
                 tmp_path / "days", progress=False)
    day6_spec = spec(tmp_path / "d6", "day6", "train.batch_size=128", "train.epochs=1")
    cold = run_training(day6_spec, tmp_path / "cold", progress=False)
    warm = run_training(day6_spec, tmp_path / "warm", progress=False,
                        init_from=tmp_path / "days")
    assert warm["test"]["auc"] > cold["test"]["auc"] + 0.05, (warm["test"], cold["test"])
    log = (tmp_path / "warm" / "train.log").read_text()
    assert "warm start from" in log and "vocabulary" in log
    # the rows matched are exactly day 6's users that days 1-5 saw (+ id 0, the unknown user)
    old_users = set(pq.read_table(tmp_path / "d15" / "vocab" / "user_id.parquet")
                    .column("value").to_pylist())
    new_users = pq.read_table(tmp_path / "d6" / "vocab" / "user_id.parquet").column(
        "value").to_pylist()
    matched = 1 + sum(u in old_users for u in new_users)
    rows = {cells[0]: cells[1:] for line in log.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip().strip("|").split("|")]]}
    assert rows["user_id"] == [f"{len(new_users) + 1:,}", f"{matched:,}",
                               f"{len(new_users) + 1 - matched:,}", "vocabulary"]
    assert d6.vocabularies["user_id"].size == len(new_users) + 1
