"""Adapters: raw public formats (MovieLens, Criteo TSV, libFM) -> prepared Parquet datasets.

Every adapter writes one view, ``impressions``, with the splits ``train``, ``valid`` and ``test``
through :class:`~recsys.data.parquet.DatasetWriter`, and describes every column in ``dataset.json``
(role, side, cardinality, description). Conventions shared by all of them:

* ids are int64, dense values float32, labels int8, multi-valued features ``list<int64>``;
* id 0 means "unknown / missing" in every vocabulary an adapter builds, so its cardinality is the
  vocabulary size + 1 (ids lie in ``[0, cardinality)``);
* the splits are temporal (MovieLens: by timestamp) or positional (Criteo, libFM: file order):
  the last ``test_fraction`` of rows are test, the ``valid_fraction`` before them valid, so no split
  sees the future of a later one.

:func:`prepare` is the entry point; a dataset already prepared with the same format, input and
options is returned as it is, so calling it again is cheap.

Example:
    >>> manifest = prepare("movielens", "../shared/data/ml-latest-small", "data/movielens")
    >>> manifest.rows["impressions"]
    {'train': 80668, 'valid': 10084, 'test': 10084}
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.parquet import DatasetWriter, claim_output, current_dataset, dataset_write
from recsys.data.schema import SPLITS, ColumnInfo, ColumnRole, DatasetManifest
from recsys.errors import DataError
from recsys.progress import progress_bar
from recsys.spec import PrepareSpec, Side

FORMATS = ("movielens", "criteo", "libfm")
VIEW = "impressions"
COUNT_CHUNK_BYTES = 1 << 24  # how much of a file line counting holds in memory at once
SNIFF_BYTES = 1 << 16  # how much of a raw file check_text reads to tell its encoding
# byte-order marks of text that is not UTF-8, longest first (UTF-32LE's starts like UTF-16LE's)
FOREIGN_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def prepare(fmt: str, input: str | Path, out: str | Path, options: PrepareSpec | None = None, *,
            force: bool = False, progress: bool = True) -> DatasetManifest:
    """Convert the raw files of ``fmt`` at ``input`` into a prepared dataset directory ``out``.

    ``input`` says where the raw files are (``options.input`` is not read here: the caller resolves
    it, e.g. relative to the working directory). An ``out`` that already holds a dataset prepared
    from the same format, input and options is returned untouched; one prepared from anything else
    is an error unless ``force``. The write holds the dataset's lock (a second writer of ``out``
    gets a RunError at once); a failed one removes ``OUT.partial`` and leaves ``out`` as it was.

    Args:
        fmt: one of :data:`FORMATS`.
        input: MovieLens: the directory of the release; Criteo, libFM: the file.
        out: the dataset directory to write (``dataset.json`` + Parquet shards).
        options: splits, label threshold, hashing and shard sizes (defaults when None).
        force: replace a dataset in ``out`` that was prepared from something else.
        progress: show a progress bar.

    Example:
        >>> opts = PrepareSpec(input="train.txt", hash_size=1 << 18)
        >>> m = prepare("criteo", "train.txt", "data/criteo", opts)
        >>> [c.name for c in m.columns][:3]
        ['click', 'I1', 'I2']
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown raw format '{fmt}' (known: {', '.join(FORMATS)})")
    input = Path(input)
    out = Path(out)
    if not input.exists():
        raise DataError(str(input), f"not found (the raw {fmt} input to prepare)")
    options = options if options is not None else PrepareSpec(input=str(input))
    chash = config_hash(fmt, input, options)
    existing = current_dataset(out, chash)  # the common case, a complete dataset: no lock
    if existing is not None:
        return existing
    with dataset_write(out):  # one writer per path; a failure removes OUT.partial
        existing = claim_output(out, chash, force)
        if existing is not None:  # another writer finished it between our first look and now
            return existing
        module = importlib.import_module(f"{__name__}.{fmt}")
        return module.convert(input, out, options, config_hash=chash, progress=progress)


def config_hash(fmt: str, input: str | Path, options: PrepareSpec) -> str:
    """16 hex digits that identify a preparation: format, absolute input path and options.

    ``options.input`` is left out: the resolved path stands for it, so a spec read from another
    working directory still finds its dataset.

    Example:
        >>> len(config_hash("libfm", "a.libfm", PrepareSpec(input="a.libfm")))
        16
    """
    canon = json.dumps({"format": fmt, "input": str(Path(input).resolve()),
                        "options": options.model_dump(mode="json", exclude={"input"})},
                       sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def source_info(fmt: str, input: Path, options: PrepareSpec) -> dict[str, object]:
    """What ``dataset.json`` records about where a prepared dataset came from."""
    return {"adapter": f"{__name__}.{fmt}", "format": fmt, "input": str(input.resolve()),
            "options": options.model_dump(mode="json", exclude={"input"})}


# --------------------------------------------------------------------------------------------------
# helpers shared by the adapters


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


__all__ = ["FORMATS", "VIEW", "PositionalSplitWriter", "check_text", "column", "config_hash",
           "count_lines", "first_bad_cast", "hint_cut_short", "label_threshold", "prepare",
           "source_info", "split_sizes", "unterminated_last_line"]
