"""Batch scoring with an exported model: Parquet in, probabilities out, bad data named clearly."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_spec_dict

from recsys.data import BatchBuilder, BatchSchema, ParquetLoader, ParquetSplit
from recsys.data.schema import DatasetManifest
from recsys.errors import DataError
from recsys.export.predictor import Predictor, predict_parquet
from recsys.export.torchscript import MANIFEST_FILE, MODEL_FILE, ServingRanker, script_ranker
from recsys.models.ranker import Ranker, RankerConfig
from recsys.spec import Spec, validate_spec


@dataclass
class Export:
    dir: Path
    spec: Spec
    serving: ServingRanker  # the eager model the export was scripted from
    schema: BatchSchema
    predictor: Predictor


@pytest.fixture(scope="module")
def export(tiny_dataset: DatasetManifest, tmp_path_factory: pytest.TempPathFactory) -> Export:
    """A click-only MLP ranker with random weights, exported as `recsys export` writes it."""
    raw = tiny_spec_dict(tiny_dataset.root)
    raw["model"] = {"arch": "mlp", "tasks": ["click"]}
    spec = validate_spec(raw, "tiny-click.toml")
    torch.manual_seed(0)
    ranker = Ranker(RankerConfig(spec, device="cpu")).eval()
    exported = script_ranker(spec, ranker, "none")
    out = tmp_path_factory.mktemp("export")
    exported.module.save(str(out / MODEL_FILE))
    (out / MANIFEST_FILE).write_text(json.dumps(exported.manifest, indent=2))
    serving = ServingRanker(ranker, ["click"], esmm=False).eval()
    return Export(out, spec, serving, BatchSchema.from_spec(spec, tiny_dataset),
                  Predictor.load(out))


def eager_probs(export: Export, files: list[Path]) -> np.ndarray:
    """Click probabilities of the eager model on batches the training loader builds."""
    split = ParquetSplit(files, export.schema)
    loader = ParquetLoader(split, batch_size=700, shuffle=False, drop_last=False)
    return np.concatenate([eager_batch(export, b) for b in loader.epoch(0)])


def eager_batch(export: Export, batch) -> np.ndarray:  # type: ignore[no-untyped-def]
    # the loader's KJT follows the spec's feature order; the model's follows its tables'
    jts = batch.sparse.to_dict()
    keys = export.serving.keys
    values = torch.cat([jts[k].values() for k in keys])
    lengths = torch.cat([jts[k].lengths() for k in keys]).to(torch.int32)
    with torch.no_grad():
        return export.serving(batch.dense, values, lengths)["click"].numpy()


def test_predict_parquet_matches_eager(export: Export, tiny_dataset: DatasetManifest,
                                       tmp_path: Path) -> None:
    files = tiny_dataset.files("impressions", "test")
    out = tmp_path / "scores.parquet"
    summary = predict_parquet(export.dir, files[0], out, batch_size=512, progress=False)

    inp = pq.read_table(files[0])
    got = pq.read_table(out)
    assert got.num_rows == inp.num_rows == summary["rows"]
    assert got.column_names == ["request_id", "user_id", "item_id", "click_prob"]
    assert got.schema.field("click_prob").type == pa.float32()
    for c in ("request_id", "user_id", "item_id"):  # input order kept
        assert got.column(c).equals(inp.column(c))
    probs = got.column("click_prob").to_numpy()
    assert ((probs > 0) & (probs < 1)).all()
    np.testing.assert_allclose(probs, eager_probs(export, files[:1]), rtol=0, atol=1e-6)
    assert summary["mean_prob"]["click"] == pytest.approx(float(probs.mean()), abs=1e-6)
    assert summary["files"] == 1 and summary["seconds"] > 0 and summary["rows_per_s"] > 0
    assert summary["columns"] == got.column_names
    assert not out.with_name(out.name + ".partial").exists()


def test_directory_of_parts(export: Export, tiny_dataset: DatasetManifest,
                            tmp_path: Path) -> None:
    table = pq.read_table(tiny_dataset.files("impressions", "test")[0])
    parts = tmp_path / "parts"
    parts.mkdir()
    cuts = [0, 300, 301, 1100, table.num_rows]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        pq.write_table(table.slice(a, b - a), parts / f"part-{i:05d}.parquet",
                       row_group_size=250)
    summary = predict_parquet(export.predictor, parts, tmp_path / "o.parquet", batch_size=128,
                              keep=("request_id", "item_id", "no_such_column"), progress=False)
    got = pq.read_table(tmp_path / "o.parquet")
    assert summary["files"] == 4 and summary["rows"] == got.num_rows == table.num_rows
    assert got.column_names == ["request_id", "item_id", "click_prob"]
    assert got.column("item_id").equals(table.column("item_id"))
    whole = export.predictor.predict_table(table)["click"]
    np.testing.assert_allclose(got.column("click_prob").to_numpy(), whole, rtol=0, atol=1e-6)


def test_null_ids_are_empty_bags(export: Export, tiny_dataset: DatasetManifest) -> None:
    table = pq.read_table(tiny_dataset.files("impressions", "test")[0]).slice(0, 40)
    mask = pa.array([i in (2, 5) for i in range(40)])
    table = _set(table, "user_age", pc.if_else(mask, pa.scalar(None, pa.int64()),
                                               table.column("user_age")))
    hist = table.column("user_hist_categories").combine_chunks()
    table = _set(table, "user_hist_categories", pa.array(
        [None if i == 3 else v for i, v in enumerate(hist.to_pylist())], hist.type))
    got = export.predictor.predict_table(table)["click"]
    want = eager_batch(export, BatchBuilder(export.schema).build(table))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    dense, values, lengths = export.predictor.tensors(table)
    feats = export.predictor.features
    lens = lengths.reshape(len(feats), 40)
    assert lens[feats.index("user_age"), 2] == 0 and lens[feats.index("user_age"), 1] == 1
    assert lens[feats.index("user_hist_categories"), 3] == 0
    assert int(lengths.sum()) == values.numel() and dense.shape == (40, 3)


def _set(table: pa.Table, name: str, col: pa.Array | pa.ChunkedArray) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, col)


def _with_value(table: pa.Table, name: str, row: int, value: object,
                type: pa.DataType | None = None) -> pa.Table:
    values = table.column(name).to_pylist()
    values[row] = value
    return _set(table, name, pa.array(values, type or table.schema.field(name).type))


BAD_TABLES: dict[str, tuple[Callable[[pa.Table], pa.Table], list[str]]] = {
    "missing feature column": (lambda t: t.drop_columns(["item_brand"]),
                               ["missing column", "'item_brand'", "sparse feature"]),
    "missing dense column": (lambda t: t.drop_columns(["item_price"]),
                             ["missing column", "'item_price'", "dense"]),
    "float ids": (lambda t: _set(t, "item_id", t.column("item_id").cast(pa.float64())),
                  ["'item_id'", "double", "integer ids"]),
    "string ids": (lambda t: _set(t, "hour", t.column("hour").cast(pa.string())),
                   ["'hour'", "string", "integer ids"]),
    "string dense": (lambda t: _set(t, "item_price", t.column("item_price").cast(pa.string())),
                     ["'item_price'", "string", "dense"]),
    "id beyond table": (lambda t: _with_value(t, "item_id", 7, 400),
                        ["'item_id'", "(400)", "row 7", "400 rows"]),
    "negative id": (lambda t: _with_value(t, "device", 4, -1),
                    ["'device'", "negative id (-1)", "row 4"]),
    "list id beyond table": (lambda t: _with_value(t, "user_hist_categories", 9, [1, 12]),
                             ["'user_hist_categories'", "(12)", "row 9", "'category'"]),
    "null dense": (lambda t: _with_value(t, "item_price", 6, None),
                   ["'item_price'", "null", "row 6"]),
    "nan dense": (lambda t: _with_value(t, "user_activity", 3, float("nan")),
                  ["'user_activity'", "nan", "row 3", "finite"]),
    "null inside id list": (lambda t: _with_value(t, "user_hist_categories", 8, [1, None]),
                            ["'user_hist_categories'", "null inside", "row 8"]),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_parquet_is_named(case: str, export: Export, tiny_dataset: DatasetManifest,
                              write_parquet: Callable[..., Path], tmp_path: Path) -> None:
    table = pq.read_table(tiny_dataset.files("impressions", "test")[0]).slice(0, 20)
    make_bad, words = BAD_TABLES[case]
    path = write_parquet("bad.parquet", make_bad(table))
    out = tmp_path / "o.parquet"
    with pytest.raises(DataError) as e:
        predict_parquet(export.predictor, path, out, batch_size=8, progress=False)
    assert e.value.where == str(path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_bad_row_is_counted_within_its_file(export: Export, tiny_dataset: DatasetManifest,
                                            write_parquet: Callable[..., Path],
                                            tmp_path: Path) -> None:
    table = pq.read_table(tiny_dataset.files("impressions", "test")[0]).slice(0, 100)
    path = write_parquet("d/part-00001.parquet", _with_value(table, "item_brand", 77, 20),
                         row_group_size=30)
    write_parquet("d/part-00000.parquet", table)
    with pytest.raises(DataError, match="'item_brand'.*row 77") as e:
        predict_parquet(export.predictor, path.parent, tmp_path / "o.parquet", batch_size=16,
                        progress=False)
    assert e.value.where == str(path)


def test_flat_inputs_are_checked(export: Export, tiny_dataset: DatasetManifest) -> None:
    p = export.predictor
    table = pq.read_table(tiny_dataset.files("impressions", "test")[0]).slice(0, 10)
    dense, values, lengths = p.tensors(table)
    np.testing.assert_array_equal(p.predict(dense.numpy(), values.numpy(), lengths.numpy())["click"],
                                  p.predict_table(table)["click"])

    with pytest.raises(DataError, match=r"lengths sum to \d+ but values holds \d+ ids"):
        bad = lengths.clone()
        bad[0] -= 1
        p.predict(dense, torch.cat([values, values[:1]]), bad)
    with pytest.raises(DataError, match=r"lengths has 89 entries; expected .* = 90"):
        p.predict(dense, values, lengths[:-1])
    with pytest.raises(DataError, match=r"dense has shape \(10, 2\); expected \(B, 3\)"):
        p.predict(dense[:, :2], values, lengths)
    with pytest.raises(DataError, match="values must be a 1-D integer tensor.*float32"):
        p.predict(dense, values.to(torch.float32), lengths)
    with pytest.raises(DataError, match="negative id"):
        bad = values.clone()
        bad[-1] = -5
        p.predict(dense, bad, lengths)
    with pytest.raises(DataError, match=r"feature 'item_id' has an id beyond its table \(400\)"
                                        r" at row 3"):
        bad = values.clone()
        f = p.features.index("item_id")
        start = int(lengths[:f * 10].sum())
        bad[start + 3] = 400
        p.predict(dense, bad, lengths)


def test_not_an_export(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not an export directory"):
        Predictor.load(tmp_path)


@pytest.mark.slow
def test_predict_from_a_run_directory_matches_its_export(tiny_dataset: DatasetManifest,
                                                         tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    """`recsys predict RUN_DIR` scores with the run's checkpoint in eager PyTorch: the same
    probabilities as its unquantized export, row for row."""
    from recsys.cli import main
    from recsys.export.torchscript import export_run
    from recsys.train.run import run_training

    raw = tiny_spec_dict(tiny_dataset.root)
    raw["model"] = {"arch": "dcn", "tasks": ["click", "conversion"], "esmm": True}
    raw["train"].update({"batch_size": 128, "epochs": 1, "eval_cascade": False})
    run = tmp_path / "run"
    run_training(validate_spec(raw), run, progress=False)
    export_run(run, tmp_path / "export", "none", check=False)
    data = tiny_dataset.files("impressions", "test")[0]
    assert main(["predict", str(run), "--data", str(data), "--out", str(tmp_path / "a.parquet"),
                 "--no-progress"]) == 0
    assert "scored" in capsys.readouterr().out
    predict_parquet(tmp_path / "export", data, tmp_path / "b.parquet", progress=False)
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.column_names == b.column_names and "conversion_prob" in a.column_names
    for task in ("click", "conversion"):
        np.testing.assert_allclose(a[f"{task}_prob"].to_numpy(), b[f"{task}_prob"].to_numpy(),
                                   rtol=0, atol=1e-6)
    assert Predictor.open(run).manifest["spec_hash"] == Predictor.open(tmp_path / "export"
                                                                       ).manifest["spec_hash"]
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(DataError, match="not an export directory"):
        Predictor.open(empty)
