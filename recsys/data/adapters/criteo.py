"""Criteo display-advertising TSV -> a prepared dataset, streamed in blocks.

Each line is ``label <TAB> I1..I13 <TAB> C1..C26`` (the Kaggle ``train.txt`` and the Criteo 1TB day
files): 13 integer fields that may be empty or negative and 26 categorical fields that are hex
strings (8 digits in the releases; up to 16 are accepted) or empty. Columns written:

=========================  =======  ==============================================================
``click``                  label    label > label_threshold (default 0, i.e. the 0/1 label)
``I1`` .. ``I13``          dense    log1p(max(x, 0)); empty -> 0
``I1_bucket`` ..           sparse   :func:`log_bucket` of x: 0 empty, 1 negative, 2..4 for 0..2,
``I13_bucket``                      then 4 + floor(ln(x)^2) (the Kaggle winners' transform)
``C1`` .. ``C26``          sparse   (hex value mod hash_size) + 1; empty -> 0
=========================  =======  ==============================================================

Criteo's fields are anonymous, so every feature column is marked ``Side.CONTEXT``: nothing says
which describe the user and which the ad, and the dataset has no user or request id (no group
columns). Files are read in blocks (``pyarrow.csv.open_csv``), so a file of many GB never sits in
memory. Two inputs are understood:

* **one file** (the Kaggle ``train.txt``): rows keep file order and split by position: the line
  count comes first (a fast byte count), then the last ``test_fraction`` of lines go to test and
  the ``valid_fraction`` before them to valid.
* **a directory of day files** (the Criteo 1TB release): ``day_0`` .. ``day_23``, each plain or
  gzip-compressed (``day_5.gz``; decompressed as a stream, never to disk), any run of consecutive
  days (``day_0`` .. ``day_2`` for a sample). The split is by days: the last ``test_days`` days
  (default 1) are test, the ``valid_days`` before them (default 1) valid, the rest train. Each day
  becomes its own shards (``impressions/<split>/day_NN/part-*.parquet``), converted by
  ``workers`` processes in parallel; the manifest lists them in day order, so the dataset is the
  same for any number of workers. Names that are not ``day_N[.gz]`` are skipped with a warning;
  a gap (``day_0``, ``day_2``), a day given twice or no day file at all is a DataError.

A line with the wrong number of fields, an empty label or a value that is not an integer (hex
string) is a DataError naming the file, line and column (and saying when that line is the last
one and has no final newline: a file cut short; for a gzip file, when the stream ends early). An
empty file, or one that is not UTF-8 text (UTF-16, NUL bytes), is refused.

Example:
    >>> from recsys.data.adapters import prepare
    >>> m = prepare("criteo", "dac/train.txt", "data/criteo",
    ...             PrepareSpec(input="dac/train.txt", hash_size=1 << 20))
    >>> m.column("C1").cardinality
    1048577
    >>> m = prepare("criteo", "criteo-1tb", "data/criteo-1tb",  # day_0.gz .. day_23.gz
    ...             PrepareSpec(input="criteo-1tb", workers=8))
    >>> m.source["days"]["test"]
    [23]
"""

from __future__ import annotations

import gzip
import logging
import multiprocessing
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import BinaryIO, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.csv as csv
from tqdm import tqdm

from recsys.data.adapters.common import (
    SNIFF_BYTES,
    VIEW,
    PositionalSplitWriter,
    check_head,
    check_text,
    column,
    hint_cut_short,
    label_threshold,
    source_info,
)
from recsys.data.parquet import DatasetWriter, ShardWriter
from recsys.data.schema import SPLITS, ColumnInfo, ColumnRole, DatasetManifest
from recsys.errors import DataError, RunError, UsageError
from recsys.progress import progress_bar
from recsys.spec import PrepareSpec, Side
from recsys.tables import format_table

log = logging.getLogger("recsys.data")

INT_COLUMNS = tuple(f"I{i}" for i in range(1, 14))
CAT_COLUMNS = tuple(f"C{i}" for i in range(1, 27))
BUCKET_COLUMNS = tuple(f"{c}_bucket" for c in INT_COLUMNS)
FIELDS = ("label", *INT_COLUMNS, *CAT_COLUMNS)
BLOCK_BYTES = 1 << 24  # bytes of text per parsed block: the memory a block needs, times ~3
MAX_HEX_DIGITS = 16  # the most that fit a uint64
DEFAULT_LABEL_THRESHOLD = 0.0
# nibble value of each byte; 255 marks a byte that is not a hex digit
_HEX = np.full(256, 255, dtype=np.uint8)
for _digits, _first in ((b"0123456789", 0), (b"abcdef", 10), (b"ABCDEF", 10)):
    _HEX[np.frombuffer(_digits, np.uint8)] = np.arange(_first, _first + len(_digits))
_INTEGER = re.compile(rb"-?\d+")
GZ = ".gz"
DAY_FILE = re.compile(r"day_(\d+)(?:\.gz)?")  # the 1TB release's names: day_0 .. day_23[.gz]
DAY_OPTIONS = ("valid_days", "test_days")  # the split of a day directory
FRACTION_OPTIONS = ("valid_fraction", "test_fraction")  # the split of a single file

ARROW_SCHEMA = pa.schema([("click", pa.int8())]
                         + [(c, pa.float32()) for c in INT_COLUMNS]
                         + [(c, pa.int64()) for c in BUCKET_COLUMNS]
                         + [(c, pa.int64()) for c in CAT_COLUMNS])


def log_bucket(x: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Integer feature -> bucket id: 0 empty, 1 any negative value, 2, 3, 4 for 0, 1, 2, and
    ``4 + floor(ln(x)^2)`` for x > 2 (>= 5: 3 and 4 -> 5, 5..7 -> 6, 8..11 -> 7, ...).

    Small values keep their own ids because they are frequent and meaningful (counts); large ones
    share logarithmic buckets. The negatives (-1..-3 in Criteo's I2) share one id.

    Example:
        >>> log_bucket(np.array([0, -2, 0, 1, 2, 3, 100]), np.array([False] + [True] * 6))
        array([ 0,  1,  2,  3,  4,  5, 25])
    """
    x = np.asarray(x, dtype=np.int64)
    small = np.where(x < 0, 1, x + 2)
    log_x = np.log(np.maximum(x, 3).astype(np.float64))
    bucket = np.where(x > 2, np.floor(log_x * log_x).astype(np.int64) + 4, small)
    return np.where(present, bucket, 0).astype(np.int64)


def hash_hex(values: pa.Array, hash_size: int) -> tuple[np.ndarray, int | None]:
    """Hex strings -> (value mod hash_size) + 1 (null -> 0), without a Python loop over rows.

    Returns the ids and the index of the first value that is not 1..16 hex digits (None if all
    are). Every byte is mapped to its nibble through a table, shifted by its distance from the end
    of its string and summed per string as a difference of a running (wrapping) uint64 sum: the
    wrap-around cancels because each string's own value fits in 64 bits.

    Example:
        >>> hash_hex(pa.array([b"68fd1e64", None], pa.binary()), 1000)[0]
        array([853,   0])
    """
    n = len(values)
    if values.null_count == n:
        return np.zeros(n, dtype=np.int64), None
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32, count=n + 1,
                            offset=values.offset * 4).astype(np.int64)
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    starts, ends = offsets[:-1] - offsets[0], offsets[1:] - offsets[0]
    lengths = ends - starts
    present = np.asarray(values.is_valid()) if values.null_count else np.ones(n, dtype=bool)
    nibbles = _HEX[data]
    width = int(lengths[np.argmax(present)])
    if 0 < width <= MAX_HEX_DIGITS and len(data) == width * int(present.sum()) \
            and (lengths[present] == width).all() and not (nibbles == 255).any():
        # the usual case, every value with the same number of digits: one (rows, digits) matrix
        shifts = np.arange(4 * (width - 1), -1, -4, dtype=np.uint64)
        value = (nibbles.reshape(-1, width).astype(np.uint64) << shifts).sum(axis=1,
                                                                            dtype=np.uint64)
        ids = np.zeros(n, dtype=np.int64)
        ids[present] = (value % np.uint64(hash_size)).astype(np.int64) + 1
        return ids, None
    row_of_byte = np.repeat(np.arange(n), lengths)
    bad = present & ((lengths == 0) | (lengths > MAX_HEX_DIGITS))
    bad_bytes = nibbles == 255
    if bad_bytes.any():
        bad[row_of_byte[bad_bytes]] |= present[row_of_byte[bad_bytes]]
    first_bad = int(np.argmax(bad)) if bad.any() else None
    # digit k from the end of its string is worth 16^k: shift by 4k bits
    shift = (4 * (ends[row_of_byte] - 1 - np.arange(len(data)))).astype(np.uint64)
    shift = np.minimum(shift, np.uint64(60))  # only over-long (already reported) strings clip
    running = np.concatenate([[np.uint64(0)],
                              np.cumsum(nibbles.astype(np.uint64) << shift, dtype=np.uint64)])
    value = running[ends] - running[starts]
    ids = (value % np.uint64(hash_size)).astype(np.int64) + 1
    return np.where(present, ids, 0), first_bad


def convert(input: Path, out: Path, options: PrepareSpec, *, config_hash: str,
            progress: bool = True, block_size: int = BLOCK_BYTES) -> DatasetManifest:
    """Stream a Criteo TSV file, or a directory of day files, into the prepared dataset (see the
    module docstring).

    Called by :func:`recsys.data.adapters.prepare`, which handles caching and ``force``;
    ``block_size`` (bytes per parsed block) bounds the memory.

    Example:
        >>> convert(Path("train.txt"), Path("data/criteo"), PrepareSpec(input="train.txt"),
        ...         config_hash="0123456789abcdef")
    """
    if input.is_dir():
        return convert_days(input, out, options, config_hash=config_hash, progress=progress,
                            block_size=block_size)
    _refuse_options(options, DAY_OPTIONS, f"{input} is one file, split by position "
                    "(valid_fraction / test_fraction); valid_days / test_days split a directory "
                    "of day files")
    if input.name.endswith(GZ):
        raise DataError(str(input), "a single gzip file cannot be split by position without "
                        "reading it twice; decompress it, or put it in a directory as day_N.gz "
                        "(split by days)")
    check_text(input)
    threshold = label_threshold(options, DEFAULT_LABEL_THRESHOLD)
    columns = describe_columns(options.hash_size, threshold)
    by_name = {c.name: c for c in columns}
    out_rows = PositionalSplitWriter("criteo", input, out, options, columns, ARROW_SCHEMA,
                                     config_hash, progress)
    with hint_cut_short(input):
        reader = _open(input, input, block_size)
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as e:
                _raise_located(input, out_rows.done, e)
            table = transform(batch, options.hash_size, threshold, input, out_rows.done + 1)
            for c in BUCKET_COLUMNS:
                top = int(np.max(table.column(c).to_numpy(), initial=0)) + 1
                by_name[c].cardinality = max(by_name[c].cardinality or 1, top)
            out_rows.write(table)
    return out_rows.finish()


def _open(source: Path | pa.NativeFile, path: Path, block_size: int) -> csv.CSVStreamingReader:
    """A block reader of ``source`` (the file ``path`` itself, or a stream that decompresses
    it); errors name ``path``."""
    read = csv.ReadOptions(column_names=list(FIELDS), block_size=block_size)
    # every line is a row (a blank one too, so that row numbers are line numbers); a row with the
    # wrong field count stops the reader and _raise_located finds its line
    parse = csv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=False,
                             invalid_row_handler=lambda row: "error")
    types = {"label": pa.int64(), **{c: pa.int64() for c in INT_COLUMNS},
             **{c: pa.binary() for c in CAT_COLUMNS}}
    convert = csv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=True)
    try:
        return csv.open_csv(source, read_options=read, parse_options=parse,
                            convert_options=convert)
    except pa.ArrowInvalid as e:
        _raise_located(path, 0, e)
    except (OSError, pa.ArrowException) as e:
        _raise_unreadable(path, 0, e)


def _raise_unreadable(path: Path, done: int, error: Exception) -> NoReturn:
    """The reader failed for another reason than a bad line: a gzip stream that ends early or is
    not gzip data, or a read error."""
    where = f"{path} (after line {done})" if done else str(path)
    if path.name.endswith(GZ) and "runcated" in str(error):
        raise DataError(where, "the gzip stream ends early; was the file cut short?") from None
    if path.name.endswith(GZ) and ("zlib" in str(error) or "gzip" in str(error)):
        raise DataError(where, f"is not valid gzip data: {error}") from None
    raise DataError(where, f"cannot read: {error}") from None


def _raise_located(path: Path, done: int, error: Exception) -> NoReturn:
    """The reader stopped in the block after row ``done``: find the first bad line from there
    (a Python scan, on this error path only) and raise a DataError naming it."""
    try:
        with _open_lines(path) as f:
            for number, raw in enumerate(f, start=1):
                if number > done:
                    _check_line(path, number, raw)
    except (EOFError, gzip.BadGzipFile) as e:
        _raise_unreadable(path, done, OSError(f"truncated: {e}"))
    raise DataError(f"{path} (after line {done})", f"cannot parse: {error}")


def _open_lines(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(GZ) else open(path, "rb")  # noqa: SIM115


def _check_line(path: Path, number: int, raw: bytes) -> None:
    line = raw.rstrip(b"\r\n")
    fields = line.split(b"\t")
    where = f"{path}:{number}"
    if len(fields) != len(FIELDS):
        raise DataError(where, f"expected {len(FIELDS)} tab-separated fields (label, "
                        f"I1..I13, C1..C26), found {len(fields)}: {_show(line)}")
    for name, value in zip(FIELDS[:14], fields[:14], strict=True):
        if value and not (_INTEGER.fullmatch(value) and -(1 << 63) <= int(value) < 1 << 63):
            raise DataError(where, f"column {name} holds {_show(value)}, which is not a "
                            "64-bit integer")


def _show(text: bytes, limit: int = 80) -> str:
    shown = text[:limit].decode("utf-8", "replace")
    return repr(shown + ("..." if len(text) > limit else ""))


def transform(batch: pa.RecordBatch, hash_size: int, threshold: float, path: Path,
              first_line: int) -> pa.Table:
    """One parsed block -> output rows; a bad value is a DataError naming its line.

    Example:
        >>> table = transform(batch, 1 << 20, 0.0, Path("train.txt"), first_line=1)
    """
    label = batch.column("label")
    if label.null_count:
        row = int(np.argmax(~np.asarray(label.is_valid())))
        raise DataError(f"{path}:{first_line + row}", "the label is empty (a blank line?)")
    out: dict[str, np.ndarray] = {
        "click": (label.to_numpy().astype(np.float64) > threshold).astype(np.int8)}
    buckets = {}
    for c in INT_COLUMNS:
        col = batch.column(c)
        x = col.fill_null(0).to_numpy()
        present = np.asarray(col.is_valid()) if col.null_count else np.ones(len(x), dtype=bool)
        out[c] = np.log1p(np.maximum(x, 0)).astype(np.float32)
        buckets[f"{c}_bucket"] = log_bucket(x, present)
    out.update(buckets)
    for c in CAT_COLUMNS:
        col = batch.column(c)
        ids, bad = hash_hex(col, hash_size)
        if bad is not None:
            raise DataError(f"{path}:{first_line + bad}", f"column {c} holds "
                            f"{_show(col[bad].as_py())}, which is not a hex string of 1 to "
                            f"{MAX_HEX_DIGITS} digits")
        out[c] = ids
    return pa.table(out, schema=ARROW_SCHEMA)


def describe_columns(hash_size: int, threshold: float) -> list[ColumnInfo]:
    """The column descriptions; the bucket columns' cardinalities are filled in while reading."""
    ctx = Side.CONTEXT  # Criteo's fields are anonymous: no user/item side is known
    return [
        column("click", ColumnRole.LABEL, None, None, f"label > {threshold}"),
        *(column(c, ColumnRole.DENSE, ctx, None, f"log1p(max({c}, 0)); empty -> 0")
          for c in INT_COLUMNS),
        *(column(f"{c}_bucket", ColumnRole.SPARSE, ctx, 1,
                 f"log bucket of {c}: 0 empty, 1 negative, 2..4 for 0..2, 4 + floor(ln(x)^2)")
          for c in INT_COLUMNS),
        *(column(c, ColumnRole.SPARSE, ctx, hash_size + 1,
                 f"(hex value of {c} mod {hash_size}) + 1; empty -> 0") for c in CAT_COLUMNS),
    ]


# --------------------------------------------------------------------------------------------------
# the 1TB layout: a directory of day files


@dataclass(frozen=True)
class DayFile:
    """One ``day_N`` or ``day_N.gz`` file of a day directory."""

    day: int
    path: Path


@dataclass(frozen=True)
class DayTask:
    """What one worker needs to convert one day: plain values only, so it pickles cheaply."""

    day: int
    path: Path
    split: str
    shard_dir: Path  # the day's own folder under OUT.partial/impressions/<split>
    hash_size: int
    threshold: float
    rows_per_shard: int
    row_group_size: int
    block_size: int


@dataclass(frozen=True)
class DayResult:
    """What converting one day wrote: its shard names (within ``shard_dir``) and a summary."""

    day: int
    split: str
    files: list[str]
    rows: int
    clicks: int
    bucket_top: dict[str, int]  # per bucket column: the largest id seen + 1
    in_bytes: int
    seconds: float


class _Stopped(Exception):
    """Another day failed: this worker stops after its current block."""


def find_day_files(directory: Path) -> list[DayFile]:
    """The day files of ``directory`` in day order: a run of consecutive days, each once.

    Names that are not ``day_N`` or ``day_N.gz`` are skipped with one warning; no day file at all,
    a day given twice (``day_3`` and ``day_3.gz``) or a missing day between two others is a
    DataError naming the directory and the days.

    Example:
        >>> [d.path.name for d in find_day_files(Path("criteo-1tb"))][:2]
        ['day_0.gz', 'day_1.gz']
    """
    found: dict[int, Path] = {}
    ignored: list[str] = []
    for path in sorted(directory.iterdir()):
        match = DAY_FILE.fullmatch(path.name)
        if match is None or not path.is_file():
            ignored.append(path.name + ("/" if path.is_dir() else ""))
            continue
        day = int(match.group(1))
        if day in found:
            raise DataError(str(directory), f"holds day {day} twice ({found[day].name} and "
                            f"{path.name}); keep one of them")
        found[day] = path
    if ignored:
        log.warning("%s: ignoring what is not a day_N or day_N.gz file (%d): %s", directory,
                    len(ignored), ", ".join(ignored[:10]) + (" ..." if len(ignored) > 10 else ""))
    if not found:
        seen = f" (it holds {', '.join(ignored[:5])})" if ignored else " (it is empty)"
        raise DataError(str(directory), "holds no Criteo day files day_N or day_N.gz" + seen
                        + "; give the file itself for a single TSV such as train.txt")
    days = sorted(found)
    missing = sorted(set(range(days[0], days[-1] + 1)) - set(days))
    if missing:
        raise DataError(str(directory), f"day files must be consecutive: it has day_{days[0]} to "
                        f"day_{days[-1]} but not {', '.join(f'day_{d}' for d in missing)}")
    return [DayFile(d, found[d]) for d in days]


def split_days(days: list[int], valid_days: int, test_days: int, where: str) -> dict[int, str]:
    """Day -> split: the last ``test_days`` are test, the ``valid_days`` before them valid, the
    rest train (at least one day).

    Example:
        >>> split_days([0, 1, 2, 3], valid_days=1, test_days=1, where="d")
        {0: 'train', 1: 'train', 2: 'valid', 3: 'test'}
    """
    n_train = len(days) - valid_days - test_days
    if n_train < 1:
        raise DataError(where, f"holds {len(days)} day file(s) (day_{days[0]} .. day_{days[-1]}); "
                        f"test_days = {test_days} and valid_days = {valid_days} leave none for "
                        "train")
    splits = ["train"] * n_train + ["valid"] * valid_days + ["test"] * test_days
    return dict(zip(days, splits, strict=True))


def convert_days(directory: Path, out: Path, options: PrepareSpec, *, config_hash: str,
                 progress: bool = True, block_size: int = BLOCK_BYTES) -> DatasetManifest:
    """Convert a directory of day files, one day per task on ``options.workers`` processes, into
    the prepared dataset (see the module docstring).

    Example:
        >>> convert_days(Path("criteo-1tb"), Path("data/criteo-1tb"),
        ...              PrepareSpec(input="criteo-1tb", workers=4), config_hash="0123456789abcdef")
    """
    _refuse_options(options, FRACTION_OPTIONS, f"{directory} is a directory of day files, split "
                    "by days (valid_days / test_days); valid_fraction / test_fraction split a "
                    "single file")
    days = find_day_files(directory)
    split_of = split_days([d.day for d in days], options.valid_days, options.test_days,
                          str(directory))
    for d in days:
        _check_day_text(d.path)
    threshold = label_threshold(options, DEFAULT_LABEL_THRESHOLD)
    columns = describe_columns(options.hash_size, threshold)
    source = {**source_info("criteo", directory, options), "layout": "days",
              "days": {split: [d for d in split_of if split_of[d] == split] for split in SPLITS},
              "files": [d.path.name for d in days]}
    writer = DatasetWriter(out, "criteo", source, config_hash, columns, ARROW_SCHEMA,
                           rows_per_shard=options.rows_per_shard,
                           row_group_size=options.row_group_size)
    width = max(2, len(str(days[-1].day)))
    tasks = [DayTask(d.day, d.path, split_of[d.day],
                     writer.partial / VIEW / split_of[d.day] / f"day_{d.day:0{width}d}",
                     options.hash_size, threshold, options.rows_per_shard,
                     options.row_group_size, block_size) for d in days]
    results = run_days(tasks, options.workers, progress)
    for split in SPLITS:  # every split is listed, even an empty one
        writer.adopt(VIEW, split, [], 0)
    by_name = {c.name: c for c in columns}
    for task, result in zip(tasks, results, strict=True):
        folder = task.shard_dir.relative_to(writer.partial).as_posix()
        writer.adopt(VIEW, result.split, [f"{folder}/{f}" for f in result.files], result.rows)
        for c, top in result.bucket_top.items():
            by_name[c].cardinality = max(by_name[c].cardinality or 1, top)
    if progress:
        print(day_summary(tasks, results), file=sys.stderr)
    return writer.finish()


def _refuse_options(options: PrepareSpec, keys: tuple[str, ...], why: str) -> None:
    """Options that do not apply to this input are an error, not silently ignored."""
    given = [k for k in keys if k in options.model_fields_set]
    if given:
        flags = " / ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"{' / '.join(given)} ({flags}) do not apply: {why}")


def _check_day_text(path: Path) -> None:
    """:func:`check_text` of a day file, decompressing the first bytes of a ``.gz`` one."""
    if not path.name.endswith(GZ):
        if path.stat().st_size == 0:
            raise DataError(str(path), "is empty (0 bytes); expected Criteo TSV lines")
        check_text(path)
        return
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except gzip.BadGzipFile as e:
        raise DataError(str(path), f"is not valid gzip data: {e}") from None
    except EOFError:
        raise DataError(str(path), "the gzip stream ends early; was the file cut short?") from None
    except OSError as e:
        raise DataError(str(path), f"cannot read: {e.strerror or e}") from None
    if not head:
        raise DataError(str(path), "is empty; expected Criteo TSV lines")
    # a character cut by the end of the sniffed bytes is not an error (check_head knows that only
    # when it gets the full SNIFF_BYTES)
    check_head(path, head, utf8=True)


def run_days(tasks: list[DayTask], workers: int, progress: bool) -> list[DayResult]:
    """Convert every day, on ``workers`` processes (in this one when 1), with one progress bar
    over the input bytes of all days; results in the order of ``tasks``.

    Example:
        >>> [r.rows for r in run_days(tasks, workers=2, progress=False)]
        [195841983, 199563535]
    """
    total = sum(t.path.stat().st_size for t in tasks)
    with progress_bar(total=total, desc="criteo days -> parquet", unit="B", unit_scale=True,
                      disable=not progress) as bar:
        if workers == 1 or len(tasks) == 1:
            return [convert_day(t, bar.update, lambda: False) for t in tasks]
        return _run_in_pool(tasks, min(workers, len(tasks)), bar)


def _run_in_pool(tasks: list[DayTask], workers: int, bar: tqdm) -> list[DayResult]:
    # spawn, not fork: forking a process whose Arrow thread pools have run can deadlock
    ctx = multiprocessing.get_context("spawn")
    read_bytes, stop = ctx.Value("q", 0), ctx.Event()
    results: dict[int, DayResult] = {}
    shown = 0
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(read_bytes, stop)) as pool:
        pending = {pool.submit(_convert_day_in_worker, t) for t in tasks}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    result = _result(future)  # re-raises a worker's DataError here
                    results[result.day] = result
                shown = _show_progress(bar, read_bytes, shown)
        except BaseException:
            stop.set()  # the running days stop after their current block
            for future in pending:
                future.cancel()
            raise
    _show_progress(bar, read_bytes, shown)
    return [results[t.day] for t in tasks]


def _result(future: Future[DayResult]) -> DayResult:
    try:
        return future.result()
    except BrokenProcessPool:
        raise RunError("criteo day workers", "a worker process died without an error (killed "
                       "for memory? its own message, if any, is above); try fewer --workers"
                       ) from None


def _show_progress(bar: tqdm, read_bytes: Synchronized, shown: int) -> int:
    now = read_bytes.value
    bar.update(now - shown)
    return now


_WORKER: tuple[Synchronized, EventType] | None = None  # (bytes read, stop) in a worker process


def _init_worker(read_bytes: Synchronized, stop: EventType) -> None:
    global _WORKER
    _WORKER = (read_bytes, stop)


def _convert_day_in_worker(task: DayTask) -> DayResult:
    assert _WORKER is not None, "the pool's initializer sets _WORKER"
    read_bytes, stop = _WORKER

    def report(n: int) -> None:
        with read_bytes.get_lock():
            read_bytes.value += n

    return convert_day(task, report, stop.is_set)


def convert_day(task: DayTask, report: Callable[[int], object],
                stopped: Callable[[], bool]) -> DayResult:
    """Stream one day file into its own shards under ``task.shard_dir``.

    ``report(n)`` is told of every ``n`` input bytes read (the progress bar); ``stopped()`` is
    asked before each block, so that a failure elsewhere stops this day soon.

    Example:
        >>> convert_day(task, report=bar.update, stopped=lambda: False).rows
        195841983
    """
    start = time.perf_counter()
    size = task.path.stat().st_size
    shards = ShardWriter(task.shard_dir, ARROW_SCHEMA, task.rows_per_shard, task.row_group_size)
    top = dict.fromkeys(BUCKET_COLUMNS, 1)
    rows = clicks = reported = 0
    gz = task.path.name.endswith(GZ)
    with hint_cut_short(*([] if gz else [task.path])), pa.OSFile(str(task.path)) as raw:
        reader = _open(pa.CompressedInputStream(raw, "gzip") if gz else raw, task.path,
                       task.block_size)
        while True:
            if stopped():
                raise _Stopped(f"day {task.day}")
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as e:
                _raise_located(task.path, rows, e)
            except (OSError, pa.ArrowException) as e:
                _raise_unreadable(task.path, rows, e)
            table = transform(batch, task.hash_size, task.threshold, task.path, rows + 1)
            for c in BUCKET_COLUMNS:
                top[c] = max(top[c], int(np.max(table.column(c).to_numpy(), initial=0)) + 1)
            clicks += int(np.count_nonzero(table.column("click").to_numpy()))
            shards.write(table)
            rows += table.num_rows
            report(raw.tell() - reported)
            reported = raw.tell()
    if rows == 0:
        raise DataError(str(task.path), "holds no lines; expected Criteo TSV lines")
    files = shards.close()
    report(size - reported)
    return DayResult(task.day, task.split, files, rows, clicks, top, size,
                     time.perf_counter() - start)


def day_summary(tasks: list[DayTask], results: list[DayResult]) -> str:
    """One line per day (file, split, rows, click rate, input size, the speed of the process that
    converted it) and a total.

    Example:
        >>> print(day_summary(tasks, results))
        | day | file     | split |    rows | click rate | MB in | rows/s |
        ...
    """
    def line(label: object, name: str, split: str, rs: list[DayResult]) -> list[object]:
        n, seconds = sum(r.rows for r in rs), sum(r.seconds for r in rs)
        return [label, name, split, n, f"{sum(r.clicks for r in rs) / max(n, 1):.4f}",
                f"{sum(r.in_bytes for r in rs) / 1e6:.1f}", round(n / max(seconds, 1e-9))]

    body = [line(t.day, t.path.name, r.split, [r]) for t, r in zip(tasks, results, strict=True)]
    body.append(line("all", f"{len(results)} files", "", results))
    return format_table(["day", "file", "split", "rows", "click rate", "MB in", "rows/s"], body)
