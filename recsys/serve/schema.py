"""Request parsing for ``recsys serve``: JSON rows of raw feature values -> checked model inputs.

A row is a JSON object with one entry per input field the model reads (``GET /metadata`` lists
them): a number for each dense field; for each sparse field an id (an integer, or the raw value a
vocabulary maps, e.g. a string) or, for a multi-valued field, a list of them; ``null`` for a
sparse field is an empty bag. Each value's type is checked here, so that a mistake is reported
with the field and the row; the values are then laid out as an Arrow table and converted by
:meth:`Predictor.tensors <recsys.export.predictor.Predictor.tensors>`, which checks the ids
against the tables exactly as ``recsys predict`` does.

Example:
    >>> parser = RowParser(predictor, multi={"user_hist_categories"}, raw_ids={})
    >>> flat = parser.parse([{"user_id": 3, "user_activity": 0.5, ...}])
    >>> flat.rows
    1
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from recsys.data.schema import DenseScaling
from recsys.errors import DataError
from recsys.export.predictor import Predictor
from recsys.serve.batching import Flat

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_NAMED = 10  # at most this many unknown names or ids are listed in one message
_EXPECTS = {"dense": "a number", "id": "one id", "ids": "a list of ids",
            "id or ids": "an id or a list of ids"}
# the column and row that Predictor's DataError messages name
_COLUMN, _ROW = re.compile(r"column '([^']+)'"), re.compile(r"at row (\d+)")


class RequestError(Exception):
    """A request the server refuses: its HTTP status and a message naming the field and row.

    Example:
        >>> RequestError(422, "expects a number", field="item_price", row=2).body()
        {'error': "row 2: field 'item_price': expects a number", 'field': 'item_price', 'row': 2}
    """

    def __init__(self, status: int, message: str, field: str | None = None,
                 row: int | None = None) -> None:
        self.status, self.field, self.row, self.detail = status, field, row, message
        parts = ([f"row {row}"] if row is not None else []) + (
            [f"field '{field}'"] if field is not None else [])
        self.message = ": ".join([*parts, message])
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """The JSON error response."""
        out: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            out["field"] = self.field
        if self.row is not None:
            out["row"] = self.row
        return out


@dataclass(frozen=True)
class RawIds:
    """How a column's raw values become ids (an export's vocabulary): their JSON type and the
    mapping (unknown values -> the vocabulary's id for unknown)."""

    value_type: str  # "string" or "int64", as VocabInfo.value_type
    to_ids: Callable[[pa.Array], np.ndarray]
    unknown_id: int | None = 0  # the id of values the vocabulary lacks (None: hashed, no such id)

    @property
    def arrow_type(self) -> pa.DataType:
        return pa.string() if self.value_type == "string" else pa.int64()


@dataclass(frozen=True)
class _Sparse:
    column: str
    multi: bool | None  # None: the export does not say (an older manifest): a value or a list
    raw: RawIds | None


def _names(values: Collection[Any]) -> str:
    shown = [repr(v) for v in list(values)[:MAX_NAMED]]
    return ", ".join(shown) + (f" and {len(values) - MAX_NAMED} more" if len(values) > MAX_NAMED
                               else "")


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def check_id(v: Any, raw: RawIds | None, column: str, row: int | None) -> Any:
    """One raw id: an integer within int64, or (with a vocabulary of strings) a string (an
    integer is taken as its decimal string there)."""
    if raw is not None and raw.value_type == "string":
        if isinstance(v, str):
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)  # as recsys.data.vocab matches them: 42 is "42"
        raise RequestError(422, f"expects a string id (the export maps them through its "
                           f"vocabulary), got {_json_type(v)}", column, row)
    if isinstance(v, int) and not isinstance(v, bool):
        if INT64_MIN <= v <= INT64_MAX:
            return v
        raise RequestError(422, f"id {v} does not fit in int64", column, row)
    hint = "" if raw is not None else " (this export has no vocabulary for it: send ids)"
    raise RequestError(422, f"expects an integer id{hint}, got {_json_type(v)}", column, row)


def id_array(raw_values: list[Any], raw: RawIds | None) -> np.ndarray:
    """Checked raw ids as int64 model ids (through the vocabulary when there is one)."""
    if raw is None:
        return np.asarray(raw_values, dtype=np.int64).reshape(-1)
    return np.asarray(raw.to_ids(pa.array(raw_values, type=raw.arrow_type)), dtype=np.int64)


def _id_column(ids: np.ndarray, lengths: np.ndarray, single: bool) -> pa.Array:
    """One sparse column as Predictor reads it: int64 ids (a null for an empty bag) for a
    single-id field, the cheaper path per column; else a list of ids per row."""
    if single:
        present = lengths.astype(bool)
        if present.all():
            return pa.array(ids)
        full = np.zeros(len(lengths), dtype=np.int64)
        full[present] = ids
        return pa.array(full, mask=~present)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids, type=pa.int64()))


class RowParser:
    """JSON rows -> :class:`Flat` model inputs for one exported module (its :class:`Predictor`).

    Args:
        predictor: the export's predictor (its manifest says the dense columns, the features'
            columns and tables; its :meth:`~Predictor.tensors` does the conversion).
        multi: the features that take a list of ids; None: unknown (either form is taken).
        raw_ids: column -> its vocabulary, for the columns whose raw values are mapped.
        scaling: dense column -> how the data preparation scaled it; a request sends raw
            numbers and they are scaled the same way here.

    Example:
        >>> RowParser(predictor, multi=set(), raw_ids={}).fields["item_price"]
        'dense'
    """

    def __init__(self, predictor: Predictor, multi: Collection[str] | None,
                 raw_ids: Mapping[str, RawIds],
                 scaling: Mapping[str, DenseScaling] | None = None) -> None:
        self.predictor = predictor
        self.dense = list(predictor.dense)
        self.scaling = [(j, scaling[c]) for j, c in enumerate(self.dense)
                        if scaling and c in scaling]
        by_column: dict[str, list[str]] = {}
        for f, c in predictor.feature_columns.items():
            by_column.setdefault(c, []).append(f)
        self.sparse = [
            _Sparse(c, None if multi is None else any(f in multi for f in fs), raw_ids.get(c))
            for c, fs in by_column.items()]
        self.fields: dict[str, str] = {c: "dense" for c in self.dense}
        for s in self.sparse:
            self.fields[s.column] = {None: "id or ids", True: "ids", False: "id"}[s.multi]

    def describe(self) -> list[dict[str, Any]]:
        """Each input field: its name, kind and, for sparse ones, its features and raw type."""
        scaled = {self.dense[j]: scale.describe() for j, scale in self.scaling}
        out: list[dict[str, Any]] = [{"name": c, "kind": "dense", "type": "number",
                                      "scaling": scaled.get(c, "x as it is")}
                                     for c in self.dense]
        for s in self.sparse:
            features = [f for f, c in self.predictor.feature_columns.items() if c == s.column]
            out.append({"name": s.column, "kind": self.fields[s.column], "features": features,
                        "type": s.raw.value_type if s.raw else "id",
                        "vocabulary": s.raw is not None,
                        "table_rows": {f: self.predictor.rows[f] for f in features}})
        return out

    def parse(self, rows: Any, where: str = "rows") -> Flat:
        """Check ``rows`` (a list of JSON objects) and convert them to the module's inputs.

        Raises:
            RequestError: 422 naming the row and field of the first problem.
        """
        if not isinstance(rows, list):
            raise RequestError(422, f"expects a list of row objects, got {_json_type(rows)}",
                               field=where)
        dense = np.empty((len(rows), len(self.dense)), dtype=np.float64)
        raw: list[list[Any]] = [[] for _ in self.sparse]
        lengths = np.zeros((len(self.sparse), len(rows)), dtype=np.int32)
        for i, row in enumerate(rows):
            self._check_keys(row, i)
            for j, c in enumerate(self.dense):
                dense[i, j] = self._number(row[c], c, i)
            for k, s in enumerate(self.sparse):
                lengths[k, i] = self._ids(row[s.column], s, i, raw[k])
        for j, scale in self.scaling:
            dense[:, j] = scale.apply(dense[:, j])
        columns: dict[str, pa.Array] = {c: pa.array(dense[:, j]) for j, c in enumerate(self.dense)}
        for k, s in enumerate(self.sparse):
            columns[s.column] = _id_column(id_array(raw[k], s.raw), lengths[k], s.multi is False)
        try:
            return Flat(*self.predictor.tensors(pa.table(columns), where=where))
        except DataError as e:  # an id outside its table, a non-finite number: named by row
            column, row = _COLUMN.search(e.message), _ROW.search(e.message)
            raise RequestError(422, e.message, field=column.group(1) if column else None,
                               row=int(row.group(1)) if row else None) from None

    def _check_keys(self, row: Any, i: int) -> None:
        if not isinstance(row, dict):
            raise RequestError(422, f"a row must be an object of field: value, got "
                               f"{_json_type(row)}", row=i)
        unknown = [k for k in row if k not in self.fields]
        if unknown:
            raise RequestError(422, f"not an input of this model (unknown: {_names(unknown)}; "
                               f"it reads {_names(list(self.fields))}; GET /metadata lists "
                               "them)", field=str(unknown[0]), row=i)
        missing = [k for k in self.fields if k not in row]
        if missing:
            raise RequestError(422, f"missing (expects {_EXPECTS[self.fields[missing[0]]]}; "
                               f"missing: {_names(missing)})", field=missing[0], row=i)

    @staticmethod
    def _number(v: Any, column: str, row: int) -> float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise RequestError(422, f"a dense field expects a number, got {_json_type(v)}",
                           column, row)

    @staticmethod
    def _ids(v: Any, s: _Sparse, row: int, out: list[Any]) -> int:
        """Append the checked raw ids of one cell to ``out``; return how many."""
        if v is None:
            return 0  # an empty bag, as a null in a Parquet column
        if isinstance(v, list):
            if s.multi is False:
                raise RequestError(422, "expects one id, got a list", s.column, row)
            out.extend(check_id(x, s.raw, s.column, row) for x in v)
            return len(v)
        if s.multi is True:
            raise RequestError(422, f"expects a list of ids, got {_json_type(v)}", s.column, row)
        out.append(check_id(v, s.raw, s.column, row))
        return 1


class CandidateIndex:
    """Candidate item ids of a two-tower request -> their rows in the export's item cache.

    Args:
        item_ids: the cached items' ids (``item_cache.pt`` ``item_id``), ascending.
        column: the item id field (named in errors).
        raw: the item column's vocabulary, if candidates are raw values.

    Example:
        >>> CandidateIndex(np.array([3, 5, 9]), "item_id", None).positions([9, 3])
        array([2, 0])
    """

    def __init__(self, item_ids: np.ndarray, column: str, raw: RawIds | None) -> None:
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        if len(self.item_ids) > 1 and not (np.diff(self.item_ids) > 0).all():
            raise ValueError("item_ids must be strictly ascending")
        self.column, self.raw = column, raw

    def positions(self, candidates: Any) -> np.ndarray:
        """The cache rows of ``candidates`` (a list of item ids), in order.

        Raises:
            RequestError: 422 for a value of the wrong type, or naming the candidates the cache
                does not hold (with their positions in the list).
        """
        if not isinstance(candidates, list):
            raise RequestError(422, f"expects a list of item ids, got {_json_type(candidates)}",
                               field="candidates")
        checked = []
        for i, v in enumerate(candidates):
            try:
                checked.append(check_id(v, self.raw, self.column, None))
            except RequestError as e:
                raise RequestError(422, f"candidate {i}: {e.message}",
                                   field="candidates") from None
        ids = id_array(checked, self.raw)
        pos = np.searchsorted(self.item_ids, ids)
        found = pos < len(self.item_ids)
        found[found] = self.item_ids[pos[found]] == ids[found]
        if self.raw is not None and self.raw.unknown_id is not None:
            found &= ids != self.raw.unknown_id  # a value the vocabulary lacks is no item
        if not found.all():
            bad = np.flatnonzero(~found)
            raise RequestError(422, f"unknown item id{'s' if len(bad) > 1 else ''} "
                               f"{_names([candidates[i] for i in bad])} at position"
                               f"{'s' if len(bad) > 1 else ''} {_names(bad.tolist())}; the "
                               f"item cache holds {len(self.item_ids):,} items",
                               field="candidates")
        return pos
