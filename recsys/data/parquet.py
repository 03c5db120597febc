"""The Parquet store: streaming sharded writes, and checked reads of row groups.

Writers never hold more than one row group per open shard in memory; a dataset directory appears only
when it is complete (written under a temporary name, then renamed), so a killed writer leaves nothing
that looks finished. One process at a time writes a dataset path (:func:`dataset_write`), and a failed
write removes what it had half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.types as pat

from recsys.data.schema import (
    MANIFEST,
    BatchSchema,
    ColumnInfo,
    DatasetManifest,
    DenseScaling,
    VocabInfo,
)
from recsys.errors import DataError
from recsys.fsutil import sibling_lock

COMPRESSION = "snappy"  # decodes faster than zstd; the loader is read-bound


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The Parquet leaf columns (dotted paths, e.g. ``tags.list.element``) of ``schema`` that are
    not floating point: the columns a shard dictionary-encodes.

    Ids and labels repeat, so a dictionary makes them small and quick to decode. Continuous floats
    (dense features, scores, probabilities) rarely repeat: dictionary-encoding them costs a hash per
    value on write (a quarter to a third of writing a shard) and decodes at half the speed of the
    plain values, for files no smaller.

    Example:
        >>> dictionary_columns(pa.schema([("id", pa.int64()), ("x", pa.float32()),
        ...                               ("tags", pa.list_(pa.int64()))]))
        ['id', 'tags.list.element']
    """
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    leaves = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return [leaves.column(i).path for i in range(len(leaves))
            if leaves.column(i).physical_type not in ("FLOAT", "DOUBLE")]


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
        self._dictionary = dictionary_columns(schema)
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
                                            compression=COMPRESSION,
                                            use_dictionary=self._dictionary)
        self._writer.write_table(head, row_group_size=n)
        self._rows_in_shard += n
        self.rows += n
        if self._rows_in_shard >= self.rows_per_shard:
            self._writer.close()
            self._writer = None
            self._rows_in_shard = 0


def partial_path(out: Path) -> Path:
    """Where a dataset is written before it is renamed to ``out``."""
    return out.with_name(out.name + ".partial")


def current_dataset(out: Path, config_hash: str) -> DatasetManifest | None:
    """The complete dataset at ``out`` if it was made from ``config_hash``, else None.

    Takes no lock: a dataset appears at ``out`` only once complete (by a rename), so a reader that
    finds a matching manifest can use it while another process waits to write elsewhere.
    """
    if not (out / MANIFEST).is_file():
        return None
    try:
        existing = DatasetManifest.load(out)
    except DataError:
        return None  # claim_output, under the lock, reports what is wrong with it
    return existing if existing.config_hash == config_hash else None


@contextlib.contextmanager
def dataset_write(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of the dataset path ``out`` for a whole write.

    A second writer of the same path gets a RunError at once instead of interleaving its shards
    with ours. If the write fails (a bad row, Ctrl-C), ``OUT.partial`` is removed, so nothing
    half-written stays behind; ``out`` itself is only ever replaced by a finished dataset.

    Example:
        >>> with dataset_write(out):
        ...     if claim_output(out, chash, force) is None:
        ...         write_everything(out)
    """
    with sibling_lock(out, f"dataset {out}"):
        try:
            yield
        except BaseException:
            shutil.rmtree(partial_path(out), ignore_errors=True)
            raise


def foreign_entries(out: Path, manifest: DatasetManifest) -> list[str]:
    """The entries under the dataset directory ``out`` that its writer did not make (relative
    paths, a directory as ``name/`` without its contents), sorted: anything but ``dataset.json``,
    the shards the manifest lists and the folders that hold them."""
    own_files = {MANIFEST} | {f for splits in manifest.views.values()
                              for files in splits.values() for f in files}
    own_files |= {v.file for v in manifest.vocabularies.values() if v.file}
    own_dirs = {str(parent) for f in own_files for parent in Path(f).parents} - {"."}
    foreign: list[str] = []
    for here, dirs, files in os.walk(out):
        rel = Path(here).relative_to(out)
        for d in list(dirs):
            if str(rel / d) not in own_dirs:
                foreign.append(f"{rel / d}/")
                dirs.remove(d)  # a foreign folder is named once, not walked
        foreign += [str(rel / f) for f in files if str(rel / f) not in own_files]
    return sorted(foreign)


def _count(items: list[str], one: str, many: str) -> str:
    return f"{len(items)} {one if len(items) == 1 else many}"


def _listing(entries: list[str], limit: int = 5) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def claim_output(out: Path, config_hash: str, force: bool,
                 regenerable: str | None = None) -> DatasetManifest | None:
    """Decide what to do with a dataset directory before writing it (call it under
    :func:`dataset_write`, so that no other writer changes ``out`` in between).

    Returns the dataset already there when it was made from the same config (nothing to do);
    returns None when ``out`` may be written. A dataset from another config, a file, or a non-empty
    directory that is not a dataset is an error unless ``force``: the writer replaces ``out``
    wholesale, and must never silently delete what is not its own. The one exception is a dataset
    whose manifest names ``regenerable`` as its generator (synthetic data: a pure function of its
    config, so replacing it loses nothing); that is replaced, with a notice, but only while it holds
    nothing else: files a user added beside the shards are an error unless ``force``.
    """
    if (out / MANIFEST).exists():
        existing = DatasetManifest.load(out)
        if existing.config_hash == config_hash:
            return existing
        if regenerable is not None and existing.source.get("generator") == regenerable:
            foreign = foreign_entries(out, existing)
            if foreign and not force:
                raise DataError(str(out), f"holds a {existing.name} dataset made from another "
                                f"config ({existing.config_hash}, wanted {config_hash}) and also "
                                f"{_count(foreign, 'entry', 'entries')} it did not write "
                                f"({_listing(foreign)}); "
                                "move them away, use another path or --force to replace it all")
            print(f"{out}: replacing the {existing.name} dataset made from another config "
                  f"({existing.config_hash}) with config {config_hash}", file=sys.stderr)
            return None
        if not force:
            raise DataError(str(out), f"holds a dataset made from another config "
                            f"({existing.config_hash}, wanted {config_hash}); use another path "
                            "or --force to replace it")
    elif out.exists() and not out.is_dir():
        raise DataError(str(out), "is a file; a dataset needs a directory path")
    elif out.is_dir() and not force:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
        if entries:
            raise DataError(str(out), "exists, is not empty and is not a dataset directory "
                            f"(it holds {_listing(entries)}); use another path or --force to "
                            "replace it")
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
        self.partial = partial_path(self.out)
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self.name, self.source, self.config_hash = name, source, config_hash
        self.columns, self.schema = columns, schema
        self.rows_per_shard, self.row_group_size = rows_per_shard, row_group_size
        self._writers: dict[tuple[str, str], ShardWriter] = {}
        self._adopted: dict[tuple[str, str], tuple[list[str], int]] = {}
        missing = [c.name for c in columns if c.name not in schema.names]
        if missing:
            raise ValueError(f"columns {missing} are described but not in the Arrow schema")

    def write(self, view: str, split: str, table: pa.Table) -> None:
        key = (view, split)
        if key not in self._writers:
            self._writers[key] = ShardWriter(self.partial / view / split, self.schema,
                                             self.rows_per_shard, self.row_group_size)
        self._writers[key].write(table)

    def adopt(self, view: str, split: str, files: list[str], rows: int) -> None:
        """List shards written by someone else (e.g. worker processes, each with its own
        :class:`ShardWriter` under ``self.partial / view / split``) as the next ones of
        ``view``/``split``, after those :meth:`write` made; ``files`` are relative to the dataset
        directory, in order, and hold ``rows`` rows in all.

        Example:
            >>> dw.adopt("impressions", "train", ["impressions/train/day_00/part-00000.parquet"], 9)
        """
        files_so_far, rows_so_far = self._adopted.get((view, split), ([], 0))
        self._adopted[(view, split)] = (files_so_far + list(files), rows_so_far + rows)

    def finish(self, vocabularies: dict[str, VocabInfo] | None = None,
               dense_scaling: dict[str, DenseScaling] | None = None) -> DatasetManifest:
        """Close every shard, write ``dataset.json`` (with ``vocabularies``, whose files the
        caller wrote under :attr:`partial`) and publish the directory as ``out``."""
        views: dict[str, dict[str, list[str]]] = {}
        rows: dict[str, dict[str, int]] = {}
        for (view, split), w in self._writers.items():
            files = w.close()
            views.setdefault(view, {})[split] = [f"{view}/{split}/{f}" for f in files]
            rows.setdefault(view, {})[split] = w.rows
        for (view, split), (files, n) in self._adopted.items():
            views.setdefault(view, {}).setdefault(split, []).extend(files)
            rows.setdefault(view, {})[split] = rows.get(view, {}).get(split, 0) + n
        manifest = DatasetManifest(name=self.name, source=self.source,
                                   config_hash=self.config_hash, columns=self.columns,
                                   views=views, rows=rows, vocabularies=vocabularies or {},
                                   dense_scaling=dense_scaling or {})
        manifest.save(self.partial)
        if self.out.exists():
            # move the old dataset aside before the new one takes its name, so that a crash in
            # between leaves one whole dataset somewhere instead of a half-deleted one
            old = self.out.with_name(f".{self.out.name}.replaced")  # a name only we use
            if old.exists():
                shutil.rmtree(old)
            self.out.rename(old)
            self.partial.rename(self.out)
            shutil.rmtree(old)
        else:
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
            md = open_metadata(path)
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


def open_metadata(path: Path) -> pq.FileMetaData:
    """The footer of a Parquet file; DataError naming the file when it is missing, empty,
    truncated or not Parquet (reads only the footer: cheap for any file size)."""
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
        expected[c] = ("0/1 labels (integer, float or bool)" if c in schema.binary_labels
                       else "graded labels (numbers)", _is_label)
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
