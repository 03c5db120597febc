"""``recsys data synth | prepare | inspect | criteo-world``: make, convert and read datasets."""

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
    _add_criteo_world(data)


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
                    "convert raw MovieLens / Criteo / libFM files or any Parquet / CSV table")
    p.add_argument("format", choices=["movielens", "criteo", "libfm", "table"],
                   help="layout of the raw files: movielens (a directory: ML-100K u.data, "
                        "ML-1M/10M ratings.dat or ml-latest ratings.csv), criteo (one TSV such as "
                        "train.txt, or a directory of 1TB day files day_N[.gz], split by days) "
                        "or libfm; table: any Parquet / CSV table (a file or a folder), its "
                        "columns named by the table options below")
    p.add_argument("--input", required=True, type=Path, help="raw file or directory")
    p.add_argument("--out", required=True, type=Path, help="dataset directory to write")
    p.add_argument("--label-threshold", type=float,
                   help="positive label cut (MovieLens: rating >= 4; libFM: label > 0)")
    p.add_argument("--valid-fraction", type=float, help="share of rows for valid (default 0.1)")
    p.add_argument("--test-fraction", type=float, help="share of rows for test (default 0.1)")
    p.add_argument("--hash-size", type=int, help="Criteo categorical buckets (default 2^20)")
    p.add_argument("--valid-days", type=int,
                   help="Criteo day files: days before the test days for valid (default 1)")
    p.add_argument("--test-days", type=int,
                   help="Criteo day files: the last days, for test (default 1)")
    p.add_argument("--workers", type=int,
                   help="Criteo day files: processes converting days in parallel (default 1; "
                        "the output is the same for any number)")
    p.add_argument("--force", action="store_true", help="replace an existing different dataset")
    _add_table_options(p)


# the options of `prepare table` -> their PrepareSpec keys
TABLE_OPTIONS = {"--label": "label", "--user": "user", "--item": "item", "--time": "time",
                 "--request": "request", "--sparse": "sparse", "--multi": "multi",
                 "--dense": "dense", "--split": "split", "--min-count": "min_count",
                 "--hash-buckets": "hash_buckets", "--dense-scale": "dense_scale",
                 "--delimiter": "delimiter", "--seed": "seed"}
LIST_OPTIONS = ("sparse", "multi", "dense")


def _add_table_options(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("table options", "format table only: which column is what")
    t.add_argument("--label", help="the 0/1 (or true/false) label column; --label-threshold T "
                   "makes a numeric one 1 where it is >= T")
    t.add_argument("--user", help="user id column -> user_id (sparse, user side, GAUC group)")
    t.add_argument("--item", help="item id column -> item_id (sparse, item side)")
    t.add_argument("--time", help="time column -> timestamp (kept; orders --split time)")
    t.add_argument("--request", help="request id column -> request_id (the request group)")
    t.add_argument("--sparse", action="append", metavar="A,B",
                   help="sparse id columns, comma-separated, each NAME or NAME:user|item|context "
                        "(default context); may repeat")
    t.add_argument("--multi", action="append", metavar="C",
                   help="id-list columns (Arrow lists, or text split on --delimiter); NAME[:SIDE]")
    t.add_argument("--dense", action="append", metavar="D",
                   help="numeric columns (missing -> 0); NAME[:SIDE]")
    t.add_argument("--split", metavar="time|random|column:COL",
                   help="time (needs --time; the default with --time), random (the default "
                        "without) or column:COL (train/valid/test named in COL)")
    t.add_argument("--min-count", type=int, help="train occurrences an id needs to get its own "
                   "id; rarer ids are 0 (default 1)")
    t.add_argument("--hash-buckets", type=int, help="hash every id column into [0, N) instead "
                   "of building vocabularies")
    t.add_argument("--dense-scale", choices=("none", "log", "standard"),
                   help="log: sign(x)log1p(|x|); standard: (x - mean) / std from train "
                        "(default none)")
    t.add_argument("--delimiter", help="separator of --multi text columns (default '|')")
    t.add_argument("--seed", type=int, help="seed of --split random (default 0)")


def _table_options(args: argparse.Namespace) -> dict[str, object]:
    """The table options given, as PrepareSpec keys; any of them with another format is a
    UsageError naming them."""
    given = {key: getattr(args, key) for key in TABLE_OPTIONS.values()
             if getattr(args, key) is not None}
    if given and args.format != "table":
        named = [opt for opt, key in TABLE_OPTIONS.items() if key in given]
        raise UsageError(f"{', '.join(named)}: only for format table, not {args.format}")
    for key in LIST_OPTIONS:
        if key in given:  # --sparse a,b --sparse c -> [a, b, c]
            given[key] = [v.strip() for arg in given[key] for v in arg.split(",") if v.strip()]
    if args.format == "table" and "label" not in given:
        raise UsageError("--label: required for format table (the label column)")
    return given


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from recsys.data.adapters import prepare
    from recsys.spec import PrepareSpec

    options = {k: v for k, v in {
        "label_threshold": args.label_threshold, "valid_fraction": args.valid_fraction,
        "test_fraction": args.test_fraction, "hash_size": args.hash_size,
        "valid_days": args.valid_days, "test_days": args.test_days, "workers": args.workers,
    }.items() if v is not None}
    options.update(_table_options(args))
    opts = check_options(lambda: PrepareSpec(input=str(args.input), **options),
                         "--label-threshold", "--valid-fraction", "--test-fraction",
                         "--hash-size", "--valid-days", "--test-days", "--workers",
                         *TABLE_OPTIONS)
    with writing(args.out):
        manifest = prepare(args.format, args.input, args.out, opts, force=args.force)
    if args.format == "table":
        from recsys.data.adapters.table import format_summary

        print(format_summary(manifest))
        return 0
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


# ---- criteo-world ---------------------------------------------------------------------------------

def _add_criteo_world(data: SubParsers) -> None:
    p = add_command(data, "criteo-world", cmd_data_criteo_world,
                    "write a synthetic Criteo-format train.txt with a known click probability "
                    "and planted feature crosses (for `data prepare criteo`)")
    p.add_argument("--out", required=True, type=Path,
                   help="directory to write train.txt and world.json (the oracle's numbers) to")
    p.add_argument("--rows", type=int, help="lines of train.txt (default 500000)")
    p.add_argument("--seed", type=int, help="seed of the world and its rows (default 0)")
    p.add_argument("--force", action="store_true",
                   help="write into a directory that is not empty (replacing its train.txt and "
                        "world.json)")


def cmd_data_criteo_world(args: argparse.Namespace) -> int:
    from recsys.data.adapters.criteo_world import CriteoWorldConfig
    from recsys.data.adapters.criteo_world_writer import write_criteo_world

    options = {k: v for k, v in {"rows": args.rows, "seed": args.seed}.items() if v is not None}
    cfg = check_options(lambda: CriteoWorldConfig(**options), "--rows", "--seed")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    # a typo'd --out must not scatter files into (or replace the train.txt of) another dataset
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UsageError(f"--out {out}: the directory is not empty; pass --force to write "
                         "train.txt and world.json into it")
    with writing(out):
        write_criteo_world(out, cfg)
    print(f"wrote {out / 'train.txt'} ({cfg.rows} rows); the world and its oracle: "
          f"{out / 'world.json'}")
    print(f"next: recsys data prepare criteo --input {out / 'train.txt'} --out DATASET_DIR")
    return 0
