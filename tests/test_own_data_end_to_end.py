"""The README's "Train on your own data" path, end to end, through the CLI: a raw table with string
ids, a timestamp and an unscaled number -> `recsys data prepare table` -> `recsys spec init` ->
`recsys train` -> `recsys export` -> `recsys serve`, queried over HTTP with the RAW values. The
served scores must equal the exported model's scores of the same rows as the preparation wrote
them (ids through the vocabularies, the number log-scaled), so serving maps raw values exactly as
the data preparation did."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from recsys.cli import main
from recsys.data.schema import DatasetManifest
from recsys.export.predictor import Predictor
from recsys.serve.app import BackgroundServer, ServeConfig


def _events(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 60, rows), rng.integers(0, 40, rows)
    price = rng.lognormal(3, 1, rows)
    logit = np.sin(users) + np.cos(items) + 0.5 * (np.log1p(price) - 3)
    return pa.table({
        "uid": [f"user-{u}" for u in users], "sku": [f"sku-{i}" for i in items],
        "city": rng.choice(["Lyon", "Oslo", "Lima"], rows), "ts": np.arange(rows) // 3,
        "tags": ["|".join(rng.choice(["new", "sale", "eco"], rng.integers(0, 3), replace=False))
                 for _ in range(rows)],
        "price": price, "clicked": (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8)})


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_raw_table_to_served_scores(tmp_path: Path, capsys) -> None:
    raw = _events(3000)
    pacsv.write_csv(raw, tmp_path / "events.csv")
    data, spec, run, export = (tmp_path / n for n in ("data", "spec.toml", "run", "export"))
    assert main(["data", "prepare", "table", "--input", str(tmp_path / "events.csv"),
                 "--out", str(data), "--label", "clicked", "--user", "uid", "--item", "sku",
                 "--time", "ts", "--sparse", "city:user", "--multi", "tags:item",
                 "--dense", "price:item", "--dense-scale", "log"]) == 0
    assert main(["spec", "init", str(data), "--arch", "dcn", "-o", str(spec)]) == 0
    assert main(["train", str(spec), "--run-dir", str(run), "--no-progress",
                 "--set", "train.batch_size=256", "--set", "train.eval_cascade=false"]) == 0
    assert main(["export", str(run), "--out", str(export)]) == 0
    capsys.readouterr()

    # the last rows of the input are the time split's test rows, in order
    manifest = DatasetManifest.load(data)
    prepared = pq.read_table(manifest.files("impressions", "test"))
    n = 20
    raw_rows = raw.slice(raw.num_rows - prepared.num_rows).slice(0, n).to_pylist()
    rows = [{"user_id": r["uid"], "item_id": r["sku"], "city": r["city"],
             "tags": [t for t in r["tags"].split("|") if t], "price": r["price"]}
            for r in raw_rows]
    expected = Predictor.load(export).predict_table(prepared.slice(0, n), where="test")
    with BackgroundServer(export, ServeConfig(port=0)) as server:
        meta = json.loads(urllib.request.urlopen(f"{server.url}/metadata", timeout=30).read())
        served = _post(f"{server.url}/score", {"rows": rows})
        unseen = _post(f"{server.url}/score", {"rows": [{**rows[0], "user_id": "nobody"}]})
    price = next(f for f in meta["fields"] if f["name"] == "price")
    assert price["scaling"] == "sign(x) * log1p(|x|)"
    np.testing.assert_allclose(served["scores"]["clicked"], expected["clicked"], rtol=0, atol=1e-6)
    assert len(unseen["scores"]["clicked"]) == 1  # an unknown user is id 0, not an error

    # batch scoring of the raw test rows (their own column names, text ids, "a|b" lists,
    # unscaled prices) through the export alone: the scores of the prepared rows
    raw_test = raw.slice(raw.num_rows - prepared.num_rows)
    pq.write_table(raw_test, tmp_path / "raw-test.parquet")
    scores = tmp_path / "scores.parquet"
    assert main(["predict", str(export), "--data", str(tmp_path / "raw-test.parquet"),
                 "--out", str(scores), "--raw", "--no-progress"]) == 0
    got = pq.read_table(scores)
    assert got.column("uid").to_pylist() == raw_test.column("uid").to_pylist()  # joinable
    everything = Predictor.load(export).predict_table(prepared, where="test")
    np.testing.assert_allclose(got.column("clicked_prob").to_numpy(), everything["clicked"],
                               rtol=0, atol=1e-6)
    # without --raw, the raw file is refused with the column it cannot read
    assert main(["predict", str(export), "--data", str(tmp_path / "raw-test.parquet"),
                 "--out", str(scores), "--no-progress"]) == 2
    assert "user_id" in capsys.readouterr().err


def test_gauc_groups_users_that_train_never_saw_apart(tmp_path: Path) -> None:
    """user_id's vocabulary is fitted on train, so every user first seen in test is id 0; GAUC
    must still group test rows by their real user: the user_group column, ids over all rows."""
    from recsys.data.adapters import prepare
    from recsys.data.schema import BatchSchema
    from recsys.spec import PrepareSpec, load_spec
    from recsys.spec_init import init_spec

    table = pa.table({"uid": ["a", "b", "a", "b", "c", "d", "c", "d"], "ts": list(range(8)),
                      "sku": ["x", "y"] * 4, "clicked": [1, 0, 0, 1, 1, 0, 0, 1]})
    pq.write_table(table, tmp_path / "t.parquet")
    manifest = prepare("table", tmp_path / "t.parquet", tmp_path / "d", PrepareSpec(
        input="x", label="clicked", user="uid", item="sku", time="ts", valid_fraction=0.0,
        test_fraction=0.5), progress=False)
    test = pq.read_table(manifest.files("impressions", "test")).to_pydict()
    assert test["user_id"] == [0, 0, 0, 0]  # c and d: never in train
    assert test["user_group"] == [3, 4, 3, 4]  # a=1, b=2 (counted first), c=3, d=4
    (tmp_path / "s.toml").write_text(init_spec(tmp_path / "d", "mlp"))
    schema = BatchSchema.from_spec(load_spec(tmp_path / "s.toml"), manifest)
    assert schema.groups["user"] == "user_group"
