"""Reading the raw MovieLens layouts (:mod:`recsys.data.adapters.movielens`): which layout a
directory holds, and its ratings, movies and users as columns, parsed by Arrow (the ML-1M/10M
``::`` separator translated on the fly by :class:`SeparatorStream`), every bad line or value a
DataError naming the file, the line and the column.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv

from recsys.data.adapters.common import (
    check_text,
    first_bad_cast,
)
from recsys.errors import DataError

CLASSIC_FILES = ("u.data", "u.user", "u.item")
LATEST_FILES = ("ratings.csv", "movies.csv")
DAT_FILES = ("ratings.dat", "movies.dat")  # ML-1M and ML-10M; ML-1M also has USERS_DAT
USERS_DAT = "users.dat"
DAT_SEPARATOR = "::"
UNIT_SEPARATOR = b"\x1f"  # ASCII "unit separator": a control byte no MovieLens text holds
SEPARATOR_CHUNK_BYTES = 1 << 22  # bytes SeparatorStream translates at a time
# users.dat's occupation codes 0..20, from the ML-1M README
ML1M_OCCUPATIONS = ("other or not specified", "academic/educator", "artist", "clerical/admin",
                    "college/grad student", "customer service", "doctor/health care",
                    "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
                    "programmer", "retired", "sales/marketing", "scientist", "self-employed",
                    "technician/engineer", "tradesman/craftsman", "unemployed", "writer")
# u.item's 19 genre flags, in file order (u.genre); "unknown" is treated as no genre
CLASSIC_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                  "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                  "Romance", "Sci-Fi", "Thriller", "War", "Western")
NO_GENRES = ("", "unknown", "(no genres listed)")
# MovieLens-1M's age groups: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+ -> ids 1..7
TITLE_YEAR = r"\((?P<year>\d{4})(?:\s*[-\x{2013}]\s*\d{0,4})?\)\s*$"  # "(1995)", "(2006-2007)"
DATE_YEAR = r"(?P<year>\d{4})\s*$"  # u.item's "01-Jan-1995"


@dataclass
class Ratings:
    """The ratings, raw ids, in file order."""

    user: np.ndarray  # int64 raw user ids
    item: np.ndarray  # int64 raw movie ids
    rating: np.ndarray  # float64
    timestamp: np.ndarray  # int64 Unix seconds


@dataclass
class Movies:
    """One row per movie of the movie file."""

    raw_id: np.ndarray  # int64
    genres: pa.ListArray  # list<int64>: genre ids (1-based, into genre_names)
    genre_names: list[str]  # genre id g is genre_names[g - 1]
    year: np.ndarray  # int64 release year, 0 = unknown


@dataclass
class Users:
    """Classic and ml-1m layouts: one row per user of ``u.user`` / ``users.dat``."""

    raw_id: np.ndarray
    age: np.ndarray  # int64 years
    gender: pa.Array  # string
    occupation: pa.Array  # string


def detect_layout(directory: Path) -> str:
    """``"classic"``, ``"latest"``, ``"ml-1m"`` or ``"ml-10m"``; DataError naming the directory
    and the files looked for.

    Example:
        >>> detect_layout(Path("../shared/data/ml-latest-small"))
        'latest'
    """
    if not directory.is_dir():
        raise DataError(str(directory), "expected a MovieLens directory (with "
                        f"{', '.join(LATEST_FILES)}, {', '.join(DAT_FILES)} or "
                        f"{', '.join(CLASSIC_FILES)}), found a file")
    for layout, files in (("classic", CLASSIC_FILES), ("latest", LATEST_FILES),
                          ("dat", DAT_FILES)):
        if (directory / files[0]).is_file():
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise DataError(str(directory), f"has {files[0]} ({layout} layout) but not "
                                f"{', '.join(missing)}")
            if layout == "dat":  # ML-1M and ML-10M differ in users.dat only
                return "ml-1m" if (directory / USERS_DAT).is_file() else "ml-10m"
            return layout
    raise DataError(str(directory), "no MovieLens layout found: looked for "
                    f"{' + '.join(LATEST_FILES)} (latest), {' + '.join(DAT_FILES)} (ML-1M with "
                    f"{USERS_DAT}, ML-10M) and {' + '.join(CLASSIC_FILES)} (classic ML-100K)")



# --------------------------------------------------------------------------------------------------
# reading


def read_latest(directory: Path) -> tuple[Ratings, Movies]:
    """``ratings.csv`` and ``movies.csv`` of the latest layout."""
    path = directory / "ratings.csv"
    t = _read_csv(path, csv.ReadOptions(),
                  csv.ParseOptions(),
                  {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float64(),
                   "timestamp": pa.int64()}, header=True)
    ratings = _ratings(t, path, ["userId", "movieId", "rating", "timestamp"], header=True)
    path = directory / "movies.csv"
    m = _read_csv(path, csv.ReadOptions(), csv.ParseOptions(),
                  {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()},
                  header=True)
    raw_id = _unique_ids(m, path, "movieId", header=True)
    names = pc.split_pattern(m.column("genres").combine_chunks().fill_null(""), "|")
    genres, genre_names = _encode_genres(names)
    year = _year(m.column("title"))
    return ratings, Movies(raw_id, genres, genre_names, year)


def read_classic(directory: Path) -> tuple[Ratings, Movies, Users]:
    """``u.data``, ``u.item`` and ``u.user`` of the ML-100K layout."""
    path = directory / "u.data"
    names = ["user", "item", "rating", "timestamp"]
    t = _read_csv(path, csv.ReadOptions(column_names=names),
                  csv.ParseOptions(delimiter="\t", quote_char=False),
                  {"user": pa.int64(), "item": pa.int64(), "rating": pa.float64(),
                   "timestamp": pa.int64()})
    ratings = _ratings(t, path, names)

    path = directory / "u.item"
    flags = [f"genre_{i}" for i in range(len(CLASSIC_GENRES))]
    names = ["id", "title", "release_date", "video_release_date", "url", *flags]
    m = _read_csv(path, csv.ReadOptions(column_names=names, encoding="latin-1"),
                  csv.ParseOptions(delimiter="|", quote_char=False),
                  {"id": pa.int64(), **{c: pa.string() for c in names[1:5]},
                   **{f: pa.int8() for f in flags}})
    raw_id = _unique_ids(m, path, "id")
    # the flags as (movie, genre) pairs, movie-major, then as one list of genre names per movie
    matrix = np.stack([m.column(f).fill_null(0).to_numpy() for f in flags], axis=1) > 0
    movie, genre = np.nonzero(matrix)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(movie, minlength=len(raw_id)))])
    genre_lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                           pa.array(np.array(CLASSIC_GENRES)[genre]))
    genres, genre_names = _encode_genres(genre_lists)
    year = _year(m.column("title"))
    from_date = _year(m.column("release_date"), DATE_YEAR)
    movies = Movies(raw_id, genres, genre_names, np.where(year > 0, year, from_date))

    path = directory / "u.user"
    names = ["id", "age", "gender", "occupation", "zip"]
    u = _read_csv(path, csv.ReadOptions(column_names=names, encoding="latin-1"),
                  csv.ParseOptions(delimiter="|", quote_char=False),
                  {"id": pa.int64(), "age": pa.int64(), "gender": pa.string(),
                   "occupation": pa.string(), "zip": pa.string()})
    users = Users(_unique_ids(u, path, "id"), u.column("age").fill_null(-1).to_numpy(),
                  u.column("gender").combine_chunks(), u.column("occupation").combine_chunks())
    return ratings, movies, users


def read_dat(directory: Path) -> tuple[Ratings, Movies, Users | None]:
    """``ratings.dat`` and ``movies.dat`` of ML-1M / ML-10M, and ML-1M's ``users.dat``.

    Example:
        >>> ratings, movies, users = read_dat(Path("ml-1m"))
        >>> len(ratings.user), len(users.raw_id)
        (1000209, 6040)
    """
    path = directory / "ratings.dat"
    names = ["user", "item", "rating", "timestamp"]
    t = _read_dat(path, {"user": pa.int64(), "item": pa.int64(), "rating": pa.float64(),
                         "timestamp": pa.int64()})
    ratings = _ratings(t, path, names)

    # titles are latin-1 in ML-1M; they only feed the year, which is ASCII, so latin-1 (which
    # decodes any byte) reads a UTF-8 movies.dat just as well
    path = directory / "movies.dat"
    m = _read_dat(path, {"id": pa.int64(), "title": pa.string(), "genres": pa.string()},
                  encoding="latin-1")
    raw_id = _unique_ids(m, path, "id")
    genres, genre_names = _encode_genres(
        pc.split_pattern(m.column("genres").combine_chunks().fill_null(""), "|"))
    movies = Movies(raw_id, genres, genre_names, _year(m.column("title")))

    path = directory / USERS_DAT
    if not path.is_file():
        return ratings, movies, None
    u = _read_dat(path, {"id": pa.int64(), "gender": pa.string(), "age": pa.int64(),
                         "occupation": pa.int64(), "zip": pa.string()}, encoding="latin-1")
    age = _required(u, path, "age")
    occupation = _required(u, path, "occupation")
    bad = (occupation < 0) | (occupation >= len(ML1M_OCCUPATIONS))
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{path}:{row + 1}", f"column 'occupation' holds {occupation[row]}; "
                        f"expected a code 0..{len(ML1M_OCCUPATIONS) - 1}")
    users = Users(_unique_ids(u, path, "id"), age, u.column("gender").combine_chunks(),
                  pa.array(np.array(ML1M_OCCUPATIONS, dtype=object)[occupation], pa.string()))
    return ratings, movies, users


def _read_dat(path: Path, types: dict[str, pa.DataType], encoding: str = "utf8") -> pa.Table:
    """A ``::``-separated file without a header (columns named as ``types``), through
    :class:`SeparatorStream`."""
    def source() -> pa.PythonFile:
        return pa.PythonFile(SeparatorStream(path), mode="r")

    return _read_csv(path, csv.ReadOptions(column_names=list(types), encoding=encoding),
                     csv.ParseOptions(delimiter=UNIT_SEPARATOR.decode(), quote_char=False),
                     types, source=source, shown_delimiter=DAT_SEPARATOR)


class SeparatorStream(io.RawIOBase):
    """The bytes of ``path`` with every ``::`` replaced by :data:`UNIT_SEPARATOR`, translated
    :data:`SEPARATOR_CHUNK_BYTES` at a time (memory stays flat), for pyarrow.csv, which splits on
    one byte only. Pairs are taken from the start of each run of colons, as ``bytes.replace``
    does on the whole file; a byte 0x1f already in the file is a DataError naming its line.

    Example:
        >>> SeparatorStream(Path("ratings.dat")).read()[:12]
        b'1\x1f1193\x1f5\x1f97'
    """

    def __init__(self, path: Path, chunk_bytes: int = SEPARATOR_CHUNK_BYTES) -> None:
        super().__init__()
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._chunk_bytes = chunk_bytes
        self._pending = memoryview(b"")
        self._tail = b""  # an odd run of colons' last colon, which the next chunk may pair
        self._lines = 0  # newlines before the pending bytes (for error messages)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            if not self._refill():
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()

    def _refill(self) -> bool:
        chunk = self._file.read(self._chunk_bytes)
        if not chunk and not self._tail:
            return False
        data = self._tail + chunk
        if chunk:
            odd_run = (len(data) - len(data.rstrip(b":"))) % 2
            data, self._tail = data[:len(data) - odd_run], data[len(data) - odd_run:]
        else:
            self._tail = b""
        found = data.find(UNIT_SEPARATOR)
        if found >= 0:
            line = self._lines + data.count(b"\n", 0, found) + 1
            raise DataError(f"{self.path}:{line}", "holds the control byte 0x1f, which the "
                            f"{DAT_SEPARATOR!r} reader uses as its field separator")
        self._lines += data.count(b"\n")
        self._pending = memoryview(data.replace(DAT_SEPARATOR.encode(), UNIT_SEPARATOR))
        return True


def _read_csv(path: Path, read: csv.ReadOptions, parse: csv.ParseOptions,
              types: dict[str, pa.DataType], *, header: bool = False,
              source: Callable[[], object] | None = None,
              shown_delimiter: str | None = None) -> pa.Table:
    """Read a whole CSV with the given column types; any problem is a DataError naming the
    file, and a row with the wrong number of fields or a value that does not convert also names
    its line (and column). ``source()`` gives a fresh stream to read instead of ``path`` (which
    errors still name); ``shown_delimiter`` is the separator the messages name."""
    check_text(path, utf8=read.encoding.lower().replace("-", "") == "utf8")
    open_source = source or (lambda: path)
    convert = csv.ConvertOptions(column_types=types, include_columns=list(types),
                                 null_values=[""], strings_can_be_null=True)
    try:
        return csv.read_csv(open_source(), read_options=read, parse_options=parse,
                            convert_options=convert)
    except pa.ArrowInvalid as e:
        if "invalid UTF8" in str(e):
            _raise_not_utf8(path)
        if "Expected" in str(e) and "columns" in str(e):
            _raise_bad_row(path, open_source, read, parse, convert,
                           shown_delimiter or parse.delimiter)
        if "conversion error" in str(e):
            as_text = csv.ConvertOptions(column_types={c: pa.string() for c in types},
                                         include_columns=list(types), strings_can_be_null=True)
            text = csv.read_csv(open_source(), read_options=read, parse_options=parse,
                                convert_options=as_text)
            _raise_first_bad_value(path, text, types, header)
        raise DataError(str(path), f"cannot read: {e}") from None
    except (OSError, pa.ArrowException) as e:
        raise DataError(str(path), f"cannot read: {e}") from None


def _raise_bad_row(path: Path, source: Callable[[], object], read: csv.ReadOptions,
                   parse: csv.ParseOptions, convert: csv.ConvertOptions, delimiter: str) -> None:
    """Name the line of the first row with the wrong number of fields: read again on one thread,
    where Arrow knows each row's line number (the error path only)."""
    rows: list[csv.InvalidRow] = []

    def keep(row: csv.InvalidRow) -> str:
        rows.append(row)
        return "error"

    read.use_threads = False
    parse.invalid_row_handler = keep
    with contextlib.suppress(pa.ArrowInvalid):
        csv.read_csv(source(), read_options=read, parse_options=parse, convert_options=convert)
    if rows:
        row = rows[0]
        where = f"{path}:{row.number}" if row.number is not None else str(path)
        text = row.text.replace(parse.delimiter, delimiter)
        shown = text if len(text) <= 80 else text[:80] + "..."
        raise DataError(where, f"expected {row.expected_columns} {delimiter!r}-separated "
                        f"fields, found {row.actual_columns}: {shown!r}")


def _raise_not_utf8(path: Path) -> None:
    """Name the first line that is not UTF-8 (a Python scan, on the error path only)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}", f"is not UTF-8 text (byte "
                                f"0x{line[e.start]:02x} in column {e.start + 1}); convert it "
                                "to UTF-8") from None
    raise DataError(str(path), "is not UTF-8 text; convert it to UTF-8")


def _raise_first_bad_value(path: Path, text: pa.Table, types: dict[str, pa.DataType],
                           header: bool) -> None:
    """Name the line and column of the first value that does not convert to its type."""
    for name, typ in types.items():
        col = text.column(name).combine_chunks()
        row = first_bad_cast(col, typ)
        if row is not None:
            raise DataError(f"{path}:{row + 1 + header}", f"column '{name}' holds "
                            f"{col[row].as_py()!r}, which is not a valid {typ}")


def _ratings(t: pa.Table, path: Path, names: list[str], header: bool = False) -> Ratings:
    if t.num_rows == 0:
        raise DataError(str(path), "holds no ratings")
    ratings = Ratings(*(_required(t, path, c, header) for c in names))
    # "nan" and "inf" parse as floats; a NaN rating would compare false and become a silent 0
    bad = ~np.isfinite(ratings.rating)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{path}:{row + 1 + header}", f"column '{names[2]}' holds "
                        f"{ratings.rating[row]}; a rating must be a finite number")
    return ratings


def _required(t: pa.Table, path: Path, name: str, header: bool = False) -> np.ndarray:
    """A column without nulls, as numpy; a missing value names its line."""
    col = t.column(name).combine_chunks()
    if col.null_count:
        row = int(np.argmax(~np.asarray(col.is_valid())))
        raise DataError(f"{path}:{row + 1 + header}", f"column '{name}' is empty")
    return col.to_numpy()


def _unique_ids(t: pa.Table, path: Path, name: str, header: bool = False) -> np.ndarray:
    """An id column that must list each id once (a second row for an id would be ambiguous)."""
    ids = _required(t, path, name, header)
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = ids[first[np.argmax(counts > 1)]]
        row = int(np.flatnonzero(ids == dup)[1])
        raise DataError(f"{path}:{row + 1 + header}", f"column '{name}' lists id {dup} a second "
                        "time; ids must be unique")
    return ids


def _encode_genres(names: pa.ListArray) -> tuple[pa.ListArray, list[str]]:
    """Genre-name lists -> lists of genre ids (1 + alphabetical rank); "no genre" markers drop."""
    flat = names.flatten()
    keep = ~np.isin(flat.to_numpy(zero_copy_only=False), NO_GENRES)
    parent = pc.list_parent_indices(names).to_numpy()[keep]
    vocab = sorted(set(pc.unique(flat.filter(pa.array(keep))).to_pylist()))
    ids = pc.index_in(flat.filter(pa.array(keep)), value_set=pa.array(vocab, pa.string()))
    lengths = np.bincount(parent, minlength=len(names))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = ids.to_numpy(zero_copy_only=False).astype(np.int64) + 1
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)), vocab


def _year(text: pa.ChunkedArray, pattern: str = TITLE_YEAR) -> np.ndarray:
    """The 4-digit year ``pattern`` finds in each string; 0 where there is none."""
    found = pc.struct_field(pc.extract_regex(text.combine_chunks().fill_null(""), pattern), "year")
    return pc.cast(found, pa.int64()).fill_null(0).to_numpy()
