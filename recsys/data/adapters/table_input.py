"""Reading the input of format ``table`` (:mod:`recsys.data.adapters.table`): which input column
becomes which output column (:class:`Layout`), finding and reading the files in blocks, and
decoding each block's columns with checks that name the file, the row and the column. Scoring raw
tables (:mod:`recsys.export.raw`) decodes them with the same functions, so that raw values are read
exactly as the preparation read them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
import pyarrow.parquet as pq
import pyarrow.types as pat

from recsys.data.adapters.common import (
    SNIFF_BYTES,
    check_head,
    check_text,
    first_bad_cast,
)
from recsys.data.schema import (
    REQUEST_ID,
    SPLITS,
    USER_GROUP,
    USER_ID,
    ColumnRole,
)
from recsys.data.vocab import (
    mix64,
)
from recsys.errors import DataError, UsageError
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
