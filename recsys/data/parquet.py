"""The Parquet store: streaming sharded writes, and checked reads of row groups.

Writers never hold more than one row group per open shard in memory; a dataset directory appears only
when it is complete (written under a temporary name, then renamed), so a killed writer leaves nothing
that looks finished.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.types as pat

from recsys.data.schema import MANIFEST, BatchSchema, ColumnInfo, DatasetManifest
from recsys.errors import DataError

COMPRESSION = "snappy"  # decodes faster than zstd; the loader is read-bound


class ShardWriter:
    """Streams Arrow tables into ``part-NNNNN.parquet`` files of at most ``rows_per_shard`` rows,
    cut into row groups of exactly ``row_group_size`` rows (the last one may be shorter).

    Example:
        >>> w = ShardWriter(Path("out/train"), schema, rows_per_shard=1_000_000, row_group_size=65536)
        >>> w.write(table); names = w.close()
    """

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_shard: int,
                 row_group_size: int) -> None:
        if row_group_size > rows_per_shard:
            row_group_size = rows_per_shard
        self.directory = directory
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.row_group_size = row_group_size
        self.files: list[str] = []
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        if table.schema != self.schema:
            table = table.select(self.schema.names).cast(self.schema)
        self._buffer.append(table)
        self._buffered += table.num_rows
        while self._buffered >= self._next_group_rows():
            self._flush(self._next_group_rows())

    def close(self) -> list[str]:
        """Flush what is buffered and close; return the shard file names in order."""
        while self._buffered:
            self._flush(min(self._buffered, self._next_group_rows()))
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.files

    def _next_group_rows(self) -> int:
        return min(self.row_group_size, self.rows_per_shard - self._rows_in_shard)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self._buffer)
        head, rest = table.slice(0, n), table.slice(n)
        self._buffer = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows
        if self._writer is None:
            name = f"part-{len(self.files):05d}.parquet"
            self.files.append(name)
            self._writer = pq.ParquetWriter(self.directory / name, self.schema,
                                            compression=COMPRESSION)
        self._writer.write_table(head, row_group_size=n)
        self._rows_in_shard += n
        self.rows += n
        if self._rows_in_shard >= self.rows_per_shard:
            self._writer.close()
            self._writer = None
            self._rows_in_shard = 0


def claim_output(out: Path, config_hash: str, force: bool,
                 regenerable: str | None = None) -> DatasetManifest | None:
    """Decide what to do with a dataset directory before writing it.

    Returns the dataset already there when it was made from the same config (nothing to do);
    returns None when ``out`` may be written. A dataset from another config, a file, or a non-empty
    directory that is not a dataset is an error unless ``force``: the writer replaces ``out``
    wholesale, and must never silently delete what is not its own. The one exception is a dataset
    whose manifest names ``regenerable`` as its generator (synthetic data: a pure function of its
    config, so replacing it loses nothing); that is replaced, with a notice.
    """
    if (out / MANIFEST).exists():
        existing = DatasetManifest.load(out)
        if existing.config_hash == config_hash:
            return existing
        if regenerable is not None and existing.source.get("generator") == regenerable:
            print(f"{out}: replacing the {existing.name} dataset made from another config "
                  f"({existing.config_hash}) with config {config_hash}", file=sys.stderr)
            return None
        if not force:
            raise DataError(str(out), f"holds a dataset made from another config "
                            f"({existing.config_hash}, wanted {config_hash}); use another path "
                            "or --force to replace it")
    elif out.exists() and not out.is_dir():
        raise DataError(str(out), "is a file; a dataset needs a directory path")
    elif out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(str(out), "exists, is not empty and is not a dataset directory; use "
                        "another path or --force to replace it")
    return None


class DatasetWriter:
    """Writes a dataset directory: shards per view and split, then ``dataset.json``.

    Everything goes to ``OUT.partial`` first and is renamed to ``OUT`` by :meth:`finish`.

    Example:
        >>> dw = DatasetWriter(Path("data/ml"), "movielens", source, cfg_hash, columns, schema)
        >>> dw.write("impressions", "train", table)
        >>> manifest = dw.finish()
    """

    def __init__(self, out: Path, name: str, source: dict[str, object], config_hash: str,
                 columns: list[ColumnInfo], schema: pa.Schema, *, rows_per_shard: int = 1_000_000,
                 row_group_size: int = 65_536) -> None:
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self.name, self.source, self.config_hash = name, source, config_hash
        self.columns, self.schema = columns, schema
        self.rows_per_shard, self.row_group_size = rows_per_shard, row_group_size
        self._writers: dict[tuple[str, str], ShardWriter] = {}
        missing = [c.name for c in columns if c.name not in schema.names]
        if missing:
            raise ValueError(f"columns {missing} are described but not in the Arrow schema")

    def write(self, view: str, split: str, table: pa.Table) -> None:
        key = (view, split)
        if key not in self._writers:
            self._writers[key] = ShardWriter(self.partial / view / split, self.schema,
                                             self.rows_per_shard, self.row_group_size)
        self._writers[key].write(table)

    def finish(self) -> DatasetManifest:
        views: dict[str, dict[str, list[str]]] = {}
        rows: dict[str, dict[str, int]] = {}
        for (view, split), w in self._writers.items():
            files = w.close()
            views.setdefault(view, {})[split] = [f"{view}/{split}/{f}" for f in files]
            rows.setdefault(view, {})[split] = w.rows
        manifest = DatasetManifest(name=self.name, source=self.source,
                                   config_hash=self.config_hash, columns=self.columns,
                                   views=views, rows=rows)
        manifest.save(self.partial)
        if self.out.exists():
            shutil.rmtree(self.out)
        self.partial.rename(self.out)
        manifest.root = self.out
        return manifest


# --------------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class RowGroupRef:
    file: int  # index into ParquetSplit.files
    group: int
    num_rows: int
    first_row: int  # the row group's first row within its file


class ParquetSplit:
    """The row groups of one split, checked against a batch schema once, at open.

    Only metadata is read at open; :meth:`read` decodes one row group's needed columns.

    Example:
        >>> split = ParquetSplit(manifest.files("impressions", "train"), schema)
        >>> table = split.read(split.row_groups[0])
    """

    def __init__(self, files: list[Path], schema: BatchSchema) -> None:
        if not files:
            raise DataError("dataset", "the split lists no Parquet files")
        self.files = [Path(f) for f in files]
        self.schema = schema
        self.columns = schema.columns
        self.row_groups: list[RowGroupRef] = []
        for i, path in enumerate(self.files):
            md = _open_metadata(path)
            _check_columns(path, md.schema.to_arrow_schema(), schema)
            first = 0
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                if n:
                    self.row_groups.append(RowGroupRef(i, g, n, first))
                first += n
        self.num_rows = sum(r.num_rows for r in self.row_groups)
        if self.num_rows == 0:
            raise DataError(str(self.files[0].parent), "the split has no rows "
                            f"({len(self.files)} file(s), all empty)")
        self._handles: dict[int, pq.ParquetFile] = {}

    def read(self, ref: RowGroupRef) -> pa.Table:
        handle = self._handles.get(ref.file)
        if handle is None:
            handle = self._handles[ref.file] = pq.ParquetFile(self.files[ref.file],
                                                              memory_map=True)
        try:
            return handle.read_row_group(ref.group, columns=self.columns, use_threads=False)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{self.files[ref.file]} (row group {ref.group})",
                            f"cannot decode: {e}") from None

    def where(self, ref: RowGroupRef) -> str:
        return str(self.files[ref.file])

    def __getstate__(self) -> dict[str, object]:
        # file handles do not cross process boundaries (DataLoader workers reopen them)
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def _open_metadata(path: Path) -> pq.FileMetaData:
    if not path.is_file():
        raise DataError(str(path), "data file not found")
    if path.stat().st_size == 0:
        raise DataError(str(path), "file is empty (0 bytes); expected a Parquet file")
    try:
        return pq.read_metadata(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(str(path), f"not a readable Parquet file (truncated or corrupt?): {e}") \
            from None


def _check_columns(path: Path, arrow: pa.Schema, schema: BatchSchema) -> None:
    expected: dict[str, tuple[str, object]] = {}
    for c in schema.dense:
        expected[c] = ("a number (float or integer)", _is_number)
    for s in schema.sparse:
        if s.multi:
            expected[s.column] = ("a list of integer ids", _is_int_list)
        else:
            expected[s.column] = ("integer ids", pat.is_integer)
        if s.weights:
            expected[s.weights] = ("a list of floats", _is_float_list)
    for c in schema.labels:
        expected[c] = ("0/1 labels (integer, float or bool)", _is_label)
    for c in schema.groups.values():
        expected[c] = ("integer group ids", pat.is_integer)
    if schema.stage:
        expected[schema.stage] = ("integer stages", pat.is_integer)
    for c in [schema.teacher, *schema.oracle.values()]:
        if c:
            expected[c] = ("a number", _is_number)
    for col, (what, ok) in expected.items():
        idx = arrow.get_field_index(col)
        if idx < 0:
            raise DataError(str(path), f"missing column '{col}' (the file has: "
                            f"{', '.join(arrow.names)})")
        typ = arrow.field(idx).type
        if not ok(typ):  # type: ignore[operator]
            raise DataError(str(path), f"column '{col}' has type {typ}; expected {what}")


def _is_number(t: pa.DataType) -> bool:
    return pat.is_floating(t) or pat.is_integer(t)


def _is_label(t: pa.DataType) -> bool:
    return _is_number(t) or pat.is_boolean(t)


def _is_int_list(t: pa.DataType) -> bool:
    return (pat.is_list(t) or pat.is_large_list(t)) and pat.is_integer(t.value_type)


def _is_float_list(t: pa.DataType) -> bool:
    return (pat.is_list(t) or pat.is_large_list(t)) and _is_number(t.value_type)
