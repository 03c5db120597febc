"""From a spec's ``[data]`` section to a ready dataset: generate, prepare or open it, then check it."""

from __future__ import annotations

from recsys.data.loader import ParquetLoader
from recsys.data.parquet import ParquetSplit
from recsys.data.schema import (
    REQUEST_ID,
    BatchSchema,
    DatasetManifest,
    check_spec_against_manifest,
)
from recsys.spec import DataSource, Spec


def ensure_dataset(spec: Spec, *, force: bool = False, progress: bool = True) -> DatasetManifest:
    """The spec's dataset, made first if it is synthetic or raw and not there yet.

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
    return manifest


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
    batch_size = spec.train.batch_size if training else \
        (spec.train.eval_batch_size or spec.train.batch_size)
    return ParquetLoader(open_split(spec, manifest, split), batch_size, rank=rank,
                         world_size=world_size, seed=spec.train.seed,
                         shuffle=training and spec.data.shuffle,
                         window_batches=spec.data.shuffle_window_batches, drop_last=training,
                         num_workers=spec.data.num_workers,
                         group_column=REQUEST_ID if training and spec.data.request_batches
                         else None)
