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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pat

from recsys.data.adapters.common import (
    VIEW,
    column,
    source_info,
    split_sizes,
)
from recsys.data.adapters.table_input import (
    CSV_BLOCK_BYTES,
    PARQUET_BLOCK_ROWS,
    SPLIT,
    TIMESTAMP,
    Block,
    Decoder,
    Layout,
    check_columns,
    count_rows,
    find_inputs,
    input_columns,
    read_blocks,
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
    value_type_of,
)
from recsys.errors import DataError
from recsys.progress import progress_bar
from recsys.spec import PrepareSpec

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
