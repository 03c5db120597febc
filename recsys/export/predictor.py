"""Batch scoring with an exported model: Arrow tables or Parquet files in, probabilities out.

An export directory (``recsys export``) holds ``model.pt`` and ``manifest.json``; the manifest says
which dense columns, which sparse feature columns (scalar ids or lists of ids), which tables (their
row counts bound every id) and which tasks the model has. :class:`Predictor` turns a table into the
model's flat inputs, checking every value on the way, so that bad data fails with a
:class:`~recsys.errors.DataError` naming the file, column, feature and row, never deep in a kernel.

Example:
    >>> summary = predict_parquet("exports/qs", "data/qs/impressions/test", "scores.parquet")
    >>> summary["rows"], summary["mean_prob"]["click"]
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.types as pat
import torch

from recsys.errors import DataError
from recsys.progress import progress_bar

MODEL_FILE, MANIFEST_FILE = "model.pt", "manifest.json"  # as recsys.export.torchscript writes them
FORMAT = "recsys-torchscript-1"
KEEP = ("request_id", "user_id", "item_id")

ArrayLike = np.ndarray | torch.Tensor


class Predictor:
    """An exported model with its manifest: checks and converts inputs, returns probabilities.

    Args:
        module: the TorchScript module (or the eager serving module of a run),
            ``forward(dense, values, lengths) -> {task: probs}``.
        manifest: the export's manifest (``inputs``, ``tables``, ``tasks``).
        where: names the export in errors.

    Example:
        >>> predictor = Predictor.load("exports/qs")
        >>> probs = predictor.predict_table(pq.read_table("test.parquet"), where="test.parquet")
        >>> probs["click"].shape
        (1500,)
    """

    def __init__(self, module: torch.jit.ScriptModule | torch.nn.Module, manifest: dict[str, Any],
                 where: str = "export") -> None:
        self.module = module.eval()
        self.manifest = manifest
        try:
            inputs = manifest["inputs"]
            self.dense: list[str] = list(inputs["dense"])
            self.features: list[str] = list(inputs["features"])
            self.feature_columns: dict[str, str] = {
                f: inputs["feature_columns"].get(f, f) for f in self.features}
            rows = {f: int(t["rows"]) for t in manifest["tables"] for f in t["features"]}
            self.tables = {f: t["name"] for t in manifest["tables"] for f in t["features"]}
            self.tasks: list[str] = list(manifest["tasks"])
            # each feature's out-of-vocabulary policy, as training applied it ("error": an id
            # outside its table is refused; "hash": ids map into the table by modulo)
            oov = inputs.get("oov", {})
            self.oov: dict[str, str] = {f: str(oov.get(f, "error")) for f in self.features}
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(where, f"the manifest lacks {e} (is it a recsys export?)") from None
        missing = [f for f in self.features if f not in rows]
        if missing:
            raise DataError(where, f"the manifest's tables do not list features {missing}")
        unknown = {f: p for f, p in self.oov.items() if p not in ("error", "hash")}
        if unknown:
            raise DataError(where, f"the manifest's inputs.oov has unknown policies {unknown} "
                            "(expected 'error' or 'hash')")
        self.rows: dict[str, int] = {f: rows[f] for f in self.features}

    @classmethod
    def from_run(cls, run_dir: str | Path) -> Predictor:
        """The trained model of a run directory (its latest complete checkpoint), in eager
        PyTorch, behind the same checks as an export: what ``recsys export`` would write, without
        writing it.

        Example:
            >>> Predictor.from_run("runs/quickstart-demo").tasks
            ['click']
        """
        from recsys.export.torchscript import ServingRanker, manifest
        from recsys.run_dir import RunDir

        run = RunDir(run_dir)
        spec = run.spec()
        ranker, _ = run.trained_ranker("cpu", purpose="predict with")
        serving = ServingRanker(ranker, list(spec.model.tasks), spec.model.esmm).eval()
        return cls(serving, manifest(spec, ranker, serving.keys, "none"), where=str(run_dir))

    @classmethod
    def open(cls, path: str | Path) -> Predictor:
        """An export directory (``manifest.json``) or a run directory (``spec.toml``)."""
        from recsys.run_dir import RunDir

        path = Path(path)
        if (path / MANIFEST_FILE).is_file() or not (path / RunDir.SPEC).is_file():
            return cls.load(path)
        return cls.from_run(path)

    @classmethod
    def load(cls, export_dir: str | Path) -> Predictor:
        """Read ``export_dir/manifest.json`` and ``export_dir/model.pt``.

        Example:
            >>> Predictor.load("exports/qs-int8").tasks
            ['click', 'conversion']
        """
        # the module calls FBGEMM's operators: registering them must precede torch.jit.load
        import fbgemm_gpu  # noqa: F401

        export_dir = Path(export_dir)
        manifest_path, model_path = export_dir / MANIFEST_FILE, export_dir / MODEL_FILE
        if not manifest_path.is_file():
            raise DataError(str(export_dir), f"not an export directory ({MANIFEST_FILE} is "
                            "missing; make one with `recsys export`)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(str(manifest_path), f"not readable JSON: {e}") from None
        if manifest.get("format") != FORMAT:
            raise DataError(str(manifest_path), f"format is {manifest.get('format')!r}; this "
                            f"recsys reads {FORMAT!r}")
        if not model_path.is_file():
            raise DataError(str(export_dir), f"{MODEL_FILE} is missing")
        try:
            module = torch.jit.load(str(model_path), map_location="cpu")
        except (RuntimeError, OSError) as e:
            raise DataError(str(model_path), f"cannot load the TorchScript module: {e}") from None
        return cls(module, manifest, str(manifest_path))

    # ---- flat tensors -------------------------------------------------------------------------

    def predict(self, dense: ArrayLike, values: ArrayLike, lengths: ArrayLike,
                where: str = "input") -> dict[str, np.ndarray]:
        """Score flat inputs laid out as the model takes them (see the manifest's ``layout``).

        Args:
            dense: ``(B, n_dense)`` numbers, columns in ``self.dense`` order.
            values: every feature's ids, feature after feature in ``self.features`` order.
            lengths: ``(n_features * B,)`` ids per row, feature-major.
            where: names the input in errors.

        Returns:
            ``{task: (B,) float32}`` probabilities.

        Example:
            >>> p = predictor.predict(np.zeros((2, 3)), np.zeros(18), np.ones(18, dtype=np.int32))
        """
        dense_t = _tensor(dense)
        values_t, lengths_t = _tensor(values), _tensor(lengths)
        if dense_t.dim() != 2 or dense_t.shape[1] != len(self.dense):
            raise DataError(where, f"dense has shape {tuple(dense_t.shape)}; expected (B, "
                            f"{len(self.dense)}) with columns {self.dense}")
        if not (dense_t.is_floating_point() or _is_int_tensor(dense_t)):
            raise DataError(where, f"dense has dtype {dense_t.dtype}; expected numbers")
        for name, t in (("values", values_t), ("lengths", lengths_t)):
            if t.dim() != 1 or not _is_int_tensor(t):
                raise DataError(where, f"{name} must be a 1-D integer tensor, got dtype {t.dtype} "
                                f"and shape {tuple(t.shape)}")
        dense_t = dense_t.to(torch.float32)
        bad = ~torch.isfinite(dense_t)
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise DataError(where, f"dense column {col} ('{self.dense[col]}') holds "
                            f"{float(dense_t[row, col])} at row {row}; dense features must be "
                            "finite")
        b, n_feat = dense_t.shape[0], len(self.features)
        if lengths_t.numel() != n_feat * b:
            raise DataError(where, f"lengths has {lengths_t.numel()} entries; expected n_features "
                            f"* B = {n_feat} * {b} = {n_feat * b} (feature-major)")
        if lengths_t.numel() and int(lengths_t.min()) < 0:
            pos = int(torch.argmax((lengths_t < 0).to(torch.int8)))
            raise DataError(where, f"lengths holds {int(lengths_t[pos])} for feature "
                            f"'{self.features[pos // b]}' at row {pos % b}; lengths must be >= 0")
        total = int(lengths_t.sum())
        if total != values_t.numel():
            raise DataError(where, f"lengths sum to {total} but values holds {values_t.numel()} "
                            "ids; every id needs a row (lengths are per feature and row)")
        lens = lengths_t.numpy().reshape(n_feat, b) if b else np.zeros((n_feat, 0), np.int64)
        ids = values_t.numpy().astype(np.int64, copy=False)
        conformed: list[np.ndarray] = []
        start = 0
        for f, row_lens in zip(self.features, lens, strict=True):
            count = int(row_lens.sum())
            offsets = np.zeros(b + 1, dtype=np.int64)
            np.cumsum(row_lens, out=offsets[1:])
            conformed.append(self._conform_ids(f, None, ids[start:start + count], offsets,
                                               where, 0))
            start += count
        values_t = torch.from_numpy(np.concatenate(conformed)) if conformed else values_t
        return self._run(dense_t, values_t.to(torch.int64), lengths_t.to(torch.int32))

    def _run(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
             ) -> dict[str, np.ndarray]:
        """The module on checked inputs (no checks here)."""
        if dense.shape[0] == 0:  # no rows: nothing the kernels need to see
            return {t: np.zeros(0, dtype=np.float32) for t in self.tasks}
        with torch.inference_mode():
            out = self.module(dense, values, lengths)
        return {t: out[t].to(torch.float32).numpy() for t in self.tasks}

    def _conform_ids(self, feature: str, column: str | None, ids: np.ndarray,
                     offsets: np.ndarray | None, where: str, first_row: int,
                     rows: np.ndarray | None = None) -> np.ndarray:
        """``feature``'s ids as the model takes them: with the ``hash`` policy mapped into the
        table by modulo (as the training loader did), else checked to lie in [0, rows of its
        table). ``offsets`` map an id's position to its row (jagged ids); else ``rows`` does (the
        rows of non-null scalar ids)."""
        n = self.rows[feature]
        if self.oov[feature] == "hash":
            return np.mod(ids, n)
        if not len(ids):
            return ids
        lo, hi = ids.min(), ids.max()
        if lo >= 0 and hi < n:
            return ids
        bad_value = lo if lo < 0 else hi
        pos = int(np.argmax(ids == bad_value))
        if offsets is not None:
            row = int(np.searchsorted(offsets, pos, side="right")) - 1
        else:
            row = int(rows[pos]) if rows is not None else pos
        what = "a negative id" if bad_value < 0 else "an id beyond its table"
        col = f"column '{column}' (feature '{feature}')" if column else f"feature '{feature}'"
        raise DataError(where, f"{col} has {what} ({bad_value}) at row {first_row + row}; the "
                        f"table '{self.tables[feature]}' has {n} rows, ids must be in [0, {n})")

    # ---- Arrow tables -------------------------------------------------------------------------

    @property
    def columns(self) -> list[str]:
        """The input columns the model reads: dense, then each feature's column."""
        return list(dict.fromkeys([*self.dense, *self.feature_columns.values()]))

    def check_schema(self, schema: pa.Schema, where: str = "table") -> None:
        """Every column the model reads is present with a type it can take (metadata only).

        Example:
            >>> predictor.check_schema(pq.read_schema("test.parquet"), "test.parquet")
        """
        missing = [f"'{c}' (dense feature)" for c in self.dense if c not in schema.names]
        missing += [f"'{c}' (sparse feature '{f}')" for f, c in self.feature_columns.items()
                    if c not in schema.names]
        if missing:
            raise DataError(where, f"missing column{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)}; the input has: {', '.join(schema.names)}")
        for c in self.dense:
            t = schema.field(c).type
            if not (pat.is_integer(t) or pat.is_floating(t)):
                raise DataError(where, f"column '{c}' has type {t}; a dense feature needs "
                                "numbers (float or integer)")
        for f, c in self.feature_columns.items():
            t = schema.field(c).type
            if not (pat.is_integer(t) or _is_int_list(t)):
                raise DataError(where, f"column '{c}' (sparse feature '{f}') has type {t}; "
                                "expected integer ids (int64) or lists of them (list<int64>)")

    def tensors(self, table: pa.Table, where: str = "table", first_row: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dense, values, lengths)`` of ``table``, checked, as :meth:`predict` takes them.

        A null scalar id or a null list is an empty bag (length 0). Errors name ``where``, the
        column, the feature and the row (counted from ``first_row``).

        Example:
            >>> dense, values, lengths = predictor.tensors(table, where="test.parquet")
        """
        self.check_schema(table.schema, where)
        n = table.num_rows
        dense = np.empty((n, len(self.dense)), dtype=np.float32)
        for j, c in enumerate(self.dense):
            col = _combined(table, c)
            if col.null_count:
                row = int(np.argmax(~np.asarray(col.is_valid())))
                raise DataError(where, f"column '{c}' has a null at row {first_row + row}; a "
                                "dense feature needs a value")
            dense[:, j] = col.to_numpy(zero_copy_only=False)
        # a finite sum proves every value finite in one pass; only a failure needs the scan
        if not np.isfinite(dense.sum(dtype=np.float64)):
            bad = ~np.isfinite(dense)
            if bad.any():
                row, j = (int(i) for i in np.argwhere(bad)[0])
                raise DataError(where, f"column '{self.dense[j]}' holds {dense[row, j]} at row "
                                f"{first_row + row}; dense features must be finite")
        values: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        for f in self.features:
            c = self.feature_columns[f]
            col = _combined(table, c)
            if pat.is_integer(col.type):
                if col.null_count:  # a null id is an empty bag
                    valid = np.asarray(col.is_valid())
                    ids = col.drop_null().to_numpy(zero_copy_only=False)
                    ids = self._conform_ids(f, c, ids, None, where, first_row,
                                            np.flatnonzero(valid))
                    lens = valid.astype(np.int32)
                else:
                    ids = col.to_numpy(zero_copy_only=False)
                    ids = self._conform_ids(f, c, ids, None, where, first_row)
                    lens = np.ones(n, dtype=np.int32)
            else:
                offsets, ids = _list_column(col, c, f, where, first_row)
                ids = self._conform_ids(f, c, ids, offsets, where, first_row)
                lens = np.diff(offsets).astype(np.int32)
            values.append(ids.astype(np.int64, copy=False))
            lengths.append(lens)
        return (torch.from_numpy(dense),
                torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
                torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int32)))

    def predict_table(self, table: pa.Table, where: str = "table", first_row: int = 0
                      ) -> dict[str, np.ndarray]:
        """Score every row of an Arrow table (extra columns are ignored).

        Args:
            table: the dense columns and each feature's column (int ids or lists of int ids).
            where: names the input in errors (a file path).
            first_row: the table's first row within ``where``, so that errors name file rows.

        Returns:
            ``{task: (rows,) float32}`` probabilities, in row order.

        Example:
            >>> predictor.predict_table(pq.read_table("test.parquet"))["click"].mean()
        """
        return self._run(*self.tensors(table, where, first_row))


# ---- Parquet files ----------------------------------------------------------------------------


def parquet_files(data: str | Path) -> list[Path]:
    """A Parquet file, or the ``part-*.parquet`` files of a directory (else its ``*.parquet``),
    in name order.

    Example:
        >>> parquet_files("data/qs/impressions/test")[:1]
        [PosixPath('data/qs/impressions/test/part-00000.parquet')]
    """
    data = Path(data)
    if data.is_dir():
        files = sorted(data.glob("part-*.parquet")) or sorted(data.glob("*.parquet"))
        if not files:
            raise DataError(str(data), "the directory holds no Parquet files (*.parquet)")
        return files
    if not data.is_file():
        raise DataError(str(data), "data file not found")
    return [data]


def predict_parquet(export_dir: str | Path | Predictor, data: str | Path, out: str | Path,
                    batch_size: int = 8192, keep: Iterable[str] = KEEP,
                    progress: bool = True, raw: bool = False) -> dict[str, Any]:
    """Score a Parquet file (or a directory of ``part-*.parquet`` files) batch by batch.

    Every file's columns are checked before anything is scored. ``out`` gets, in input row
    order, the columns of ``keep`` that the input has, then one ``<task>_prob`` float32 column per
    task; it appears only once complete (written beside it, then renamed).

    Args:
        export_dir: an export directory, a run directory (its trained model in eager PyTorch),
            or a loaded :class:`Predictor`.
        data: a Parquet file, or a directory of them.
        out: the output Parquet file.
        batch_size: rows scored at a time (bounds the memory used).
        keep: input columns copied to the output where present (ids to join the scores on).
        progress: show a progress bar.
        raw: ``data`` is a raw table of the kind ``recsys data prepare table`` read (its own
            column names, raw ids, unscaled numbers): it is mapped through the export's
            vocabularies and dense scaling first (:mod:`recsys.export.raw`); ``keep`` then names
            model columns whose raw columns are copied.

    Returns:
        ``{"rows", "files", "seconds", "rows_per_s", "mean_prob": {task: float | None},
        "columns", "out"}``.

    Example:
        >>> s = predict_parquet("exports/qs", "data/qs/impressions/test", "scores.parquet")
        >>> s["rows"], round(s["rows_per_s"]), s["mean_prob"]
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    predictor = export_dir if isinstance(export_dir, Predictor) else Predictor.open(export_dir)
    mapper = _raw_input(export_dir) if raw else None
    files = parquet_files(data)
    out = Path(out)
    if out.is_dir():
        raise DataError(str(out), "is a directory; the output is one Parquet file")

    # check every file up front (metadata only): a bad last file must not waste a long run
    schemas = [_read_schema(path) for path in files]
    for path, schema in zip(files, schemas, strict=True):
        if mapper is None:
            predictor.check_schema(schema, str(path))
        else:
            mapper.check(schema.names, predictor.columns, str(path))
    outputs = [f"{t}_prob" for t in predictor.tasks]
    if mapper is not None:  # keep the raw columns behind the model's id columns
        keep = [mapper.input_column(c) for c in keep]
    kept = [c for c in dict.fromkeys(keep) if c in schemas[0].names]
    clash = [c for c in kept if c in outputs]
    if clash:
        raise DataError(str(out), f"kept column(s) {clash} would clash with the predictions "
                        f"{outputs}; leave them out of keep")
    for path, schema in zip(files, schemas, strict=True):
        lacking = [c for c in kept if c not in schema.names]
        if lacking:
            raise DataError(str(path), f"lacks the kept column(s) {lacking} that "
                            f"{files[0].name} has")
    out_schema = pa.schema([schemas[0].field(c) for c in kept]
                           + [pa.field(c, pa.float32()) for c in outputs])
    model_columns = predictor.columns if mapper is None else \
        [mapper.input_column(c) for c in predictor.columns]
    read_columns = list(dict.fromkeys([*model_columns, *kept]))
    total_rows = sum(_num_rows(path) for path in files)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    sums = dict.fromkeys(predictor.tasks, 0.0)
    rows = 0
    start = time.perf_counter()
    bar = progress_bar(total=total_rows, unit="row", unit_scale=True, desc="scoring",
                       disable=not progress)
    try:
        with pq.ParquetWriter(partial, out_schema) as writer:
            for path, first_row, table in _batches(files, read_columns, batch_size):
                model_input = table if mapper is None else \
                    mapper.convert(table, str(path), first_row, predictor.columns)
                probs = predictor.predict_table(model_input, str(path), first_row)
                columns = [_conform(table.column(c), out_schema.field(c), path) for c in kept]
                columns += [pa.array(probs[t], type=pa.float32()) for t in predictor.tasks]
                writer.write_table(pa.Table.from_arrays(columns, schema=out_schema))
                for t in predictor.tasks:
                    sums[t] += float(probs[t].sum(dtype=np.float64))
                rows += table.num_rows
                bar.update(table.num_rows)
        os.replace(partial, out)
    finally:
        bar.close()
        partial.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return {
        "rows": rows, "files": len(files), "seconds": seconds,
        "rows_per_s": rows / seconds if seconds > 0 else float("inf"),
        "mean_prob": {t: (sums[t] / rows if rows else None) for t in predictor.tasks},
        "columns": out_schema.names, "out": str(out),
    }


# ---- helpers ----------------------------------------------------------------------------------


def _raw_input(export_dir: str | Path | Predictor):  # type: ignore[no-untyped-def]
    """The raw-input mapping of an export directory (``--raw``)."""
    from recsys.export.raw import RawInput

    if isinstance(export_dir, Predictor) or not (Path(export_dir) / MANIFEST_FILE).is_file():
        raise DataError(str(export_dir), "--raw maps raw values through an export's "
                        "vocabularies: give an export directory (recsys export RUN_DIR --out DIR)")
    return RawInput.load(export_dir)


def _tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.from_numpy(np.ascontiguousarray(x))


def _is_int_tensor(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _is_int_list(t: pa.DataType) -> bool:
    return (pat.is_list(t) or pat.is_large_list(t)) and pat.is_integer(t.value_type)


def _combined(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _list_column(col: pa.Array, column: str, feature: str, where: str, first_row: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, ids) of a list column; a null list is an empty bag."""
    lengths = np.diff(col.offsets.to_numpy()).astype(np.int64)
    if col.null_count:
        lengths = np.where(np.asarray(col.is_valid()), lengths, 0)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = col.flatten()  # respects slicing and skips whatever backs a null list
    if flat.null_count:
        pos = int(np.argmax(~np.asarray(flat.is_valid())))
        row = int(np.searchsorted(offsets, pos, side="right")) - 1
        raise DataError(where, f"column '{column}' (sparse feature '{feature}') has a null "
                        f"inside the id list of row {first_row + row}; drop it (a null list "
                        "is an empty bag)")
    return offsets, flat.to_numpy(zero_copy_only=False)


def _read_schema(path: Path) -> pa.Schema:
    if path.stat().st_size == 0:
        raise DataError(str(path), "file is empty (0 bytes); expected a Parquet file")
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(str(path), f"not a readable Parquet file (truncated or corrupt?): {e}") \
            from None


def _num_rows(path: Path) -> int:
    return pq.read_metadata(path).num_rows


def _batches(files: list[Path], columns: list[str], batch_size: int
             ) -> Iterator[tuple[Path, int, pa.Table]]:
    """(file, first row within it, table) of at most ``batch_size`` rows, in file order."""
    for path in files:
        first_row = 0
        try:
            handle = pq.ParquetFile(path, memory_map=True)
            for rb in handle.iter_batches(batch_size=batch_size, columns=columns):
                table = pa.Table.from_batches([rb])
                yield path, first_row, table
                first_row += table.num_rows
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path} (from row {first_row})", f"cannot decode: {e}") from None


def _conform(col: pa.ChunkedArray, field: pa.Field, path: Path) -> pa.ChunkedArray:
    """A kept column in the output's type (the first file's): files of a directory may differ."""
    if col.type == field.type:
        return col
    try:
        return col.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(str(path), f"column '{field.name}' has type {col.type}, not "
                        f"{field.type} as in the first file: {e}") from None
