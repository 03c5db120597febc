"""Raw layouts at real size: the Criteo 1TB day files (plain and gzip, split by day, converted by
several processes) and MovieLens-1M / 10M (``::``-separated ``.dat`` files), on tiny hand-written
files whose answers are worked out by hand."""

from __future__ import annotations

import gzip
import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from recsys.cli import main
from recsys.data.adapters import config_hash, prepare
from recsys.data.adapters.movielens_read import SeparatorStream, detect_layout
from recsys.data.schema import DatasetManifest
from recsys.errors import DataError, UsageError
from recsys.spec import PrepareSpec
from tests.conftest import standardized

HASH_SIZE = 1000


def table(manifest: DatasetManifest, split: str) -> pa.Table:
    files = manifest.files("impressions", split)
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def rows(manifest: DatasetManifest, split: str) -> list[dict]:
    return table(manifest, split).to_pylist()


def every_row(manifest: DatasetManifest) -> list[dict]:
    return rows(manifest, "train") + rows(manifest, "valid") + rows(manifest, "test")


# --------------------------------------------------------------------------------------------------
# Criteo 1TB day files


def criteo_line(label: str, ints: dict[int, str], cats: dict[int, str]) -> str:
    return "\t".join([label] + [ints.get(i, "") for i in range(1, 14)]
                     + [cats.get(i, "") for i in range(1, 27)]) + "\n"


def day_lines(day: int) -> list[str]:
    """Line i of day d: label (d + i) % 2, I1 = 10 d + i, C1 = hex 'dd' + i in 6 digits."""
    return [criteo_line(str((day + i) % 2), {1: str(10 * day + i)}, {1: f"{day:02x}{i:06x}"})
            for i in range(3)]


def write_day(directory: Path, day: int, lines: list[str], gz: bool) -> Path:
    text = "".join(lines).encode()
    path = directory / (f"day_{day}.gz" if gz else f"day_{day}")
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def write_days(directory: Path, days: range = range(4)) -> Path:
    """Odd days gzip-compressed, even ones plain, and a README that is no day file."""
    directory.mkdir()
    for day in days:
        write_day(directory, day, day_lines(day), gz=day % 2 == 1)
    (directory / "README").write_text("Criteo 1TB sample\n")
    return directory


def test_criteo_days_split_by_day(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = write_days(tmp_path / "days")
    with caplog.at_level(logging.WARNING, logger="recsys.data"):
        m = prepare("criteo", src, tmp_path / "out", PrepareSpec(input=str(src),
                                                                 hash_size=HASH_SIZE),
                    progress=False)
    assert "README" in caplog.text and "ignoring" in caplog.text
    # the last day is test, the one before it valid, the rest train; rows keep file order
    assert m.rows["impressions"] == {"train": 6, "valid": 3, "test": 3}
    assert m.source["days"] == {"train": [0, 1], "valid": [2], "test": [3]}
    got = every_row(m)
    assert [round(math.expm1(r["I1"])) for r in got] == [0, 1, 2, 10, 11, 12, 20, 21, 22, 30,
                                                         31, 32]
    assert [r["click"] for r in got] == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    # C1 of day 2, line 1 is 0x02000001 = 33554433 -> 433 + 1; day 3 line 2: 0x03000002
    assert rows(m, "valid")[1]["C1"] == 434
    assert rows(m, "test")[2]["C1"] == 50331650 % HASH_SIZE + 1
    assert [r["I1_bucket"] for r in rows(m, "train")] == [2, 3, 4, 9, 9, 10]  # 4 + ln(x)^2
    assert m.column("I1_bucket").cardinality == 4 + int(math.log(32) ** 2) + 1 == 17
    # each day has its own shards, listed in day order
    assert [f.split("/")[2] for f in m.views["impressions"]["train"]] == ["day_00", "day_01"]
    assert m.name == "criteo" and m.source["files"] == ["day_0", "day_1.gz", "day_2", "day_3.gz"]


def test_criteo_days_chosen_split_and_a_later_first_day(tmp_path: Path) -> None:
    src = write_days(tmp_path / "days", range(5, 9))  # day_5 .. day_8
    opts = PrepareSpec(input=str(src), hash_size=HASH_SIZE, valid_days=0, test_days=2)
    m = prepare("criteo", src, tmp_path / "out", opts, progress=False)
    assert m.rows["impressions"] == {"train": 6, "valid": 0, "test": 6}
    assert m.source["days"] == {"train": [5, 6], "valid": [], "test": [7, 8]}
    assert [round(math.expm1(r["I1"])) for r in rows(m, "test")] == [70, 71, 72, 80, 81, 82]
    assert m.files("impressions", "valid") == []


@pytest.mark.slow
@pytest.mark.distributed
def test_criteo_days_same_output_for_any_number_of_workers(tmp_path: Path) -> None:
    src = write_days(tmp_path / "days")
    made = {}
    for workers in (1, 2):
        opts = PrepareSpec(input=str(src), hash_size=HASH_SIZE, workers=workers,
                           rows_per_shard=2, row_group_size=1)
        made[workers] = prepare("criteo", src, tmp_path / f"out{workers}", opts, progress=False)
    one, two = made[1], made[2]
    assert one.config_hash == two.config_hash
    assert one.views == two.views and one.rows == two.rows
    for split in ("train", "valid", "test"):
        assert table(one, split).equals(table(two, split))
    for a, b in zip(one.files("impressions", "train"), two.files("impressions", "train"),
                    strict=True):
        assert a.read_bytes() == b.read_bytes()
    # dataset.json, options included, is the same too: workers is not recorded
    assert json.loads((tmp_path / "out1/dataset.json").read_text())["source"] == \
        json.loads((tmp_path / "out2/dataset.json").read_text())["source"]


@pytest.mark.parametrize("days, message", [
    ((0, 2), r"must be consecutive: it has day_0 to day_2 but not day_1"),
    ((), r"holds no Criteo day files day_N or day_N.gz \(it holds README\)"),
    ((0, 1), r"holds 2 day file\(s\) \(day_0 \.\. day_1\); test_days = 1 and valid_days = 1 "
             r"leave none for train"),
])
def test_criteo_day_directory_errors(tmp_path: Path, days: tuple[int, ...], message: str) -> None:
    src = tmp_path / "days"
    src.mkdir()
    (src / "README").write_text("x")
    for day in days:
        write_day(src, day, day_lines(day), gz=False)
    with pytest.raises(DataError, match=message) as e:
        prepare("criteo", src, tmp_path / "out", progress=False)
    assert e.value.where == str(src)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_criteo_day_given_twice_and_empty_directory(tmp_path: Path) -> None:
    src = tmp_path / "days"
    src.mkdir()
    with pytest.raises(DataError, match=r"no Criteo day files .* \(it is empty\)"):
        prepare("criteo", src, tmp_path / "out", progress=False)
    write_day(src, 3, day_lines(3), gz=False)
    write_day(src, 3, day_lines(3), gz=True)
    with pytest.raises(DataError, match=r"holds day 3 twice \(day_3 and day_3.gz\)"):
        prepare("criteo", src, tmp_path / "out", progress=False)


@pytest.mark.parametrize("gz, bad_line, message", [
    (True, criteo_line("1", {4: "x7"}, {}), r"day_1\.gz:2: column I4 holds 'x7'"),
    (True, criteo_line("1", {}, {5: "68fd1e6g"}), r"day_1\.gz:2: column C5 holds '68fd1e6g'"),
    (False, "1\t2\t3\n", r"day_1:2: expected 40 tab-separated fields .* found 3"),
    (False, "\n", r"day_1:2: the label is empty"),
])
def test_criteo_day_bad_line_names_file_and_line(tmp_path: Path, gz: bool, bad_line: str,
                                                 message: str) -> None:
    src = write_days(tmp_path / "days", range(3))
    for stale in src.glob("day_1*"):
        stale.unlink()
    lines = day_lines(1)
    write_day(src, 1, [lines[0], bad_line, lines[1]], gz=gz)
    with pytest.raises(DataError, match=message):
        prepare("criteo", src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out.partial").exists()


def test_criteo_day_gzip_cut_short_or_not_gzip(tmp_path: Path) -> None:
    src = write_days(tmp_path / "days", range(3))
    whole = (src / "day_1.gz").read_bytes()
    (src / "day_1.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=r"day_1\.gz: the gzip stream ends early; was the file "
                                        r"cut short\?"):
        prepare("criteo", src, tmp_path / "out", progress=False)
    (src / "day_1.gz").write_bytes(b"".join(day_lines(1)[0].encode() for _ in range(3)))
    with pytest.raises(DataError, match=r"day_1\.gz: is not valid gzip data"):
        prepare("criteo", src, tmp_path / "out", progress=False)


def test_criteo_split_options_must_fit_the_input(tmp_path: Path) -> None:
    src = write_days(tmp_path / "days", range(3))
    with pytest.raises(UsageError, match=r"valid_fraction \(--valid-fraction\) do not apply: .* "
                                         r"split by days"):
        prepare("criteo", src, tmp_path / "out", PrepareSpec(input=str(src), valid_fraction=0.2),
                progress=False)
    single = tmp_path / "train.txt"
    single.write_text("".join(day_lines(0)))
    with pytest.raises(UsageError, match=r"test_days \(--test-days\) do not apply: .* one file"):
        prepare("criteo", single, tmp_path / "out", PrepareSpec(input=str(single), test_days=2),
                progress=False)
    for key, value in [("valid_days", -1), ("test_days", 0), ("workers", 0)]:
        with pytest.raises(ValidationError, match=rf"{key} must be >= "):
            PrepareSpec(input="x", **{key: value})


def test_config_hash_of_existing_options_is_unchanged() -> None:
    # values recorded before valid_days / test_days / workers existed
    assert config_hash("criteo", "/x/train.txt", PrepareSpec(input="x")) == "2f03a39ba2147426"
    # (MovieLens is at output revision 1, so its hash moved on: datasets of the older code are
    # remade, not reused)
    opts = PrepareSpec(input="x", hash_size=97, valid_fraction=0.2, label_threshold=3.0)
    assert config_hash("movielens", "/x/ml", opts) == "1465ea592114477c"  # was 3f9a3a7c14db957d
    assert config_hash("criteo", "/x/d", PrepareSpec(input="x", workers=8, valid_days=1)) == \
        config_hash("criteo", "/x/d", PrepareSpec(input="x"))
    assert config_hash("criteo", "/x/d", PrepareSpec(input="x", test_days=2)) != \
        config_hash("criteo", "/x/d", PrepareSpec(input="x"))


def test_cli_prepares_criteo_days_and_movielens_1m(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = write_days(tmp_path / "days", range(3))
    assert main(["data", "prepare", "criteo", "--input", str(src), "--out",
                 str(tmp_path / "c"), "--workers", "1", "--hash-size", "97"]) == 0
    assert DatasetManifest.load(tmp_path / "c").rows["impressions"] == {"train": 3, "valid": 3,
                                                                        "test": 3}
    assert "day_2" in capsys.readouterr().err  # the per-day summary
    ml = write_ml1m(tmp_path / "ml-1m")
    assert main(["data", "prepare", "movielens", "--input", str(ml), "--out",
                 str(tmp_path / "m")]) == 0
    assert DatasetManifest.load(tmp_path / "m").name == "movielens-ml-1m"
    assert main(["data", "prepare", "criteo", "--input", str(src), "--out",
                 str(tmp_path / "c2"), "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# MovieLens-1M and 10M (::-separated .dat files)

T = 978_300_000
# (user, movie, rating, timestamp) in time order; the file holds them in ML1M_FILE_ORDER
ML1M_RATINGS = [(3, 10, 2, T), (1, 10, 5, T + 100), (2, 20, 3, T + 200), (1, 30, 4, T + 300),
                (4, 20, 4, T + 400), (5, 30, 1, T + 500), (6, 10, 5, T + 600), (7, 20, 4, T + 700),
                (8, 40, 3, T + 800), (2, 10, 4, T + 900)]  # user 8 is not in users.dat
ML1M_FILE_ORDER = [1, 2, 0, 3, 4, 5, 6, 7, 9, 8]


def write_ml1m(d: Path) -> Path:
    d.mkdir()
    (d / "ratings.dat").write_text("".join(
        "::".join(map(str, ML1M_RATINGS[i])) + "\n" for i in ML1M_FILE_ORDER))
    # latin-1, as the release: "é" is the single byte 0xe9 (invalid UTF-8)
    (d / "movies.dat").write_bytes(
        "10::Toy Story (1995)::Animation|Children's|Comedy\n"
        "20::N\u00e9nette et Boni (1996)::Drama\n"
        "30::Cit\u00e9 des enfants perdus, La (1989)::Adventure|Sci-Fi\n".encode("latin-1"))
    # every age group code: 1, 18, 25, 35, 45, 50, 56
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n"
                                 "4::F::45::7::02460\n5::M::18::20::55455\n6::F::50::9::55117\n"
                                 "7::M::35::1::06810\n")
    (d / "README").write_text("ml-1m terms\n")
    return d


def test_movielens_1m_known_answers(tmp_path: Path) -> None:
    src = write_ml1m(tmp_path / "ml-1m")
    assert detect_layout(src) == "ml-1m"
    m = prepare("movielens", src, tmp_path / "out",
                PrepareSpec(input=str(src), valid_fraction=0.2, test_fraction=0.2),
                progress=False)
    assert m.name == "movielens-ml-1m" and m.source["layout"] == "ml-1m"
    assert m.rows["impressions"] == {"train": 6, "valid": 2, "test": 2}
    got = every_row(m)
    assert [r["timestamp"] for r in got] == [r[3] for r in ML1M_RATINGS]
    assert [r["user_id"] for r in got] == [3, 1, 2, 1, 4, 5, 6, 7, 8, 2]
    assert [r["item_id"] for r in got] == [1, 1, 2, 3, 2, 3, 1, 2, 4, 1]  # 10 20 30 40 -> 1..4
    assert [r["rating"] for r in got] == [2, 5, 3, 4, 4, 1, 5, 4, 3, 4]
    assert [r["click"] for r in got] == [0, 1, 0, 1, 1, 0, 1, 1, 0, 1]
    # genres: Adventure 1, Animation 2, Children's 3, Comedy 4, Drama 5, Sci-Fi 6
    genres = {1: [2, 3, 4], 2: [5], 3: [1, 6], 4: []}
    assert [r["item_genres"] for r in got] == [genres[r["item_id"]] for r in got]
    # 1995, 1996 -> 21; 1989 (from a latin-1 title) -> 19; movie 40 is unknown -> 0
    assert [r["item_year"] for r in got] == [21, 21, 21, 19, 21, 19, 21, 21, 0, 21]
    # age codes 1, 56, 25, 45, 18, 50, 35 of users 1..7 -> buckets 1, 7, 3, 5, 2, 6, 4
    assert [r["user_age"] for r in got] == [3, 1, 7, 1, 5, 2, 6, 4, 0, 7]
    assert [r["user_gender"] for r in got] == [2, 1, 2, 1, 1, 2, 1, 2, 0, 2]  # F 1, M 2
    # occupations 10 K-12 student, 16 self-employed, 15 scientist, 7 executive/managerial,
    # 20 writer, 9 homemaker, 1 academic/educator, ranked by name: K-12 1, academic 2,
    # executive 3, homemaker 4, scientist 5, self-employed 6, writer 7
    assert [r["user_occupation"] for r in got] == [5, 1, 6, 1, 3, 7, 4, 2, 0, 6]
    assert m.column("user_age").cardinality == 8 and m.column("user_occupation").cardinality == 8
    assert m.column("user_gender").cardinality == 3 and m.column("item_genres").cardinality == 7
    assert np.allclose([r["user_prior_count"] for r in got],
                       standardized(np.log1p([0, 0, 0, 1, 0, 0, 0, 0, 0, 1]), 6), atol=1e-6)
    assert (tmp_path / "out" / "README").read_text() == "ml-1m terms\n"


def test_movielens_10m_known_answers(tmp_path: Path) -> None:
    src = tmp_path / "ml-10M100K"
    src.mkdir()
    (src / "ratings.dat").write_text(f"1::100::4.5::{T + 300}\n2::200::3.5::{T + 100}\n"
                                     f"1::300::5::{T + 200}\n2::100::0.5::{T + 400}\n"
                                     f"3::300::4::{T}\n")
    (src / "movies.dat").write_text(  # UTF-8 here: titles only feed the (ASCII) year
        "100::Heat (1995)::Action|Crime|Thriller\n"
        "200::Pull My Daisy (1958)::(no genres listed)\n"
        "300::Am\u00e9lie (Fabuleux destin d'Am\u00e9lie Poulain, Le) (2001)::Comedy|Romance\n")
    (src / "tags.dat").write_text(f"1::100::not read::{T}\n")
    assert detect_layout(src) == "ml-10m"
    m = prepare("movielens", src, tmp_path / "out", progress=False)
    assert m.name == "movielens-ml-10m"
    assert m.rows["impressions"] == {"train": 3, "valid": 1, "test": 1}
    got = every_row(m)
    assert [r["user_id"] for r in got] == [3, 2, 1, 1, 2]
    assert [r["item_id"] for r in got] == [3, 2, 3, 1, 1]
    assert [r["rating"] for r in got] == [4.0, 3.5, 5.0, 4.5, 0.5]
    assert [r["click"] for r in got] == [1, 0, 1, 1, 0]
    # Action 1, Comedy 2, Crime 3, Romance 4, Thriller 5; "(no genres listed)" is none
    assert [r["item_genres"] for r in got] == [[2, 4], [], [2, 4], [1, 3, 5], [1, 3, 5]]
    assert [r["item_year"] for r in got] == [22, 13, 22, 21, 21]
    names = {c.name for c in m.columns}
    assert not names & {"user_age", "user_gender", "user_occupation"}


@pytest.mark.parametrize("file, line, message", [
    ("ratings.dat", "1::20::4", r"ratings\.dat:3: expected 4 '::'-separated fields, found 3: "
                                r"'1::20::4'"),
    ("ratings.dat", "1::20::x::978300000", r"ratings\.dat:3: column 'rating' holds 'x'"),
    ("users.dat", "9::M::25::21::12345", r"users\.dat:3: column 'occupation' holds 21; expected "
                                         r"a code 0\.\.20"),
    ("movies.dat", "50::A\x1fB (2000)::Drama", r"movies\.dat:3: holds the control byte 0x1f"),
])
def test_movielens_dat_bad_line_names_file_and_line(tmp_path: Path, file: str, line: str,
                                                    message: str) -> None:
    src = write_ml1m(tmp_path / "ml-1m")
    lines = (src / file).read_bytes().splitlines(keepends=True)
    lines.insert(2, line.encode("latin-1") + b"\n")
    (src / file).write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=message):
        prepare("movielens", src, tmp_path / "out", progress=False)


def test_movielens_dat_needs_movies(tmp_path: Path) -> None:
    src = write_ml1m(tmp_path / "ml-1m")
    (src / "movies.dat").unlink()
    with pytest.raises(DataError, match=r"has ratings\.dat \(dat layout\) but not movies\.dat"):
        detect_layout(src)


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 64])
def test_separator_stream_matches_a_whole_file_replace(tmp_path: Path, chunk_bytes: int) -> None:
    # runs of 1..5 colons, cut at every position by some chunk size
    data = b"1::2::3:::4::::5:\n::a:b::\n:::::c\n" * 3
    path = tmp_path / "x.dat"
    path.write_bytes(data)
    stream = SeparatorStream(path, chunk_bytes)
    assert stream.read() == data.replace(b"::", b"\x1f")
    stream.close()
