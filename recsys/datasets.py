"""From a spec's ``[data]`` section to a ready dataset: generate, prepare or open it, then check it."""

from __future__ import annotations

from pathlib import Path

from recsys.data.loader import ParquetLoader, per_rank_batch
from recsys.data.parquet import ParquetSplit, open_metadata
from recsys.data.schema import (
    MANIFEST,
    REQUEST_ID,
    BatchSchema,
    DatasetManifest,
    check_spec_against_manifest,
    with_dataset_sizes,
)
from recsys.errors import DataError
from recsys.spec import DataSource, Spec


def ensure_dataset(spec: Spec, *, force: bool = False, progress: bool = True) -> DatasetManifest:
    """The spec's dataset, made first if it is synthetic or raw and not there yet, and checked
    (:func:`verify_dataset`) so that a broken shard of any split stops the run before training.

    Example:
        >>> manifest = ensure_dataset(load_spec("specs/quickstart.toml"))
        >>> manifest.rows["impressions"]["train"]
        200000
    """
    data = spec.data
    if data.source == DataSource.SYNTHETIC:
        from recsys.data.synthetic import generate

        assert data.synthetic is not None  # filled in by DataSpec's validator
        manifest = generate(data.synthetic, data.path, force=force, progress=progress)
    elif data.source == DataSource.PARQUET:
        manifest = DatasetManifest.load(data.path)
    else:
        from recsys.data.adapters import prepare

        assert data.prepare is not None  # required by DataSpec's validator
        manifest = prepare(str(data.source), data.prepare.input, data.path, data.prepare,
                           force=force, progress=progress)
    check_spec_against_manifest(spec, manifest)
    verify_dataset(manifest)
    return manifest


def sized_spec(spec: Spec) -> Spec:
    """``spec`` with its ``"auto"`` table sizes read from the dataset already at ``data.path``
    (for what needs sizes without making the dataset, e.g. planning); a SpecError naming the
    tables when there is no dataset there yet.

    Example:
        >>> sized_spec(load_spec("specs/criteo.toml")).features.unsized_tables()
        []
    """
    if not spec.features.unsized_tables():
        return spec
    if (Path(spec.data.path) / MANIFEST).is_file():
        return with_dataset_sizes(spec, DatasetManifest.load(spec.data.path))
    spec.features.require_sizes()
    return spec


def verify_dataset(manifest: DatasetManifest) -> None:
    """Check every shard of every view and split the manifest lists: the file is there, its
    Parquet footer reads, and each split holds the rows the manifest says.

    Only footers are read (milliseconds per file), so a truncated or corrupt validation or test
    shard is a DataError naming it before training starts, not hours later at the first eval.

    Example:
        >>> verify_dataset(DatasetManifest.load("data/quickstart"))
    """
    assert manifest.root is not None, "manifest was not loaded from a directory"
    for view, splits in manifest.views.items():
        for split in splits:
            rows = sum(open_metadata(path).num_rows for path in manifest.files(view, split))
            expected = manifest.rows.get(view, {}).get(split)
            if expected is not None and rows != expected:
                raise DataError(str(manifest.root / view / split), f"the shards hold {rows} rows "
                                f"but {MANIFEST} lists {expected}; the dataset was changed after "
                                "it was written: make it again")


def open_split(spec: Spec, manifest: DatasetManifest, split: str,
               view: str | None = None) -> ParquetSplit:
    """The row groups of one split of the spec's view, checked against the spec's schema."""
    schema = BatchSchema.from_spec(spec, manifest)
    return ParquetSplit(manifest.files(view or spec.data.view, split), schema)



def make_loader(spec: Spec, manifest: DatasetManifest, split: str, *, rank: int = 0,
                world_size: int = 1, training: bool = True) -> ParquetLoader:
    """The loader a trainer or evaluator uses for one split, configured from the spec.

    Training shuffles (if ``data.shuffle``) and drops the rows past the last batch every rank can
    make; evaluation reads every row of the rank's share in file order.

    Example:
        >>> train = make_loader(spec, manifest, "train", rank=0, world_size=2)
        >>> test = make_loader(spec, manifest, "test", training=False)
    """
    # train.batch_size (and eval_batch_size) are global: each rank reads its share
    batch_size = per_rank_batch(spec.train.batch_size if training else
                                (spec.train.eval_batch_size or spec.train.batch_size), world_size)
    return ParquetLoader(open_split(spec, manifest, split), batch_size, rank=rank,
                         world_size=world_size, seed=spec.train.seed,
                         shuffle=training and spec.data.shuffle,
                         window_batches=spec.data.shuffle_window_batches, drop_last=training,
                         num_workers=spec.data.num_workers,
                         group_column=REQUEST_ID if training and spec.data.request_batches
                         else None)
