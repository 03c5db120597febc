"""``recsys data prepare table``: vocabularies, stable hashing, splits, scaling, errors, the CLI and
``recsys bench prepare``, on small hand-made tables whose outputs are worked out by hand."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as csv
import pyarrow.parquet as pq
import pytest

from recsys.cli import main
from recsys.data.adapters import config_hash, prepare, recorded_options, table_input
from recsys.data.adapters import table as table_adapter
from recsys.data.parquet import ParquetSplit
from recsys.data.schema import BatchSchema, DatasetManifest, SparseColumn, VocabKind
from recsys.data.vocab import (
    Vocabulary,
    VocabularyBuilder,
    hashed,
    load_vocabularies,
    stable_hash,
)
from recsys.errors import DataError, SpecError, UsageError
from recsys.spec import OOVPolicy, PrepareSpec, validate_spec
from recsys.spec.data import TABLE_OPTIONS
from recsys.spec.io import read_raw_spec

# rows 0-4 are train (time < 4; the cut moves past the three tied rows at time 3), 5 valid, 6-7 test
ROWS = {
    "uid": ["u1", "u2", "u1", "u3", "u1", "u2", "u4", "u1"],
    "sku": [10, 20, 10, 30, 20, 10, 40, 50],
    "ts": [1, 2, 3, 3, 3, 4, 5, 6],
    "city": ["a", "b", "a", None, "a", "b", "c", "a"],
    "tags": ["x|y", "y", "", "x||z", None, "y|x", "z", "x"],
    "price": [1.0, 2.0, None, 4.0, 5.0, 6.0, 7.0, 8.0],
    "clicked": [1, 0, 1, 0, 1, 1, 0, 0],
}
OPTIONS = {"label": "clicked", "user": "uid", "item": "sku", "time": "ts",
           "sparse": ["city:user"], "multi": ["tags"], "dense": ["price"],
           "valid_fraction": 0.25, "test_fraction": 0.25}


def write_input(folder: Path, kind: str, rows: dict[str, list[object]] = ROWS) -> Path:
    """The table as Parquet, CSV or gzipped CSV."""
    table = pa.table(rows)
    if kind == "parquet":
        path = folder / "events.parquet"
        pq.write_table(table, path)
    else:
        path = folder / "events.csv"
        csv.write_csv(table, path)
        if kind == "csv.gz":
            gz = folder / "events.csv.gz"
            gz.write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()
            path = gz
    return path


def opts(path: Path, **changes: object) -> PrepareSpec:
    return PrepareSpec(input=str(path), **{**OPTIONS, **changes})


def read(m: DatasetManifest, split: str) -> dict[str, list[object]]:
    return pq.read_table(m.files("impressions", split)).to_pydict()


# ---- the vocabulary contract ----------------------------------------------------------------------

def reference_hash(value: object) -> int:
    """stable_hash's documented formula, one value at a time in plain Python."""
    data = str(value).encode()
    mask = (1 << 64) - 1
    poly = 0
    for b in data:
        poly = (poly * 0x100000001B3 + b + 1) & mask
    x = (poly + (len(data) + 1) * 0x9E3779B97F4A7C15) & mask
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & mask
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & mask
    return x ^ (x >> 33)


def test_stable_hash_is_the_documented_formula_and_pinned() -> None:
    values = ["", "a", "42", "héllo wörld", "x" * 300, "u1"]
    assert stable_hash(pa.array(values)).tolist() == [reference_hash(v) for v in values]
    assert stable_hash(pa.array(["a"]))[0] == 12802135788181653797  # pinned: never changes
    # integers hash as their decimal strings; a null is 0; a slice hashes like its values
    assert stable_hash(pa.array([42, -7])).tolist() == [reference_hash(42), reference_hash(-7)]
    assert stable_hash(pa.array(["42", None])).tolist() == [reference_hash(42), 0]
    assert stable_hash(pa.array(["q", "a", "42"]).slice(1)).tolist() == \
        [reference_hash("a"), reference_hash("42")]
    # dictionary-encoded and chunked (over 1 MiB of text: hashed in halves) give the same
    many = pa.array([f"value-{i:07d}" for i in range(120_000)])
    assert np.array_equal(stable_hash(many.dictionary_encode()), stable_hash(many))
    assert stable_hash(many)[99_999] == reference_hash("value-0099999")
    # one string longer than a chunk needs powers past the table kept per base, computed apart
    long = "ab" * ((1 << 19) + 3)
    assert stable_hash(pa.array([long, "u1"])).tolist() == [reference_hash(long),
                                                            reference_hash("u1")]
    assert stable_hash(pa.array(values)).tolist() == [reference_hash(v) for v in values]


def test_builder_orders_by_count_then_value_and_drops_rare() -> None:
    b = VocabularyBuilder("city", min_count=2)
    b.update(pa.array(["rome", "paris", None, "oslo"]))
    b.update(pa.array(["paris", "rome", "paris", "bonn"]).dictionary_encode())
    b.update(pa.array([None, None], pa.string()))
    v = b.finish()
    # paris 3, rome 2 (oslo and bonn once: under min_count); ids 1, 2; 0 = unknown or missing
    assert v.values.to_pylist() == ["paris", "rome"]
    assert v.info.kind == VocabKind.VOCAB and v.info.size == 3 and v.info.min_count == 2
    assert v.info.value_type == "string" and v.info.file == "vocab/city.parquet"
    assert b.total == 7
    assert v.ids(["rome", "oslo", None, "paris"]).tolist() == [2, 0, 0, 1]
    assert v.raw_of([1, 0, 2]) == ["paris", None, "rome"]
    with pytest.raises(ValueError, match="outside"):
        v.raw_of([3])


def test_ties_break_by_value_whatever_the_block_order() -> None:
    blocks = [pa.array([5, 3, 9]), pa.array([9, 3, 5, 7])]
    forward, backward = VocabularyBuilder("item"), VocabularyBuilder("item")
    for blk in blocks:
        forward.update(blk)
    for blk in reversed(blocks):
        backward.update(blk)
    assert forward.finish().values.to_pylist() == [3, 5, 9, 7]  # three twice (asc), then 7
    assert backward.finish().values.to_pylist() == [3, 5, 9, 7]


def test_lookup_paths_agree_and_integers_meet_strings(tmp_path: Path) -> None:
    values = pa.array([f"id{i}" for i in range(5000)])
    info = VocabularyBuilder("x").finish().info.model_copy(update={"size": 5001})
    v = Vocabulary("x", info, values)
    raw = pa.array(["id17", "nope", None, "id4999"])
    # 5000 values against 4 raw ones: the sorted lookup; against 2000 raw ones: index_in
    assert v.ids(raw).tolist() == [18, 0, 0, 5000]
    long = pa.array(["id17", "nope", None, "id4999"] * 500)
    assert v.ids(long).tolist()[:4] == [18, 0, 0, 5000]
    ints = Vocabulary("n", info.model_copy(update={"size": 3, "value_type": "int64"}),
                      pa.array([42, 7]))
    assert ints.ids(["7", "42", "x"]).tolist() == [2, 1, 0]  # strings find integers
    strings = Vocabulary("s", info.model_copy(update={"size": 3}), pa.array(["42", "7"]))
    assert strings.ids(pa.array([7, 42, 8])).tolist() == [2, 1, 0]
    # save -> load round trip
    v.save(tmp_path)
    back = Vocabulary.load(tmp_path, "x", v.info)
    assert back.values.equals(values) and back.ids(raw).tolist() == [18, 0, 0, 5000]


def test_hashed_vocabulary_is_in_range_and_stable() -> None:
    v = hashed("city", 16, "string")
    ids = v.ids(pa.array(["a", "u1", None, "42"]))
    assert ids.tolist() == [12802135788181653797 % 16, reference_hash("u1") % 16, 0,
                            reference_hash("42") % 16]
    assert v.ids(pa.array([42])).tolist() == [reference_hash("42") % 16]
    many = v.ids(pa.array([f"k{i}" for i in range(1000)]))
    assert many.min() >= 0 and many.max() < 16 and len(set(many.tolist())) == 16
    with pytest.raises(ValueError, match="cannot be mapped back"):
        v.raw_of([1])


# ---- the adapter ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["parquet", "csv", "csv.gz"])
def test_time_split_vocabularies_and_scaling(tmp_path: Path, kind: str) -> None:
    path = write_input(tmp_path, kind)
    m = prepare("table", path, tmp_path / "out", opts(path, dense_scale="standard"),
                progress=False)
    assert m.rows["impressions"] == {"train": 5, "valid": 1, "test": 2}
    train, valid, test = read(m, "train"), read(m, "valid"), read(m, "test")
    assert train["timestamp"] == [1, 2, 3, 3, 3] and valid["timestamp"] == [4]  # ties together
    # train counts: u1 3, u2 1, u3 1 -> 1, 2, 3; u4 never in train -> 0
    assert train["user_id"] == [1, 2, 1, 3, 1] and valid["user_id"] == [2]
    assert test["user_id"] == [0, 1]
    # 10 and 20 twice each (ties by value), 30 once; 40 and 50 only in test
    assert train["item_id"] == [1, 2, 1, 3, 2] and test["item_id"] == [0, 0]
    assert train["city"] == [1, 2, 1, 0, 1] and test["city"] == [0, 1]
    # tags: x 2, y 2, z 1; "" and a missing list are empty, "x||z" drops its empty item
    assert train["tags"] == [[1, 2], [2], [], [1, 3], []]
    assert valid["tags"] == [[2, 1]] and test["tags"] == [[3], [1]]
    # price: train values 1, 2, 4, 5 -> mean 3, population std sqrt(2.5); missing -> 0
    s = math.sqrt(2.5)
    expected = [(1 - 3) / s, (2 - 3) / s, 0.0, (4 - 3) / s, (5 - 3) / s]
    assert train["price"] == pytest.approx(expected, rel=1e-6)
    assert test["price"] == pytest.approx([(7 - 3) / s, (8 - 3) / s], rel=1e-6)
    assert train["clicked"] == [1, 0, 1, 0, 1] and test["clicked"] == [0, 0]

    loaded = DatasetManifest.load(tmp_path / "out")
    assert loaded.vocabularies == m.vocabularies
    assert loaded.column("user_id").cardinality == loaded.vocabularies["user_id"].size == 4
    assert loaded.column("tags").role == "multi_sparse" and loaded.column("city").side == "user"
    vocabs = load_vocabularies(tmp_path / "out", loaded)
    assert vocabs["user_id"].raw_of([1, 2, 3]) == ["u1", "u2", "u3"]
    assert vocabs["tags"].raw_of([1, 2, 3]) == ["x", "y", "z"]
    # Parquet keeps the integer item ids; CSV reads every id as text
    assert vocabs["item_id"].raw_of([1, 2, 3]) == ([10, 20, 30] if kind == "parquet"
                                                   else ["10", "20", "30"])
    assert (tmp_path / "out" / "vocab" / "user_id.parquet").is_file()
    record = loaded.source["table"]
    assert record["dense"]["price"]["missing"] == 1
    assert record["ids"]["user_id"]["unknown_share"]["test"] == 0.5
    # the loader reads it back
    schema = BatchSchema(dense=["price"], labels=["clicked"], groups={"user": "user_id"},
                         sparse=[SparseColumn("user_id", "user_id", 4, OOVPolicy.ERROR, False),
                                 SparseColumn("tags", "tags", 4, OOVPolicy.ERROR, True)])
    split = ParquetSplit(loaded.files("impressions", "train"), schema)
    assert split.read(split.row_groups[0]).column("user_id").to_pylist() == [1, 2, 1, 3, 1]


def test_min_count_log_scaling_and_request_groups(tmp_path: Path) -> None:
    rows = {**ROWS, "price": [-1.0, 0.0, None, 4.0, 5.0, 6.0, 7.0, 8.0],
            "req": ["r1", "r1", "r2", "r2", "r2", "r3", "r4", "r4"]}
    path = write_input(tmp_path, "parquet", rows)
    m = prepare("table", path, tmp_path / "out",
                opts(path, min_count=2, dense_scale="log", request="req"), progress=False)
    train = read(m, "train")
    assert train["user_id"] == [1, 0, 1, 0, 1]  # only u1 is seen twice in train
    assert m.vocabularies["user_id"].size == 2 and m.vocabularies["user_id"].min_count == 2
    assert train["price"] == pytest.approx([-math.log(2), 0.0, 0.0, math.log(5), math.log(6)],
                                           rel=1e-6)
    # requests over every row: r2 3 rows, r1 and r4 2 (by value), r3 1 -> 1, 2, 3, 4
    assert train["request_id"] == [2, 2, 1, 1, 1] and read(m, "test")["request_id"] == [3, 3]
    assert m.column("request_id").role == "group"


def test_hash_buckets(tmp_path: Path) -> None:
    path = write_input(tmp_path, "parquet")
    m = prepare("table", path, tmp_path / "out", opts(path, hash_buckets=16), progress=False)
    info = m.vocabularies["user_id"]
    assert info.kind == VocabKind.HASH and info.size == 16 and info.file is None
    assert m.column("user_id").cardinality == 16 and not (tmp_path / "out" / "vocab").exists()
    assert read(m, "train")["user_id"] == [reference_hash(u) % 16 for u in ROWS["uid"][:5]]
    assert read(m, "test")["item_id"] == [reference_hash(40) % 16, reference_hash(50) % 16]
    assert read(m, "train")["city"][3] == 0  # a missing value is 0


def random_rows(n: int) -> dict[str, list[object]]:
    return {"uid": [f"u{i % 7}" for i in range(n)], "clicked": [i % 2 for i in range(n)]}


def test_random_split_is_deterministic_per_seed_and_block_size(tmp_path: Path) -> None:
    path = write_input(tmp_path, "parquet", random_rows(400))
    options = PrepareSpec(input=str(path), label="clicked", user="uid", split="random", seed=3,
                          valid_fraction=0.2, test_fraction=0.2)

    def run(out: str, **kwargs: object) -> DatasetManifest:
        return table_adapter.convert(path, tmp_path / out, options, config_hash="x",
                                     progress=False, **kwargs)

    a, b = run("a"), run("b", parquet_block_rows=7)
    assert a.rows == b.rows and all(read(a, s) == read(b, s) for s in ("train", "valid", "test"))
    rows = a.rows["impressions"]
    assert sum(rows.values()) == 400 and 40 <= rows["test"] <= 120 and 40 <= rows["valid"] <= 120
    other = table_adapter.convert(path, tmp_path / "c", options.model_copy(update={"seed": 4}),
                                  config_hash="x", progress=False)
    assert other.rows != a.rows or read(other, "test") != read(a, "test")
    codes = table_input.random_split(0, 400, 3, 0.2, 0.2)
    assert np.array_equal(codes[100:], table_input.random_split(100, 300, 3, 0.2, 0.2))


def test_column_split_and_a_bad_split_name(tmp_path: Path) -> None:
    rows = {**random_rows(6), "fold": ["train", "test", "train", "valid", "train", "test"]}
    path = write_input(tmp_path, "csv", rows)
    options = PrepareSpec(input=str(path), label="clicked", user="uid", split="column:fold")
    m = prepare("table", path, tmp_path / "out", options, progress=False)
    assert m.rows["impressions"] == {"train": 3, "valid": 1, "test": 2}
    assert read(m, "test")["clicked"] == [1, 1]
    rows["fold"][4] = "dev"
    (tmp_path / "bad").mkdir()
    bad = write_input(tmp_path / "bad", "csv", rows)
    with pytest.raises(DataError, match=r"events\.csv:6: the split column 'fold' holds 'dev'"):
        prepare("table", bad, tmp_path / "out2", options, progress=False)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.partial").exists()


def test_multi_from_arrow_lists(tmp_path: Path) -> None:
    rows = {"clicked": [1, 0, 1, 0], "tags": [["b", "a"], None, ["a", "c", "a"], ["b", "d"]],
            "fold": ["train", "train", "train", "test"]}
    path = write_input(tmp_path, "parquet", rows)
    options = PrepareSpec(input=str(path), label="clicked", multi=["tags:item"],
                          split="column:fold")
    m = prepare("table", path, tmp_path / "out", options, progress=False)
    assert m.column("tags").side == "item" and m.vocabularies["tags"].size == 4
    assert read(m, "train")["tags"] == [[2, 1], [], [1, 3, 1]]  # a 3, then b, c once (by value)
    assert read(m, "test")["tags"] == [[2, 0]]  # d is not in train


@pytest.mark.parametrize(("column", "values", "where", "message"), [
    ("clicked", [1, 0, 2, 0, 1, 1, 0, 0], r"events\.csv:4", r"label column 'clicked' holds 2"),
    ("clicked", ["1", "0", "yes", "0", "1", "1", "0", "0"], r"events\.csv:4",
     r"label column 'clicked' holds 'yes'"),
    ("clicked", [1, 0, None, 0, 1, 1, 0, 0], r"events\.csv:4", r"label column 'clicked' is empty"),
    ("price", [1.0, "cheap", 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], r"events\.csv:3",
     r"column 'price' holds 'cheap', which is not a number"),
])
def test_bad_values_name_file_row_and_column(tmp_path: Path, column: str, values: list[object],
                                             where: str, message: str) -> None:
    rows = {**ROWS, column: [None if v is None else str(v) for v in values]}
    path = write_input(tmp_path, "csv", rows)
    with pytest.raises(DataError, match=f"{where}: .*{message}"):
        prepare("table", path, tmp_path / "out", opts(path), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert not list(tmp_path.glob(".out.scan-*"))  # the spill is gone too


def test_parquet_bad_label_names_the_row(tmp_path: Path) -> None:
    path = write_input(tmp_path, "parquet", {**ROWS, "clicked": [1, 0, 1, 0, 1, 1, 0, 3]})
    with pytest.raises(DataError, match=r"events\.parquet row 8: .*holds 3"):
        prepare("table", path, tmp_path / "out", opts(path), progress=False)
    m = prepare("table", path, tmp_path / "out", opts(path, label_threshold=1.0), progress=False)
    assert read(m, "test")["clicked"] == [0, 1]  # >= 1 -> 1


def test_unknown_column_lists_the_columns(tmp_path: Path) -> None:
    path = write_input(tmp_path, "parquet")
    with pytest.raises(DataError, match=r"events\.parquet: has no column 'shop' \(a sparse "
                       r"column\); its columns: uid, sku, ts, city, tags, price, clicked"):
        prepare("table", path, tmp_path / "out", opts(path, sparse=["shop"]), progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="label: format 'table' needs label"):
        prepare("table", path, tmp_path / "out", PrepareSpec(input=str(path)), progress=False)


def test_folders_sorted_and_mixed_formats_refused(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    half = {k: v[:4] for k, v in ROWS.items()}
    rest = {k: v[4:] for k, v in ROWS.items()}
    pq.write_table(pa.table(rest), folder / "part-1.parquet")
    pq.write_table(pa.table(half), folder / "part-0.parquet")
    (folder / "_SUCCESS").write_text("")
    m = prepare("table", folder, tmp_path / "out", opts(folder), progress=False)
    assert read(m, "train")["user_id"] == [1, 2, 1, 3, 1]  # as from one file
    csv.write_csv(pa.table(half), folder / "part-2.csv")
    with pytest.raises(DataError, match="mixes CSV and Parquet"):
        prepare("table", folder, tmp_path / "out2", opts(folder), progress=False)


def test_spec_and_hash_contract() -> None:
    raw = read_raw_spec("specs/quickstart.toml")
    raw["data"] = {**raw["data"], "source": "table", "prepare": {"input": "events.csv"}}
    raw["data"].pop("synthetic", None)
    with pytest.raises(SpecError, match=r"data\.prepare\.label: format 'table' needs label"):
        validate_spec(raw, "q.toml")
    raw["data"]["source"] = "criteo"
    raw["data"]["prepare"] = {"input": "train.txt", "user": "uid"}
    with pytest.raises(SpecError, match=r"data\.prepare\.user: is an option of format 'table'"):
        validate_spec(raw, "q.toml")
    # the table options left unset do not enter the other formats' hashes
    plain = PrepareSpec(input="a.libfm")
    assert not set(recorded_options(plain)) & set(TABLE_OPTIONS)
    assert config_hash("libfm", "a.libfm", plain) != config_hash(
        "table", "a.libfm", PrepareSpec(input="a.libfm", label="y"))


def test_cli_prepare_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_input(tmp_path, "csv")
    out = tmp_path / "out"
    assert main(["data", "prepare", "table", "--input", str(path), "--out", str(out),
                 "--label", "clicked", "--user", "uid", "--item", "sku", "--time", "ts",
                 "--sparse", "city:user", "--multi", "tags", "--dense", "price",
                 "--dense-scale", "standard", "--valid-fraction", "0.25",
                 "--test-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "| train |    5 |" in printed and "user_id" in printed and "standard" in printed
    assert DatasetManifest.load(out).vocabularies["city"].size == 3
    assert main(["data", "prepare", "criteo", "--input", str(path), "--out",
                 str(tmp_path / "x"), "--user", "uid"]) == 2
    assert "--user: only for format table" in capsys.readouterr().err


def test_bench_prepare_quick(tmp_path: Path) -> None:
    import json

    assert main(["bench", "prepare", "--quick", "--rows", "4000", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "prepare.json").read_text())
    assert set(result["rows_per_s_per_core"]) == {"csv", "parquet"}
    assert result["cases"]["csv/full"]["rows"] == 4000
    assert result["cases"]["parquet/small"]["rows"] == 1000
    assert "rows/s per core" in (tmp_path / "prepare.md").read_text()


def test_bench_prepare_reports_a_conversion_process_that_dies_without_a_result() -> None:
    """A child killed before it answers (out of memory, say) is an error naming its exit code,
    not a wait for ever on its queue."""
    import os

    from recsys.bench.prepare import _result
    from recsys.clean_start import clean_context

    ctx = clean_context()
    queue = ctx.Queue()
    child = ctx.Process(target=os._exit, args=(3,))
    child.start()
    with pytest.raises(RuntimeError, match=r"exited \(code 3\) without a result"):
        _result(queue, child)
    child.join()
