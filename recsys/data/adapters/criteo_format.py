"""The Criteo TSV line format (:mod:`recsys.data.adapters.criteo`): the columns, the log buckets
of the integer fields, the hashing of the categorical ones, the streamed reader, and errors that
name the file, the line and the column. The single-file adapter and the day-directory one
(:mod:`recsys.data.adapters.criteo_days`) both convert lines with these.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import BinaryIO, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.csv as csv

from recsys.data.adapters.common import column
from recsys.data.schema import ColumnInfo, ColumnRole
from recsys.errors import DataError, UsageError
from recsys.spec import PrepareSpec, Side

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


def open_reader(source: Path | pa.NativeFile, path: Path, block_size: int
                ) -> csv.CSVStreamingReader:
    """A block reader of ``source`` (the file ``path`` itself, or a stream that decompresses
    it); errors name ``path``."""
    read = csv.ReadOptions(column_names=list(FIELDS), block_size=block_size)
    # every line is a row (a blank one too, so that row numbers are line numbers); a row with the
    # wrong field count stops the reader and raise_located finds its line
    parse = csv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=False,
                             invalid_row_handler=lambda row: "error")
    types = {"label": pa.int64(), **{c: pa.int64() for c in INT_COLUMNS},
             **{c: pa.binary() for c in CAT_COLUMNS}}
    convert = csv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=True)
    try:
        return csv.open_csv(source, read_options=read, parse_options=parse,
                            convert_options=convert)
    except pa.ArrowInvalid as e:
        raise_located(path, 0, e)
    except (OSError, pa.ArrowException) as e:
        raise_unreadable(path, 0, e)


def raise_unreadable(path: Path, done: int, error: Exception) -> NoReturn:
    """The reader failed for another reason than a bad line: a gzip stream that ends early or is
    not gzip data, or a read error."""
    where = f"{path} (after line {done})" if done else str(path)
    if path.name.endswith(GZ) and "runcated" in str(error):
        raise DataError(where, "the gzip stream ends early; was the file cut short?") from None
    if path.name.endswith(GZ) and ("zlib" in str(error) or "gzip" in str(error)):
        raise DataError(where, f"is not valid gzip data: {error}") from None
    raise DataError(where, f"cannot read: {error}") from None


def raise_located(path: Path, done: int, error: Exception) -> NoReturn:
    """The reader stopped in the block after row ``done``: find the first bad line from there
    (a Python scan, on this error path only) and raise a DataError naming it."""
    try:
        with _open_lines(path) as f:
            for number, raw in enumerate(f, start=1):
                if number > done:
                    _check_line(path, number, raw)
    except (EOFError, gzip.BadGzipFile) as e:
        raise_unreadable(path, done, OSError(f"truncated: {e}"))
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


def refuse_options(options: PrepareSpec, keys: tuple[str, ...], why: str) -> None:
    """Options that do not apply to this input are an error, not silently ignored."""
    given = [k for k in keys if k in options.model_fields_set]
    if given:
        flags = " / ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"{' / '.join(given)} ({flags}) do not apply: {why}")
