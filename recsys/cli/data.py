"""``recsys data synth | prepare | inspect``: make, convert and read back datasets."""

from __future__ import annotations

import argparse
from pathlib import Path

from recsys.cli.common import SubParsers, add_command, add_group, add_spec, check_options, load
from recsys.errors import UsageError
from recsys.fsutil import writing


def register(sub: SubParsers) -> None:
    data = add_group(sub, "data", "generate, prepare and inspect datasets")
    _add_synth(data)
    _add_prepare(data)
    _add_inspect(data)


# ---- synth ----------------------------------------------------------------------------------------

def _add_synth(data: SubParsers) -> None:
    p = add_command(data, "synth", cmd_data_synth,
                    "run the synthetic cascade simulator into Parquet shards")
    add_spec(p)
    p.add_argument("--out", help="dataset directory (default: the spec's data.path)")
    p.add_argument("--force", action="store_true",
                   help="replace a dataset made from another config")


def cmd_data_synth(args: argparse.Namespace) -> int:
    from recsys.datasets import ensure_dataset
    from recsys.spec import DataSource

    if args.out:
        args.overrides.append(f"data.path={args.out}")
    spec = load(args)
    if spec.data.source != DataSource.SYNTHETIC:
        raise UsageError(f"{args.spec}: data.source is '{spec.data.source}', not 'synthetic'")
    with writing(spec.data.path):
        manifest = ensure_dataset(spec, force=args.force)
    _print_rows(manifest)
    return 0


# ---- prepare --------------------------------------------------------------------------------------

def _add_prepare(data: SubParsers) -> None:
    p = add_command(data, "prepare", cmd_data_prepare,
                    "convert raw MovieLens / Criteo / libFM files")
    p.add_argument("format", choices=["movielens", "criteo", "libfm"],
                   help="layout of the raw files: movielens (u.data or ratings.csv), criteo "
                        "(TSV) or libfm")
    p.add_argument("--input", required=True, type=Path, help="raw file or directory")
    p.add_argument("--out", required=True, type=Path, help="dataset directory to write")
    p.add_argument("--label-threshold", type=float,
                   help="positive label cut (MovieLens: rating >= 4; libFM: label > 0)")
    p.add_argument("--valid-fraction", type=float, help="share of rows for valid (default 0.1)")
    p.add_argument("--test-fraction", type=float, help="share of rows for test (default 0.1)")
    p.add_argument("--hash-size", type=int, help="Criteo categorical buckets (default 2^20)")
    p.add_argument("--force", action="store_true", help="replace an existing different dataset")


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from recsys.data.adapters import prepare
    from recsys.spec import PrepareSpec

    options = {k: v for k, v in {
        "label_threshold": args.label_threshold, "valid_fraction": args.valid_fraction,
        "test_fraction": args.test_fraction, "hash_size": args.hash_size,
    }.items() if v is not None}
    opts = check_options(lambda: PrepareSpec(input=str(args.input), **options),
                         "--label-threshold", "--valid-fraction", "--test-fraction",
                         "--hash-size")
    with writing(args.out):
        manifest = prepare(args.format, args.input, args.out, opts, force=args.force)
    _print_rows(manifest)
    return 0


def _print_rows(manifest) -> None:  # type: ignore[no-untyped-def]
    from recsys.tables import format_table

    views = sorted(manifest.rows)
    splits = sorted({s for v in views for s in manifest.rows[v]},
                    key=lambda s: ("train", "valid", "test").index(s)
                    if s in ("train", "valid", "test") else 9)
    print(f"dataset {manifest.root} ({manifest.name}, config {manifest.config_hash})")
    print(format_table(["split", *[f"{v} rows" for v in views]],
                       [[s, *[manifest.rows[v].get(s, 0) for v in views]] for s in splits]))


# ---- inspect --------------------------------------------------------------------------------------

def _add_inspect(data: SubParsers) -> None:
    p = add_command(data, "inspect", cmd_data_inspect,
                    "read a spec's dataset back through the loader and summarise it")
    add_spec(p)
    p.add_argument("--view", help="dataset view (default: the spec's data.view)")


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from recsys.data.schema import SPLITS, BatchSchema
    from recsys.data.summary import format_summary, summarise_split
    from recsys.datasets import ensure_dataset, open_split

    spec = load(args)
    manifest = ensure_dataset(spec)
    view = args.view or spec.data.view
    schema = BatchSchema.from_spec(spec, manifest)
    summaries = [summarise_split(open_split(spec, manifest, split, view), split)
                 for split in SPLITS if split in manifest.views[view]]
    print(format_summary(manifest, view, schema, summaries))
    return 0
