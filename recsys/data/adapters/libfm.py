"""libFM / SVMlight text -> a prepared dataset, streamed in blocks and parsed with pyarrow.compute.

Each line is ``label idx:value idx:value ...`` (whitespace-separated; ``idx`` a non-negative
integer, ``value`` a float; a line may list no features). Columns written:

====================  ============  =============================================================
``click``             label         label > label_threshold (default 0: -1/1 and 0/1 both work)
``label``             other         the raw label (float32), kept for regression or analysis
``features``          multi_sparse  idx + 1 per token (0 stays "unknown"); cardinality max idx + 2
``feature_values``    weights       the token values, aligned with ``features`` (list<float32>)
====================  ============  =============================================================

A spec uses them as one weighted bag: ``kind = "multi_sparse"``, ``weights = "feature_values"``.
libFM's features are anonymous, so ``features`` is marked ``Side.CONTEXT``; there are no group
columns. The file is read in byte blocks cut at line ends; each block becomes one Arrow string
array of lines that is split into tokens and converted column-wise, so there is no Python loop over
lines. Rows keep file order and split by position like Criteo (last ``test_fraction`` of lines test,
the ``valid_fraction`` before them valid). A blank line or a malformed token is a DataError naming
the file, line and token (and says when that line is the last one and has no final newline: a file
cut short). An empty file, or one that is not UTF-8 text (UTF-16, NUL bytes), is refused.

Example:
    >>> from recsys.data.adapters import prepare
    >>> m = prepare("libfm", "frappe.libfm", "data/frappe", PrepareSpec(input="frappe.libfm"))
    >>> m.column("features").cardinality
    5383
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.adapters.common import (
    PositionalSplitWriter,
    check_text,
    column,
    first_bad_cast,
    hint_cut_short,
    label_threshold,
)
from recsys.data.schema import ColumnInfo, ColumnRole, DatasetManifest
from recsys.errors import DataError
from recsys.spec import PrepareSpec, Side

BLOCK_BYTES = 1 << 24  # bytes of text per block: the memory a block needs, times ~10
DEFAULT_LABEL_THRESHOLD = 0.0

ARROW_SCHEMA = pa.schema([("click", pa.int8()), ("label", pa.float32()),
                          ("features", pa.list_(pa.int64())),
                          ("feature_values", pa.list_(pa.float32()))])


def read_lines(path: Path, block_size: int = BLOCK_BYTES) -> Iterator[pa.StringArray]:
    """The file's lines (each with its line end), as one Arrow string array per block of about
    ``block_size`` bytes; blocks end at a line end, so no line is split.

    Example:
        >>> sum(len(block) for block in read_lines(Path("a.libfm"))) == count_lines(Path("a.libfm"))
        True
    """
    carry = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block_size)
            text = carry + chunk
            if not chunk:  # end of file: what is left is the last line, unterminated
                if text:
                    yield _lines(text + b"\n")
                return
            cut = text.rfind(b"\n") + 1
            carry = text[cut:]
            if cut:
                yield _lines(text[:cut])


def _lines(text: bytes) -> pa.StringArray:
    """``text`` (ending in a newline) as one string per line, zero-copy over the bytes.

    Arrow's string spans are contiguous, so each line keeps its newline (:func:`parse_block`
    trims it); the bytes are not checked to be UTF-8 here (``convert`` does).
    """
    ends = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == 10)
    offsets = np.concatenate([[0], ends + 1]).astype(np.int32)
    return pa.StringArray.from_buffers(len(ends), pa.py_buffer(offsets), pa.py_buffer(text))


def convert(input: Path, out: Path, options: PrepareSpec, *, config_hash: str,
            progress: bool = True, block_size: int = BLOCK_BYTES) -> DatasetManifest:
    """Stream a libFM file into the prepared dataset (see the module docstring).

    Called by :func:`recsys.data.adapters.prepare`, which handles caching and ``force``.

    Example:
        >>> convert(Path("a.libfm"), Path("data/a"), PrepareSpec(input="a.libfm"),
        ...         config_hash="0123456789abcdef")
    """
    if not input.is_file():
        raise DataError(str(input), "expected a libFM text file, found a directory")
    check_text(input)
    threshold = label_threshold(options, DEFAULT_LABEL_THRESHOLD)
    columns = describe_columns(threshold)
    features = next(c for c in columns if c.name == "features")
    out_rows = PositionalSplitWriter("libfm", input, out, options, columns, ARROW_SCHEMA,
                                     config_hash, progress)
    with hint_cut_short(input):
        for lines in read_lines(input, block_size):
            _check_utf8(lines, input, out_rows.done + 1)
            table, top = parse_block(lines, threshold, input, out_rows.done + 1)
            features.cardinality = max(features.cardinality or 1, top + 1)
            out_rows.write(table)
    return out_rows.finish()


def _check_utf8(lines: pa.StringArray, path: Path, first_line: int) -> None:
    try:
        lines.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    for i in range(len(lines)):  # the error path only: find the line to name
        try:
            lines[i].as_py()
        except UnicodeDecodeError:
            raise DataError(f"{path}:{first_line + i}", "is not UTF-8 text") from None


def parse_block(lines: pa.StringArray, threshold: float, path: Path,
                first_line: int) -> tuple[pa.Table, int]:
    """Lines -> (output rows, the largest feature id in them, 0 if none).

    Example:
        >>> parse_block(pa.array(["1 3:0.5 7:1"]), 0.0, Path("a.libfm"), 1)[0].to_pylist()
        [{'click': 1, 'label': 1.0, 'features': [4, 8], 'feature_values': [0.5, 1.0]}]
    """
    tokens = pc.ascii_split_whitespace(pc.utf8_trim_whitespace(lines))
    count = pc.list_value_length(tokens).to_numpy()  # >= 1: a blank line splits into [""]
    label_text = pc.list_element(tokens, 0)
    label = _cast(label_text, pa.float64(), path, first_line, np.arange(len(lines)), "label")
    # the features: every token after the first of its line, with the line it came from
    is_feature = np.ones(int(count.sum()), dtype=bool)
    is_feature[np.concatenate([[0], np.cumsum(count)[:-1]])] = False
    flat = tokens.flatten().filter(pa.array(is_feature))
    line_of = pc.list_parent_indices(tokens).to_numpy()[is_feature]
    parts = pc.split_pattern(flat, ":")
    bad = pc.not_equal(pc.list_value_length(parts), 2).to_numpy(zero_copy_only=False)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{path}:{first_line + line_of[i]}", f"token {flat[i].as_py()!r} is not "
                        "idx:value")
    index = _cast(pc.list_element(parts, 0), pa.int64(), path, first_line, line_of,
                  "feature index", flat)
    if len(index) and index.min() < 0:
        i = int(np.argmax(index < 0))
        raise DataError(f"{path}:{first_line + line_of[i]}", f"token {flat[i].as_py()!r} has a "
                        "negative feature index")
    value = _cast(pc.list_element(parts, 1), pa.float32(), path, first_line, line_of,
                  "feature value", flat)
    offsets = pa.array(np.concatenate([[0], np.cumsum(count - 1)]).astype(np.int32))
    table = pa.table({
        "click": (label > threshold).astype(np.int8),
        "label": label.astype(np.float32),
        "features": pa.ListArray.from_arrays(offsets, pa.array(index + 1)),
        "feature_values": pa.ListArray.from_arrays(offsets, pa.array(value)),
    }, schema=ARROW_SCHEMA)
    return table, int(index.max()) + 1 if len(index) else 0


def _cast(text: pa.Array, typ: pa.DataType, path: Path, first_line: int, line_of: np.ndarray,
          what: str, tokens: pa.Array | None = None) -> np.ndarray:
    """Cast a whole column at once; a value that does not convert (or is not finite) is a
    DataError naming its line and token."""
    try:
        values = pc.cast(text, typ).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        values = None
    if values is not None:
        if values.dtype.kind != "f" or np.isfinite(values).all():
            return values
        i = int(np.argmax(~np.isfinite(values)))  # nan/inf would poison every sum they enter
        shown = (tokens if tokens is not None else text)[i].as_py()
        raise DataError(f"{path}:{first_line + line_of[i]}", f"{what} {shown!r} is not finite")
    lo = first_bad_cast(text, typ)
    assert lo is not None, "the whole cast failed, so a value does"
    shown = (tokens if tokens is not None else text)[lo].as_py()
    hint = " (a blank line?)" if shown == "" else ""
    raise DataError(f"{path}:{first_line + line_of[lo]}", f"{what} {shown!r} is not a valid "
                    f"{'integer' if pa.types.is_integer(typ) else 'number'}{hint}")


def describe_columns(threshold: float) -> list[ColumnInfo]:
    """The column descriptions; the cardinality of ``features`` is filled in while reading."""
    return [
        column("click", ColumnRole.LABEL, None, None, f"label > {threshold}"),
        column("label", ColumnRole.OTHER, None, None, "the raw label"),
        column("features", ColumnRole.MULTI_SPARSE, Side.CONTEXT, 1,
               "feature index + 1 per token (0 = unknown); libFM's features are anonymous"),
        column("feature_values", ColumnRole.WEIGHTS, None, None,
               "the value of each token, aligned with features"),
    ]
