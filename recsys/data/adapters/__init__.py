"""Adapters: raw public formats (MovieLens, Criteo TSV, libFM) and any Parquet / CSV table
(``table``) -> prepared Parquet datasets.

Every adapter writes one view, ``impressions``, with the splits ``train``, ``valid`` and ``test``
through :class:`~recsys.data.parquet.DatasetWriter`, and describes every column in ``dataset.json``
(role, side, cardinality, description). Conventions shared by all of them:

* ids are int64, dense values float32, labels int8, multi-valued features ``list<int64>``;
* id 0 means "unknown / missing" in every vocabulary an adapter builds, so its cardinality is the
  vocabulary size + 1 (ids lie in ``[0, cardinality)``);
* the splits are temporal (MovieLens: by timestamp) or positional (Criteo, libFM: file order):
  the last ``test_fraction`` of rows are test, the ``valid_fraction`` before them valid, so no split
  sees the future of a later one.

:func:`prepare` is the entry point; a dataset already prepared with the same format, input and
options is returned as it is, so calling it again is cheap.

Example:
    >>> manifest = prepare("movielens", "../shared/data/ml-latest-small", "data/movielens")
    >>> manifest.rows["impressions"]
    {'train': 80668, 'valid': 10084, 'test': 10084}
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

from recsys.data.adapters.common import (
    VIEW,
    PositionalSplitWriter,
    check_text,
    column,
    count_lines,
    first_bad_cast,
    hint_cut_short,
    label_threshold,
    recorded_options,
    source_info,
    split_sizes,
    unterminated_last_line,
)
from recsys.data.parquet import claim_output, current_dataset, dataset_write
from recsys.data.schema import DatasetManifest
from recsys.errors import DataError, UsageError
from recsys.spec import PrepareSpec

FORMATS = ("movielens", "criteo", "libfm", "table")


def prepare(fmt: str, input: str | Path, out: str | Path, options: PrepareSpec | None = None, *,
            force: bool = False, progress: bool = True) -> DatasetManifest:
    """Convert the raw files of ``fmt`` at ``input`` into a prepared dataset directory ``out``.

    ``input`` says where the raw files are (``options.input`` is not read here: the caller resolves
    it, e.g. relative to the working directory). An ``out`` that already holds a dataset prepared
    from the same format, input and options is returned untouched; one prepared from anything else
    is an error unless ``force``. The write holds the dataset's lock (a second writer of ``out``
    gets a RunError at once); a failed one removes ``OUT.partial`` and leaves ``out`` as it was.

    Args:
        fmt: one of :data:`FORMATS`.
        input: MovieLens: the directory of the release; Criteo: the file, or a directory of
            day files day_N[.gz] (split by days); libFM: the file; table: a
            Parquet / CSV file or a folder of them.
        out: the dataset directory to write (``dataset.json`` + Parquet shards).
        options: splits, label threshold, hashing and shard sizes (defaults when None); format
            table needs at least ``label``.
        force: replace a dataset in ``out`` that was prepared from something else.
        progress: show a progress bar.

    Example:
        >>> opts = PrepareSpec(input="train.txt", hash_size=1 << 18)
        >>> m = prepare("criteo", "train.txt", "data/criteo", opts)
        >>> [c.name for c in m.columns][:3]
        ['click', 'I1', 'I2']
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown raw format '{fmt}' (known: {', '.join(FORMATS)})")
    input = Path(input)
    out = Path(out)
    if not input.exists():
        raise DataError(str(input), f"not found (the raw {fmt} input to prepare)")
    options = options if options is not None else PrepareSpec(input=str(input))
    problem = options.format_problem(fmt)
    if problem is not None:
        raise UsageError(f"{problem[0]}: {problem[1]}")
    chash = config_hash(fmt, input, options)
    existing = current_dataset(out, chash)  # the common case, a complete dataset: no lock
    if existing is not None:
        return existing
    with dataset_write(out):  # one writer per path; a failure removes OUT.partial
        existing = claim_output(out, chash, force)
        if existing is not None:  # another writer finished it between our first look and now
            return existing
        module = importlib.import_module(f"{__name__}.{fmt}")
        return module.convert(input, out, options, config_hash=chash, progress=progress)


# a format's output revision: bumped when its adapter writes different data from the same input,
# so that datasets prepared by the older code are remade instead of reused. MovieLens 1:
# user_prior_count is standardized with the train split's moments.
FORMAT_REVISIONS: dict[str, int] = {"movielens": 1}


def config_hash(fmt: str, input: str | Path, options: PrepareSpec) -> str:
    """16 hex digits that identify a preparation: format, absolute input path, options and the
    format's output revision (:data:`FORMAT_REVISIONS`).

    ``options.input`` is left out: the resolved path stands for it, so a spec read from another
    working directory still finds its dataset; so is ``workers``, which does not change the output,
    and options added after the first datasets were made count only when set away from their
    default (:func:`~recsys.data.adapters.common.recorded_options`).

    Example:
        >>> len(config_hash("libfm", "a.libfm", PrepareSpec(input="a.libfm")))
        16
    """
    identity: dict[str, object] = {"format": fmt, "input": str(Path(input).resolve()),
                                   "options": recorded_options(options)}
    revision = FORMAT_REVISIONS.get(fmt, 0)
    if revision:  # (revision 0 is left out, so the first datasets of a format keep their hash)
        identity["revision"] = revision
    canon = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


# the helpers of recsys.data.adapters.common stay importable from here
__all__ = ["FORMATS", "VIEW", "PositionalSplitWriter", "check_text", "column", "config_hash",
           "count_lines", "first_bad_cast", "hint_cut_short", "label_threshold", "prepare",
           "recorded_options", "source_info", "split_sizes", "unterminated_last_line"]
