"""Criteo display-advertising TSV -> a prepared dataset, streamed in blocks.

Each line is ``label <TAB> I1..I13 <TAB> C1..C26`` (the Kaggle ``train.txt`` and the Criteo 1TB day
files): 13 integer fields that may be empty or negative and 26 categorical fields that are hex
strings (8 digits in the releases; up to 16 are accepted) or empty. Columns written:

=========================  =======  ==============================================================
``click``                  label    label > label_threshold (default 0, i.e. the 0/1 label)
``I1`` .. ``I13``          dense    log1p(max(x, 0)); empty -> 0
``I1_bucket`` ..           sparse   :func:`log_bucket` of x: 0 empty, 1 negative, 2..4 for 0..2,
``I13_bucket``                      then 4 + floor(ln(x)^2) (the Kaggle winners' transform)
``C1`` .. ``C26``          sparse   (hex value mod hash_size) + 1; empty -> 0
=========================  =======  ==============================================================

Criteo's fields are anonymous, so every feature column is marked ``Side.CONTEXT``: nothing says
which describe the user and which the ad, and the dataset has no user or request id (no group
columns). Files are read in blocks (``pyarrow.csv.open_csv``), so a file of many GB never sits in
memory. Two inputs are understood:

* **one file** (the Kaggle ``train.txt``): rows keep file order and split by position: the line
  count comes first (a fast byte count), then the last ``test_fraction`` of lines go to test and
  the ``valid_fraction`` before them to valid.
* **a directory of day files** (the Criteo 1TB release): ``day_0`` .. ``day_23``, each plain or
  gzip-compressed (``day_5.gz``; decompressed as a stream, never to disk), any run of consecutive
  days (``day_0`` .. ``day_2`` for a sample). The split is by days: the last ``test_days`` days
  (default 1) are test, the ``valid_days`` before them (default 1) valid, the rest train. Each day
  becomes its own shards (``impressions/<split>/day_NN/part-*.parquet``), converted by
  ``workers`` processes in parallel; the manifest lists them in day order, so the dataset is the
  same for any number of workers. Names that are not ``day_N[.gz]`` are skipped with a warning;
  a gap (``day_0``, ``day_2``), a day given twice or no day file at all is a DataError
  (:mod:`recsys.data.adapters.criteo_days`).

A line with the wrong number of fields, an empty label or a value that is not an integer (hex
string) is a DataError naming the file, line and column (and saying when that line is the last
one and has no final newline: a file cut short; for a gzip file, when the stream ends early). An
empty file, or one that is not UTF-8 text (UTF-16, NUL bytes), is refused.

Example:
    >>> from recsys.data.adapters import prepare
    >>> m = prepare("criteo", "dac/train.txt", "data/criteo",
    ...             PrepareSpec(input="dac/train.txt", hash_size=1 << 20))
    >>> m.column("C1").cardinality
    1048577
    >>> m = prepare("criteo", "criteo-1tb", "data/criteo-1tb",  # day_0.gz .. day_23.gz
    ...             PrepareSpec(input="criteo-1tb", workers=8))
    >>> m.source["days"]["test"]
    [23]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from recsys.data.adapters.common import (
    PositionalSplitWriter,
    check_text,
    hint_cut_short,
    label_threshold,
)
from recsys.data.adapters.criteo_days import convert_days
from recsys.data.adapters.criteo_format import (
    ARROW_SCHEMA,
    BLOCK_BYTES,
    BUCKET_COLUMNS,
    DAY_OPTIONS,
    DEFAULT_LABEL_THRESHOLD,
    GZ,
    describe_columns,
    open_reader,
    raise_located,
    refuse_options,
    transform,
)
from recsys.data.schema import DatasetManifest
from recsys.errors import DataError
from recsys.spec import PrepareSpec


def convert(input: Path, out: Path, options: PrepareSpec, *, config_hash: str,
            progress: bool = True, block_size: int = BLOCK_BYTES) -> DatasetManifest:
    """Stream a Criteo TSV file, or a directory of day files, into the prepared dataset (see the
    module docstring).

    Called by :func:`recsys.data.adapters.prepare`, which handles caching and ``force``;
    ``block_size`` (bytes per parsed block) bounds the memory.

    Example:
        >>> convert(Path("train.txt"), Path("data/criteo"), PrepareSpec(input="train.txt"),
        ...         config_hash="0123456789abcdef")
    """
    if input.is_dir():
        return convert_days(input, out, options, config_hash=config_hash, progress=progress,
                            block_size=block_size)
    refuse_options(options, DAY_OPTIONS, f"{input} is one file, split by position "
                    "(valid_fraction / test_fraction); valid_days / test_days split a directory "
                    "of day files")
    if input.name.endswith(GZ):
        raise DataError(str(input), "a single gzip file cannot be split by position without "
                        "reading it twice; decompress it, or put it in a directory as day_N.gz "
                        "(split by days)")
    check_text(input)
    threshold = label_threshold(options, DEFAULT_LABEL_THRESHOLD)
    columns = describe_columns(options.hash_size, threshold)
    by_name = {c.name: c for c in columns}
    out_rows = PositionalSplitWriter("criteo", input, out, options, columns, ARROW_SCHEMA,
                                     config_hash, progress)
    with hint_cut_short(input):
        reader = open_reader(input, input, block_size)
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as e:
                raise_located(input, out_rows.done, e)
            table = transform(batch, options.hash_size, threshold, input, out_rows.done + 1)
            for c in BUCKET_COLUMNS:
                top = int(np.max(table.column(c).to_numpy(), initial=0)) + 1
                by_name[c].cardinality = max(by_name[c].cardinality or 1, top)
            out_rows.write(table)
    return out_rows.finish()
