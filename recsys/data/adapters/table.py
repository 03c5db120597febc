"""Any table (Parquet or CSV, one file or a folder of them) -> a prepared dataset, streamed.

The options (:class:`~recsys.spec.PrepareSpec`, ``recsys data prepare table``) say which input
column is what; only the columns they name are read and written:

===================  ==============  ==========================================================
option               output column   what it becomes
===================  ==============  ==========================================================
``label``            (same name)     label, int8 0/1: 0/1 numbers or booleans; with
                                     ``label_threshold``, 1 where the number is >= it
``user``             ``user_id``     sparse, user side (also the user group of GAUC)
``item``             ``item_id``     sparse, item side
``sparse``           (same names)    sparse; ``NAME:user|item|context`` (default context)
``multi``            (same names)    multi_sparse: Arrow lists, or strings split on
                                     ``delimiter`` (empty items dropped)
``dense``            (same names)    dense float32, scaled by ``dense_scale``; null -> 0
``request``          ``request_id``  the request group: contiguous ids 1..R (0 = missing)
``time``             ``timestamp``   kept as it is (not a feature); orders the time split
===================  ==============  ==========================================================

Every id column (user, item, sparse, multi) gets a vocabulary built from the TRAIN rows only
(no test leakage): the raw values (strings or integers) seen at least ``min_count`` times, most
frequent first, as ids 1..V; rarer, unseen and missing values are 0. With ``hash_buckets = N``
every id column is instead ``stable_hash(value) % N`` (:mod:`recsys.data.vocab`). Both are
recorded in ``dataset.json`` ``vocabularies`` and the vocabulary files in ``vocab/``.

Splits (``split``): ``time`` puts the last ``test_fraction`` of rows by time into test and the
``valid_fraction`` before them into valid; the cut-offs come from the exact count of every
distinct timestamp (memory grows with the distinct timestamps, like a vocabulary, and the
fractions are exact up to ties), and rows with equal timestamps always share a split.
``random`` draws each row's split from a counter-based hash of (``seed``, row number), so it
does not depend on how the input is cut into blocks or files. ``column:NAME`` reads train /
valid / test from a column.

The input is read once, in blocks (memory flat in its size): each block is checked and decoded
into typed columns, spilled to a temporary Arrow stream beside the output and counted
(vocabularies, request ids, time stamps, dense statistics on train). A time split needs one more
read of the spill to count the train rows once the cut-offs are known. The last read maps ids,
scales dense values and writes the Parquet shards of view ``impressions``. A bad value is a
DataError naming the file, the row (CSV: the line) and the column; nothing is published unless
every row converted.

Example:
    >>> from recsys.data.adapters import prepare
    >>> opts = PrepareSpec(input="events.parquet", label="clicked", user="uid", item="sku",
    ...                    time="ts", sparse=["city:user"], dense=["price"], dense_scale="log")
    >>> m = prepare("table", "events.parquet", "data/events", opts)
    >>> m.vocabularies["user_id"].size
    5001
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
import pyarrow.parquet as pq
import pyarrow.types as pat

from recsys.data.adapters.common import (
    SNIFF_BYTES,
    VIEW,
    check_head,
    check_text,
    column,
    first_bad_cast,
    source_info,
    split_sizes,
)
from recsys.data.parquet import DatasetWriter
from recsys.data.schema import (
    REQUEST_ID,
    SPLITS,
    USER_GROUP,
    USER_ID,
    ColumnInfo,
    ColumnRole,
    DatasetManifest,
    VocabKind,
)
from recsys.data.schema import DenseScaling as Scaling
from recsys.data.vocab import (
    STRING,
    ValueCounter,
    Vocabulary,
    VocabularyBuilder,
    hashed,
    mix64,
    value_type_of,
)
from recsys.errors import DataError, UsageError
from recsys.progress import progress_bar
from recsys.spec import PrepareSpec, Side

ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
SPLIT = "__split"  # the spill's split code column (not written)
UNKNOWN_SPLIT = -1  # a time split's rows before the cut-offs are known
CSV_BLOCK_BYTES = 1 << 24  # CSV text per parsed block
PARQUET_BLOCK_ROWS = 1 << 18  # Parquet rows per read batch
CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
TIME_TYPES = (pa.int64(), pa.float64(), pa.timestamp("us"))  # tried in order on CSV text
STRING_IDS = pa.dictionary(pa.int32(), pa.string())  # string ids, as decoded


# --------------------------------------------------------------------------------------------------
# which input column becomes what


@dataclass(frozen=True)
class Feature:
    """One feature column: its input column, output name, role and side."""

    source: str
    name: str
    role: ColumnRole
    side: Side


@dataclass(frozen=True)
class Layout:
    """The table options resolved: the output columns and the input columns they come from.

    Example:
        >>> Layout.from_options(PrepareSpec(input="t.csv", label="y", user="uid")).inputs()
        ['y', 'uid']
    """

    label: str
    features: tuple[Feature, ...]
    time: str | None
    request: str | None
    split: str  # "time", "random" or "column"
    split_column: str | None

    @classmethod
    def from_options(cls, options: PrepareSpec) -> Layout:
        problem = options.format_problem("table")
        if problem is not None:
            raise UsageError(f"{problem[0]}: {problem[1]}")
        assert options.label is not None  # format_problem checked it
        features: list[Feature] = []
        if options.user:
            features.append(Feature(options.user, USER_ID, ColumnRole.SPARSE, Side.USER))
        if options.item:
            features.append(Feature(options.item, ITEM_ID, ColumnRole.SPARSE, Side.ITEM))
        for key, role in (("sparse", ColumnRole.SPARSE), ("multi", ColumnRole.MULTI_SPARSE),
                          ("dense", ColumnRole.DENSE)):
            for entry in getattr(options, key) or []:
                name, _, side = entry.partition(":")
                features.append(Feature(name, name, role, Side(side or Side.CONTEXT)))
        split, split_column = options.table_split()
        layout = cls(options.label, tuple(features), options.time, options.request, split,
                     split_column)
        layout._check_names()
        return layout

    def _check_names(self) -> None:
        names = self.outputs()
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise UsageError(f"two options write output column '{name}' (outputs: "
                                 f"{', '.join(names)}); rename one")
            if name.startswith("__") or "/" in name or "\\" in name:
                raise UsageError(f"output column '{name}': a name must not start with '__' or "
                                 "hold a path separator")
            seen.add(name)

    def outputs(self) -> list[str]:
        """The output columns, in the order they are written."""
        names = [REQUEST_ID] if self.request else []
        names += [USER_GROUP] if self.has_user else []
        names += [f.name for f in self.features] + [self.label]
        return names + ([TIMESTAMP] if self.time else [])

    @property
    def has_user(self) -> bool:
        return any(f.name == USER_ID for f in self.features)

    def inputs(self) -> list[str]:
        """The input columns to read, each once."""
        return list(self.roles())

    def roles(self) -> dict[str, str]:
        """Input column -> the option that names it (the first one, where several do)."""
        roles: dict[str, str] = {self.label: "the label"}
        for f in self.features:
            what = {USER_ID: "the user column", ITEM_ID: "the item column"}.get(
                f.name, f"a {f.role} column")
            roles.setdefault(f.source, what)
        if self.request:
            roles.setdefault(self.request, "the request column")
        if self.time:
            roles.setdefault(self.time, "the time column")
        if self.split_column:
            roles.setdefault(self.split_column, "the split column")
        return roles

    @property
    def ids(self) -> list[Feature]:
        return [f for f in self.features if f.role != ColumnRole.DENSE]

    @property
    def dense(self) -> list[Feature]:
        return [f for f in self.features if f.role == ColumnRole.DENSE]


# --------------------------------------------------------------------------------------------------
# reading the input


def find_inputs(input: Path) -> tuple[list[Path], str]:
    """The files to read, in order, and their format ("csv" or "parquet"): ``input`` itself, or
    the files of the folder ``input`` sorted by name (hidden files and ``_``-prefixed markers
    such as ``_SUCCESS`` skipped).

    Example:
        >>> find_inputs(Path("events/"))
        ([PosixPath('events/part-0.parquet'), PosixPath('events/part-1.parquet')], 'parquet')
    """
    if input.is_dir():
        files = sorted(p for p in input.iterdir() if not p.name.startswith((".", "_")))
        if not files:
            raise DataError(str(input), "holds no files; expected Parquet or CSV files")
    else:
        files = [input]
    kinds = {p: _kind(p) for p in files}
    unknown = [p.name for p, k in kinds.items() if k is None]
    if unknown:
        raise DataError(str(input), f"{', '.join(unknown[:5])}: not a table file (expected "
                        f"{', '.join(PARQUET_SUFFIXES + CSV_SUFFIXES)})")
    found = sorted({k for k in kinds.values() if k})
    if len(found) > 1:
        raise DataError(str(input), "mixes CSV and Parquet files; convert them to one format "
                        "(or prepare them apart)")
    bad = [p for p in files if not p.is_file()]
    if bad:
        raise DataError(str(bad[0]), "is not a file")
    return files, found[0]


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    return None


def input_columns(path: Path, kind: str) -> list[str]:
    """The column names of one input file (a CSV file's header)."""
    if kind == "parquet":
        try:
            return list(pq.read_schema(path).names)
        except (OSError, pa.ArrowException) as e:
            raise DataError(str(path), f"not a readable Parquet file: {e}") from None
    _check_csv_text(path)
    try:
        reader = csv.open_csv(path, read_options=csv.ReadOptions(block_size=1 << 20),
                              convert_options=csv.ConvertOptions(include_columns=[]))
    except (OSError, pa.ArrowException) as e:
        raise DataError(str(path), f"cannot read the CSV header: {e}") from None
    return list(reader.schema.names)


def _check_csv_text(path: Path) -> None:
    if path.name.lower().endswith(".gz"):
        try:
            with pa.input_stream(str(path), compression="gzip") as f:
                head = f.read(SNIFF_BYTES)
        except (OSError, pa.ArrowException) as e:
            raise DataError(str(path), f"cannot read as gzip: {e}") from None
        check_head(path, head)
    else:
        check_text(path)


def check_columns(path: Path, have: list[str], layout: Layout) -> None:
    """Every column the options name is in the file, once."""
    for name, what in layout.roles().items():
        count = have.count(name)
        if count != 1:
            problem = "has no column" if count == 0 else f"has {count} columns named"
            raise DataError(str(path), f"{problem} '{name}' ({what}); its columns: "
                            f"{', '.join(have)}")


@dataclass
class Block:
    """A block of input rows: its columns, its file, the file's row number of its first row
    (0-based) and its running row number in the whole input."""

    batch: pa.RecordBatch
    path: Path
    first_row: int
    first_global: int
    csv: bool

    def where(self, i: int) -> str:
        """Where row ``i`` of the block is: a CSV file's line, a Parquet file's row (from 1)."""
        row = self.first_row + i + 1
        return f"{self.path}:{row + 1}" if self.csv else f"{self.path} row {row}"


def read_blocks(files: list[Path], kind: str, columns: list[str], ids: set[str],
                csv_block_bytes: int = CSV_BLOCK_BYTES,
                parquet_block_rows: int = PARQUET_BLOCK_ROWS) -> Iterator[Block]:
    """The input's rows in blocks, file by file. CSV values come as strings, converted later so
    that every block of every file has the same types; the single-id columns ``ids`` come
    dictionary-encoded when they hold text (each distinct value of a block is then decoded,
    counted and mapped once)."""
    done = 0
    for path in files:
        rows = 0
        batches = (_parquet_batches(path, columns, ids, parquet_block_rows) if kind == "parquet"
                   else _csv_batches(path, columns, ids, csv_block_bytes))
        for batch in batches:
            yield Block(batch, path, rows, done, kind == "csv")
            rows += batch.num_rows
            done += batch.num_rows


def _parquet_batches(path: Path, columns: list[str], ids: set[str],
                     rows: int) -> Iterator[pa.RecordBatch]:
    try:
        schema = pq.read_schema(path)
        text = [c for c in ids if pat.is_string(schema.field(c).type)
                or pat.is_large_string(schema.field(c).type)]
        f = pq.ParquetFile(path, read_dictionary=text)
        yield from f.iter_batches(batch_size=rows, columns=columns, use_threads=False)
    except (OSError, pa.ArrowException) as e:
        raise DataError(str(path), f"cannot read: {e}") from None


def _csv_batches(path: Path, columns: list[str], ids: set[str],
                 block_bytes: int) -> Iterator[pa.RecordBatch]:
    types = {c: STRING_IDS if c in ids else pa.string() for c in columns}
    convert = csv.ConvertOptions(column_types=types,
                                 include_columns=columns, null_values=[""],
                                 strings_can_be_null=True)
    rows = 0
    try:
        reader = csv.open_csv(path, read_options=csv.ReadOptions(block_size=block_bytes),
                              convert_options=convert)
        for batch in reader:
            yield batch
            rows += batch.num_rows
    except pa.ArrowInvalid as e:
        raise DataError(f"{path} (after line {rows + 1})", f"cannot parse: {e}") from None
    except (OSError, pa.ArrowException) as e:
        raise DataError(str(path), f"cannot read: {e}") from None


def count_rows(files: list[Path], kind: str) -> int | None:
    """Rows of Parquet input from the footers (None for CSV: unknown until read)."""
    if kind != "parquet":
        return None
    return sum(pq.ParquetFile(p).metadata.num_rows for p in files)


# --------------------------------------------------------------------------------------------------
# decoding one block into typed columns


def _first_null(arr: pa.Array) -> int:
    return int(np.argmax(~np.asarray(arr.is_valid())))


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _cast_or_raise(arr: pa.Array, typ: pa.DataType, block: Block, name: str,
                   expected: str) -> pa.Array:
    """``arr`` cast to ``typ``; the first value that does not cast is a DataError naming it."""
    try:
        return pc.cast(arr, typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        bad = first_bad_cast(arr, typ)
        if bad is None:  # only a type that cannot cast at all gets here
            raise DataError(str(block.path), f"column '{name}' has type {arr.type}; expected "
                            f"{expected}") from None
        raise DataError(block.where(bad), f"column '{name}' holds {_show(arr[bad].as_py())}, "
                        f"which is not {expected}") from None


def decode_label(arr: pa.Array, name: str, threshold: float | None, block: Block) -> pa.Array:
    """0/1 numbers, booleans (true/false in CSV) or, with ``threshold``, any number (1 where
    >= threshold) -> int8; anything else, a missing or NaN label is a DataError."""
    if arr.null_count:
        raise DataError(block.where(_first_null(arr)), f"the label column '{name}' is empty")
    if pat.is_string(arr.type) or pat.is_large_string(arr.type):
        if _casts(arr, pa.float64()):
            arr = pc.cast(arr, pa.float64())
        elif threshold is None and _casts(arr, pa.bool_()):
            arr = pc.cast(arr, pa.bool_())
        else:
            bad = first_bad_cast(arr, pa.float64()) or 0
            raise DataError(block.where(bad), f"the label column '{name}' holds "
                            f"{_show(arr[bad].as_py())}; expected 0/1, true/false or (with "
                            "label_threshold) a number")
    if pat.is_boolean(arr.type):
        if threshold is not None:
            raise DataError(str(block.path), f"the label column '{name}' holds booleans; "
                            "label_threshold applies to a numeric label only")
        return pc.cast(arr, pa.int8())
    if not (pat.is_integer(arr.type) or pat.is_floating(arr.type)):
        raise DataError(str(block.path), f"the label column '{name}' has type {arr.type}; "
                        "expected 0/1 numbers or booleans")
    x = arr.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.isnan(x) if threshold is not None else (x != 0) & (x != 1)
    if bad.any():
        i = int(np.argmax(bad))
        hint = "" if threshold is not None else " (label_threshold / --label-threshold " \
            "turns a numeric label into 0/1)"
        raise DataError(block.where(i), f"the label column '{name}' holds {_show(x[i].item())}; "
                        f"expected 0 or 1{hint}")
    return pa.array((x >= threshold if threshold is not None else x).astype(np.int8))


def decode_dense(arr: pa.Array, name: str, block: Block) -> pa.Array:
    """Numbers (or numeric text) -> float64; NaN counts as missing (null); an infinite value or
    text that is not a number is a DataError."""
    if pat.is_boolean(arr.type):
        arr = pc.cast(arr, pa.int8())
    if not (pat.is_integer(arr.type) or pat.is_floating(arr.type) or pat.is_decimal(arr.type)
            or pat.is_string(arr.type) or pat.is_large_string(arr.type)):
        raise DataError(str(block.path), f"the dense column '{name}' has type {arr.type}; "
                        "expected numbers")
    x = _cast_or_raise(arr, pa.float64(), block, name, "a number")
    values = x.to_numpy(zero_copy_only=False)
    inf = np.isinf(values)
    if inf.any():
        i = int(np.argmax(inf))
        raise DataError(block.where(i), f"the dense column '{name}' holds {values[i]}; dense "
                        "values must be finite")
    nan = np.isnan(values) & np.asarray(x.is_valid())
    return pa.array(values, mask=np.isnan(values)) if nan.any() else x


def decode_ids(arr: pa.Array, name: str, block: Block) -> pa.Array:
    """Raw ids as dictionary-encoded strings (each distinct value of a block is then counted,
    mapped and hashed once) or int64 (integral floats, as pandas writes integers with gaps,
    become int64); other types are a DataError."""
    if pat.is_dictionary(arr.type):
        if pat.is_string(arr.type.value_type) or pat.is_large_string(arr.type.value_type):
            return arr.cast(STRING_IDS)
        arr = arr.dictionary_decode()
    if pat.is_string(arr.type) or pat.is_large_string(arr.type):
        return pc.dictionary_encode(arr).cast(STRING_IDS)
    if pat.is_integer(arr.type) or pat.is_boolean(arr.type) or pat.is_null(arr.type):
        return pc.cast(arr, pa.int64() if not pat.is_null(arr.type) else pa.string())
    if pat.is_floating(arr.type):
        return _cast_or_raise(arr, pa.int64(), block, name, "an integer id")
    raise DataError(str(block.path), f"the id column '{name}' has type {arr.type}; expected "
                    "strings or integers")


def decode_multi(arr: pa.Array, name: str, delimiter: str, block: Block) -> pa.Array:
    """Id lists -> list<string | int64> without nulls (a missing list is empty): Arrow lists as
    they are, strings split on ``delimiter`` with empty items dropped ("a||b|" -> [a, b])."""
    if pat.is_string(arr.type) or pat.is_large_string(arr.type):
        lists = pc.split_pattern(arr, pattern=delimiter)
        return _rebuild(lists, lambda v: pc.and_(v.is_valid(), pc.greater(
            pc.utf8_length(v.fill_null("")), 0)), name, block)
    if pat.is_list(arr.type) or pat.is_large_list(arr.type):
        return _rebuild(arr, None, name, block)
    raise DataError(str(block.path), f"the multi column '{name}' has type {arr.type}; expected "
                    f"lists or strings of ids separated by {delimiter!r}")


def _rebuild(lists: pa.Array, keep: Callable[[pa.Array], pa.Array] | None, name: str,
             block: Block) -> pa.Array:
    values = lists.flatten()
    parents = pc.list_parent_indices(lists)
    if keep is not None:
        mask = keep(values)
        values, parents = values.filter(mask), parents.filter(mask)
    values = decode_ids(values, name, block)
    lengths = np.bincount(parents.to_numpy(zero_copy_only=False), minlength=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def decode_split(arr: pa.Array, name: str, block: Block) -> np.ndarray:
    """Split names train / valid / test -> 0 / 1 / 2; another value or a missing one is a
    DataError naming its row."""
    text = pc.cast(arr, pa.string()) if not pat.is_string(arr.type) else arr
    codes = pc.index_in(text, value_set=pa.array(list(SPLITS)))
    if codes.null_count:
        i = _first_null(codes)
        raise DataError(block.where(i), f"the split column '{name}' holds "
                        f"{_show(text[i].as_py())}; expected one of {', '.join(SPLITS)}")
    return codes.to_numpy(zero_copy_only=False).astype(np.int8)


class Decoder:
    """Checks and converts input blocks into the spill's typed columns, and holds every column
    to the types of the first block (so that a file with other types is named, not mixed in).

    Example:
        >>> d = Decoder(layout, options)
        >>> table = d.decode(block)  # label int8, ids string|int64, dense float64, __split int8
    """

    def __init__(self, layout: Layout, options: PrepareSpec) -> None:
        self.layout = layout
        self.options = options
        self.schema: pa.Schema | None = None
        self.first: Block | None = None
        self.time_type: pa.DataType | None = None

    def decode(self, block: Block) -> pa.Table:
        b, lay = block.batch, self.layout
        out: dict[str, pa.Array] = {}
        if lay.request:
            out[REQUEST_ID] = decode_ids(b.column(lay.request), lay.request, block)
        for f in lay.features:
            col = b.column(f.source)
            if f.role == ColumnRole.DENSE:
                out[f.name] = decode_dense(col, f.source, block)
            elif f.role == ColumnRole.MULTI_SPARSE:
                out[f.name] = decode_multi(col, f.source, self.options.delimiter, block)
            else:
                out[f.name] = decode_ids(col, f.source, block)
        out[lay.label] = decode_label(b.column(lay.label), lay.label,
                                      self.options.label_threshold, block)
        if lay.time:
            out[TIMESTAMP] = self._time(b.column(lay.time), block)
        out[SPLIT] = pa.array(self._split(b, block))
        return self._typed(pa.table(out), block)

    def _time(self, arr: pa.Array, block: Block) -> pa.Array:
        name = self.layout.time
        assert name is not None
        if self.layout.split == "time" and arr.null_count:
            raise DataError(block.where(_first_null(arr)), f"the time column '{name}' is empty; "
                            "a time split needs every row's time")
        if pat.is_string(arr.type) or pat.is_large_string(arr.type):
            if self.time_type is None:
                self.time_type = next((t for t in TIME_TYPES if _casts(arr, t)), None)
                if self.time_type is None:
                    bad = first_bad_cast(arr, pa.timestamp("us")) or 0
                    raise DataError(block.where(bad), f"the time column '{name}' holds "
                                    f"{_show(arr[bad].as_py())}: neither an integer, a number nor "
                                    "a date-time")
            return _cast_or_raise(arr, self.time_type, block, name, f"a {self.time_type} time")
        if pat.is_integer(arr.type):
            return pc.cast(arr, pa.int64())
        if pat.is_floating(arr.type):
            x = pc.cast(arr, pa.float64())
            nan = pc.is_nan(x).fill_null(False)
            if self.layout.split == "time" and pc.any(nan).as_py():
                raise DataError(block.where(int(np.argmax(np.asarray(nan)))),
                                f"the time column '{name}' holds NaN; a time split needs every "
                                "row's time")
            return x
        if pat.is_timestamp(arr.type) or pat.is_date(arr.type):
            return arr
        raise DataError(str(block.path), f"the time column '{name}' has type {arr.type}; "
                        "expected integers, numbers or date-times")

    def _split(self, b: pa.RecordBatch, block: Block) -> np.ndarray:
        lay, opts = self.layout, self.options
        n = b.num_rows
        if lay.split == "column":
            assert lay.split_column is not None
            return decode_split(b.column(lay.split_column), lay.split_column, block)
        if lay.split == "random":
            return random_split(block.first_global, n, opts.seed, opts.valid_fraction,
                                opts.test_fraction)
        return np.full(n, UNKNOWN_SPLIT, dtype=np.int8)

    def _typed(self, table: pa.Table, block: Block) -> pa.Table:
        if self.schema is None:
            self.schema, self.first = table.schema, block
            return table
        if table.schema.equals(self.schema):
            return table
        for fld in self.schema:
            typ = table.schema.field(fld.name).type
            if typ != fld.type:
                if pat.is_null(typ) or pat.is_list(typ) and pat.is_null(typ.value_type):
                    table = table.set_column(table.schema.get_field_index(fld.name), fld,
                                             table.column(fld.name).cast(fld.type))
                    continue
                assert self.first is not None
                raise DataError(str(block.path), f"column '{fld.name}' holds {typ} values here "
                                f"but {fld.type} values in {self.first.path}; a column must "
                                "hold one type in every file")
        return table


def _casts(arr: pa.Array, typ: pa.DataType) -> bool:
    try:
        pc.cast(arr, typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def random_split(first_row: int, n: int, seed: int, valid_fraction: float,
                 test_fraction: float) -> np.ndarray:
    """Split codes (0 train, 1 valid, 2 test) of the rows ``first_row .. first_row + n - 1``: a
    uniform number per row from a hash of (seed, row number), so the same on every machine and
    for any cut of the input into blocks; test where it is < test_fraction, valid where it is
    < test_fraction + valid_fraction.

    Example:
        >>> random_split(0, 5, seed=0, valid_fraction=0.2, test_fraction=0.2)
        array([...], dtype=int8)
    """
    rows = np.arange(first_row, first_row + n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        key = rows + mix64(np.array([seed], dtype=np.uint64) ^ np.uint64(0x5EED))
    u = (mix64(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    codes = np.where(u < test_fraction, 2, np.where(u < test_fraction + valid_fraction, 1, 0))
    return codes.astype(np.int8)


# --------------------------------------------------------------------------------------------------
# statistics: vocabularies, request ids, time cut-offs, dense moments


@dataclass
class Moments:
    """Count, mean and sum of squared deviations of a stream of numbers, merged block by block
    (Chan et al.'s parallel update: stable where a running sum of squares is not).

    Example:
        >>> m = Moments(); m.update(np.array([1.0, 2.0])); m.update(np.array([3.0]))
        >>> m.mean, m.std
        (2.0, 0.816496580927726)
    """

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: np.ndarray) -> None:
        if not len(x):
            return
        nb, mb = len(x), float(x.mean())
        m2b = float(((x - mb) ** 2).sum())
        total = self.n + nb
        delta = mb - self.mean
        self.mean += delta * nb / total
        self.m2 += m2b + delta * delta * self.n * nb / total
        self.n = total

    @property
    def std(self) -> float:
        """The population standard deviation (0 with no values)."""
        return math.sqrt(self.m2 / self.n) if self.n else 0.0


@dataclass
class Stats:
    """What the passes over the input learn: train value counts per id column, request ids over
    all rows, the time stamps' counts, dense moments on train and missing dense values."""

    layout: Layout
    options: PrepareSpec
    builders: dict[str, VocabularyBuilder] = field(default_factory=dict)
    requests: VocabularyBuilder | None = None
    users: VocabularyBuilder | None = None  # every row's user: the GAUC group (USER_GROUP)
    times: ValueCounter | None = None
    moments: dict[str, Moments] = field(default_factory=dict)
    nulls: dict[str, int] = field(default_factory=dict)
    rows: int = 0

    def __post_init__(self) -> None:
        lay, opts = self.layout, self.options
        if opts.hash_buckets is None:
            self.builders = {f.name: VocabularyBuilder(f.name, opts.min_count) for f in lay.ids}
        self.moments = {f.name: Moments() for f in lay.dense}
        self.nulls = {f.name: 0 for f in lay.dense}
        if lay.request:
            self.requests = VocabularyBuilder(REQUEST_ID, 1)
        if lay.has_user:
            self.users = VocabularyBuilder(USER_GROUP, 1)
        if lay.split == "time":
            self.times = ValueCounter()

    def scan(self, table: pa.Table) -> None:
        """Pass 1, every row: request ids, time stamps, missing dense values."""
        self.rows += table.num_rows
        if self.requests is not None:
            self.requests.update(table.column(REQUEST_ID))
        if self.users is not None:
            self.users.update(table.column(USER_ID))
        if self.times is not None:
            self.times.update(table.column(TIMESTAMP))
        for name in self.nulls:
            self.nulls[name] += table.column(name).null_count

    def count_train(self, table: pa.Table, codes: np.ndarray) -> None:
        """The train rows' id values and dense moments."""
        train = table.filter(pa.array(codes == 0))
        for name, b in self.builders.items():
            b.update(train.column(name))
        for name, m in self.moments.items():
            m.update(train.column(name).drop_null().to_numpy())


def time_cuts(times: pa.Table, valid_fraction: float,
              test_fraction: float) -> tuple[object | None, object | None]:
    """The first time of valid and the first time of test (None: that split is empty) from
    every distinct time's count: each cut is the distinct time at which the rows before it come
    closest to the wanted train (train + valid) count, so tied rows never straddle a cut.

    Example:
        >>> t = pa.table({"value": [1, 2, 3, 4], "count": [5, 2, 2, 1]})
        >>> time_cuts(t, 0.2, 0.3)  # 10 rows: 5 train, 2 valid, 3 test -> 5 | 2 | 3
        (2, 3)
    """
    order = pc.sort_indices(times, sort_keys=[("value", "ascending")])
    values = times.column("value").take(order)
    counts = times.column("count").take(order).to_numpy()
    before = np.concatenate([[0], np.cumsum(counts)])  # rows before distinct time k (k = K: all)
    n_train, n_valid, _ = split_sizes(int(before[-1]), valid_fraction, test_fraction)

    def cut(target: int, lowest: int = 0) -> int:
        k = int(np.argmin(np.abs(before[lowest:] - target))) + lowest
        return k

    k_valid = cut(n_train)
    k_test = cut(n_train + n_valid, k_valid)
    pick = [values[k].as_py() if k < len(values) else None for k in (k_valid, k_test)]
    return pick[0], pick[1]


def time_codes(t: pa.ChunkedArray | pa.Array, cuts: tuple[object | None, object | None]
               ) -> np.ndarray:
    """Split codes of time stamps ``t`` given :func:`time_cuts`' cut-offs."""
    codes = np.zeros(len(t), dtype=np.int8)
    for cut in cuts:
        if cut is not None:
            codes += np.asarray(pc.greater_equal(t, pa.scalar(cut, t.type)).fill_null(False),
                                dtype=np.int8)
    return codes


# --------------------------------------------------------------------------------------------------
# the conversion


def convert(input: Path, out: Path, options: PrepareSpec, *, config_hash: str,
            progress: bool = True, csv_block_bytes: int = CSV_BLOCK_BYTES,
            parquet_block_rows: int = PARQUET_BLOCK_ROWS) -> DatasetManifest:
    """Stream the table at ``input`` into the prepared dataset ``out`` (see the module
    docstring). Called by :func:`recsys.data.adapters.prepare`, which holds the output's lock and
    removes ``OUT.partial`` on failure; the spill lives in a temporary folder beside ``out``
    that goes in every case.

    Example:
        >>> convert(Path("events.csv"), Path("data/events"),
        ...         PrepareSpec(input="events.csv", label="clicked", user="uid"),
        ...         config_hash="0123456789abcdef")
    """
    layout = Layout.from_options(options)
    files, kind = find_inputs(input)
    for path in files:
        check_columns(path, input_columns(path, kind), layout)
    stats = Stats(layout, options)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.scan-") as tmp:
        spill = Path(tmp) / "decoded.arrow"
        single = {f.source for f in layout.ids if f.role == ColumnRole.SPARSE}
        single |= {layout.request} if layout.request else set()
        blocks = read_blocks(files, kind, layout.inputs(), single, csv_block_bytes,
                             parquet_block_rows)
        schema = _scan(blocks, count_rows(files, kind), spill, layout, options, stats, progress)
        if stats.rows == 0:
            raise DataError(str(input), "holds no rows")
        cuts = None
        if stats.times is not None:
            cuts = time_cuts(stats.times.counts(), options.valid_fraction, options.test_fraction)
            _count_time_split(spill, cuts, stats, progress)
        vocabs = _vocabularies(layout, options, stats, schema)
        return _write(spill, input, out, options, config_hash, layout, stats, vocabs, cuts,
                      schema, progress)


def _scan(blocks: Iterator[Block], total: int | None, spill: Path, layout: Layout,
          options: PrepareSpec, stats: Stats, progress: bool) -> pa.Schema:
    """Pass 1: decode and check every block, spill it, count what needs every row (and the
    train rows, when the split is known already). Returns the spill's schema."""
    decoder = Decoder(layout, options)
    bar = progress_bar(total=total, desc="table 1: read", unit="row", unit_scale=True,
                       disable=not progress)
    writer: pa.ipc.RecordBatchStreamWriter | None = None
    try:
        for block in blocks:
            table = decoder.decode(block)
            if writer is None:
                writer = pa.ipc.new_stream(str(spill), table.schema)
            writer.write_table(table)
            stats.scan(table)
            if layout.split != "time":
                stats.count_train(table, table.column(SPLIT).to_numpy())
            bar.update(table.num_rows)
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    if decoder.schema is None:  # not one block: an empty input
        return pa.schema([])
    return decoder.schema


def _spilled(spill: Path) -> Iterator[pa.Table]:
    with pa.OSFile(str(spill)) as f:
        reader = pa.ipc.open_stream(f)
        for batch in reader:
            yield pa.Table.from_batches([batch])


def _codes(table: pa.Table, cuts: tuple[object | None, object | None] | None) -> np.ndarray:
    if cuts is not None:
        return time_codes(table.column(TIMESTAMP), cuts)
    return table.column(SPLIT).to_numpy()


def _count_time_split(spill: Path, cuts: tuple[object | None, object | None], stats: Stats,
                      progress: bool) -> None:
    """Pass 2 (time split only): count the train rows, now that the cut-offs are known."""
    bar = progress_bar(total=stats.rows, desc="table 2: count train", unit="row",
                       unit_scale=True, disable=not progress)
    for table in _spilled(spill):
        stats.count_train(table, _codes(table, cuts))
        bar.update(table.num_rows)
    bar.close()


def _vocabularies(layout: Layout, options: PrepareSpec, stats: Stats,
                  schema: pa.Schema) -> dict[str, Vocabulary]:
    if options.hash_buckets is not None:
        vocabs = {}
        for f in layout.ids:
            typ = schema.field(f.name).type if f.name in schema.names else pa.string()
            typ = typ.value_type if pat.is_list(typ) else typ
            vocabs[f.name] = hashed(f.name, options.hash_buckets,
                                    value_type_of(typ) if not pat.is_null(typ) else STRING)
        return vocabs
    return {name: b.finish() for name, b in stats.builders.items()}


@dataclass
class Oov:
    """Per split: id values that were present (not null) and those that got id 0."""

    present: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    unknown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))

    def share(self) -> dict[str, float | None]:
        return {s: (self.unknown[s] / self.present[s] if self.present[s] else None)
                for s in SPLITS}


def _write(spill: Path, input: Path, out: Path, options: PrepareSpec, config_hash: str,
           layout: Layout, stats: Stats, vocabs: dict[str, Vocabulary],
           cuts: tuple[object | None, object | None] | None, schema: pa.Schema,
           progress: bool) -> DatasetManifest:
    """The last pass: ids, scaled dense values, labels, groups -> Parquet shards per split."""
    requests = stats.requests.finish() if stats.requests is not None else None
    users = stats.users.finish() if stats.users is not None else None
    scaling = {f.name: _scaling(options.dense_scale, stats.moments[f.name]) for f in layout.dense}
    columns = describe_columns(layout, options, vocabs, scaling, requests, users)
    arrow = output_schema(layout, schema)
    source = source_info("table", input, options)
    writer = DatasetWriter(out, "table", source, config_hash, columns, arrow,
                           rows_per_shard=options.rows_per_shard,
                           row_group_size=options.row_group_size)
    for split in SPLITS:  # every split is listed, even an empty one
        writer.write(VIEW, split, arrow.empty_table())
    oov = {name: Oov() for name in vocabs}
    rows = dict.fromkeys(SPLITS, 0)
    bar = progress_bar(total=stats.rows, desc="table 3: write", unit="row", unit_scale=True,
                       disable=not progress)
    for table in _spilled(spill):
        codes = _codes(table, cuts)
        data = transform(table, layout, vocabs, scaling, requests, codes, oov, users)
        for code, split in enumerate(SPLITS):
            mask = codes == code
            n = int(mask.sum())
            if n:
                writer.write(VIEW, split, data.filter(pa.array(mask)) if n < len(mask) else data)
                rows[split] += n
        bar.update(table.num_rows)
    bar.close()
    if rows["train"] == 0:
        raise DataError(str(input), f"no row falls into train (split: {layout.split}); check "
                        "the split options")
    source["table"] = summary_record(layout, options, stats, vocabs, scaling, oov, cuts, requests)
    for vocab in vocabs.values():
        vocab.save(writer.partial)
    return writer.finish(vocabularies={name: v.info for name, v in vocabs.items()},
                         dense_scaling={n: sc for n, sc in scaling.items() if sc.kind != "none"})


def _scaling(kind: str, moments: Moments) -> Scaling:
    if kind != "standard":
        return Scaling(kind=kind)
    # a constant (or empty) train column would divide by zero: it is only centred
    return Scaling(kind=kind, mean=moments.mean, std=moments.std if moments.std > 0 else 1.0)


def transform(table: pa.Table, layout: Layout, vocabs: dict[str, Vocabulary],
              scaling: dict[str, Scaling], requests: Vocabulary | None, codes: np.ndarray,
              oov: dict[str, Oov], users: Vocabulary | None = None) -> pa.Table:
    """One spilled block -> output rows (all splits; the caller cuts them)."""
    out: dict[str, pa.Array | np.ndarray] = {}
    if requests is not None:
        out[REQUEST_ID] = requests.ids(table.column(REQUEST_ID))
    if users is not None:
        out[USER_GROUP] = users.ids(table.column(USER_ID))
    for f in layout.features:
        col = table.column(f.name).combine_chunks()
        if f.role == ColumnRole.DENSE:
            x = scaling[f.name].apply(col.fill_null(0.0).to_numpy())
            if col.null_count:  # missing -> 0 after scaling (standard: the train mean)
                x = np.where(np.asarray(col.is_valid()), x, 0.0)
            out[f.name] = x.astype(np.float32)
        elif f.role == ColumnRole.MULTI_SPARSE:
            items = col.flatten()
            ids = vocabs[f.name].ids(items)
            parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
            _count_oov(oov[f.name], items, ids, codes[parents])
            offsets = np.asarray(col.offsets, dtype=np.int32)
            out[f.name] = pa.ListArray.from_arrays(pa.array(offsets - offsets[0]), pa.array(ids))
        else:
            ids = vocabs[f.name].ids(col)
            _count_oov(oov[f.name], col, ids, codes)
            out[f.name] = ids
    out[layout.label] = table.column(layout.label)
    if layout.time:
        out[TIMESTAMP] = table.column(TIMESTAMP)
    return pa.table(out)


def _count_oov(oov: Oov, raw: pa.Array, ids: np.ndarray, codes: np.ndarray) -> None:
    present = np.asarray(raw.is_valid()) if raw.null_count else np.ones(len(raw), dtype=bool)
    unknown = present & (ids == 0)
    for code, split in enumerate(SPLITS):
        in_split = codes == code
        oov.present[split] += int(np.count_nonzero(present & in_split))
        oov.unknown[split] += int(np.count_nonzero(unknown & in_split))


def output_schema(layout: Layout, spill: pa.Schema) -> pa.Schema:
    """The Parquet schema: ids int64, id lists list<int64>, dense float32, the label int8."""
    fields = [pa.field(REQUEST_ID, pa.int64())] if layout.request else []
    fields += [pa.field(USER_GROUP, pa.int64())] if layout.has_user else []
    for f in layout.features:
        typ = {ColumnRole.DENSE: pa.float32(), ColumnRole.MULTI_SPARSE: pa.list_(pa.int64())
               }.get(f.role, pa.int64())
        fields.append(pa.field(f.name, typ))
    fields.append(pa.field(layout.label, pa.int8()))
    if layout.time:
        fields.append(pa.field(TIMESTAMP, spill.field(TIMESTAMP).type))
    return pa.schema(fields)


def describe_columns(layout: Layout, options: PrepareSpec, vocabs: dict[str, Vocabulary],
                     scaling: dict[str, Scaling], requests: Vocabulary | None,
                     users: Vocabulary | None = None) -> list[ColumnInfo]:
    """``dataset.json``'s description of every output column."""
    cols = []
    if requests is not None:
        cols.append(column(REQUEST_ID, ColumnRole.GROUP, None, None,
                           f"request group from input column '{layout.request}': contiguous ids "
                           f"1..{requests.info.size - 1} (0 = missing)"))
    if users is not None:
        cols.append(column(USER_GROUP, ColumnRole.GROUP, None, None,
                           "the user group of GAUC: every row's user (all splits) as ids "
                           f"1..{users.info.size - 1} (0 = missing); user_id, the feature, maps "
                           "users that train never saw to 0"))
    for f in layout.features:
        if f.role == ColumnRole.DENSE:
            cols.append(column(f.name, f.role, f.side, None, f"input column '{f.source}': "
                               f"{scaling[f.name].describe()}; missing -> 0"))
            continue
        v = vocabs[f.name]
        how = (f"stable_hash(value) % {v.info.hash_buckets}" if v.info.kind == VocabKind.HASH
               else f"vocabulary of the {v.info.size - 1} train values seen >= "
                    f"{v.info.min_count} times, most frequent first ({v.info.file}); 0 = "
                    "unknown, rare or missing")
        items = " items" if f.role == ColumnRole.MULTI_SPARSE else ""
        cols.append(column(f.name, f.role, f.side, v.info.size,
                           f"input column '{f.source}'{items}: {how}"))
    threshold = options.label_threshold
    cols.append(column(layout.label, ColumnRole.LABEL, None, None,
                       f"input column '{layout.label}' >= {threshold}" if threshold is not None
                       else f"input column '{layout.label}' (0/1)"))
    if layout.time:
        cols.append(column(TIMESTAMP, ColumnRole.OTHER, None, None,
                           f"input column '{layout.time}' as it is"))
    return cols


# --------------------------------------------------------------------------------------------------
# the summary


def summary_record(layout: Layout, options: PrepareSpec, stats: Stats,
                   vocabs: dict[str, Vocabulary], scaling: dict[str, Scaling],
                   oov: dict[str, Oov], cuts: tuple[object | None, object | None] | None,
                   requests: Vocabulary | None) -> dict[str, object]:
    """What ``dataset.json`` ``source.table`` records of the conversion (shown by
    :func:`format_summary`): the split rule and cut-offs, each id column's vocabulary size and
    unknown share per split, each dense column's scaling and missing values."""
    split = layout.split + (f":{layout.split_column}" if layout.split_column else "")
    record: dict[str, object] = {
        "rows": stats.rows,
        "split": split,
        # a hashed column has no unknown values (its bucket 0 is a bucket like any other)
        "ids": {name: {"kind": str(v.info.kind), "size": v.info.size,
                       "unknown_share": oov[name].share() if v.info.kind == VocabKind.VOCAB
                       else dict.fromkeys(SPLITS)} for name, v in vocabs.items()},
        "dense": {name: {"scale": str(s.kind), "mean": s.mean, "std": s.std,
                         "missing": stats.nulls[name]} for name, s in scaling.items()},
    }
    if cuts is not None:
        record["time_cuts"] = {"valid": _jsonable(cuts[0]), "test": _jsonable(cuts[1])}
    if requests is not None:
        record["requests"] = requests.info.size - 1
    return record


def _jsonable(value: object) -> object:
    return value if value is None or isinstance(value, int | float) else str(value)


def format_summary(manifest: DatasetManifest) -> str:
    """The conversion's summary for people: rows per split, then one line per id column
    (vocabulary size, unknown share in valid and test) and per dense column (scaling, missing).

    Example:
        >>> print(format_summary(manifest))
    """
    from recsys.tables import format_table

    rec = manifest.source.get("table")
    rows = manifest.rows.get(VIEW, {})
    lines = [f"dataset {manifest.root} (table, config {manifest.config_hash})",
             format_table(["split", "rows"], [[s, rows.get(s, 0)] for s in SPLITS])]
    if not isinstance(rec, dict):
        return "\n".join(lines)
    lines.append(f"\nsplit: {rec['split']}" + (
        f" (valid from {rec['time_cuts']['valid']}, test from {rec['time_cuts']['test']})"
        if "time_cuts" in rec else ""))

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    ids = rec.get("ids", {})
    if ids:
        lines.append(format_table(
            ["id column", "kind", "size", "unknown train", "unknown valid", "unknown test"],
            [[name, d["kind"], d["size"], *(pct(d["unknown_share"][s]) for s in SPLITS)]
             for name, d in ids.items()]))
    dense = rec.get("dense", {})
    if dense:
        lines.append(format_table(
            ["dense column", "scaling", "mean", "std", "missing -> 0"],
            [[name, d["scale"], *((d["mean"], d["std"]) if d["scale"] == "standard"
                                  else ("-", "-")), d["missing"]]
             for name, d in dense.items()]))
    if "requests" in rec:
        lines.append(f"requests: {rec['requests']:,}")
    return "\n".join(lines)
