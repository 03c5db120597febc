"""Raw-format adapters: tiny hand-written files with answers worked out by hand, error messages
that name the file and line, the prepare cache, and the real ml-latest-small through the loader."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data.adapters import FORMATS, count_lines, criteo_format, prepare, split_sizes
from recsys.data.adapters import criteo as criteo_adapter
from recsys.data.adapters.movielens import age_bucket, year_bucket
from recsys.data.schema import DatasetManifest
from recsys.errors import DataError
from recsys.spec import PrepareSpec
from tests.conftest import standardized

REPO = Path(__file__).resolve().parents[1]
ML_LATEST_SMALL = REPO.parent / "shared/data/ml-latest-small"
T0 = 1_577_836_800  # 2020-01-01 00:00:00 UTC, a Wednesday (weekday 2)
HOUR, DAY = 3600, 86_400


def rows(manifest: DatasetManifest, split: str) -> list[dict]:
    files = manifest.files("impressions", split)
    if not files:
        return []
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def options(path: Path, **kw: object) -> PrepareSpec:
    return PrepareSpec(input=str(path), **kw)


# --------------------------------------------------------------------------------------------------
# shared helpers


def test_split_sizes_and_line_count(tmp_path: Path) -> None:
    assert split_sizes(10, 0.2, 0.2) == (6, 2, 2)
    assert split_sizes(5, 0.1, 0.1) == (3, 1, 1)  # 0.5 rounds up
    assert split_sizes(100836, 0.1, 0.1) == (80668, 10084, 10084)
    (tmp_path / "a").write_bytes(b"x\ny\nz")  # a last line without a newline counts
    (tmp_path / "b").write_bytes(b"x\ny\n")
    assert count_lines(tmp_path / "a") == 3
    assert count_lines(tmp_path / "b", chunk_bytes=1) == 2


def test_unknown_format_and_missing_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known: movielens, criteo, libfm, table"):
        prepare("csv", tmp_path, tmp_path / "out")
    assert FORMATS == ("movielens", "criteo", "libfm", "table")
    with pytest.raises(DataError, match="nope.*not found"):
        prepare("criteo", tmp_path / "nope", tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# MovieLens, latest layout

# (user, movie, rating, timestamp) in the order of the file; "r<k>" names row k of the time order
R0 = (20, 200, 5.0, T0 + 5 * HOUR)  # Wed 05:00
R1 = (10, 100, 3.5, T0 + 1 * HOUR)  # Wed 01:00
R2 = (10, 300, 4.0, T0 + 1 * HOUR)  # Wed 01:00, tied with R1 and after it in the file
R3 = (30, 100, 2.0, T0 + DAY + 10 * HOUR)  # Thu 10:00
R4 = (20, 100, 4.5, T0 + DAY + 23 * HOUR)  # Thu 23:00
R5 = (10, 200, 1.0, T0 + 2 * DAY)  # Fri 00:00
R6 = (30, 400, 4.0, T0 + 3 * DAY + 12 * HOUR)  # Sat 12:00 (movie 400 is not in movies.csv)
R7 = (10, 400, 5.0, T0 + 4 * DAY)  # Sun 00:00
R8 = (20, 300, 3.0, T0 + 5 * DAY + 60)  # Mon 00:01
R9 = (30, 200, 4.0, T0 + 6 * DAY + 8 * HOUR)  # Tue 08:00
FILE_ORDER = [R7, R1, R9, R2, R0, R4, R3, R8, R5, R6]
TIME_ORDER = [R1, R2, R0, R3, R4, R5, R6, R7, R8, R9]


def write_latest(d: Path) -> Path:
    d.mkdir()
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{m},{r},{t}\n" for u, m, r, t in FILE_ORDER))
    (d / "movies.csv").write_text(
        "movieId,title,genres\n"
        '100,"Toy Story, The (1995)",Adventure|Animation|Children\n'
        "200,Heat (1987),Action|Crime|Thriller\n"
        "300,Babylon 5,(no genres listed)\n"
        "500,Never Rated (2001),Drama\n")
    (d / "README.txt").write_text("terms of use\n")
    return d


def test_movielens_latest_known_answers(tmp_path: Path) -> None:
    src = write_latest(tmp_path / "ml")
    m = prepare("movielens", src, tmp_path / "out", options(src, valid_fraction=0.2,
                                                            test_fraction=0.2), progress=False)
    assert m.rows["impressions"] == {"train": 6, "valid": 2, "test": 2}
    got = rows(m, "train") + rows(m, "valid") + rows(m, "test")
    # the global temporal split: the stable time order, cut 6 / 2 / 2
    assert [(r["rating"], r["timestamp"]) for r in got] == [(x[2], x[3]) for x in TIME_ORDER]
    assert [r["timestamp"] for r in rows(m, "test")] == [R8[3], R9[3]]
    # raw users 10, 20, 30 -> 1, 2, 3; movies 100, 200, 300, 400 -> 1..4; 0 stays "unknown"
    assert [r["user_id"] for r in got] == [1, 1, 2, 3, 2, 1, 3, 1, 2, 3]
    assert [r["item_id"] for r in got] == [1, 3, 2, 1, 1, 2, 4, 4, 3, 2]
    assert m.column("user_id").cardinality == 4 and m.column("item_id").cardinality == 5
    # genres: Action 1, Adventure 2, Animation 3, Children 4, Crime 5, Drama 6, Thriller 7
    genres = {1: [2, 3, 4], 2: [1, 5, 7], 3: [], 4: []}
    assert [r["item_genres"] for r in got] == [genres[r["item_id"]] for r in got]
    assert m.column("item_genres").cardinality == 8
    # years: 1995 -> (95 // 5) + 2 = 21, 1987 -> 19, no year / no movie -> 0
    years = {1: 21, 2: 19, 3: 0, 4: 0}
    assert [r["item_year"] for r in got] == [years[r["item_id"]] for r in got]
    assert m.column("item_year").cardinality == 22
    assert [r["hour"] for r in got] == [1, 1, 5, 10, 23, 0, 12, 0, 0, 8]
    assert [r["weekday"] for r in got] == [2, 2, 2, 3, 3, 4, 5, 6, 0, 1]
    assert [r["click"] for r in got] == [0, 1, 1, 0, 1, 0, 1, 1, 0, 1]
    # ratings each user gave strictly before (user 10 rates twice at 01:00: file order decides)
    prior = [0, 1, 0, 0, 1, 2, 1, 3, 2, 2]
    # standardized with the 6 train rows' moments, recorded for serving
    assert np.allclose([r["user_prior_count"] for r in got], standardized(np.log1p(prior), 6),
                       atol=1e-6)
    scale = m.dense_scaling["user_prior_count"]
    assert scale.kind == "standard" and scale.mean == pytest.approx(np.log1p(prior[:6]).mean())
    assert scale.std == pytest.approx(np.log1p(prior[:6]).std())
    # (user, day) -> request id in (user, day) order: u1 d0,d2,d4 = 0,1,2; u2 d0,d1,d5 = 3,4,5;
    # u3 d1,d3,d6 = 6,7,8
    assert [r["request_id"] for r in got] == [0, 0, 3, 6, 4, 1, 7, 2, 5, 8]
    assert (tmp_path / "out" / "README.txt").read_text() == "terms of use\n"
    assert "user_age" not in {c.name for c in m.columns}


def test_prepare_is_cached_and_guards_other_configs(tmp_path: Path) -> None:
    src = write_latest(tmp_path / "ml")
    out = tmp_path / "out"
    first = prepare("movielens", src, out, progress=False)
    stamp = (out / "dataset.json").stat().st_mtime_ns
    time.sleep(0.01)
    again = prepare("movielens", src, out, options(src), progress=False)  # same as the defaults
    assert again.config_hash == first.config_hash
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="another config"):
        prepare("movielens", src, out, options(src, test_fraction=0.3), progress=False)
    replaced = prepare("movielens", src, out, options(src, test_fraction=0.3), force=True,
                       progress=False)
    assert replaced.rows["impressions"]["test"] == 3 and replaced.config_hash != first.config_hash
    # a non-empty directory that is not a dataset is never replaced without force
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a dataset directory"):
        prepare("movielens", src, tmp_path / "mine", progress=False)


def test_movielens_without_a_layout(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        prepare("movielens", tmp_path / "empty", tmp_path / "out")
    assert str(tmp_path / "empty") in str(e.value)
    assert "ratings.csv" in str(e.value) and "u.data" in str(e.value)


def test_movielens_bad_value_names_file_line_and_column(tmp_path: Path) -> None:
    src = write_latest(tmp_path / "ml")
    text = (src / "ratings.csv").read_text().splitlines()
    text[3] = "10,100,four,1577836800"  # line 4 of the file
    (src / "ratings.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"ratings\.csv:4: column 'rating' holds 'four'"):
        prepare("movielens", src, tmp_path / "out", progress=False)


# --------------------------------------------------------------------------------------------------
# MovieLens, classic (ML-100K) layout


def write_classic(d: Path) -> Path:
    d.mkdir()
    # user item rating timestamp; time order: (3,10) (2,20) (1,10) (1,20) (3,30)
    (d / "u.data").write_text("1\t10\t5\t1000\n2\t20\t3\t900\n1\t20\t4\t1100\n3\t10\t2\t800\n"
                              "3\t30\t4\t1200\n")
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n"
                              "3|17|M|writer|32067\n4|40|F|artist|00000\n")

    def flags(*on: int) -> str:
        return "|".join("1" if i in on else "0" for i in range(19))

    # genre flags: 0 unknown, 3 Animation, 4 Children's, 5 Comedy, 8 Drama
    (d / "u.item").write_bytes(
        f"10|Toy Story (1995)|01-Jan-1994||http://x|{flags(3, 4, 5)}\n"
        f"20|N\u00e9nette et Boni|01-Jan-2003||http://y|{flags(8)}\n"
        f"30|unknown||||{flags(0)}\n".encode("latin-1"))
    (d / "README").write_text("ml-100k terms\n")
    return d


def test_movielens_classic_known_answers(tmp_path: Path) -> None:
    src = write_classic(tmp_path / "ml-100k")
    m = prepare("movielens", src, tmp_path / "out", progress=False)
    assert m.rows["impressions"] == {"train": 3, "valid": 1, "test": 1}
    got = rows(m, "train") + rows(m, "valid") + rows(m, "test")
    assert [r["timestamp"] for r in got] == [800, 900, 1000, 1100, 1200]
    assert rows(m, "test")[0]["item_id"] == 3 and rows(m, "valid")[0]["timestamp"] == 1100
    assert [r["user_id"] for r in got] == [3, 2, 1, 1, 3]
    assert [r["item_id"] for r in got] == [1, 2, 1, 2, 3]
    assert [r["click"] for r in got] == [0, 0, 1, 1, 1]
    # genres that occur: Animation 1, Children's 2, Comedy 3, Drama 4 ("unknown" is none)
    assert [r["item_genres"] for r in got] == [[1, 2, 3], [4], [1, 2, 3], [4], []]
    # Toy Story: the title's 1995 wins over the date (21); Nenette: the date's 2003 (22)
    assert [r["item_year"] for r in got] == [21, 22, 21, 22, 0]
    # ages 17, 53, 24 -> buckets 1 (<18), 6 (50-55), 2 (18-24)
    assert [r["user_age"] for r in got] == [1, 6, 2, 2, 1]
    assert [r["user_gender"] for r in got] == [2, 1, 2, 2, 2]  # F 1, M 2
    # occupations of u.user: artist 1, other 2, technician 3, writer 4
    assert [r["user_occupation"] for r in got] == [4, 2, 3, 3, 4]
    assert np.allclose([r["user_prior_count"] for r in got],
                       standardized(np.log1p([0, 0, 0, 1, 1]), 3), atol=1e-6)
    assert m.column("user_age").cardinality == 8
    assert m.column("user_occupation").cardinality == 5
    assert (tmp_path / "out" / "README").read_text() == "ml-100k terms\n"


def test_movielens_buckets() -> None:
    assert year_bucket(np.array([0, 1895, 1900, 1904, 1905, 1995, 2018])).tolist() == \
        [0, 1, 2, 2, 3, 21, 25]
    assert age_bucket(np.array([-1, 7, 17, 18, 24, 25, 34, 35, 45, 50, 55, 56, 90])).tolist() == \
        [0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 6, 7, 7]


# --------------------------------------------------------------------------------------------------
# Criteo


def criteo_line(label: str, ints: dict[int, str], cats: dict[int, str]) -> str:
    return "\t".join([label] + [ints.get(i, "") for i in range(1, 14)]
                     + [cats.get(i, "") for i in range(1, 27)]) + "\n"


CRITEO_LINES = [
    criteo_line("1", {2: "-1", 3: "0", 4: "1", 5: "2", 6: "3", 7: "100"},
                {1: "68fd1e64", 3: "80e26c9b"}),
    criteo_line("0", {1: "5", 2: "-3", 13: "4"}, {1: "05db9164", 2: "FFFFFFFF"}),
    *(criteo_line(str(i % 2), {1: str(i)}, {26: f"{i:08x}"}) for i in range(2, 10)),
]


def criteo_bucket(x: int | None) -> int:
    """The documented convention, written out independently of the adapter."""
    if x is None:
        return 0
    if x < 0:
        return 1
    return x + 2 if x <= 2 else 4 + int(math.log(x) ** 2)


def test_criteo_known_answers(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("".join(CRITEO_LINES))
    hash_size = 1000
    m = prepare("criteo", path, tmp_path / "out",
                options(path, hash_size=hash_size, valid_fraction=0.2, test_fraction=0.2),
                progress=False)
    assert m.rows["impressions"] == {"train": 6, "valid": 2, "test": 2}
    train, test = rows(m, "train"), rows(m, "test")
    first, second = train[0], train[1]
    assert [r["click"] for r in train + rows(m, "valid") + test] == [1, 0] + [i % 2
                                                                              for i in range(2, 10)]
    assert [r["I1"] for r in test] == pytest.approx([math.log1p(8), math.log1p(9)])  # file order
    # integers: empty, -1, 0, 1, 2, 3, 100
    for col, x in [(1, None), (2, -1), (3, 0), (4, 1), (5, 2), (6, 3), (7, 100)]:
        assert first[f"I{col}_bucket"] == criteo_bucket(x), col
        assert first[f"I{col}"] == pytest.approx(math.log1p(max(x or 0, 0)))
    assert [first[f"I{c}_bucket"] for c in range(1, 8)] == [0, 1, 2, 3, 4, 5, 25]
    assert second["I2_bucket"] == 1 and second["I13_bucket"] == criteo_bucket(4) == 5
    # categoricals: (hex value mod hash_size) + 1, empty -> 0
    assert first["C1"] == int("68fd1e64", 16) % hash_size + 1
    assert first["C3"] == int("80e26c9b", 16) % hash_size + 1
    assert first["C2"] == 0 and first["C26"] == 0
    assert second["C1"] == int("05db9164", 16) % hash_size + 1
    assert second["C2"] == int("ffffffff", 16) % hash_size + 1
    assert test[-1]["C26"] == 9 % hash_size + 1
    assert m.column("C1").cardinality == hash_size + 1
    assert m.column("I7_bucket").cardinality == 26  # the largest bucket seen (100 -> 25) + 1
    assert {c.side for c in m.columns if c.name != "click"} == {"context"}


def test_criteo_streams_blocks_like_one(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("".join(CRITEO_LINES))
    opts = options(path, hash_size=97)
    whole = criteo_adapter.convert(path, tmp_path / "a", opts, config_hash="x", progress=False)
    blocks = criteo_adapter.convert(path, tmp_path / "b", opts, config_hash="x", progress=False,
                                    block_size=128)
    for split in ("train", "valid", "test"):
        assert rows(whole, split) == rows(blocks, split)


def test_criteo_hex_hash_with_mixed_widths() -> None:
    values = pa.array([b"ff", None, b"68fd1e64", b"0123456789abcdef"], pa.binary())
    ids, bad = criteo_format.hash_hex(values, 1 << 20)
    expected = [int(h, 16) % (1 << 20) + 1 for h in ("ff", "68fd1e64", "0123456789abcdef")]
    assert bad is None and ids.tolist() == [expected[0], 0, expected[1], expected[2]]
    _, bad = criteo_format.hash_hex(pa.array([b"00", b"zz", b"1"], pa.binary()), 10)
    assert bad == 1


@pytest.mark.parametrize("bad_line, message", [
    ("1\t2\t3\n", r"train\.txt:3: expected 40 tab-separated fields .* found 3"),
    (criteo_line("1", {4: "x7"}, {}), r"train\.txt:3: column I4 holds 'x7'"),
    (criteo_line("1", {}, {5: "68fd1e6g"}), r"train\.txt:3: column C5 holds '68fd1e6g'"),
    ("\n", r"train\.txt:3: the label is empty"),
])
def test_criteo_malformed_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "train.txt"
    path.write_text(CRITEO_LINES[0] + CRITEO_LINES[1] + bad_line + CRITEO_LINES[2])
    with pytest.raises(DataError, match=message):
        prepare("criteo", path, tmp_path / "out", progress=False)


# --------------------------------------------------------------------------------------------------
# libFM


def test_libfm_known_answers(tmp_path: Path) -> None:
    path = tmp_path / "data.libfm"
    path.write_text("1 0:1.5 3:0.5\n-1 2:1\n0\n1  7:2.5 0:1 \n-1 1:0.25\t5:-3")  # no final \n
    m = prepare("libfm", path, tmp_path / "out", progress=False)
    assert m.rows["impressions"] == {"train": 3, "valid": 1, "test": 1}
    got = rows(m, "train") + rows(m, "valid") + rows(m, "test")
    assert [r["click"] for r in got] == [1, 0, 0, 1, 0]
    assert [r["label"] for r in got] == [1.0, -1.0, 0.0, 1.0, -1.0]
    assert [r["features"] for r in got] == [[1, 4], [3], [], [8, 1], [2, 6]]  # idx + 1
    assert [r["feature_values"] for r in got] == [[1.5, 0.5], [1.0], [], [2.5, 1.0], [0.25, -3.0]]
    assert m.column("features").cardinality == 9  # max idx 7 + 2
    assert m.column("feature_values").role == "weights"
    # 0/1 labels with a threshold in between
    m = prepare("libfm", path, tmp_path / "out2", options(path, label_threshold=-0.5),
                progress=False)
    assert [r["click"] for r in rows(m, "train")] == [1, 0, 1]


@pytest.mark.parametrize("bad_line, message", [
    ("1 3-0.5", r"data\.libfm:2: token '3-0\.5' is not idx:value"),
    ("yes 3:0.5", r"data\.libfm:2: label 'yes' is not a valid number"),
    ("1 3:0.5 x:1", r"data\.libfm:2: feature index 'x:1' is not a valid integer"),
    ("1 -3:0.5", r"data\.libfm:2: token '-3:0\.5' has a negative feature index"),
    ("1 3:nan", r"data\.libfm:2: feature value '3:nan' is not finite"),
    ("", r"data\.libfm:2: label '' is not a valid number \(a blank line\?\)"),
])
def test_libfm_malformed_token(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "data.libfm"
    path.write_text(f"1 0:1\n{bad_line}\n0 1:1\n")
    with pytest.raises(DataError, match=message):
        prepare("libfm", path, tmp_path / "out", progress=False)


def test_libfm_streams_blocks_like_one(tmp_path: Path) -> None:
    from recsys.data.adapters import libfm as libfm_adapter

    path = tmp_path / "data.libfm"
    path.write_text("".join(f"{i % 2} {i}:{i / 4} {i + 1}:1\n" for i in range(50)))
    opts = options(path)
    whole = libfm_adapter.convert(path, tmp_path / "a", opts, config_hash="x", progress=False)
    blocks = libfm_adapter.convert(path, tmp_path / "b", opts, config_hash="x", progress=False,
                                   block_size=37)
    for split in ("train", "valid", "test"):
        assert rows(whole, split) == rows(blocks, split)
    assert whole.column("features").cardinality == blocks.column("features").cardinality == 52


# --------------------------------------------------------------------------------------------------
# the real ml-latest-small, through the loader


def test_ml_latest_small_through_the_loader(tmp_path: Path) -> None:
    if not ML_LATEST_SMALL.is_dir():
        pytest.skip(f"{ML_LATEST_SMALL} is absent")
    from recsys.data.loader import ParquetLoader
    from recsys.data.parquet import ParquetSplit
    from recsys.data.schema import BatchSchema, check_spec_against_manifest
    from recsys.spec import load_spec

    out = tmp_path / "movielens"
    # the spec's input is relative to the repository root; pin it so any working directory works
    spec = load_spec(REPO / "specs/movielens.toml",
                     overrides=[f'data.path="{out}"', f'data.prepare.input="{ML_LATEST_SMALL}"'])
    assert spec.data.prepare is not None
    m = prepare("movielens", ML_LATEST_SMALL, out, spec.data.prepare, progress=False)
    assert sum(m.rows["impressions"].values()) == 100_836
    assert m.column("user_id").cardinality == 611
    columns = ["user_id", "click", "timestamp"]
    tables = {s: pa.concat_tables([pq.read_table(f, columns=columns)
                                   for f in m.files("impressions", s)]) for s in m.rows["impressions"]}
    users = np.concatenate([t.column("user_id").to_numpy() for t in tables.values()])
    assert len(np.unique(users)) == 610
    clicks = np.concatenate([t.column("click").to_numpy() for t in tables.values()])
    assert 0.4 < clicks.mean() < 0.6
    assert tables["test"].column("timestamp").to_numpy().min() >= \
        tables["train"].column("timestamp").to_numpy().max()
    assert (out / "README.txt").is_file()

    schema = BatchSchema.from_spec(spec, m)
    check_spec_against_manifest(spec, m)
    loader = ParquetLoader(ParquetSplit(m.files("impressions", "train"), schema), 1024)
    seen = 0
    for batch in loader.epoch(0):
        assert batch.dense.shape == (1024, 1)
        seen += batch.batch_size
    assert seen == loader.steps_per_epoch() * 1024 == m.rows["impressions"]["train"] // 1024 * 1024
