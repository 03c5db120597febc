"""Raw tables in, model inputs out, exactly as ``recsys data prepare table`` made the training data.

A model trained on a prepared table reads ids and scaled numbers. Tomorrow's events arrive raw:
the user column under its own name (``uid``), string ids, id lists as ``"a|b"`` text, unscaled
prices. :class:`RawInput` maps such a table the way the preparation did, with the same decoders
(:mod:`recsys.data.adapters.table_input`), the dataset's vocabularies (unknown values -> id 0) and its
dense scaling (missing -> 0 after scaling). ``recsys export`` records what it needs in the
export's ``manifest.json`` (``raw_input``, ``vocabularies``, ``dense_scaling``), so the export
alone scores raw data (``recsys predict EXPORT --data RAW --raw``).

Example:
    >>> raw = RawInput.load("exports/events")
    >>> table = raw.convert(pq.read_table("events-day7.parquet"), "events-day7.parquet")
    >>> predictor.predict_table(table)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recsys.data.schema import ColumnRole, DatasetManifest, DenseScaling, VocabInfo
from recsys.data.vocab import Vocabulary
from recsys.errors import DataError

MANIFEST_FILE = "manifest.json"  # as recsys.export.torchscript writes it


def describe_raw_input(dataset: DatasetManifest) -> dict[str, Any] | None:
    """What an export records to map raw tables (None unless the dataset came from
    ``recsys data prepare table``): output column -> (input column, role), and the delimiter
    of id lists stored as text."""
    from recsys.data.adapters.table_input import Layout
    from recsys.spec import PrepareSpec

    if dataset.source.get("format") != "table":
        return None
    options = PrepareSpec(input=str(dataset.source.get("input", "-")),
                          **dict(dataset.source.get("options", {})))  # type: ignore[arg-type]
    layout = Layout.from_options(options)
    return {"columns": {f.name: {"input": f.source, "role": str(f.role)}
                        for f in layout.features},
            "delimiter": options.delimiter}


def export_vocabularies(export_dir: Path, manifest: dict[str, Any]) -> dict[str, Vocabulary]:
    """An export's vocabularies (``manifest.json`` ``vocabularies``, files under ``vocab/``), by
    column; a DataError naming the entry that does not read."""
    where = str(export_dir / MANIFEST_FILE)
    out = {}
    for column, raw in (manifest.get("vocabularies") or {}).items():
        try:
            info = VocabInfo.model_validate(raw)
        except ValueError as e:
            raise DataError(where, f"vocabularies.{column}: {e}") from None
        out[column] = Vocabulary.load(export_dir, column, info)
    return out


def export_dense_scaling(export_dir: Path, manifest: dict[str, Any]) -> dict[str, DenseScaling]:
    """An export's dense scaling (``manifest.json`` ``dense_scaling``): column -> how the data
    preparation scaled its raw numbers; a DataError naming the entry that does not read."""
    where = str(export_dir / MANIFEST_FILE)
    out = {}
    for column, raw in (manifest.get("dense_scaling") or {}).items():
        try:
            out[column] = DenseScaling.model_validate(raw)
        except ValueError as e:
            raise DataError(where, f"dense_scaling.{column}: {e}") from None
    return out


@dataclass
class RawInput:
    """The mapping from a raw table's columns to the model's input columns.

    Args:
        columns: output column -> (input column, role: sparse, multi_sparse or dense).
        delimiter: the separator of id lists stored as text.
        vocabs: output column -> its vocabulary (or hash).
        scaling: dense output column -> how its raw numbers are scaled.
    """

    columns: dict[str, tuple[str, str]]
    delimiter: str
    vocabs: dict[str, Vocabulary]
    scaling: dict[str, DenseScaling]
    where: str = "export"

    @classmethod
    def load(cls, export_dir: str | Path) -> RawInput:
        """The raw-input mapping of an export (a DataError when it has none: its data was not
        prepared from a raw table, so its inputs are ids already)."""
        export_dir = Path(export_dir)
        where = str(export_dir / MANIFEST_FILE)
        try:
            manifest = json.loads((export_dir / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as e:
            raise DataError(where, f"cannot read the export's manifest: {e}") from None
        raw = manifest.get("raw_input")
        if not raw:
            raise DataError(where, "this export records no raw input mapping: its training data "
                            "was not made by `recsys data prepare table`, so it reads ids; score "
                            "prepared data (without --raw)")
        columns = {out: (c["input"], c["role"]) for out, c in raw["columns"].items()}
        return cls(columns, raw["delimiter"], export_vocabularies(export_dir, manifest),
                   export_dense_scaling(export_dir, manifest), where)

    def input_column(self, output: str) -> str:
        """The raw column that feeds model column ``output`` (itself when it is not mapped)."""
        return self.columns[output][0] if output in self.columns else output

    def check(self, names: list[str], needed: list[str], where: str) -> None:
        """Every raw column the model needs is in ``names`` (metadata only)."""
        missing = [f"'{self.input_column(c)}' (for {c})" for c in needed
                   if self.input_column(c) not in names]
        if missing:
            raise DataError(where, f"missing raw column{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)}; the input has: {', '.join(names)}")

    def convert(self, table: pa.Table, where: str, first_row: int = 0,
                needed: list[str] | None = None) -> pa.Table:
        """The model columns ``needed`` (default: every mapped one) of a raw ``table``: ids
        through the vocabularies, id lists split on the delimiter, numbers scaled."""
        from recsys.data.adapters.table_input import Block, decode_dense, decode_ids, decode_multi

        needed = list(self.columns) if needed is None else needed
        self.check(table.column_names, needed, where)
        batch = table.select([self.input_column(c) for c in needed]).combine_chunks()
        block = Block(batch.to_batches()[0] if batch.num_rows else
                      pa.RecordBatch.from_pylist([], schema=batch.schema),
                      Path(where), first_row, first_row, csv=False)
        out: dict[str, pa.Array] = {}
        for c in needed:
            source, role = self.columns.get(c, (c, str(ColumnRole.SPARSE)))
            col = batch.column(source).combine_chunks()
            if role == ColumnRole.DENSE:
                x = decode_dense(col, source, block)
                values = x.fill_null(0.0).to_numpy(zero_copy_only=False)
                if c in self.scaling:
                    values = self.scaling[c].apply(values)
                valid = np.asarray(x.is_valid()) if x.null_count else None
                out[c] = pa.array(values if valid is None else np.where(valid, values, 0.0))
            elif role == ColumnRole.MULTI_SPARSE:
                lists = decode_multi(col, source, self.delimiter, block)
                ids = self._ids(c, lists.flatten())
                out[c] = pa.ListArray.from_arrays(lists.offsets, pa.array(ids, pa.int64()))
            else:
                out[c] = pa.array(self._ids(c, decode_ids(col, source, block)), pa.int64())
        return pa.table(out)

    def _ids(self, column: str, raw: pa.Array) -> np.ndarray:
        if column not in self.vocabs:  # an id column the preparation kept as ids
            return raw.cast(pa.int64()).to_numpy(zero_copy_only=False)
        return self.vocabs[column].ids(raw)
