"""What the adapters share: split sizes, line counting, checks of raw text, the positional split
writer and the description of a column.

The adapters import these from here, not from :mod:`recsys.data.adapters`, which imports the
adapters (by name, in :func:`~recsys.data.adapters.prepare`) and re-exports these helpers.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.parquet import DatasetWriter
from recsys.data.schema import SPLITS, ColumnInfo, ColumnRole, DatasetManifest
from recsys.errors import DataError
from recsys.progress import progress_bar
from recsys.spec import PrepareSpec, Side

ADAPTERS = __name__.rpartition(".")[0]  # recsys.data.adapters, the package of the adapters
VIEW = "impressions"
COUNT_CHUNK_BYTES = 1 << 24  # how much of a file line counting holds in memory at once
SNIFF_BYTES = 1 << 16  # how much of a raw file check_text reads to tell its encoding
# byte-order marks of text that is not UTF-8, longest first (UTF-32LE's starts like UTF-16LE's)
FOREIGN_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


# PrepareSpec keys that every config hash has held from the start; keys added since join it only
# when set away from their default, so a new option never orphans the datasets prepared before it
HASHED_ALWAYS = frozenset({"label_threshold", "valid_fraction", "test_fraction", "hash_size",
                           "rows_per_shard", "row_group_size"})
# input: its resolved path stands for it; workers: the output is the same for any number of them
NOT_HASHED = frozenset({"input", "workers"})


def recorded_options(options: PrepareSpec) -> dict[str, object]:
    """The options that shape a prepared dataset, as hashed and recorded in ``dataset.json``.

    Example:
        >>> sorted(recorded_options(PrepareSpec(input="x", workers=4, test_days=2)))
        ['hash_size', 'label_threshold', 'row_group_size', 'rows_per_shard', 'test_days', \
'test_fraction', 'valid_fraction']
    """
    fields = type(options).model_fields
    return {key: value for key, value in options.model_dump(mode="json", exclude=NOT_HASHED).items()
            if key in HASHED_ALWAYS
            or getattr(options, key) != fields[key].get_default(call_default_factory=True)}


def source_info(fmt: str, input: Path, options: PrepareSpec) -> dict[str, object]:
    """What ``dataset.json`` records about where a prepared dataset came from."""
    return {"adapter": f"{ADAPTERS}.{fmt}", "format": fmt, "input": str(input.resolve()),
            "options": recorded_options(options)}


def split_sizes(n: int, valid_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, valid, test) row counts: the last ``test_fraction`` of ``n`` rows are test, the
    ``valid_fraction`` before them valid (each rounded half up), the rest train.

    Example:
        >>> split_sizes(100, 0.1, 0.15)
        (75, 10, 15)
    """
    test = min(n, math.floor(n * test_fraction + 0.5))
    valid = min(n - test, math.floor(n * valid_fraction + 0.5))
    return n - valid - test, valid, test


def count_lines(path: Path, chunk_bytes: int = COUNT_CHUNK_BYTES) -> int:
    """Lines in a text file (a last line without a newline counts), read in fixed-size chunks so
    that a file of many GB never sits in memory.

    Example:
        >>> count_lines(Path("train.txt"))
        45840617
    """
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def check_text(path: Path, *, utf8: bool = True) -> None:
    """Refuse a raw file that is not text in the encoding its reader expects, from its first
    :data:`SNIFF_BYTES`: a UTF-16/32 byte-order mark, NUL bytes (UTF-16 without a mark, or a
    binary file) and, where the reader expects UTF-8 (``utf8``), bytes that are not UTF-8. The
    parsers would otherwise report a baffling parse error, or read garbage.

    Example:
        >>> check_text(Path("ratings.csv"))  # DataError: ratings.csv: is UTF-16LE text ...
    """
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        raise DataError(str(path), f"cannot read: {e.strerror or e}") from None
    check_head(path, head, utf8=utf8)


def check_head(path: Path, head: bytes, *, utf8: bool = True) -> None:
    """:func:`check_text` of the first bytes ``head`` of ``path``'s text, however they were read
    (e.g. decompressed from a ``.gz`` file).

    Example:
        >>> check_head(Path("day_0.gz"), gzip.open("day_0.gz").read(SNIFF_BYTES))
    """
    for bom, name in FOREIGN_BOMS:
        if head.startswith(bom):
            raise DataError(str(path), f"is {name} text (it starts with a {name} byte-order "
                            f"mark), not UTF-8; convert it, e.g. iconv -f {name} -t UTF-8")
    nul = head.find(b"\0")
    if nul >= 0:
        raise DataError(str(path), f"holds NUL bytes (the first at offset {nul}), so it is not "
                        "UTF-8 text (UTF-16 without a byte-order mark? a binary file?)")
    if utf8:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            # a character cut by the end of the sniffed bytes is not an error
            if not (e.reason == "unexpected end of data" and len(head) == SNIFF_BYTES):
                raise DataError(f"{path}:{_line_at(head, e.start)}", "is not UTF-8 text (byte "
                                f"0x{head[e.start]:02x} at offset {e.start}); convert it to "
                                "UTF-8") from None


def _line_at(text: bytes, offset: int) -> int:
    return text.count(b"\n", 0, offset) + 1


def unterminated_last_line(path: Path) -> int | None:
    """The number of the file's last line if it does not end in a newline; None if it does (or
    the file is empty).

    Example:
        >>> unterminated_last_line(Path("a.libfm"))  # "1 0:1\n0 2:" -> 2
        2
    """
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return None
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return None
    return count_lines(path)


@contextlib.contextmanager
def hint_cut_short(*paths: Path) -> Iterator[None]:
    """Say so when a DataError names the last line of one of ``paths`` and that line has no final
    newline: the file was most likely cut short (an interrupted download or copy).

    Example:
        >>> with hint_cut_short(path):
        ...     parse(path)  # DataError: a.libfm:2: ... (the last line, with no final newline: ...)
    """
    try:
        yield
    except DataError as e:
        file, _, line = e.where.rpartition(":")
        if not (line.isdigit() and file in {str(p) for p in paths}
                and unterminated_last_line(Path(file)) == int(line)):
            raise
        message = str(e)[len(e.where) + 2:]
        raise DataError(e.where, f"{message} (the last line, with no final newline: was the file "
                        "cut short?)") from None


def first_bad_cast(values: pa.Array, typ: pa.DataType) -> int | None:
    """Index of the first value of ``values`` that does not cast to ``typ`` (None if all do).

    One cast of the whole array when it is clean; on failure a bisection (log n casts), so the
    error path stays vectorised too.

    Example:
        >>> first_bad_cast(pa.array(["1", "2", "x", "y"]), pa.int64())
        2
    """
    if _casts(values, typ):
        return None
    lo, hi = 0, len(values)  # the first bad value lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _casts(values.slice(lo, mid - lo), typ) else (lo, mid)
    return lo


def _casts(values: pa.Array, typ: pa.DataType) -> bool:
    try:
        pc.cast(values, typ)
    except pa.ArrowInvalid:
        return False
    return True


def label_threshold(options: PrepareSpec, default: float) -> float:
    return default if options.label_threshold is None else options.label_threshold


class PositionalSplitWriter:
    """Writes the rows of a file read front to back, in blocks, into train / valid / test by
    position (the last ``test_fraction`` of lines are test, the ``valid_fraction`` before them
    valid), with a progress bar. ``done`` is the number of rows written so far, so the next block
    starts at line ``done + 1`` (for error messages).

    Example:
        >>> w = PositionalSplitWriter("libfm", path, out, options, columns, schema, chash)
        >>> for table in blocks: w.write(table)
        >>> manifest = w.finish()
    """

    def __init__(self, fmt: str, input: Path, out: Path, options: PrepareSpec,
                 columns: list[ColumnInfo], schema: pa.Schema, config_hash: str,
                 progress: bool = True) -> None:
        self.input = input
        self.total = count_lines(input)
        if self.total == 0:  # an empty dataset would only fail later, far from its cause
            raise DataError(str(input), f"is empty (0 bytes); expected {fmt} lines")
        sizes = split_sizes(self.total, options.valid_fraction, options.test_fraction)
        self.bounds = [0, sizes[0], sizes[0] + sizes[1], self.total]
        self.writer = DatasetWriter(out, fmt, source_info(fmt, input, options), config_hash,
                                    columns, schema, rows_per_shard=options.rows_per_shard,
                                    row_group_size=options.row_group_size)
        for split in SPLITS:  # every split is listed, even an empty one
            self.writer.write(VIEW, split, schema.empty_table())
        self.done = 0
        self.bar = progress_bar(total=self.total, desc=f"{fmt} -> parquet", unit="line",
                        unit_scale=True, disable=not progress)

    def write(self, table: pa.Table) -> None:
        for split, lo, hi in zip(SPLITS, self.bounds[:-1], self.bounds[1:], strict=True):
            a, b = max(lo, self.done), min(hi, self.done + table.num_rows)
            if a < b:
                self.writer.write(VIEW, split, table.slice(a - self.done, b - a))
        self.done += table.num_rows
        self.bar.update(table.num_rows)

    def finish(self) -> DatasetManifest:
        self.bar.close()
        if self.done != self.total:
            raise DataError(str(self.input), f"read {self.done} rows but counted {self.total} "
                            "lines; did the file change while it was read?")
        return self.writer.finish()


def column(name: str, role: ColumnRole, side: Side | None = None, cardinality: int | None = None,
           description: str = "") -> ColumnInfo:
    """A :class:`ColumnInfo` in one line (positional, as the adapters' column tables read best)."""
    return ColumnInfo(name=name, role=role, side=side, cardinality=cardinality,
                      description=description)
