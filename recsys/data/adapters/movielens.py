"""MovieLens ratings -> a prepared dataset: one row per rating, ``click`` = rating >= threshold.

Four layouts are recognised in the input directory:

* **classic** (ML-100K): ``u.data`` (tab-separated ``user item rating timestamp``), ``u.user``
  (``id|age|gender|occupation|zip``) and ``u.item`` (``id|title|release date|video release
  date|IMDb URL|`` + 19 genre flags, latin-1);
* **latest** (ml-latest, ml-latest-small, ML-20M/25M/32M): ``ratings.csv``
  (``userId,movieId,rating,timestamp``) and ``movies.csv`` (``movieId,title,genres``, genres
  ``|``-separated, ``(no genres listed)`` = none);
* **ml-1m** (MovieLens-1M): ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``),
  ``movies.dat`` (``MovieID::Title::Genres``, latin-1, genres ``|``-separated) and ``users.dat``
  (``UserID::Gender::Age::Occupation::Zip-code``; Age is already one of the group codes 1, 18,
  25, 35, 45, 50, 56 and Occupation a code 0..20, named in
  :data:`recsys.data.adapters.movielens_read.ML1M_OCCUPATIONS`);
* **ml-10m** (MovieLens-10M): ``ratings.dat`` and ``movies.dat`` as ML-1M (half-star ratings),
  no ``users.dat``, so no user features; ``tags.dat`` is not read.

pyarrow.csv splits on one byte only, so the ``::`` files are read through :class:`SeparatorStream`,
which replaces ``::`` by the control byte 0x1f in streamed chunks before Arrow parses them. Chosen
over ``pyarrow.compute.split_pattern`` because Arrow's multi-threaded CSV parser then does the
splitting and the typed conversion in one pass (about as fast as for ``ratings.csv``), and every
error path of the CSV layouts (a wrong field count, a value that does not convert) works, and names
its line, unchanged. A file that holds 0x1f itself is refused, naming the line.

Columns (every vocabulary keeps id 0 for "unknown"):

============================  ============  =====================================================
``request_id``                group         contiguous id of (user, UTC day), in (user, day) order
``user_id``                   sparse, user  users remapped to 1..U in order of their raw ids
``item_id``                   sparse, item  rated movies remapped to 1..I in order of raw ids
``item_genres``               multi, item   genre ids, 1 + the genre's alphabetical rank
``item_year``                 sparse, item  5-year bucket of the release year (:func:`year_bucket`)
``hour``, ``weekday``         sparse, ctx   UTC hour 0..23 and weekday 0..6 (Monday = 0)
``user_prior_count``          dense, user   log1p(ratings the user gave strictly before this one),
                                            standardized with the train split's mean and std
``user_age``                  sparse, user  classic, ml-1m: 7 age buckets (:data:`AGE_EDGES`)
``user_gender``               sparse, user  classic, ml-1m: 1 + alphabetical rank (F 1, M 2)
``user_occupation``           sparse, user  classic, ml-1m: 1 + alphabetical rank of the name
``click``                     label         rating >= label_threshold (default 4.0)
``rating``, ``timestamp``     other         the raw rating and Unix time, kept for analysis
============================  ============  =====================================================

The vocabularies span every split (which ids exist is not treated as leakage); everything that
depends on behaviour (``user_prior_count``) is causal. Rows are sorted by timestamp (stable, so
ties keep file order) and split globally: the last ``test_fraction`` are test, the
``valid_fraction`` before them valid. Ratings are never looped over in Python.

Example:
    >>> from recsys.data.adapters import prepare
    >>> m = prepare("movielens", "../shared/data/ml-latest-small", "data/movielens")
    >>> m.column("user_id").cardinality
    611
    >>> prepare("movielens", "ml-1m", "data/ml-1m").rows["impressions"]
    {'train': 800167, 'valid': 100021, 'test': 100021}
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.adapters.common import VIEW, column, hint_cut_short, source_info, split_sizes
from recsys.data.adapters.movielens_read import (
    CLASSIC_FILES,
    DAT_FILES,
    LATEST_FILES,
    USERS_DAT,
    Movies,
    Ratings,
    Users,
    detect_layout,
    read_classic,
    read_dat,
    read_latest,
)
from recsys.data.parquet import DatasetWriter
from recsys.data.schema import (
    REQUEST_ID,
    USER_ID,
    ColumnInfo,
    ColumnRole,
    DatasetManifest,
    DenseScaling,
)
from recsys.progress import progress_bar
from recsys.spec import PrepareSpec, Side

README_FILES = ("README.txt", "README", "README.html")  # the terms of use travel with the data
DEFAULT_LABEL_THRESHOLD = 4.0
AGE_EDGES = (18, 25, 35, 45, 50, 56)
YEAR_FIRST, YEAR_WIDTH = 1900, 5
SECONDS_PER_DAY = 86_400
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0, as datetime.weekday)



def convert(input: Path, out: Path, options: PrepareSpec, *, config_hash: str,
            progress: bool = True) -> DatasetManifest:
    """Read a MovieLens directory and write the prepared dataset (see the module docstring).

    Called by :func:`recsys.data.adapters.prepare`, which handles caching and ``force``.

    Example:
        >>> convert(Path("ml-100k"), Path("data/ml100k"), PrepareSpec(input="ml-100k"),
        ...         config_hash="0123456789abcdef")
    """
    layout = detect_layout(input)
    files = {"classic": CLASSIC_FILES, "latest": LATEST_FILES}.get(layout,
                                                                  (*DAT_FILES, USERS_DAT))
    with hint_cut_short(*(input / f for f in files)):
        if layout == "classic":
            ratings, movies, users = read_classic(input)
        elif layout == "latest":
            (ratings, movies), users = read_latest(input), None
        else:
            ratings, movies, users = read_dat(input)
    threshold = options.label_threshold
    threshold = DEFAULT_LABEL_THRESHOLD if threshold is None else threshold
    table, columns = build_table(ratings, movies, users, threshold)

    writer = DatasetWriter(out, f"movielens-{layout}", {**source_info("movielens", input, options),
                                                        "layout": layout},
                           config_hash, columns, table.schema,
                           rows_per_shard=options.rows_per_shard,
                           row_group_size=options.row_group_size)
    sizes = split_sizes(table.num_rows, options.valid_fraction, options.test_fraction)
    table, scaling = standardize_dense(table, columns, sizes[0])
    start = 0
    for split, size in progress_bar(list(zip(("train", "valid", "test"), sizes, strict=True)),
                            desc="movielens -> parquet", unit="split", disable=not progress):
        writer.write(VIEW, split, table.slice(start, size))
        start += size
    for name in README_FILES:
        if (input / name).is_file():
            shutil.copy2(input / name, writer.partial / name)
    return writer.finish(dense_scaling=scaling)


def standardize_dense(table: pa.Table, columns: list[ColumnInfo], train_rows: int
                      ) -> tuple[pa.Table, dict[str, DenseScaling]]:
    """Every dense column as (x - mean) / std with the moments of the first ``train_rows`` rows
    (the train split), and how each was scaled, for ``dataset.json``.

    Unscaled, ``user_prior_count`` (log1p of a count: mean about 4.8, rising over time, so higher
    in the temporal test split) is raised to high powers by PIN's polynomial layers, which made
    xDeepInt's test AUC swing by seed (docs/methods.md); every arch trains better on centred
    inputs.

    Example:
        >>> t, s = standardize_dense(pa.table({"x": [1.0, 3.0, 5.0]}),
        ...                          [column("x", ColumnRole.DENSE, None, None, "")], 2)
        >>> t.column("x").to_pylist(), s["x"].mean
        ([-1.0, 1.0, 3.0], 2.0)
    """
    scaling: dict[str, DenseScaling] = {}
    for c in columns:
        if c.role != ColumnRole.DENSE:
            continue
        x = table.column(c.name).to_numpy().astype(np.float64)
        train = x[:train_rows]
        mean = float(train.mean()) if len(train) else 0.0
        std = float(train.std()) if len(train) else 0.0
        scaling[c.name] = DenseScaling(kind="standard", mean=mean, std=std if std > 0 else 1.0)
        scaled = scaling[c.name].apply(x).astype(np.float32)
        table = table.set_column(table.schema.get_field_index(c.name), c.name, pa.array(scaled))
    return table, scaling



# --------------------------------------------------------------------------------------------------
# the table


def year_bucket(year: np.ndarray) -> np.ndarray:
    """Release year -> id: 0 unknown (year 0), 1 before 1900, then one id per 5 years from 1900.

    Example:
        >>> year_bucket(np.array([0, 1895, 1900, 1995, 2018]))
        array([ 0,  1,  2, 21, 25])
    """
    bucket = np.where(year < YEAR_FIRST, 1, (year - YEAR_FIRST) // YEAR_WIDTH + 2)
    return np.where(year > 0, bucket, 0).astype(np.int64)


def age_bucket(age: np.ndarray) -> np.ndarray:
    """Age in years -> 1..7 (<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+); unknown (< 0) -> 0.

    Example:
        >>> age_bucket(np.array([-1, 7, 18, 24, 25, 56, 73]))
        array([0, 1, 2, 2, 3, 7, 7])
    """
    return np.where(age >= 0, np.searchsorted(AGE_EDGES, age, side="right") + 1, 0) \
        .astype(np.int64)


def prior_counts(user: np.ndarray) -> np.ndarray:
    """For rows in time order: how many earlier rows have the same user.

    Example:
        >>> prior_counts(np.array([5, 7, 5, 5, 7]))
        array([0, 0, 1, 2, 1])
    """
    by_user = np.argsort(user, kind="stable")  # stable: rows of one user stay in time order
    grouped = user[by_user]
    starts = np.concatenate([[0], np.flatnonzero(grouped[1:] != grouped[:-1]) + 1])
    group_start = np.repeat(starts, np.diff(np.concatenate([starts, [len(user)]])))
    out = np.empty(len(user), dtype=np.int64)
    out[by_user] = np.arange(len(user)) - group_start
    return out


def _remap(raw: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """Raw ids -> 1 + their position in the sorted ``vocab``; ids not in it -> 0."""
    if not len(vocab):
        return np.zeros(len(raw), dtype=np.int64)
    pos = np.searchsorted(vocab, raw)
    clipped = np.minimum(pos, len(vocab) - 1)
    return np.where(vocab[clipped] == raw, clipped + 1, 0).astype(np.int64)


def _encode_strings(values: pa.Array) -> tuple[np.ndarray, list[str]]:
    """Strings -> 1 + alphabetical rank among the distinct non-empty values; null/empty -> 0."""
    values = values.fill_null("")
    vocab = sorted(v for v in pc.unique(values).to_pylist() if v)
    ids = pc.index_in(values, value_set=pa.array(vocab, pa.string()))
    return pc.add(ids, 1).fill_null(0).to_numpy().astype(np.int64), vocab


def build_table(ratings: Ratings, movies: Movies, users: Users | None,
                threshold: float) -> tuple[pa.Table, list[ColumnInfo]]:
    """Every rating as a row, in (stable) timestamp order, with its column descriptions.

    Example:
        >>> table, columns = build_table(*read_latest(Path("ml-latest-small")), None, 4.0)
    """
    order = np.argsort(ratings.timestamp, kind="stable")
    ts = ratings.timestamp[order]
    raw_user, raw_item = ratings.user[order], ratings.item[order]
    rating = ratings.rating[order]

    user_vocab, item_vocab = np.unique(raw_user), np.unique(raw_item)
    user_id, item_id = _remap(raw_user, user_vocab), _remap(raw_item, item_vocab)

    # per item id (index 0 = unknown): the row of its movie; movies without one get a sentinel
    # row with no genres and year 0 appended after the real ones
    movie_row = np.full(len(item_vocab) + 1, len(movies.raw_id), dtype=np.int64)
    known = _remap(movies.raw_id, item_vocab)
    movie_row[known[known > 0]] = np.flatnonzero(known > 0)
    no_genres = pa.array([[]], pa.list_(pa.int64()))
    genres_by_item = pa.concat_arrays([movies.genres, no_genres]).take(pa.array(movie_row))
    year_by_item = year_bucket(np.concatenate([movies.year, [0]])[movie_row])

    day = ts // SECONDS_PER_DAY
    _, request_id = np.unique(user_id * (day.max() - day.min() + 1) + (day - day.min()),
                              return_inverse=True)
    data: dict[str, pa.Array | np.ndarray] = {
        REQUEST_ID: request_id.astype(np.int64),
        USER_ID: user_id,
        "item_id": item_id,
        "item_genres": genres_by_item.take(pa.array(item_id)),
        "item_year": year_by_item[item_id],
        "hour": (ts // 3600) % 24,
        "weekday": (day + EPOCH_WEEKDAY) % 7,
        "user_prior_count": np.log1p(prior_counts(user_id)).astype(np.float32),
    }
    genre_text = ", ".join(f"{i} = {g}" for i, g in enumerate(movies.genre_names, start=1))
    S, D = ColumnRole.SPARSE, ColumnRole.DENSE
    columns = [
        column(REQUEST_ID, ColumnRole.GROUP, None, None, "contiguous id of (user, UTC day)"),
        column(USER_ID, S, Side.USER, len(user_vocab) + 1,
               "user, remapped to 1..U in raw-id order (0 = unknown)"),
        column("item_id", S, Side.ITEM, len(item_vocab) + 1,
               "rated movie, remapped to 1..I in raw-id order (0 = unknown)"),
        column("item_genres", ColumnRole.MULTI_SPARSE, Side.ITEM, len(movies.genre_names) + 1,
               f"genres ({genre_text}); empty when none are listed"),
        column("item_year", S, Side.ITEM, int(year_by_item.max()) + 1,
               f"release year bucket: 0 unknown, 1 before {YEAR_FIRST}, then "
               f"{YEAR_WIDTH}-year buckets from {YEAR_FIRST} (id 2)"),
        column("hour", S, Side.CONTEXT, 24, "UTC hour of the rating, 0..23"),
        column("weekday", S, Side.CONTEXT, 7, "UTC weekday of the rating, Monday = 0"),
        column("user_prior_count", D, Side.USER, None,
               "log1p(ratings the user gave strictly before this one), standardized with the "
               "train split's mean and std (dataset.json dense_scaling); causal"),
    ]
    if users is not None:
        row = _remap(users.raw_id, user_vocab)  # u.user row -> user id (0 = never rated)
        by_user = np.full(len(user_vocab) + 1, len(users.raw_id), dtype=np.int64)
        by_user[row[row > 0]] = np.flatnonzero(row > 0)
        age = np.concatenate([age_bucket(users.age), [0]])
        gender, genders = _encode_strings(users.gender)
        occupation, occupations = _encode_strings(users.occupation)
        data["user_age"] = age[by_user][user_id]
        data["user_gender"] = np.concatenate([gender, [0]])[by_user][user_id]
        data["user_occupation"] = np.concatenate([occupation, [0]])[by_user][user_id]
        columns += [
            column("user_age", S, Side.USER, len(AGE_EDGES) + 2,
                   "age bucket: 1 <18, 2 18-24, 3 25-34, 4 35-44, 5 45-49, 6 50-55, 7 56+"),
            column("user_gender", S, Side.USER, len(genders) + 1,
                   ", ".join(f"{i} = {g}" for i, g in enumerate(genders, start=1))),
            column("user_occupation", S, Side.USER, len(occupations) + 1,
                   "occupation, 1 + alphabetical rank (0 = unknown)"),
        ]
    data["click"] = (rating >= threshold).astype(np.int8)
    data["rating"] = rating.astype(np.float32)
    data["timestamp"] = ts
    columns += [
        column("click", ColumnRole.LABEL, None, None, f"rating >= {threshold}"),
        column("rating", ColumnRole.OTHER, None, None, "the raw star rating"),
        column("timestamp", ColumnRole.OTHER, None, None, "Unix time of the rating (seconds)"),
    ]
    return pa.table(data, schema=_schema(data)), columns


def _schema(data: dict[str, pa.Array | np.ndarray]) -> pa.Schema:
    types = {"user_prior_count": pa.float32(), "item_genres": pa.list_(pa.int64()),
             "click": pa.int8(), "rating": pa.float32()}
    return pa.schema([(name, types.get(name, pa.int64())) for name in data])
