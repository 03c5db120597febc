"""Bad data is refused with one error that names what and where (file, column, row or line), and
nothing a user made is ever lost: labels outside {0, 1}, non-finite ratings, empty, cut-short and
non-UTF-8 raw files, foreign files in a dataset directory, two writers of one dataset, failed writes
and corrupt shards of any split."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_SYNTHETIC, tiny_spec_dict

from recsys.data import synthetic
from recsys.data.adapters import prepare
from recsys.data.batch import BatchBuilder
from recsys.data.loader import ParquetLoader
from recsys.data.parquet import ParquetSplit
from recsys.data.schema import BatchSchema, DatasetManifest, SparseColumn
from recsys.data.synthetic import generate
from recsys.datasets import ensure_dataset, open_split, verify_dataset
from recsys.errors import DataError, RunError
from recsys.fsutil import sibling_lock
from recsys.spec import OOVPolicy, PrepareSpec, Spec, SyntheticSpec, validate_spec

REPO = Path(__file__).resolve().parents[1]
SMALL: dict[str, Any] = {**TINY_SYNTHETIC, "requests": {"train": 200, "valid": 40, "test": 40},
                         "rows_per_shard": 1000, "row_group_size": 500}


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def synthetic_spec(path: Path, **data: Any) -> Spec:
    raw = tiny_spec_dict(path)
    raw["data"].update({"source": "synthetic", "synthetic": SMALL, **data})
    return validate_spec(raw, "tiny.toml")


# ==================================================================================================
# 1. binary labels hold 0 or 1; graded labels any finite value

LABEL_SCHEMA = dict(dense=[], sparse=[SparseColumn("rid", "rid", 100, OOVPolicy.ERROR, False)],
                    labels=["click", "grade"])


def label_table(click: list[Any], click_type: pa.DataType, grade: list[float] | None = None,
                ) -> pa.Table:
    n = len(click)
    return pa.table({"rid": pa.array(np.arange(n), pa.int64()),
                     "click": pa.array(click, click_type),
                     "grade": pa.array(grade if grade is not None else [0.0] * n, pa.float32())})


@pytest.mark.parametrize("value, click_type, shown", [
    (2, pa.int8(), "holds 2 at row 5"),
    (-1, pa.int64(), "holds -1 at row 5"),
    (0.5, pa.float32(), "holds 0.5 at row 5"),
    (2.0, pa.float64(), "holds 2.0 at row 5"),
    (float("nan"), pa.float32(), "holds nan at row 5"),
])
def test_binary_label_outside_0_1_names_file_column_and_row(tmp_path, value, click_type, shown):
    click = [0, 1, 1, 0, 1, value, 0, 1, 0, 0]
    path = tmp_path / "part-00000.parquet"
    pq.write_table(label_table(click, click_type), path, row_group_size=4)
    schema = BatchSchema(**LABEL_SCHEMA, binary_labels=("click",))
    loader = ParquetLoader(ParquetSplit([path], schema), 3, shuffle=False, drop_last=False)
    with pytest.raises(DataError) as info:
        list(loader.epoch(0))
    message = str(info.value)
    assert str(path) in message and "'click'" in message and shown in message
    assert "graded_labels" in message  # the way out when the values are meant


def test_binary_labels_of_every_type_pass(tmp_path):
    schema = BatchSchema(**LABEL_SCHEMA, binary_labels=("click",))
    builder = BatchBuilder(schema)
    for typ in (pa.int8(), pa.int64(), pa.float32(), pa.float64()):
        cols = builder.columns(label_table([0, 1, 1, 0], typ), "t")
        assert cols.values["click"].tolist() == [0, 1, 1, 0]
    cols = builder.columns(label_table([False, True], pa.bool_()), "t")
    assert cols.values["click"].tolist() == [False, True]


def test_graded_label_may_hold_grades_but_not_nan(tmp_path):
    schema = BatchSchema(**LABEL_SCHEMA, binary_labels=("click",))  # "grade" is graded
    builder = BatchBuilder(schema)
    cols = builder.columns(label_table([0, 1, 0], pa.int8(), [0.0, 4.5, -2.0]), "t")
    assert cols.values["grade"].tolist() == [0.0, 4.5, -2.0]
    with pytest.raises(DataError, match=r"f\.parquet: column 'grade' holds inf at row 1"):
        builder.columns(label_table([0, 1, 0], pa.int8(), [0.0, float("inf"), 1.0]), "f.parquet")


def test_spec_graded_labels_reach_the_loader(tmp_path, tiny_dataset):
    """From the spec to the loader: click = 2 in a valid shard is an error naming the shard,
    unless data.graded_labels lists click."""
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset.root, root)
    shard = DatasetManifest.load(root).files("impressions", "valid")[0]
    table = pq.read_table(shard)
    click = table.column("click").to_numpy().copy()
    click[7] = 2
    table = table.set_column(table.schema.get_field_index("click"), "click",
                             pa.array(click, pa.int8()))
    pq.write_table(table, shard, row_group_size=1000)

    raw = tiny_spec_dict(root)
    spec = validate_spec(raw, "tiny.toml")
    manifest = ensure_dataset(spec, progress=False)  # the footers are fine
    split = open_split(spec, manifest, "valid")
    assert split.schema.binary_labels == ("click", "conversion")
    with pytest.raises(DataError) as info:
        list(ParquetLoader(split, 64, shuffle=False, drop_last=False).epoch(0))
    assert str(shard) in str(info.value)
    assert "column 'click' holds 2 at row 7" in str(info.value)

    raw["data"]["graded_labels"] = ["click"]
    graded = validate_spec(raw, "tiny.toml")
    split = open_split(graded, manifest, "valid")
    assert split.schema.binary_labels == ("conversion",)
    batches = list(ParquetLoader(split, 64, shuffle=False, drop_last=False).epoch(0))
    assert float(batches[0].labels["click"][7]) == 2.0


# ==================================================================================================
# 2. MovieLens ratings are finite


def write_movielens(d: Path, ratings: str) -> Path:
    d.mkdir()
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + ratings)
    (d / "movies.csv").write_text("movieId,title,genres\n100,Heat (1995),Action\n")
    return d


@pytest.mark.parametrize("rating", ["nan", "NaN", "inf", "-inf"])
def test_movielens_non_finite_rating_names_file_and_line(tmp_path, rating):
    src = write_movielens(tmp_path / "ml", f"1,100,4.0,10\n2,100,{rating},20\n3,100,3.0,30\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"ratings\.csv:3: column 'rating' holds -?(nan|inf)"):
        prepare("movielens", src, out, progress=False)
    assert not out.exists() and not partial(out).exists()


def test_movielens_classic_non_finite_rating(tmp_path):
    src = tmp_path / "ml100k"
    src.mkdir()
    (src / "u.data").write_text("1\t100\t4\t10\n2\t100\tnan\t20\n")
    (src / "u.user").write_text("1|24|M|writer|00000\n2|30|F|other|00000\n")
    (src / "u.item").write_text("100|Heat (1995)|01-Jan-1995||http://x|" + "|".join("0" * 19)
                                + "\n")
    with pytest.raises(DataError, match=r"u\.data:2: column 'rating' holds nan"):
        prepare("movielens", src, tmp_path / "out", progress=False)


# ==================================================================================================
# 3. empty raw files


@pytest.mark.parametrize("fmt", ["libfm", "criteo"])
def test_empty_raw_file_is_refused(tmp_path, fmt):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare(fmt, path, out, progress=False)
    assert str(info.value).startswith(f"{path}: is empty")
    assert not out.exists() and not partial(out).exists()


# ==================================================================================================
# 4. a last line cut short (no final newline)

CRITEO_LINE = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["68fd1e64"] * 26)


@pytest.mark.parametrize("fmt, text, where", [
    ("criteo", f"{CRITEO_LINE}\n{CRITEO_LINE}\n{CRITEO_LINE[:30]}", "raw:3: expected 40"),
    ("libfm", "1 0:1\n0 2:1 3:", "raw:2: feature value '3:'"),
    ("libfm", "1 0:1\n0 2:1 3", "raw:2: token '3' is not idx:value"),
])
def test_cut_short_last_line_names_file_and_line(tmp_path, fmt, text, where):
    path = tmp_path / "raw"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        prepare(fmt, path, tmp_path / "out", progress=False)
    message = str(info.value)
    assert message.startswith(str(tmp_path / where))
    assert "no final newline" in message and "cut short" in message


def test_movielens_cut_short_last_line(tmp_path):
    src = write_movielens(tmp_path / "ml", "1,100,4.0,10\n2,100,3.0,20\n3,10")
    with pytest.raises(DataError) as info:
        prepare("movielens", src, tmp_path / "out", progress=False)
    message = str(info.value)
    assert message.startswith(f"{src / 'ratings.csv'}:4: expected 4 ','-separated fields, "
                               "found 2: '3,10'")
    assert "no final newline" in message


def test_movielens_wrong_field_count_in_the_middle_names_the_line(tmp_path):
    src = write_movielens(tmp_path / "ml", "1,100,4.0,10\n2,100,3.0\n3,100,5.0,30\n")
    with pytest.raises(DataError) as info:
        prepare("movielens", src, tmp_path / "out", progress=False)
    assert str(info.value).startswith(f"{src / 'ratings.csv'}:3: expected 4")
    assert "no final newline" not in str(info.value)  # the file ends in a newline


def test_complete_last_lines_without_a_newline_are_fine(tmp_path):
    src = write_movielens(tmp_path / "ml", "1,100,4.0,10\n2,100,3.0,20\n3,100,5.0,30")
    m = prepare("movielens", src, tmp_path / "ml-out", progress=False)
    assert sum(m.rows["impressions"].values()) == 3
    path = tmp_path / "train.txt"
    path.write_text(f"{CRITEO_LINE}\n" * 9 + CRITEO_LINE)
    m = prepare("criteo", path, tmp_path / "criteo-out", progress=False)
    assert sum(m.rows["impressions"].values()) == 10


# ==================================================================================================
# 5. raw files that are not UTF-8


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
@pytest.mark.parametrize("fmt", ["criteo", "libfm", "movielens"])
def test_raw_file_not_in_utf8_says_so(tmp_path, fmt, encoding):
    if fmt == "movielens":
        src = write_movielens(tmp_path / "ml", "1,100,4.0,10\n")
        path = src / "ratings.csv"
        path.write_bytes(path.read_text().encode(encoding))
    else:
        text = f"{CRITEO_LINE}\n" if fmt == "criteo" else "1 0:1\n0 2:0.5\n"
        src = path = tmp_path / "raw.txt"
        path.write_bytes(text.encode(encoding))
    with pytest.raises(DataError) as info:
        prepare(fmt, src, tmp_path / "out", progress=False)
    message = str(info.value)
    assert message.startswith(f"{path}")
    assert "not UTF-8" in message
    assert not partial(tmp_path / "out").exists()


def test_movies_file_in_latin1_names_the_line(tmp_path):
    src = write_movielens(tmp_path / "ml", "1,100,4.0,10\n")
    (src / "movies.csv").write_bytes(b"movieId,title,genres\n100,Heat (1995),Action\n"
                                     b"200,Am\xe9lie (2001),Comedy\n")
    with pytest.raises(DataError, match=r"movies\.csv:3: is not UTF-8 text \(byte 0xe9"):
        prepare("movielens", src, tmp_path / "out", progress=False)


# ==================================================================================================
# 6. a synthetic dataset is regenerated only while it holds nothing but its own files


def test_synth_keeps_a_dataset_that_holds_foreign_files(tmp_path):
    out = tmp_path / "ds"
    generate(SyntheticSpec(**SMALL), out, progress=False)
    (out / "notes.txt").write_text("my notes")
    (out / "impressions" / "train" / "extra.parquet").write_bytes(b"mine")
    (out / "plots").mkdir()
    (out / "plots" / "auc.png").write_bytes(b"png")
    before = digests(out)
    other = SyntheticSpec(**{**SMALL, "seed": 99})
    with pytest.raises(DataError) as info:
        generate(other, out, progress=False)
    message = str(info.value)
    assert message.startswith(f"{out}: ")
    assert "3 entries it did not write" in message
    assert "impressions/train/extra.parquet, notes.txt, plots/" in message
    assert digests(out) == before and not partial(out).exists()

    # without them the dataset is the synthetic generator's alone: regenerated
    (out / "notes.txt").unlink()
    (out / "impressions" / "train" / "extra.parquet").unlink()
    shutil.rmtree(out / "plots")
    replaced = generate(other, out, progress=False)
    assert DatasetManifest.load(out).config_hash == replaced.config_hash != \
        synthetic.config_hash(SyntheticSpec(**SMALL))


def test_synth_force_replaces_a_dataset_with_foreign_files(tmp_path):
    out = tmp_path / "ds"
    generate(SyntheticSpec(**SMALL), out, progress=False)
    (out / "notes.txt").write_text("my notes")
    other = SyntheticSpec(**{**SMALL, "seed": 99})
    generate(other, out, force=True, progress=False)
    assert DatasetManifest.load(out).config_hash == synthetic.config_hash(other)
    assert not (out / "notes.txt").exists()


# ==================================================================================================
# 7. one writer per dataset path


def test_second_synth_writer_gets_a_run_error_at_once(tmp_path):
    out = tmp_path / "ds"
    with sibling_lock(out, f"dataset {out}"), \
            pytest.raises(RunError, match=r"dataset .*ds is in use by another process"):
        generate(SyntheticSpec(**SMALL), out, progress=False)
    assert not out.exists() and not partial(out).exists()
    generate(SyntheticSpec(**SMALL), out, progress=False)  # free again once released


def test_second_prepare_writer_gets_a_run_error(tmp_path):
    path = tmp_path / "a.libfm"
    path.write_text("1 0:1\n0 1:1\n1 2:1\n0 3:1\n")
    out = tmp_path / "out"
    with sibling_lock(out, f"dataset {out}"), pytest.raises(RunError, match="in use"):
        prepare("libfm", path, out, progress=False)
    assert not out.exists() and not partial(out).exists()


def test_ensure_dataset_locks_only_to_write(tmp_path):
    out = tmp_path / "ds"
    spec = synthetic_spec(out)
    with sibling_lock(out, f"dataset {out}"), pytest.raises(RunError, match="in use"):
        ensure_dataset(spec, progress=False)
    made = ensure_dataset(spec, progress=False)
    # a complete dataset with the matching config is read without the lock
    with sibling_lock(out, f"dataset {out}"):
        assert ensure_dataset(spec, progress=False).config_hash == made.config_hash


def test_a_writer_in_another_process_blocks_synth(tmp_path):
    out = tmp_path / "ds"
    holder = ("import sys, time\n"
              "from recsys.fsutil import sibling_lock\n"
              "with sibling_lock(sys.argv[1], 'dataset ' + sys.argv[1]):\n"
              "    print('held', flush=True)\n"
              "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(RunError) as info:
            generate(SyntheticSpec(**SMALL), out, progress=False)
        assert f"(pid {proc.pid})" in str(info.value)
        assert not out.exists() and not partial(out).exists()
    finally:
        proc.kill()
        proc.wait()
    generate(SyntheticSpec(**SMALL), out, progress=False)  # the kernel dropped the dead lock


# ==================================================================================================
# 8. failed writes leave no OUT.partial and the previous dataset as it was


def test_failed_prepare_removes_partial_and_keeps_the_old_dataset(tmp_path):
    path = tmp_path / "a.libfm"
    path.write_text("".join(f"{i % 2} {i}:1\n" for i in range(20)))
    out = tmp_path / "out"
    prepare("libfm", path, out, progress=False)
    before = digests(out)
    # a bad row past the first block, so that shards were already being written
    path.write_text("".join(f"{i % 2} {i}:1\n" for i in range(19)) + "1 x:1\n")
    with pytest.raises(DataError, match=r"a\.libfm:20: feature index 'x:1'"):
        prepare("libfm", path, out, PrepareSpec(input=str(path), test_fraction=0.3),
                force=True, progress=False)
    assert not partial(out).exists()
    assert digests(out) == before


def test_failed_synth_removes_partial_and_keeps_the_old_dataset(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    generate(SyntheticSpec(**SMALL), out, progress=False)
    before = digests(out)
    calls = []
    real = synthetic.simulate_chunk

    def failing(*args: Any, **kwargs: Any) -> pa.Table:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C half-way
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "simulate_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        generate(SyntheticSpec(**{**SMALL, "seed": 99}), out, progress=False)
    assert len(calls) == 2
    assert not partial(out).exists()
    assert digests(out) == before


# ==================================================================================================
# 9. a corrupt shard of any split is found when the dataset is opened


@pytest.mark.parametrize("split", ["valid", "test"])
def test_truncated_eval_shard_stops_ensure_dataset(tmp_path, tiny_dataset, split):
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset.root, root)
    shard = DatasetManifest.load(root).files("cascade", split)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    spec = validate_spec(tiny_spec_dict(root), "tiny.toml")  # reads the impressions view
    with pytest.raises(DataError) as info:
        ensure_dataset(spec, progress=False)
    assert str(info.value).startswith(f"{shard}: not a readable Parquet file")


def test_truncated_shard_of_a_synthetic_dataset_is_found_on_reopen(tmp_path):
    out = tmp_path / "ds"
    spec = synthetic_spec(out)
    manifest = ensure_dataset(spec, progress=False)
    shard = manifest.files("impressions", "valid")[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"^{re.escape(str(shard))}: not a readable Parquet"):
        ensure_dataset(spec, progress=False)
    shard.unlink()
    with pytest.raises(DataError, match=rf"^{re.escape(str(shard))}: data file not found"):
        ensure_dataset(spec, progress=False)


def test_shard_replaced_with_other_rows_is_found(tmp_path):
    out = tmp_path / "ds"
    manifest = generate(SyntheticSpec(**SMALL), out, progress=False)
    shard = manifest.files("impressions", "test")[0]
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 1), shard)
    with pytest.raises(DataError) as info:
        verify_dataset(DatasetManifest.load(out))
    assert str(info.value).startswith(f"{out / 'impressions' / 'test'}: the shards hold "
                                      f"{table.num_rows - 1} rows but dataset.json lists "
                                      f"{table.num_rows}")
