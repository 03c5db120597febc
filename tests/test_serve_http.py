"""`recsys serve`: the HTTP scoring service (parity with Predictor, micro-batching, bad requests,
vocabularies, two-tower candidates), its command line, and `recsys bench serve-http`."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_spec_dict

from recsys.bench.serve_http import ServeHttpBenchConfig, export_untrained
from recsys.bench.serve_http import run as bench_run
from recsys.bench.serve_http import table as bench_table
from recsys.cli import main
from recsys.data.schema import DatasetManifest, VocabInfo
from recsys.data.vocab import Vocabulary, hashed
from recsys.errors import DataError
from recsys.export.predictor import Predictor
from recsys.export.torchscript import raw_value_maps
from recsys.serve.app import BackgroundServer
from recsys.serve.batching import Flat, MicroBatcher, merge_flat
from recsys.serve.service import ServeConfig
from recsys.spec import validate_spec

ROOT = Path(__file__).resolve().parents[1]
MAX_BODY = 64 * 1024
TOL = 1e-6


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def export(tiny_dataset: DatasetManifest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight MLP ranker (click, conversion) on the tiny world, exported."""
    raw = tiny_spec_dict(tiny_dataset.root)
    raw["model"] = {"arch": "mlp", "tasks": ["click", "conversion"]}
    return export_untrained(validate_spec(raw, "tiny.toml"),
                            tmp_path_factory.mktemp("serve") / "export")


@pytest.fixture(scope="module")
def predictor(export: Path) -> Predictor:
    return Predictor.load(export)


@pytest.fixture(scope="module")
def server(export: Path) -> Iterator[BackgroundServer]:
    # a long max_wait: concurrent requests of a test always meet in one batch
    cfg = ServeConfig(port=0, max_batch_rows=64, max_wait_ms=50, max_body_bytes=MAX_BODY)
    with BackgroundServer(export, cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def test_table(tiny_dataset: DatasetManifest) -> pa.Table:
    return pq.read_table(tiny_dataset.files("impressions", "test")[0]).slice(0, 200)


def json_rows(table: pa.Table, columns: list[str]) -> list[dict[str, Any]]:
    """The rows of ``table`` as a request's JSON rows (only the model's input columns)."""
    return table.select(columns).to_pylist()


def post(url: str, body: Any, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    """POST JSON (or raw bytes) to url; (status, decoded JSON body)."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def post_all(url: str, bodies: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """POST every body at once from concurrent connections."""
    async with aiohttp.ClientSession() as session:
        async def one(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            async with session.post(url, json=body) as r:
                return r.status, await r.json()

        return await asyncio.gather(*(one(b) for b in bodies))


# ---- health, metadata, parity -------------------------------------------------------------------

def test_health_and_metadata(server: BackgroundServer, predictor: Predictor) -> None:
    assert get(f"{server.url}/health") == (200, {"status": "ok",
                                                 "model": server.service.model_name})
    status, meta = get(f"{server.url}/metadata")
    assert status == 200
    assert meta["tasks"] == ["click", "conversion"] == predictor.tasks
    assert meta["spec_hash"] == predictor.manifest["spec_hash"]
    assert {f["name"] for f in meta["fields"]} == set(predictor.columns)
    kinds = {f["name"]: f["kind"] for f in meta["fields"]}
    assert kinds["user_hist_categories"] == "ids" and kinds["item_id"] == "id"
    assert kinds["item_price"] == "dense"
    assert meta["batching"]["max_batch_rows"] == 64 and meta["batching"]["max_wait_ms"] == 50
    assert meta["versions"]["server"]["aiohttp"] == aiohttp.__version__
    assert meta["two_tower"] is None


def test_scores_equal_predictor_row_by_row(server: BackgroundServer, predictor: Predictor,
                                           test_table: pa.Table) -> None:
    table = test_table.slice(0, 50)
    status, out = post(f"{server.url}/score", {"rows": json_rows(table, predictor.columns)})
    assert status == 200, out
    assert out["rows"] == 50 and out["model"] == server.service.model_name
    expected = predictor.predict_table(table)
    for task in ("click", "conversion"):
        np.testing.assert_allclose(out["scores"][task], expected[task], atol=TOL, rtol=0)


def test_empty_rows_score_nothing(server: BackgroundServer) -> None:
    assert post(f"{server.url}/score", {"rows": []}) == (
        200, {"scores": {"click": [], "conversion": []}, "model": server.service.model_name,
              "rows": 0})


def test_a_null_sparse_value_is_an_empty_bag(server: BackgroundServer, predictor: Predictor,
                                            test_table: pa.Table) -> None:
    table = test_table.slice(0, 3)
    rows = json_rows(table, predictor.columns)
    rows[1]["item_brand"], rows[2]["user_hist_categories"] = None, None
    status, out = post(f"{server.url}/score", {"rows": rows})
    assert status == 200, out
    nulls = pa.Table.from_pylist(rows, schema=table.select(predictor.columns).schema)
    expected = predictor.predict_table(nulls)  # Predictor: a null is an empty bag
    np.testing.assert_allclose(out["scores"]["click"], expected["click"], atol=TOL, rtol=0)
    assert abs(out["scores"]["click"][1] - predictor.predict_table(table)["click"][1]) > 1e-6


# ---- micro-batching -----------------------------------------------------------------------------

def test_concurrent_requests_are_merged_and_each_gets_its_own_rows(
        server: BackgroundServer, predictor: Predictor, test_table: pa.Table) -> None:
    sizes = [1, 3, 2, 5, 1, 4, 2, 1, 3, 2, 1, 5]  # 30 rows in 12 requests, under max_batch_rows
    bounds = np.cumsum([0, *sizes])
    tables = [test_table.slice(int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:],
                                                                    strict=True)]
    stats = server.service.rows_batcher.stats
    calls_before, requests_before = stats.batches, stats.requests
    answers = asyncio.run(post_all(f"{server.url}/score",
                                   [{"rows": json_rows(t, predictor.columns)} for t in tables]))
    assert stats.requests - requests_before == len(sizes)
    assert stats.batches - calls_before < len(sizes)  # merged: fewer model calls than requests
    for (status, out), table in zip(answers, tables, strict=True):
        assert status == 200 and out["rows"] == table.num_rows
        expected = predictor.predict_table(table)
        for task in ("click", "conversion"):
            np.testing.assert_allclose(out["scores"][task], expected[task], atol=TOL, rtol=0)


def test_batcher_fills_batches_in_order_up_to_max_rows() -> None:
    from concurrent.futures import ThreadPoolExecutor

    calls: list[list[int]] = []

    def run_many(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        return [10 * x for x in xs]

    async def go() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[int, int] = MicroBatcher(run_many, max_batch_rows=4,
                                                           max_wait_ms=0, executor=pool)
            batcher.start()
            # all ten are queued before the batcher runs: 4 + 4 + 2 rows, in order
            out = await asyncio.gather(*(batcher.submit(i, rows=1) for i in range(10)))
            await batcher.stop()
            return list(out)

    assert asyncio.run(go()) == [10 * i for i in range(10)]
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_merge_flat_equals_the_inputs_of_the_concatenated_rows(predictor: Predictor,
                                                                test_table: pa.Table) -> None:
    a, b = test_table.slice(0, 3), test_table.slice(3, 4)
    merged = merge_flat([Flat(*predictor.tensors(a)), Flat(*predictor.tensors(b))],
                        len(predictor.features))
    whole = predictor.tensors(test_table.slice(0, 7))
    for got, want in zip((merged.dense, merged.values, merged.lengths), whole, strict=True):
        assert torch.equal(got, want)


# ---- bad requests -------------------------------------------------------------------------------

def _row(predictor: Predictor, table: pa.Table, **change: Any) -> dict[str, Any]:
    row = json_rows(table.slice(0, 1), predictor.columns)[0]
    for k, v in change.items():
        if v is ...:
            del row[k]
        else:
            row[k] = v
    return row


BAD = {  # case -> (changes to the second row, status, field, row, words in the message)
    "unknown field": ({"colour": 1}, 422, "colour", 1, "not an input"),
    "missing field": ({"hour": ...}, 422, "hour", 1, "missing"),
    "string for dense": ({"item_price": "12.5"}, 422, "item_price", 1, "expects a number"),
    "bool for dense": ({"item_price": True}, 422, "item_price", 1, "expects a number"),
    "list for a single id": ({"user_id": [1, 2]}, 422, "user_id", 1, "one id, got a list"),
    "id for a list": ({"user_hist_categories": 3}, 422, "user_hist_categories", 1,
                      "a list of ids"),
    "string id without vocabulary": ({"item_id": "i7"}, 422, "item_id", 1, "no vocabulary"),
    "float id": ({"device": 1.5}, 422, "device", 1, "integer id"),
    "id beyond its table": ({"item_id": 400}, 422, "item_id", 1, "beyond its table"),
    "negative id": ({"user_hist_categories": [1, -2]}, 422, "user_hist_categories", 1,
                    "negative id"),
    "id over int64": ({"item_id": 2**70}, 422, "item_id", 1, "int64"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rows_get_422_naming_field_and_row(case: str, server: BackgroundServer,
                                               predictor: Predictor, test_table: pa.Table,
                                               ) -> None:
    change, status, field, row, words = BAD[case]
    good = _row(predictor, test_table)
    code, out = post(f"{server.url}/score", {"rows": [good, _row(predictor, test_table,
                                                                **change)]})
    assert (code, out.get("field"), out.get("row")) == (status, field, row), out
    assert words in out["error"] and f"'{field}'" in out["error"], out
    assert post(f"{server.url}/score", {"rows": [good]})[0] == 200  # still serving


@pytest.mark.parametrize("body, status, field, words", [
    (b"{\"rows\": [", 400, None, "not valid JSON"),
    (b"\xff\xfe", 400, None, "not valid JSON"),
    (b"x" * (MAX_BODY + 1), 413, None, "larger than the server's limit"),
    (b"[1, 2]", 422, None, "JSON object"),
    (b"{\"rows\": {\"a\": 1}}", 422, "rows", "list of row objects"),
    (b"{\"rows\": [7]}", 422, None, "row 0"),
    (b"{\"rows\": [], \"debug\": true}", 422, "debug", "unknown key"),
    (b"{\"row\": []}", 422, "row", "unknown key"),
    (b"{\"user\": {}, \"candidates\": [1]}", 422, "user", "two-tower export"),
])
def test_bad_bodies_get_4xx_and_the_server_goes_on(body: bytes, status: int, field: str | None,
                                                   words: str, server: BackgroundServer,
                                                   predictor: Predictor,
                                                   test_table: pa.Table) -> None:
    code, out = post(f"{server.url}/score", None, raw=body)
    assert code == status and out.get("field") == field and words in out["error"], out
    assert post(f"{server.url}/score", {"rows": [_row(predictor, test_table)]})[0] == 200


def test_non_finite_dense_value_is_named(server: BackgroundServer, predictor: Predictor,
                                         test_table: pa.Table) -> None:
    body = json.dumps({"rows": [_row(predictor, test_table),
                                _row(predictor, test_table, item_popularity=math.nan)]})
    assert "NaN" in body  # Python's json writes it; the server's reader accepts it
    code, out = post(f"{server.url}/score", None, raw=body.encode())
    assert (code, out["field"], out["row"]) == (422, "item_popularity", 1)
    assert "finite" in out["error"]


def test_unknown_paths_and_methods_are_json_errors(server: BackgroundServer) -> None:
    assert get(f"{server.url}/predict")[0] == 404
    code, out = get(f"{server.url}/score")
    assert code == 405 and "POST /score" in out["error"]


# ---- vocabularies -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vocab_export(export: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Path, Vocabulary, Vocabulary]:
    """The export with raw-value vocabularies: item_id by strings (399 values + unknown = its
    400 rows), device hashed into its 4 rows."""
    out = tmp_path_factory.mktemp("vocab") / "export"
    shutil.copytree(export, out)
    items = Vocabulary("item_id", VocabInfo(kind="vocab", size=400, value_type="string",
                                            file="vocab/item_id.parquet"),
                       pa.array([f"item-{i}" for i in range(399)]))
    items.save(out)
    device = hashed("device", 4, "string")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["vocabularies"] = {v.column: v.info.model_dump(mode="json") for v in (items, device)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, items, device


def test_raw_values_are_mapped_through_the_export_vocabularies(
        vocab_export: tuple[Path, Vocabulary, Vocabulary], predictor: Predictor,
        test_table: pa.Table) -> None:
    out, items, device = vocab_export
    raw_items, raw_devices = ["item-4", "atlantis", "item-398", 17], ["ios", "web", "tv", "x"]
    base = json_rows(test_table.slice(0, 4), predictor.columns)
    rows = [{**r, "item_id": i, "device": d}
            for r, i, d in zip(base, raw_items, raw_devices, strict=True)]
    with BackgroundServer(out, ServeConfig(port=0)) as srv:
        status, got = post(f"{srv.url}/score", {"rows": rows})
        bad = post(f"{srv.url}/score", {"rows": [{**rows[0], "device": [1]}]})
        meta = get(f"{srv.url}/metadata")[1]
    assert status == 200, got
    # item-4 -> 5 (values are ids 1..), unknown -> 0, 17 -> "17" -> unknown; device hashed
    item_ids = [5, 0, 399, 0]
    assert items.ids(pa.array(["item-4", "atlantis", "item-398", "17"])).tolist() == item_ids
    ids_table = test_table.slice(0, 4).set_column(
        test_table.schema.get_field_index("item_id"), "item_id", pa.array(item_ids))
    ids_table = ids_table.set_column(ids_table.schema.get_field_index("device"), "device",
                                     pa.array(device.ids(pa.array(raw_devices))))
    expected = predictor.predict_table(ids_table)
    np.testing.assert_allclose(got["scores"]["click"], expected["click"], atol=TOL, rtol=0)
    assert bad[0] == 422 and bad[1]["field"] == "device"
    assert meta["vocabularies"]["item_id"]["kind"] == "vocab"
    assert {f["name"]: f["type"] for f in meta["fields"]}["item_id"] == "string"


def test_export_copies_the_dataset_vocabularies(tiny_dataset: DatasetManifest,
                                                tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    manifest = json.loads((tiny_dataset.root / "dataset.json").read_text())
    vocab = Vocabulary("user_id", VocabInfo(kind="vocab", size=3, value_type="string",
                                            file="vocab/user_id.parquet"), pa.array(["a", "b"]))
    vocab.save(data)
    manifest["vocabularies"] = {"user_id": vocab.info.model_dump(mode="json"),
                                "device": hashed("device", 4, "string").info.model_dump(
                                    mode="json")}
    (data / "dataset.json").write_text(json.dumps(manifest))
    spec = validate_spec(tiny_spec_dict(data), "tiny.toml")
    out = tmp_path / "export"
    out.mkdir()
    recorded = raw_value_maps(spec, out)["vocabularies"]
    assert recorded == manifest["vocabularies"]
    assert (out / "vocab/user_id.parquet").read_bytes() == \
        (data / "vocab/user_id.parquet").read_bytes()
    assert Vocabulary.load(out, "user_id", vocab.info).ids(["b", "z"]).tolist() == [2, 0]
    (data / "vocab/user_id.parquet").unlink()
    with pytest.raises(DataError, match="user_id.*vocab/user_id.parquet, which is missing"):
        raw_value_maps(spec, tmp_path / "export2")


# ---- two-tower ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dssm_export(tiny_dataset: DatasetManifest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    full = tomllib.loads((ROOT / "specs" / "ranktower.toml").read_text())
    raw = tiny_spec_dict(tiny_dataset.root)
    raw["data"]["labels"] = ["click"]
    raw["model"] = {**full["model"], "arch": "dssm", "tasks": ["click"],
                    "ranktower": {**full["model"]["ranktower"], "hidden": [16], "head_dim": 8}}
    return export_untrained(validate_spec(raw, "tiny-dssm.toml"),
                            tmp_path_factory.mktemp("dssm") / "export")


def test_two_tower_candidates_are_scored_from_the_item_cache(
        dssm_export: Path, test_table: pa.Table) -> None:
    joint = Predictor.load(dssm_export)
    split = joint.manifest["serving_split"]
    user_fields = split["user_dense"] + [joint.feature_columns[f] for f in split["user_features"]]
    user = json_rows(test_table.slice(0, 1), user_fields)[0]
    # candidates: items of later rows (their features as cached), in an order of our choosing
    items = test_table.slice(1, 12)
    candidates = items.column("item_id").to_pylist()[::-1]
    # the joint model on (this user, each candidate's own row) is what the split must equal
    rows = [{**r, **user} for r in json_rows(items, joint.columns)][::-1]
    expected = joint.predict_table(pa.Table.from_pylist(rows))["click"]
    with BackgroundServer(dssm_export, ServeConfig(port=0, max_wait_ms=50)) as srv:
        status, got = post(f"{srv.url}/score", {"user": user, "candidates": candidates})
        missing = post(f"{srv.url}/score", {"user": user, "candidates": [candidates[0], 99999]})
        bad_user = post(f"{srv.url}/score", {"user": {**user, "item_price": 1.0},
                                             "candidates": candidates})
        rows_form = post(f"{srv.url}/score", {"rows": rows[:3]})
        stats = srv.service.user_batcher.stats
        before = stats.batches
        answers = asyncio.run(post_all(f"{srv.url}/score",
                                       [{"user": user, "candidates": candidates[:k]}
                                        for k in range(1, 9)]))
        merged_calls = stats.batches - before
    assert status == 200 and got["rows"] == len(candidates), got
    # joint model vs towers + scorer: the same math in another order (as tests/
    # test_ranktower_training.py checks the cache)
    np.testing.assert_allclose(got["scores"]["click"], expected, atol=1e-5, rtol=0)
    assert missing[0] == 422 and missing[1]["field"] == "candidates"
    assert "99999" in missing[1]["error"] and "position 1" in missing[1]["error"]
    assert bad_user[0] == 422 and bad_user[1]["field"] == "item_price"
    assert "user:" in bad_user[1]["error"]
    np.testing.assert_allclose(rows_form[1]["scores"]["click"], expected[:3], atol=TOL, rtol=0)
    assert merged_calls < 8
    for k, (code, out) in enumerate(answers, start=1):
        assert code == 200
        np.testing.assert_allclose(out["scores"]["click"], got["scores"]["click"][:k],
                                   atol=TOL, rtol=0)


# ---- the command line ---------------------------------------------------------------------------

def test_serve_cli_refuses_a_missing_export_and_bad_options(tmp_path: Path, capsys) -> None:
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert "nope: export directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty"), "--port", "0"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-batch-rows", "0"]) == 2
    assert "--max-batch-rows must be >= 1" in capsys.readouterr().err


def test_serve_cli_names_a_port_in_use(export: Path, capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(export), "--port", str(port)]) == 2
    assert f"--port {port}: 127.0.0.1:{port} is already in use" in capsys.readouterr().err


# ---- the load test ------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_serve_http_quick(export: Path, tmp_path: Path) -> None:
    from recsys.bench import write_result

    cfg = ServeHttpBenchConfig(export=str(export), quick=True, requests=40, clients=4,
                               rows_per_request=4, inprocess_calls=20, warmup=2)
    result = bench_run(cfg, progress=False)
    http, batching = result["http"], result["batching"]
    assert http["requests"] == 40 and http["errors"] == 0
    assert 0 < http["p50_ms"] <= http["p99_ms"]
    assert http["rows_per_s"] == pytest.approx(http["requests_per_s"] * 4)
    assert batching["requests"] == 40 and 0 < batching["batches"] <= 40
    assert result["inprocess"]["calls"] == 20
    assert result["parity"]["ok"] and result["parity"]["requests_checked"] == 40
    assert result["server"]["exit_status"] == 0  # SIGTERM: a graceful shutdown
    assert result["server"]["torch_threads"] == result["inprocess"]["threads"]
    text = bench_table(result)
    assert "HTTP POST /score, 4 clients" in text and "in-process TorchScript call" in text
    path = write_result(tmp_path, "serve-http", result, text)
    assert json.loads(path.read_text())["http"]["requests"] == 40


@pytest.mark.slow
def test_serve_command_prints_its_url_and_stops_gracefully_on_sigint(
        export: Path, predictor: Predictor, test_table: pa.Table, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from recsys.bench.serve_http import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", "serve", str(export),
                                 "--port", str(port), "--threads", "1"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while f"at {url} " not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert get(f"{url}/health")[0] == 200
        assert post(f"{url}/score", {"rows": [_row(predictor, test_table)]})[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"serving {export} (mlp, tasks click, conversion) at {url} " in text
    assert "stopped: 1 request(s), 1 rows in 1 model call(s)" in text
