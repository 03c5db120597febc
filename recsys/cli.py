"""The ``recsys`` command line: thin wrappers over the library.

    recsys spec show SPEC [--set k=v ...]
    recsys data synth SPEC [--out DIR] [--force]
    recsys data prepare FORMAT --input PATH --out DIR [...]
    recsys data inspect SPEC [--view V]
    recsys train SPEC [--set k=v ...] [--run-dir DIR] [--resume | --overwrite]
                                                           (one process, or under torchrun)
    recsys evaluate RUN_DIR [--scores PARQUET]
    recsys plan SPEC --world-size 64 --device cuda
    recsys bench data|train|moe|serve|hgr|ranktower|scaling|rvq|all [--out DIR] [--quick] [...]
    recsys export RUN_DIR --out DIR [--quantize int8|fp16|none]
    recsys predict EXPORT_DIR --data PARQUET --out PARQUET
    recsys rvq encode RUN_DIR --out DIR
    recsys report [--only NAME ...] [--seeds N] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from recsys.errors import RecsysError
from recsys.fsutil import output_error, writing

T = TypeVar("T")


def _add_spec(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="experiment spec (TOML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, e.g. --set train.batch_size=4096 (repeatable)")


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from recsys.spec import load_spec

    return load_spec(args.spec, args.overrides)


class OptionError(RecsysError):
    """A command-line option has a value the command cannot use."""


def _options(build: Callable[[], T], *options: str) -> T:
    """``build()`` a config from command-line options; the ValueError its checks raise for a bad
    value becomes one error line, the config's field names spelled as the options
    (``steps must be >= 1`` -> ``--steps must be >= 1``)."""
    from pydantic import ValidationError

    try:
        return build()
    except ValidationError as e:
        message = e.errors()[0]["msg"].removeprefix("Value error, ")
    except ValueError as e:
        message = str(e)
    named = message
    for option in sorted(options, key=len, reverse=True):
        named = re.sub(rf"\b{option[2:].replace('-', '_')}\b", option, named)
    raise OptionError(named if named != message else f"{'/'.join(options)}: {message}"
                      ) from None


# ---- spec -----------------------------------------------------------------------------------------

def cmd_spec_show(args: argparse.Namespace) -> int:
    from recsys.spec import dump_toml, spec_hash

    spec = _load(args)
    print(f"# resolved spec {args.spec}, hash {spec_hash(spec)}")
    print(dump_toml(spec))
    return 0


# ---- data -----------------------------------------------------------------------------------------

def cmd_data_synth(args: argparse.Namespace) -> int:
    from recsys.data.source import ensure_dataset
    from recsys.spec import DataSource

    if args.out:
        args.overrides.append(f"data.path={args.out}")
    spec = _load(args)
    if spec.data.source != DataSource.SYNTHETIC:
        print(f"error: {args.spec}: data.source is '{spec.data.source}', not 'synthetic'",
              file=sys.stderr)
        return 2
    with writing(spec.data.path):
        manifest = ensure_dataset(spec, force=args.force)
    _print_rows(manifest)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from recsys.data.adapters import prepare
    from recsys.spec import PrepareSpec

    options = {k: v for k, v in {
        "label_threshold": args.label_threshold, "valid_fraction": args.valid_fraction,
        "test_fraction": args.test_fraction, "hash_size": args.hash_size,
    }.items() if v is not None}
    opts = _options(lambda: PrepareSpec(input=str(args.input), **options), "--label-threshold",
                    "--valid-fraction", "--test-fraction", "--hash-size")
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


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from recsys.data.schema import SPLITS, BatchSchema
    from recsys.data.source import ensure_dataset, open_split
    from recsys.data.summary import format_summary, summarise_split

    spec = _load(args)
    manifest = ensure_dataset(spec)
    view = args.view or spec.data.view
    schema = BatchSchema.from_spec(spec, manifest)
    summaries = [summarise_split(open_split(spec, manifest, split, view), split)
                 for split in SPLITS if split in manifest.views[view]]
    print(format_summary(manifest, view, schema, summaries))
    return 0


# ---- bench ----------------------------------------------------------------------------------------

def cmd_bench_data(args: argparse.Namespace) -> int:
    from recsys.bench import write_result
    from recsys.bench.data import DataBenchConfig, run

    spec = _load(args)
    cfg = _options(lambda: DataBenchConfig(view=args.view, batch_size=args.batch_size,
                                           repeats=args.repeats, one_core=not args.all_cores),
                   "--batch-size", "--repeats")
    result, table = run(spec, cfg)
    path = write_result(args.out, "data", result, table)
    print(table)
    print(f"\nwrote {path}")
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from recsys.bench import write_result
    from recsys.bench.train import (
        TrainBenchConfig,
        check_plain_optimizers,
        random_batches,
        run,
        stress_spec,
    )

    cfg = _options(lambda: TrainBenchConfig(steps=args.steps, warmup=args.warmup,
                                            repeats=args.repeats, one_core=not args.all_cores),
                   "--steps", "--warmup", "--repeats")
    if args.tables is not None:
        try:
            spec = stress_spec(args.tables, args.rows, args.dim, args.dense,
                               args.batch_size or 2048, args.overrides)
        except ValueError as e:
            print(f"error: --tables/--rows: {e}", file=sys.stderr)
            return 2
        batches = random_batches(spec, cfg.warmup + cfg.steps, cfg.seed)
    else:
        if args.batch_size:
            args.overrides.append(f"train.batch_size={args.batch_size}")
        spec = _load(args)
        batches = None  # the first batches of the spec's training loader
    try:  # before the children start: they would fail on it with a traceback
        check_plain_optimizers(spec.train)
    except ValueError as e:
        print(f"error: {args.spec}: {e}", file=sys.stderr)
        return 2
    result, table = run(spec, cfg, batches)
    path = write_result(args.out, "train", result, table)
    print(table)
    print(f"\nwrote {path}")
    return 0


def cmd_bench_moe(args: argparse.Namespace) -> int:
    from recsys.bench.moe import config_from_args, run_and_write

    moe = _load(args).model.moe
    run_and_write(_options(lambda: config_from_args(args, moe), "--fields", "--dim",
                           "--batch-size", "--repeats", "--warmup"), args.out)
    return 0


# ---- export and predict ---------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from recsys.export.torchscript import export_run
    from recsys.tables import format_table

    info = export_run(args.run_dir, args.out, args.quantize, check=not args.no_check)
    print(f"exported {args.run_dir} ({info['arch']}, embeddings {info['quantize']}) to "
          f"{args.out}: model.pt {info['model_bytes']:,} bytes, manifest.json")
    if "serving_split" in info:
        split = info["serving_split"]
        timing = split["score_1000_cached"]
        print(f"serving split: {', '.join(split['files'])} ({split['items_cached']:,} items "
              f"cached); scoring 1,000 cached candidates for one request: p50 "
              f"{timing['p50_ms']:.2f} ms, p99 {timing['p99_ms']:.2f} ms")
    if "parity" in info:
        p = info["parity"]
        print(f"\nparity on {p['rows']:,} {p['split']} rows (eager PyTorch vs exported):")
        recorded = p.get("recorded", {})
        rec = recorded.get("tasks", {}) if recorded.get("available") else {}
        print(format_table(
            ["task", "max |diff|", "AUC eager", "AUC exported", "AUC the run recorded"],
            [[t, v["max_abs_diff"], v["auc_eager"], v["auc_exported"],
              rec[t]["auc_recorded"] if t in rec else float("nan")]
             for t, v in p["tasks"].items()]))
        if not rec:
            print(f"(not compared with the run's metrics: {recorded.get('why', 'none recorded')})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from recsys.export.predictor import predict_parquet

    if args.batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1, got {args.batch_size}")
    with writing(args.out):
        s = predict_parquet(args.export_dir, args.data, args.out, batch_size=args.batch_size,
                            progress=not args.no_progress)
    means = ", ".join(f"{t} {v:.4f}" for t, v in s["mean_prob"].items() if v is not None)
    print(f"scored {s['rows']:,} rows from {s['files']} file(s) in {s['seconds']:.1f} s "
          f"({s['rows_per_s']:,.0f} rows/s); mean probability: {means or '-'}; wrote {s['out']}")
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from recsys.bench.serve import config_from_args, run_and_write

    run_and_write(_options(lambda: config_from_args(args), "--batch-sizes", "--repeats",
                           "--warmup", "--calls"), args.out)
    return 0


def cmd_bench_all(args: argparse.Namespace) -> int:
    import logging

    from recsys.bench.all import AllConfig, run_all

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    summary = run_all(AllConfig(Path(args.out), quick=args.quick), args.only)
    print(f"\n{summary}\n\nwrote {args.out}/NAME.json and NAME.md for each")
    return 0


# ---- rvq ------------------------------------------------------------------------------------------

def cmd_rvq_encode(args: argparse.Namespace) -> int:
    import json

    from recsys.quantization.offline import encode_run

    summary = encode_run(args.run_dir, args.out, field=args.field, iters=args.iters,
                         batch_size=args.batch_size, seed=args.seed, force=args.force)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}: train on it with data.source = 'parquet', data.path = '{args.out}',"
          " loss.hierarchical.codes = 'data'")
    return 0


# ---- report ---------------------------------------------------------------------------------------

REPORTS = ("interactions", "sparsity", "ranking-losses", "ranktower")


def cmd_report(args: argparse.Namespace) -> int:
    import logging

    from recsys.bench import write_result
    from recsys.experiments.interactions import (
        InteractionsConfig,
        run_interactions,
        run_sparsity,
    )
    from recsys.experiments.ranking_losses import RankingLossesConfig, run_ranking_losses
    from recsys.experiments.ranktower import RankTowerConfig, run_ranktower
    from recsys.experiments.report import write_report

    if args.seeds is not None and args.seeds < 1:
        raise OptionError(f"--seeds must be >= 1, got {args.seeds}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # --quick: a smoke run of every code path (CI): tiny data, few steps, one seed
    sizes: dict[str, Any] = {"seeds": args.seeds or 3}
    if args.quick:
        sizes = {"seeds": args.seeds or 1, "synthetic_requests": 3000, "max_steps": 20}
    interactions = InteractionsConfig(**sizes, **({"l1_values": (0.0, 0.1)} if args.quick
                                                  else {}))
    runners = {"interactions": lambda out: run_interactions(interactions, out),
               "sparsity": lambda out: run_sparsity(interactions, out),
               "ranking-losses": lambda out: run_ranking_losses(RankingLossesConfig(**sizes),
                                                                out),
               "ranktower": lambda out: run_ranktower(RankTowerConfig(**sizes), out)}
    out = Path(args.out)
    for name in args.only or REPORTS:
        result, table = runners[name](out)
        path = write_result(out, name, {"command": f"recsys report --only {name}", **result},
                            table)
        print(f"\n{table}\n\nwrote {path}")
    print(f"wrote {write_report(out)}")
    return 0


# ---- plan -----------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from recsys.train.run import run_training

    if args.resume and args.overwrite:
        print("error: --resume and --overwrite exclude each other", file=sys.stderr)
        return 2
    run_training(_load(args), args.run_dir, progress=not args.no_progress, resume=args.resume,
                 overwrite=args.overwrite)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from recsys.train.run import evaluate_run

    evaluate_run(args.run_dir, scores=args.scores)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from recsys.fsutil import atomic_write_text
    from recsys.train.planning import peak_rss_bytes, plan_report, plan_spec, plan_summary

    spec = _load(args)
    world_size = spec.distributed.world_size if args.world_size is None else args.world_size
    try:
        result = plan_spec(spec, world_size, args.device, batch_size=args.batch_size,
                           local_world_size=args.local_world_size, hbm_gb=args.hbm_gb,
                           ddr_gb=args.ddr_gb)
    except ValueError as e:  # constraints the device cannot run, or no plan fits
        print(f"error: {args.spec}: {e}", file=sys.stderr)
        return 2
    print(plan_report(spec, result.plan, result.topology, result.estimated_storage))
    rss = peak_rss_bytes()
    print(f"\nplanned in {result.seconds:.1f} s ({result.num_proposals} proposals) on the meta "
          f"device; peak RSS {rss / 2**30:.2f} GiB")
    if args.json:
        summary = plan_summary(spec, result.plan, result.topology, result.estimated_storage)
        summary.update(plan_seconds=result.seconds, peak_rss_bytes=rss)
        out = Path(args.json)
        text = json.dumps(summary, indent=1) + "\n"
        with writing(out):
            if out.exists() and not out.is_file():  # /dev/stdout, a pipe: not to be renamed over
                out.write_text(text)
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(out, text)
        print(f"wrote {out}")
    return 0


# ---- wiring ---------------------------------------------------------------------------------------

def _add_bench_options(p: argparse.ArgumentParser, name: str, all_cores_help: str) -> None:
    """What every benchmark takes: the spec and overrides, where results go, repeats, cores."""
    p.add_argument("--spec", dest="spec", default="specs/quickstart.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="bench-results", help=f"where {name}.json / {name}.md go")
    p.add_argument("--repeats", type=int, default=3, help="best of this many, side by side")
    p.add_argument("--all-cores", action="store_true", help=all_cores_help)


def build_parser() -> argparse.ArgumentParser:
    from recsys import __version__

    parser = argparse.ArgumentParser(prog="recsys", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"recsys {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    spec = sub.add_parser("spec", help="inspect experiment specs").add_subparsers(
        dest="action", required=True)
    p = spec.add_parser("show", help="print the resolved spec (defaults filled in) and its hash")
    _add_spec(p)
    p.set_defaults(fn=cmd_spec_show)

    data = sub.add_parser("data", help="generate, prepare and inspect datasets").add_subparsers(
        dest="action", required=True)
    p = data.add_parser("synth", help="run the synthetic cascade simulator into Parquet shards")
    _add_spec(p)
    p.add_argument("--out", help="dataset directory (default: the spec's data.path)")
    p.add_argument("--force", action="store_true",
                   help="replace a dataset made from another config")
    p.set_defaults(fn=cmd_data_synth)

    p = data.add_parser("prepare", help="convert raw MovieLens / Criteo / libFM files")
    p.add_argument("format", choices=["movielens", "criteo", "libfm"])
    p.add_argument("--input", required=True, type=Path, help="raw file or directory")
    p.add_argument("--out", required=True, type=Path, help="dataset directory to write")
    p.add_argument("--label-threshold", type=float,
                   help="positive label cut (MovieLens: rating >= 4; libFM: label > 0)")
    p.add_argument("--valid-fraction", type=float, help="share of rows for valid (default 0.1)")
    p.add_argument("--test-fraction", type=float, help="share of rows for test (default 0.1)")
    p.add_argument("--hash-size", type=int, help="Criteo categorical buckets (default 2^20)")
    p.add_argument("--force", action="store_true", help="replace an existing different dataset")
    p.set_defaults(fn=cmd_data_prepare)

    p = data.add_parser("inspect", help="read a spec's dataset back through the loader and "
                        "summarise it")
    _add_spec(p)
    p.add_argument("--view", help="dataset view (default: the spec's data.view)")
    p.set_defaults(fn=cmd_data_inspect)

    bench = sub.add_parser("bench", help="benchmarks (JSON + table)").add_subparsers(
        dest="action", required=True)
    p = bench.add_parser("data", help="Parquet -> Batch rows/s against a bare pyarrow read")
    _add_bench_options(p, "data", "do not pin to one core")
    p.add_argument("--view", default="cascade")
    p.add_argument("--batch-size", type=int, help="default: the spec's train.batch_size")
    p.set_defaults(fn=cmd_bench_data)

    p = bench.add_parser("train", help="samples/s of the sharded ranker (DMP, fused optimizer, "
                         "pipeline) against the same model in plain PyTorch")
    _add_bench_options(p, "train", "torch's default threads, not 1")
    p.add_argument("--tables", type=int, help="stress spec instead of --spec: N sparse features "
                   "on random ids, one table each (e.g. 26)")
    p.add_argument("--rows", type=int, default=100_000, help="rows per stress table")
    p.add_argument("--dim", type=int, default=16, help="embedding dim of the stress tables")
    p.add_argument("--dense", type=int, default=13, help="dense features of the stress spec")
    p.add_argument("--batch-size", type=int,
                   help="default: the spec's train.batch_size (stress: 2048)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per side and repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    p.set_defaults(fn=cmd_bench_train)

    p = bench.add_parser("moe", help="AdaEnsemble inference time per example when every row "
                         "exits at depth 1 versus deeper (early exit's saving)")
    _add_bench_options(p, "moe", "torch's default threads, not 1")
    p.add_argument("--fields", type=int, default=26, help="fields m (default 26)")
    p.add_argument("--dim", type=int, default=16, help="embedding dim D (default 16)")
    p.add_argument("--batch-size", type=int, default=2048, help="rows per forward (default 2048)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per case first")
    p.set_defaults(fn=cmd_bench_moe, spec="specs/adaensemble.toml", repeats=10)

    p = sub.add_parser("export", help="TorchScript export of a run's latest checkpoint "
                       "(quantized embeddings, flat inputs, manifest)")
    p.add_argument("run_dir", help="a run directory with checkpoints")
    p.add_argument("--out", required=True, help="directory for model.pt and manifest.json")
    p.add_argument("--quantize", choices=["none", "fp16", "int8"], default="none",
                   help="embedding rows as stored in the artifact (default none: fp32)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the parity check against eager PyTorch on the test split")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("predict", help="score a Parquet file (or directory) with an export")
    p.add_argument("export_dir", help="a directory written by recsys export")
    p.add_argument("--data", required=True, help="Parquet file or directory of part files")
    p.add_argument("--out", required=True, help="output Parquet: ids and <task>_prob columns")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_predict)

    rvq = sub.add_parser("rvq", help="residual vector quantization of user embeddings"
                         ).add_subparsers(dest="action", required=True)
    p = rvq.add_parser("encode", help="codes of a trained run's user table, written into a copy "
                       "of its dataset (column rvq_code)")
    p.add_argument("run_dir", help="a run directory with checkpoints")
    p.add_argument("--out", required=True, help="the new dataset directory")
    p.add_argument("--field", default="user_id", help="the user-id feature (default user_id)")
    p.add_argument("--iters", type=int, default=10, help="EMA epochs after k-means")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per EMA step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(fn=cmd_rvq_encode)

    p = bench.add_parser("serve", help="p50/p99 latency, throughput and artifact size of eager, "
                         "scripted fp32 / fp16 / int8 at batch 1, 64, 1024")
    p.add_argument("--out", default="bench-results", help="where serve.json / serve.md go")
    p.add_argument("--run-dir", help="a trained run instead of the random stress model")
    p.add_argument("--tables", type=int, default=26, help="stress model: tables (default 26)")
    p.add_argument("--rows", type=int, default=100_000, help="rows per table (default 100k)")
    p.add_argument("--dim", type=int, default=64,
                   help="embedding dim (default 64: int8 rows are padded to 16 bytes)")
    p.add_argument("--dense", type=int, default=13, help="dense features (default 13)")
    p.add_argument("--batch-sizes", dest="batch_sizes", type=int, nargs="+",
                   default=[1, 64, 1024])
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds of timed calls")
    p.add_argument("--all-cores", action="store_true", help="torch's default threads, not 1")
    p.set_defaults(fn=cmd_bench_serve)

    for name, what in (("hgr", "step time of the hierarchical group-wise loss against BCE"),
                       ("ranktower", "RankTower's online scoring of 1,000 cached candidates"),
                       ("scaling", "samples/s and per-rank embedding memory on 1 and 2 processes"),
                       ("rvq", "RVQ encoding and update throughput")):
        p = bench.add_parser(name, help=what)
        p.add_argument("--out", default="bench-results")
        p.add_argument("--quick", action="store_true", help="tiny sizes")
        p.set_defaults(fn=cmd_bench_all, only=[name])

    p = bench.add_parser("all", help="every benchmark (JSON + table each) and a summary")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks every code path")
    p.add_argument("--only", nargs="+", choices=["data", "train", "moe", "serve", "hgr",
                                                  "ranktower", "scaling", "rvq"])
    p.set_defaults(fn=cmd_bench_all)

    p = sub.add_parser("report", help="quality experiments over seeds (mean ± std tables)")
    p.add_argument("--only", nargs="+", choices=REPORTS, help=f"default: all of {REPORTS}")
    p.add_argument("--seeds", type=int, help="seeds per variant (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the code paths")
    p.add_argument("--out", default="report", help="where NAME.json / NAME.md and runs/ go")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("train", help="train and evaluate a spec's model (torchrun for several "
                       "processes); writes a run directory")
    _add_spec(p)
    p.add_argument("--run-dir", help="run directory (default: runs/NAME-HASH)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run directory's latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in the run directory (without it, training into "
                        "a directory that holds a run is an error)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="re-evaluate a run directory from its last complete "
                       "checkpoint, on any number of processes; writes evaluation.json")
    p.add_argument("run_dir", help="a run directory written by recsys train")
    p.add_argument("--scores", help="also write the test split's probabilities here (Parquet, "
                   "one row per test row in file order)")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("plan", help="plan how the spec's embedding tables shard over a cluster "
                       "(on the meta device: nothing is allocated)")
    _add_spec(p)
    p.add_argument("--world-size", type=int, help="ranks in all (default: distributed.world_size)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda, or cpu (gloo: no row-wise sharding); default cuda")
    p.add_argument("--batch-size", type=int,
                   help="rows per rank (default: train.batch_size / world size)")
    p.add_argument("--local-world-size", type=int,
                   help="ranks per host (default: cuda 8, cpu all on this machine)")
    p.add_argument("--hbm-gb", type=float, help="GPU memory per rank in GiB (default 80)")
    p.add_argument("--ddr-gb", type=float,
                   help="host memory per rank in GiB (default: cpu this machine's share)")
    p.add_argument("--json", help="also write the plan summary as JSON to this path")
    p.set_defaults(fn=cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; an error the user can fix is one ``error: ...`` line and exit status 2.

    Under torchrun every rank runs this: each prints its own error once, and a rank whose peer
    failed first says so in one line instead of a traceback from the collective it was in.
    """
    args = build_parser().parse_args(argv)
    code = _run(args)
    try:
        # here, where a failure can be reported, not in the exit flush as "Exception ignored"
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
        return code or 141
    except OSError as e:  # stdout goes to a full disk
        _drop_stdout()
        error = output_error(e, "stdout")
        if error is None:
            raise
        return _error(str(error))
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.fn(args))
    except RecsysError as e:
        return _error(str(e))
    except BrokenPipeError:
        # whoever read our output stopped (`recsys spec show ... | head`): nothing to report, but
        # stdout must not be flushed again at exit, which would print "Exception ignored"
        _drop_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a command that a closed pipe stopped
    except OSError as e:
        # an OSError without a file name: pyarrow's, or print()'s when stdout's disk is full
        error = output_error(e, _output_of(args) if _stdout_ok() else "stdout")
        if error is None:
            raise
        return _error(str(error))
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not _peer_gone(e):
            raise
        rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
        return _error(f"rank {rank} of {world}: another process of this job stopped "
                      f"({_first_line(e)}); its own error says why")


def _error(message: str) -> int:
    _close_progress_bars()
    print(f"error: {message}", file=sys.stderr)
    return 2


def _close_progress_bars() -> None:
    """Finish the bars the error left open, so the error starts a line of its own and no bar is
    redrawn after it (when the bar is garbage-collected)."""
    if "recsys.progress" in sys.modules:
        from recsys.progress import close_progress_bars

        close_progress_bars()


def _output_of(args: argparse.Namespace) -> str:
    """What a command writes, to name in a "cannot write" error whose OSError names no file
    (pyarrow's do not)."""
    for name in ("out", "json", "run_dir"):
        value = getattr(args, name, None)
        if value:
            return str(value)
    if hasattr(args, "run_dir"):  # recsys train without --run-dir
        return "the run directory"
    return "stdout"  # the only thing the other commands write


def _stdout_ok() -> bool:
    """Whether stdout takes its pending output; if not (its disk is full), it is dropped, so that
    the interpreter's exit flush does not fail a second time with "Exception ignored"."""
    try:
        sys.stdout.flush()
    except OSError:
        _drop_stdout()
        return False
    return True


def _drop_stdout() -> None:
    """Point stdout's file descriptor at /dev/null (what is still buffered goes there at exit)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a file descriptor (captured by a test)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


# what a gloo / NCCL collective reports when the process on the other end has exited
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _peer_gone(e: RuntimeError) -> bool:
    """Whether ``e`` is a collective failing because another rank of this torchrun job exited
    (after printing its own error): one line for it, not torch's traceback."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or "torch.distributed" not in sys.modules:
        return False
    return any(s in str(e) for s in _PEER_GONE)


def _first_line(e: BaseException) -> str:
    """The first sentence of an error message, without gloo's ``[source/file.cc:123] `` prefix
    (``Connection closed by peer [127.0.0.1]:24717``)."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line.split(". ", 1)[0].rstrip(".")


if __name__ == "__main__":
    sys.exit(main())
