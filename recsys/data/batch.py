"""The one type everything downstream reads: :class:`Batch`, and its vectorised builder from Arrow."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

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


class BatchBuilder:
    """Turns an Arrow table with the schema's columns into a :class:`Batch`, column by column
    (no Python loop over rows), and checks values the schema forbids.

    Example:
        >>> builder = BatchBuilder(schema)
        >>> builder.validate(table, where="train/part-00000.parquet", first_row=0)
        >>> batch = builder.build(table)
    """

    def __init__(self, schema: BatchSchema) -> None:
        self.schema = schema
        self._weighted = any(s.weights for s in schema.sparse)

    # ---- checks -------------------------------------------------------------------------------

    def validate(self, table: pa.Table, where: str, first_row: int = 0) -> None:
        """Raise DataError naming ``where``, the column and the row of the first bad value."""
        for name in self.schema.dense:
            col = _chunk(table, name)
            if col.null_count:
                raise DataError(where, f"column '{name}' has a null at row "
                                f"{first_row + _first_null(col)}; dense features need a value")
            values = col.to_numpy(zero_copy_only=False)
            if values.dtype.kind == "f":
                bad = ~np.isfinite(values)
                if bad.any():
                    row = int(np.argmax(bad))
                    raise DataError(where, f"column '{name}' holds {values[row]} at row "
                                    f"{first_row + row}; dense features must be finite")
        for s in self.schema.sparse:
            values, lengths = _ids(table, s, where)
            if not len(values):
                continue
            lo, hi = int(values.min()), int(values.max())
            if s.oov == OOVPolicy.HASH:
                continue
            if lo < 0 or hi >= s.num_embeddings:
                bad_value = lo if lo < 0 else hi
                pos = int(np.argmax(values == bad_value))
                row = first_row + int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
                what = "a negative id" if bad_value < 0 else "an id beyond its table"
                raise DataError(where, f"column '{s.column}' has {what} ({bad_value}) at row "
                                f"{row}; the table '{s.key}' has {s.num_embeddings} rows "
                                "[0, {}) (set oov = 'hash' to map ids into it)"
                                .format(s.num_embeddings))
        for name in self.schema.labels:
            col = _chunk(table, name)
            if col.null_count:
                raise DataError(where, f"label column '{name}' has a null at row "
                                f"{first_row + _first_null(col)}")

    # ---- building -----------------------------------------------------------------------------

    def build(self, table: pa.Table) -> Batch:
        n = table.num_rows
        s = self.schema
        dense = np.empty((n, len(s.dense)), dtype=np.float32)
        for j, name in enumerate(s.dense):
            dense[:, j] = _chunk(table, name).to_numpy(zero_copy_only=False)
        all_values, all_lengths, all_weights = [], [], []
        for col in s.sparse:
            values, lengths = _ids(table, col, col.column)
            if col.oov == OOVPolicy.HASH:
                values = np.mod(values, col.num_embeddings)
            all_values.append(values)
            all_lengths.append(lengths)
            if self._weighted:
                all_weights.append(_weights(table, col, len(values)))
        kjt = KeyedJaggedTensor(
            keys=s.sparse_keys,
            values=torch.from_numpy(np.concatenate(all_values).astype(np.int64, copy=False)),
            lengths=torch.from_numpy(np.concatenate(all_lengths).astype(np.int32, copy=False)),
            weights=torch.from_numpy(np.concatenate(all_weights)) if self._weighted else None,
        )
        return Batch(
            dense=torch.from_numpy(dense),
            sparse=kjt,
            labels={k: _float_tensor(table, k) for k in s.labels},
            groups={k: _int_tensor(table, c) for k, c in s.groups.items()},
            stage=_int_tensor(table, s.stage) if s.stage else None,
            teacher=_float_tensor(table, s.teacher) if s.teacher else None,
            oracle={k: _float_tensor(table, c) for k, c in s.oracle.items()},
        )


def _chunk(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _first_null(col: pa.Array) -> int:
    return int(np.argmax(~np.asarray(col.is_valid())))


def _ids(table: pa.Table, s: SparseColumn, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of one sparse column; a null single id is an empty bag."""
    col = _chunk(table, s.column)
    if s.multi:
        offsets = col.offsets.to_numpy()
        flat = col.flatten()
        if flat.null_count:
            raise DataError(where, f"column '{s.column}' has a null inside an id list")
        lengths = np.diff(offsets).astype(np.int32)
        if col.null_count:  # a null list is an empty bag (flatten() skips what backs it)
            lengths[~np.asarray(col.is_valid())] = 0
        return flat.to_numpy(zero_copy_only=False), lengths
    if col.null_count:
        valid = np.asarray(col.is_valid())
        values = col.fill_null(0).to_numpy(zero_copy_only=False)[valid]
        return values, valid.astype(np.int32)
    values = col.to_numpy(zero_copy_only=False)
    return values, np.ones(len(values), dtype=np.int32)


def _weights(table: pa.Table, s: SparseColumn, count: int) -> np.ndarray:
    if not s.weights:
        return np.ones(count, dtype=np.float32)
    w = _chunk(table, s.weights).flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if len(w) != count:
        raise DataError(f"column '{s.weights}'",
                        f"holds {len(w)} weights for the {count} ids of '{s.column}'")
    return w


def _float_tensor(table: pa.Table, name: str) -> torch.Tensor:
    col = _chunk(table, name)
    if col.null_count:
        col = col.cast(pa.float32()).fill_null(float("nan"))
    return torch.from_numpy(_writable(col.to_numpy(zero_copy_only=False).astype(np.float32,
                                                                            copy=False)))


def _int_tensor(table: pa.Table, name: str) -> torch.Tensor:
    return torch.from_numpy(_writable(_chunk(table, name).to_numpy(zero_copy_only=False)
                                      .astype(np.int64, copy=False)))


def _writable(a: np.ndarray) -> np.ndarray:
    # Arrow hands out read-only views; torch wants to own writable memory (a copy, only then)
    return np.require(a, requirements="W")
