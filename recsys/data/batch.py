"""The one type everything downstream reads: :class:`Batch`, and its vectorised builder from Arrow."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import accumulate

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from recsys.data.schema import BatchSchema, SparseColumn
from recsys.errors import DataError
from recsys.spec import OOVPolicy


@dataclass
class Batch(Pipelineable):
    """A batch of rows: dense features, a KeyedJaggedTensor of ids, labels, group ids and the
    cascade columns where the data has them. Implements TorchRec's ``Pipelineable``.

    Args:
        dense: ``(B, n_dense)`` float32.
        sparse: ids per sparse feature (``rvq_code`` included when codes are known).
        labels: ``(B,)`` float32 per label name (``click``, ``conversion``).
        groups: ``(B,)`` int64 per group kind (``request``, ``user``).
        stage: ``(B,)`` int64, the deepest :class:`~recsys.data.schema.Stage` reached.
        teacher: ``(B,)`` float32 ranker score; NaN where the ranker did not score the row.
        oracle: ``(B,)`` float32 true probability per label (synthetic data).

    Example:
        >>> batch = next(iter(loader.epoch(0)))
        >>> batch.dense.shape, batch.sparse.keys()[:2], batch.labels["click"].mean()
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: dict[str, torch.Tensor]
    groups: dict[str, torch.Tensor] = field(default_factory=dict)
    stage: torch.Tensor | None = None
    teacher: torch.Tensor | None = None
    oracle: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])

    def with_sparse_feature(self, key: str, values: torch.Tensor,
                            lengths: torch.Tensor) -> Batch:
        """A copy whose KJT has one more feature appended, e.g. the auxiliary ``rvq_code`` with L
        trie-node ids per row (``lengths`` all L) once the codes are known.

        Example:
            >>> batch = batch.with_sparse_feature("rvq_code", codes.flatten(),
            ...                                   torch.full((B,), L, dtype=torch.int32))
        """
        if key in self.sparse.keys():  # noqa: SIM118 (a KJT is not a dict)
            raise ValueError(f"the batch already has a sparse feature '{key}'")
        if lengths.numel() != self.batch_size or int(lengths.sum()) != values.numel():
            raise ValueError(f"'{key}': {lengths.numel()} lengths summing to {int(lengths.sum())} "
                             f"for {values.numel()} values, in a batch of {self.batch_size}")
        weights = self.sparse.weights_or_none()
        extra = KeyedJaggedTensor(
            keys=[key], values=values.to(torch.int64), lengths=lengths.to(torch.int32),
            weights=None if weights is None else torch.ones(values.numel(), dtype=weights.dtype,
                                                            device=weights.device))
        return replace(self, sparse=KeyedJaggedTensor.concat([self.sparse, extra]))

    def _map(self, fn) -> Batch:  # type: ignore[no-untyped-def]
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):
                out[f.name] = {k: fn(t) for k, t in v.items()}
            elif v is not None:
                out[f.name] = fn(v)
            else:
                out[f.name] = None
        return Batch(**out)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        def record(t):  # type: ignore[no-untyped-def]
            t.record_stream(stream)
            return t

        self._map(record)

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())


@dataclass
class Columns:
    """Rows of a table as numpy columns laid out for cheap shuffles and batches.

    Single ids sit in one feature-major matrix ``singles (n_single, n)`` (narrowed to int32 once
    checked, so that a column fits in cache while a window is permuted); ``single_valid`` marks the
    rows of a feature whose id is null (an empty bag). Id lists sit in ``jagged`` as
    ``(offsets (n+1,), ids)`` with per-id ``weights``. Labels, group ids, stage, teacher and oracle
    keep their stored dtype in ``values`` (NaN for a null float) and are widened per batch.

    Example:
        >>> cols = builder.columns(table, where="part-00000.parquet")
        >>> batch = builder.assemble(cols.take(np.random.permutation(cols.n)[:2048]))
    """

    n: int
    dense: np.ndarray  # (n, n_dense) float32
    singles: np.ndarray  # (n_single, n)
    single_valid: dict[str, np.ndarray]
    jagged: dict[str, tuple[np.ndarray, np.ndarray]]
    weights: dict[str, np.ndarray]
    values: dict[str, np.ndarray]

    @staticmethod
    def concat(parts: list[Columns]) -> Columns:
        if len(parts) == 1:
            return parts[0]
        jagged = {}
        for k in parts[0].jagged:
            offs = [p.jagged[k][0] for p in parts]
            shifts = np.cumsum([0] + [o[-1] for o in offs[:-1]])
            offsets = np.concatenate([offs[0][:1]] + [o[1:] + sh for o, sh in
                                                      zip(offs, shifts, strict=True)])
            jagged[k] = (offsets, np.concatenate([p.jagged[k][1] for p in parts]))
        valid_keys = {k for p in parts for k in p.single_valid}
        return Columns(
            n=sum(p.n for p in parts),
            dense=np.concatenate([p.dense for p in parts]),
            singles=np.concatenate([p.singles for p in parts], axis=1),
            single_valid={k: np.concatenate([p.single_valid.get(k, np.ones(p.n, dtype=bool))
                                             for p in parts]) for k in valid_keys},
            jagged=jagged,
            weights={k: np.concatenate([p.weights[k] for p in parts]) for k in parts[0].weights},
            values={k: np.concatenate([p.values[k] for p in parts]) for k in parts[0].values},
        )

    def take(self, rows: np.ndarray) -> Columns:
        """The given rows, in the given order: one gather per column."""
        jagged, weights = {}, {}
        for k, (offsets, ids) in self.jagged.items():
            lengths, taken, w = _take_jagged(offsets, ids, self.weights.get(k), rows)
            new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(lengths, out=new_offsets[1:])
            jagged[k] = (new_offsets, taken)
            if w is not None:
                weights[k] = w
        singles = np.empty((len(self.singles), len(rows)), dtype=self.singles.dtype)
        for i, row in enumerate(self.singles):  # row by row: each source row stays in cache
            np.take(row, rows, out=singles[i])
        return Columns(
            n=len(rows), dense=np.take(self.dense, rows, axis=0), singles=singles,
            single_valid={k: v[rows] for k, v in self.single_valid.items()},
            jagged=jagged, weights=weights, values={k: v[rows] for k, v in self.values.items()},
        )

    def slice(self, a: int, b: int) -> Columns:
        """Rows [a, b) as views (no copy)."""
        jagged, weights = {}, {}
        for k, (offsets, ids) in self.jagged.items():
            lo, hi = offsets[a], offsets[b]
            jagged[k] = (offsets[a:b + 1] - lo, ids[lo:hi])
            if k in self.weights:
                weights[k] = self.weights[k][lo:hi]
        return Columns(
            n=b - a, dense=self.dense[a:b], singles=self.singles[:, a:b],
            single_valid={k: v[a:b] for k, v in self.single_valid.items()},
            jagged=jagged, weights=weights, values={k: v[a:b] for k, v in self.values.items()},
        )


@dataclass
class Window:
    """Rows gathered in batch order (one gather per column, whatever the number of batches) and
    the cuts that make them batches: batch ``j`` is rows ``[cuts[j], cuts[j+1])``, and its ids
    of key ``k`` are ``ids[k][at_cuts[j][k]:at_cuts[j+1][k]]``. Building a batch is then one
    concatenation of slices for the KJT's values and views for the rest (:meth:`BatchBuilder.batch`),
    done as the batch is needed, so that its memory is the memory the batch before it just freed.

    ``ids``, ``lengths`` and ``weights`` are per sparse key, in the schema's order: ``lengths[k]``
    is None where every row has exactly one id, ``weights[k]`` None where the key has none. The
    label, group, stage, teacher and oracle columns are in their tensors' dtypes.

    Example:
        >>> window = builder.window(cols, rows=np.array([2, 0, 1]), cuts=[0, 2, 3])
        >>> [b.batch_size for b in builder.batches(window)]
        [2, 1]
    """

    cuts: list[int]
    at_cuts: list[list[int]]
    ids: list[np.ndarray]
    lengths: list[np.ndarray | None]
    weights: list[np.ndarray | None]
    dense: np.ndarray  # (n, n_dense) float32
    labels: dict[str, np.ndarray]  # float32
    groups: dict[str, np.ndarray]  # int64
    stage: np.ndarray | None  # int64
    teacher: np.ndarray | None  # float32
    oracle: dict[str, np.ndarray]  # float32

    @property
    def num_batches(self) -> int:
        return len(self.cuts) - 1


class BatchBuilder:
    """Turns Arrow tables with the schema's columns into :class:`Batch` es, column by column
    (no Python loop over rows), checking every value the schema forbids on the way.

    ``columns`` converts and checks a table once; :meth:`window` then gathers rows of it in any
    order with one gather per column, and :meth:`batch` makes each batch of that window from
    slices (one concatenation for the KJT's ids, views for the rest).

    Example:
        >>> builder = BatchBuilder(schema)
        >>> batch = builder.build(table, where="train/part-00000.parquet")
        >>> cols = builder.columns(table, where="train/part-00000.parquet")
        >>> first_two = builder.assemble(cols.take(np.array([0, 1])))
        >>> window = builder.window(cols, np.random.permutation(cols.n), [0, 1024, cols.n])
        >>> first, second = builder.batches(window)
    """

    def __init__(self, schema: BatchSchema) -> None:
        self.schema = schema
        self._weighted = any(s.weights for s in schema.sparse)
        self._singles = [sc for sc in schema.sparse if not sc.multi]
        self._single_row = {sc.key: i for i, sc in enumerate(self._singles)}
        largest = max((sc.num_embeddings for sc in schema.sparse), default=1)
        # ids are checked (or hashed) into their tables before they are narrowed
        self.id_dtype = np.int32 if largest <= np.iinfo(np.int32).max + 1 else np.int64
        s = schema
        others = [*s.labels, *s.groups.values(), s.stage, s.teacher, *s.oracle.values()]
        self._values = [c for c in dict.fromkeys(others) if c]
        # columns whose nulls are an error (what needs a value); the teacher and oracle may be null
        self._required = {c: "a group id" for c in s.groups.values()}
        self._required.update({s.stage: "a stage"} if s.stage else {})
        self._required.update({c: "a label" for c in s.labels})
        self._binary = list(dict.fromkeys(s.binary_labels))
        self._graded = [c for c in dict.fromkeys(s.labels) if c not in s.binary_labels]

    # ---- conversion and checks ----------------------------------------------------------------

    def columns(self, table: pa.Table, where: str = "table", first_row: int = 0) -> Columns:
        """Convert ``table`` and check it; DataError names ``where``, the column and the row
        (counted from ``first_row``) of the first value the schema forbids."""
        s = self.schema
        n = table.num_rows
        dense = np.empty((n, len(s.dense)), dtype=np.float32)
        for j, name in enumerate(s.dense):
            values = _numbers(table, name, where, first_row, required="a dense feature")
            # a finite sum proves every value finite in one pass; only a failure needs the scan
            if values.dtype.kind == "f" and not np.isfinite(values.sum(dtype=np.float64)):
                bad = ~np.isfinite(values)
                if bad.any():
                    row = int(np.argmax(bad))
                    raise DataError(where, f"column '{name}' holds {values[row]} at row "
                                    f"{first_row + row}; dense features must be finite")
            dense[:, j] = values
        values = {c: _numbers(table, c, where, first_row, self._required.get(c))
                  for c in self._values}
        for c in self._binary:
            _check_binary(values[c], c, where, first_row)
        for c in self._graded:
            _check_finite(values[c], c, where, first_row)

        singles = np.empty((len(self._singles), n), dtype=self.id_dtype)
        single_valid: dict[str, np.ndarray] = {}
        for i, sc in enumerate(self._singles):
            col = _chunk(table, sc.column)
            valid = None
            if col.null_count:
                valid = single_valid[sc.key] = _valid(col)
                col = col.fill_null(0)
            ids = col.to_numpy(zero_copy_only=False)
            np.copyto(singles[i], self._checked(sc, ids, None, valid, where, first_row),
                      casting="unsafe")
        jagged: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        weights: dict[str, np.ndarray] = {}
        for sc in s.sparse:
            if not sc.multi:
                continue
            offsets, ids = _list_column(_chunk(table, sc.column), sc.column, where)
            ids = self._checked(sc, ids, offsets, None, where, first_row)
            # writable: torch views them when a window gathers rows (_take_jagged)
            jagged[sc.key] = (offsets, np.require(ids.astype(self.id_dtype, copy=False),
                                                  requirements="W"))
            if sc.weights:
                w = _chunk(table, sc.weights).flatten().to_numpy(zero_copy_only=False)
                if len(w) != len(ids):
                    raise DataError(where, f"column '{sc.weights}' holds {len(w)} weights for "
                                    f"the {len(ids)} ids of '{sc.column}'")
                weights[sc.key] = np.require(w.astype(np.float32, copy=False), requirements="W")
        return Columns(n, dense, singles, single_valid, jagged, weights, values)

    def _checked(self, sc: SparseColumn, ids: np.ndarray, offsets: np.ndarray | None,
                 valid: np.ndarray | None, where: str, first_row: int) -> np.ndarray:
        """Ids within [0, num_embeddings) (narrowed by the caller, once checked); out-of-range
        ids are an error or hashed."""
        if sc.oov == OOVPolicy.HASH:
            return np.mod(ids, sc.num_embeddings)
        if len(ids):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= sc.num_embeddings:
                bad_value = lo if lo < 0 else hi
                pos = int(np.argmax(ids == bad_value))
                if valid is not None and bad_value == 0:  # the 0 filled in for a null is fine
                    pos = int(np.argmax((ids == bad_value) & valid))
                row = pos if offsets is None else \
                    int(np.searchsorted(offsets, pos, side="right")) - 1
                what = "a negative id" if bad_value < 0 else "an id beyond its table"
                raise DataError(where, f"column '{sc.column}' has {what} ({bad_value}) at row "
                                f"{first_row + row}; the table of '{sc.key}' has "
                                f"{sc.num_embeddings} rows [0, {sc.num_embeddings}) "
                                "(set oov = 'hash' to map ids into it)")
        return ids

    def validate(self, table: pa.Table, where: str, first_row: int = 0) -> None:
        """Raise DataError naming ``where``, the column and the row of the first bad value."""
        self.columns(table, where, first_row)

    # ---- building -----------------------------------------------------------------------------

    def build(self, table: pa.Table, where: str = "table") -> Batch:
        """Every row of ``table``, in order."""
        return self.assemble(self.columns(table, where))

    def assemble(self, cols: Columns) -> Batch:
        """A Batch of every row of ``cols``."""
        return self.batch(self.window(cols), 0)

    def window(self, cols: Columns, rows: np.ndarray | None = None,
               cuts: Sequence[int] | None = None) -> Window:
        """Rows ``rows`` of ``cols`` (every row, in order, when None) to be cut into batches at
        ``cuts`` (one batch when None): every column gathered once, in its tensor's dtype.

        Example:
            >>> window = builder.window(cols, rows=np.random.permutation(cols.n),
            ...                         cuts=[0, 2048, cols.n])
            >>> first, second = builder.batches(window)
        """
        s = self.schema
        n = cols.n if rows is None else len(rows)
        cuts = [0, n] if cuts is None else list(cuts)

        # every key's ids in row order, with its lengths (None: one id per row) and weights
        singles = cols.singles if rows is None else np.take(cols.singles, rows, axis=1)
        ids: list[np.ndarray] = []
        lens: list[np.ndarray | None] = []
        wts: list[np.ndarray | None] = []
        for sc in s.sparse:
            w = None
            if sc.multi:
                offsets, v = cols.jagged[sc.key]
                w = cols.weights.get(sc.key)
                if rows is None:
                    ln = np.diff(offsets)
                    v = v[offsets[0]:offsets[-1]]
                    w = None if w is None else w[offsets[0]:offsets[-1]]
                else:
                    ln, v, w = _take_jagged(offsets, v, w, rows)
            else:
                v, ln = singles[self._single_row[sc.key]], None
                valid = cols.single_valid.get(sc.key)
                if valid is not None:  # a null single id is an empty bag
                    valid = valid if rows is None else valid[rows]
                    v, ln = v[valid], valid
            ids.append(v)
            lens.append(ln)
            wts.append(w)

        # where each key's ids start at each cut
        at_cuts = np.empty((len(cuts), len(ids)), dtype=np.int64)
        for k, ln in enumerate(lens):
            if ln is None:
                at_cuts[:, k] = cuts
            else:
                ends = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(ln, out=ends[1:])
                at_cuts[:, k] = ends[cuts]

        def column(name: str, dtype: type) -> np.ndarray:
            # astype copies when rows is None: batches never alias the rows they came from,
            # nor Arrow's read-only memory
            v = cols.values[name]
            return v.astype(dtype) if rows is None else np.take(v, rows).astype(dtype, copy=False)

        return Window(
            cuts=cuts, at_cuts=at_cuts.tolist(), ids=ids, lengths=lens, weights=wts,
            dense=np.array(cols.dense) if rows is None else np.take(cols.dense, rows, axis=0),
            labels={k: column(k, np.float32) for k in s.labels},
            groups={k: column(c, np.int64) for k, c in s.groups.items()},
            stage=column(s.stage, np.int64) if s.stage else None,
            teacher=column(s.teacher, np.float32) if s.teacher else None,
            oracle={k: column(c, np.float32) for k, c in s.oracle.items()},
        )

    def batch(self, window: Window, j: int) -> Batch:
        """Batch ``j`` of ``window``: the KJT's values, lengths and weights in one concatenation
        each, every other tensor a view; the KJT carries its stride and per-key lengths, so
        that nothing downstream recomputes them (on a GPU, that would wait for the device)."""
        w, t = window, torch.from_numpy
        a, b, lo, hi = w.cuts[j], w.cuts[j + 1], w.at_cuts[j], w.at_cuts[j + 1]
        rows = b - a
        values = np.concatenate([v[lo[k]:hi[k]] for k, v in enumerate(w.ids)], dtype=np.int64)
        lengths = np.ones(len(w.ids) * rows, dtype=np.int32)
        for k, ln in enumerate(w.lengths):
            if ln is not None:
                lengths[k * rows:(k + 1) * rows] = ln[a:b]
        weights = None
        if self._weighted:
            weights = np.concatenate([np.ones(hi[k] - lo[k], dtype=np.float32) if x is None
                                      else x[lo[k]:hi[k]] for k, x in enumerate(w.weights)])
        per_key = [y - x for x, y in zip(lo, hi, strict=True)]
        kjt = KeyedJaggedTensor(
            keys=self.schema.sparse_keys, values=t(values), lengths=t(lengths),
            weights=None if weights is None else t(weights), stride=rows,
            length_per_key=per_key, offset_per_key=list(accumulate(per_key, initial=0)))
        return Batch(
            dense=t(w.dense[a:b]), sparse=kjt,
            labels={k: t(v[a:b]) for k, v in w.labels.items()},
            groups={k: t(v[a:b]) for k, v in w.groups.items()},
            stage=None if w.stage is None else t(w.stage[a:b]),
            teacher=None if w.teacher is None else t(w.teacher[a:b]),
            oracle={k: t(v[a:b]) for k, v in w.oracle.items()},
        )

    def batches(self, window: Window, first: int = 0) -> Iterator[Batch]:
        """The batches of ``window`` from batch ``first`` on, each built as it is asked for."""
        return (self.batch(window, j) for j in range(first, window.num_batches))


def _chunk(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _numbers(table: pa.Table, name: str, where: str, first_row: int,
             required: str | None) -> np.ndarray:
    """A numeric column as numpy; nulls are an error where ``required`` says what needs a value,
    NaN elsewhere (e.g. the teacher score of rows the ranker never scored)."""
    col = _chunk(table, name)
    if col.null_count:
        if required:
            row = int(np.argmax(~_valid(col)))
            raise DataError(where, f"column '{name}' has a null at row {first_row + row}; "
                            f"{required} needs a value")
        return _nan_for_null(col)
    return col.to_numpy(zero_copy_only=False)


def _valid(col: pa.Array) -> np.ndarray:
    """Which rows of ``col`` hold a value, unpacked from Arrow's bitmap (a tenth of the cost of
    ``is_valid()``)."""
    bitmap = col.buffers()[0]
    if bitmap is None:
        return np.ones(len(col), dtype=bool)
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), count=col.offset + len(col),
                         bitorder="little")
    return bits[col.offset:].view(bool)


_NAN_OR_ONE = np.array([np.nan, 1.0], dtype=np.float32)


def _nan_for_null(col: pa.Array) -> np.ndarray:
    """A numeric column as float32, NaN where null.

    A null's slot holds anything; multiplying every slot by NaN (null) or 1 (valid) costs no
    branch, unlike np.where or Arrow's casts, and keeps each valid value exact, -0.0 and inf
    included.

    Example:
        >>> _nan_for_null(pa.array([1.5, None, -0.0], type=pa.float32()))
        array([ 1.5,  nan, -0. ], dtype=float32)
    """
    if pa.types.is_boolean(col.type):  # bit-packed: no slot to read
        return col.cast(pa.float32()).to_numpy(zero_copy_only=False)
    values = np.frombuffer(col.buffers()[1], dtype=col.type.to_pandas_dtype(),
                           count=col.offset + len(col))[col.offset:]
    return values.astype(np.float32, copy=False) * np.take(_NAN_OR_ONE, _valid(col).view(np.uint8))


def _check_binary(values: np.ndarray, name: str, where: str, first_row: int) -> None:
    """A binary label holds only 0 and 1: anything else (2, 0.5, -1, NaN) would silently train
    a wrong loss. Two reductions prove a clean integer column; floats need one more pass."""
    if values.dtype == np.bool_ or not len(values):
        return
    lo, hi = values.min(), values.max()  # NaN propagates and fails both comparisons
    if lo >= 0 and hi <= 1 and (values.dtype.kind != "f"
                                or not np.any((values > 0) & (values < 1))):
        return
    row = int(np.argmax((values != 0) & (values != 1)))
    raise DataError(where, f"column '{name}' holds {values[row].item()} at row "
                    f"{first_row + row}; a binary label must be 0 or 1 (list it in "
                    "data.graded_labels if it holds grades)")


def _check_finite(values: np.ndarray, name: str, where: str, first_row: int) -> None:
    """A graded label may hold any finite value; NaN or inf would poison every loss it enters."""
    # a finite sum proves every value finite in one pass; only a failure needs the scan
    if values.dtype.kind != "f" or np.isfinite(values.sum(dtype=np.float64)):
        return
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(where, f"column '{name}' holds {values[row]} at row {first_row + row}; "
                        "labels must be finite")


def _list_column(col: pa.Array, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, values) of a list column; a null list is an empty bag."""
    flat = col.flatten()  # respects slicing and skips whatever backs a null list
    if flat.null_count:
        raise DataError(where, f"column '{name}' has a null inside an id list")
    offsets = col.offsets.to_numpy().astype(np.int64)
    if col.null_count:  # a null list may be backed by values: count none of them
        offsets[1:] = np.cumsum(np.diff(offsets) * _valid(col))
        offsets[0] = 0
    else:
        offsets -= offsets[0]
    return offsets, flat.to_numpy(zero_copy_only=False)


def _take_jagged(offsets: np.ndarray, ids: np.ndarray, weights: np.ndarray | None,
                 rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Lengths (int32), ids and weights of ``rows`` of a jagged column, in the order of ``rows``
    (any rows, repeats allowed).

    FBGEMM's segment gather copies each row's run in one compiled pass: 2-3x numpy, which needs
    a position per id (ones, a scatter of the jumps and a cumsum) before its take.

    Example:
        >>> ln, ids, _ = _take_jagged(np.array([0, 2, 2, 5]), np.arange(5), None,
        ...                           np.array([2, 1, 0]))
        >>> ln.tolist(), ids.tolist()
        ([3, 0, 2], [2, 3, 4, 0, 1])
    """
    lengths = torch.from_numpy(np.diff(offsets).astype(np.int32))
    values = torch.from_numpy(ids[offsets[0]:offsets[-1]])
    w = None if weights is None else torch.from_numpy(weights[offsets[0]:offsets[-1]])
    out_lengths, out_ids, out_w = torch.ops.fbgemm.permute_1D_sparse_data(
        torch.from_numpy(rows.astype(np.int32)), lengths, values, w, None)
    return out_lengths.numpy(), out_ids.numpy(), None if out_w is None else out_w.numpy()
