"""``recsys bench data | train | models | moe | serve | serve-http | archs | hgr | ranktower |
scaling | rvq | prepare | all``:
benchmarks, each writing NAME.json and a NAME.md table."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from recsys.cli.common import SubParsers, add_command, add_group, add_overrides, check_options, load
from recsys.errors import UsageError

# the benchmarks that `recsys bench all` runs (recsys.bench.all.BENCHES, which imports torch)
BENCHES = ("data", "train", "small", "models", "moe", "serve", "serve-http", "prepare", "archs",
           "hgr", "ranktower", "scaling", "rvq")

# the benchmarks with no options of their own: each runs as `recsys bench all --only NAME`
ONLY_IN_ALL = {
    "small": "DCN-v2 on MovieLens at batch 1024, sharded against plain PyTorch (small-model speed)",
    "hgr": "step time of the hierarchical group-wise loss against BCE",
    "ranktower": "RankTower's online scoring of 1,000 cached candidates",
    "scaling": "samples/s and per-rank embedding memory on 1 and 2 processes",
    "rvq": "RVQ encoding and update throughput",
}


def register(sub: SubParsers) -> None:
    bench = add_group(sub, "bench", "benchmarks (JSON + table)")
    _add_data(bench)
    _add_train(bench)
    _add_models(bench)
    _add_moe(bench)
    _add_serve(bench)
    _add_serve_http(bench)
    _add_archs(bench)
    _add_prepare(bench)
    for name, what in ONLY_IN_ALL.items():
        p = add_command(bench, name, cmd_bench_all, what)
        p.add_argument("--out", default="bench-results",
                       help=f"where {name}.json / {name}.md go (default bench-results)")
        p.add_argument("--quick", action="store_true", help="tiny sizes")
        p.set_defaults(only=[name])
    _add_all(bench)


def _add_bench_options(p: argparse.ArgumentParser, name: str, all_cores_help: str) -> None:
    """What every benchmark takes: the spec and overrides, where results go, repeats, cores."""
    p.add_argument("--spec", dest="spec", default="specs/quickstart.toml",
                   help="experiment spec (TOML) to measure (default %(default)s)")
    add_overrides(p)
    p.add_argument("--out", default="bench-results", help=f"where {name}.json / {name}.md go")
    p.add_argument("--repeats", type=int, default=3, help="best of this many, side by side (default %(default)s)")
    p.add_argument("--all-cores", action="store_true", help=all_cores_help)


# ---- data -----------------------------------------------------------------------------------------

def _add_data(bench: SubParsers) -> None:
    p = add_command(bench, "data", cmd_bench_data,
                    "Parquet -> Batch rows/s against a bare pyarrow read")
    _add_bench_options(p, "data", "do not pin to one core")
    p.add_argument("--view", default="cascade", help="dataset view to read (default cascade)")
    p.add_argument("--batch-size", type=int, help="default: the spec's train.batch_size")


def cmd_bench_data(args: argparse.Namespace) -> int:
    from recsys.bench import write_result
    from recsys.bench.data import DataBenchConfig, run

    spec = load(args)
    cfg = check_options(lambda: DataBenchConfig(view=args.view, batch_size=args.batch_size,
                                                repeats=args.repeats,
                                                one_core=not args.all_cores),
                        "--batch-size", "--repeats")
    result, table = run(spec, cfg)
    path = write_result(args.out, "data", result, table)
    print(table)
    print(f"\nwrote {path}")
    return 0


# ---- train ----------------------------------------------------------------------------------------

def _add_train(bench: SubParsers) -> None:
    p = add_command(bench, "train", cmd_bench_train, "samples/s of the sharded ranker (DMP, "
                    "fused optimizer, pipeline) against the same model in plain PyTorch")
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


def cmd_bench_train(args: argparse.Namespace) -> int:
    from recsys.bench import write_result
    from recsys.bench.plain import check_plain_optimizers
    from recsys.bench.train import TrainBenchConfig, random_batches, run, stress_spec

    cfg = check_options(lambda: TrainBenchConfig(steps=args.steps, warmup=args.warmup,
                                                 repeats=args.repeats,
                                                 one_core=not args.all_cores),
                        "--steps", "--warmup", "--repeats")
    if args.tables is not None:
        try:
            spec = stress_spec(args.tables, args.rows, args.dim, args.dense,
                               args.batch_size or 2048, args.overrides)
        except ValueError as e:
            raise UsageError(f"--tables/--rows: {e}") from e
        batches = random_batches(spec, cfg.warmup + cfg.steps, cfg.seed)
    else:
        if args.batch_size:
            args.overrides.append(f"train.batch_size={args.batch_size}")
        spec = load(args)
        batches = None  # the first batches of the spec's training loader
    try:  # before the children start: they would fail on it with a traceback
        check_plain_optimizers(spec.train)
    except ValueError as e:
        raise UsageError(f"{args.spec}: {e}") from e
    result, table = run(spec, cfg, batches)
    path = write_result(args.out, "train", result, table)
    print(table)
    print(f"\nwrote {path}")
    return 0


# ---- models ---------------------------------------------------------------------------------------

def _add_models(bench: SubParsers) -> None:
    p = add_command(bench, "models", cmd_bench_models, "full sharded training samples/s of every "
                    "ranking arch on one Criteo-shaped world, against dcn (and xdeepint's gftrl "
                    "against its rowwise_adagrad)")
    p.add_argument("--out", default="bench-results", help="where models.json / models.md go")
    p.add_argument("--models", help="comma-separated (default: all of mlp, dcn, dlrm, deepfm, pin, "
                   "xdeepint, xdeepint_adagrad, dynint, moe)")
    p.add_argument("--tables", type=int, help="sparse features, one table each (default 26)")
    p.add_argument("--rows", type=int, help="rows per table (default 262144)")
    p.add_argument("--batch-size", type=int, help="default 2048")
    p.add_argument("--steps", type=int, help="timed steps per repeat (default 20)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3)")
    p.add_argument("--repeats", type=int,
                   help="rounds of the models: the table keeps each model's best, a ratio the "
                        "median of its side-by-side pairs (default 3)")
    p.add_argument("--one-core", action="store_true", help="one thread per training process")


def cmd_bench_models(args: argparse.Namespace) -> int:
    from recsys.bench import write_result
    from recsys.bench.models import NAME, config_from, run

    try:
        cfg = config_from(args)
    except ValueError as e:  # named as the options are
        message = re.sub(r"\b(tables|rows|batch_size|steps|repeats|model)(s?)\b",
                         lambda m: "--" + m.group(1).replace("_", "-") + m.group(2), str(e))
        raise UsageError(message) from None
    result, table = run(cfg)
    print(table)
    print(f"\nwrote {write_result(args.out, NAME, result, table)}")
    return 0


# ---- moe ------------------------------------------------------------------------------------------

def _add_moe(bench: SubParsers) -> None:
    p = add_command(bench, "moe", cmd_bench_moe, "AdaEnsemble inference time per example when "
                    "every row exits at depth 1 versus deeper (early exit's saving)")
    _add_bench_options(p, "moe", "torch's default threads, not 1")
    p.add_argument("--fields", type=int, default=26, help="fields m (default 26)")
    p.add_argument("--dim", type=int, default=16, help="embedding dim D (default 16)")
    p.add_argument("--batch-size", type=int, default=2048, help="rows per forward (default 2048)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per case first")
    p.set_defaults(spec="specs/adaensemble.toml", repeats=10)  # over _add_bench_options' defaults


def cmd_bench_moe(args: argparse.Namespace) -> int:
    from recsys.bench.moe import config_from_args, run_and_write

    # the spec's [model.moe] when its arch has one (specs/adaensemble.toml), else the defaults
    moe = getattr(load(args).model, "moe", None)
    run_and_write(check_options(lambda: config_from_args(args, moe), "--fields", "--dim",
                                "--batch-size", "--repeats", "--warmup"), args.out)
    return 0


# ---- serve ----------------------------------------------------------------------------------------

def _add_serve(bench: SubParsers) -> None:
    p = add_command(bench, "serve", cmd_bench_serve, "p50/p99 latency, throughput and artifact "
                    "size of eager, scripted fp32 / fp16 / int8 at batch 1, 64, 1024")
    p.add_argument("--out", default="bench-results", help="where serve.json / serve.md go")
    p.add_argument("--run-dir", help="a trained run instead of the random stress model")
    p.add_argument("--tables", type=int, default=26, help="stress model: tables (default 26)")
    p.add_argument("--rows", type=int, default=100_000, help="rows per table (default 100k)")
    p.add_argument("--dim", type=int, default=64,
                   help="embedding dim (default 64: int8 rows are padded to 16 bytes)")
    p.add_argument("--dense", type=int, default=13, help="dense features (default 13)")
    p.add_argument("--batch-sizes", dest="batch_sizes", type=int, nargs="+",
                   default=[1, 64, 1024], help="batch sizes to time (default 1 64 1024)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds of timed calls")
    p.add_argument("--all-cores", action="store_true", help="torch's default threads, not 1")


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from recsys.bench.serve import config_from_args, run_and_write

    run_and_write(check_options(lambda: config_from_args(args), "--batch-sizes", "--repeats",
                                "--warmup", "--calls"), args.out)
    return 0


# ---- serve-http ----------------------------------------------------------------------------------

def _add_serve_http(bench: SubParsers) -> None:
    p = add_command(bench, "serve-http", cmd_bench_serve_http, "recsys serve under concurrent "
                    "HTTP clients (p50/p99 latency, requests/s, rows/s) beside in-process calls "
                    "of the same TorchScript module")
    p.add_argument("--out", default="bench-results", help="where serve-http.json / .md go")
    p.add_argument("--export", help="an export directory to serve (default: a random-weight "
                   "stress model exported on the fly)")
    p.add_argument("--tables", type=int, help="random model: sparse features (default 26)")
    p.add_argument("--rows", type=int, help="random model: rows per table (default 100k)")
    p.add_argument("--dim", type=int, help="random model: embedding dim (default 16)")
    p.add_argument("--dense", type=int, help="random model: dense features (default 13)")
    p.add_argument("--clients", type=int, help="concurrent clients (default 8)")
    p.add_argument("--requests", type=int, help="requests to send at most (default 2000)")
    p.add_argument("--rows-per-request", dest="rows_per_request", type=int,
                   help="rows in each request (default 16)")
    p.add_argument("--seconds", type=float, help="time limit of the driving (default 60)")
    p.add_argument("--max-batch-rows", dest="max_batch_rows", type=int,
                   help="the server's --max-batch-rows (default 1024)")
    p.add_argument("--max-wait-ms", dest="max_wait_ms", type=float,
                   help="the server's --max-wait-ms (default 2)")
    p.add_argument("--threads", type=int, help="torch threads, server and in-process "
                   "(default: every core but one, as recsys serve)")
    p.add_argument("--inprocess-calls", dest="inprocess_calls", type=int,
                   help="timed in-process calls (default 500)")
    p.add_argument("--warmup", type=int, help="untimed requests / calls first (default 20)")
    p.add_argument("--seed", type=int, help="seeds the weights and the requests (default 0)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks every code path")


def cmd_bench_serve_http(args: argparse.Namespace) -> int:
    from recsys.bench.serve_http import config_from_args, run_and_write

    cfg = check_options(lambda: config_from_args(args), "--tables", "--rows", "--dim", "--dense",
                        "--clients", "--requests", "--rows-per-request", "--seconds",
                        "--max-batch-rows", "--max-wait-ms", "--threads", "--inprocess-calls",
                        "--warmup")
    run_and_write(cfg, args.out)
    return 0


# ---- archs ----------------------------------------------------------------------------------------

def _add_archs(bench: SubParsers) -> None:
    p = add_command(bench, "archs", cmd_bench_archs, "training and inference samples/s of every "
                    "over-arch in pure torch (runs where only torch is installed), fp32 and bf16")
    p.add_argument("--out", default="bench-results", help="where archs.json / archs.md go")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default cpu")
    p.add_argument("--archs", nargs="+", metavar="ARCH",
                   help="default: all (mlp dcn pin xdeepint dynint dynint-B2 dynint-B3 dynint-B4 "
                        "dynint-static moe dlrm deepfm ranktower dssm)")
    p.add_argument("--batch-sizes", dest="batch_sizes", type=int, nargs="+",
                   help="default 2048 32768")
    p.add_argument("--dtype", nargs="+", choices=("fp32", "bf16", "both"),
                   help="fp32 and/or bf16 autocast (default both)")
    p.add_argument("--repeats", type=int, help="best of this many, side by side (default 3)")
    p.add_argument("--warmup", type=int, help="untimed steps per arch and phase (default 2)")
    p.add_argument("--min-seconds", dest="min_seconds", type=float,
                   help="least time of each timed block (default 0.3)")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default 1)")
    p.add_argument("--all-cores", action="store_true", help="torch's default threads, not 1")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--sync-debug", dest="sync_debug", action="store_true",
                   help="cuda: training forward + backward under set_sync_debug_mode('error'); "
                        "reports the arches that synchronize")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks every code path")
    p.add_argument("--no-progress", dest="no_progress", action="store_true",
                   help="no progress lines on stderr")


def cmd_bench_archs(args: argparse.Namespace) -> int:
    from recsys.bench.archs import config_from_args, run_and_write

    # not check_options (it imports pydantic: this command must run with torch alone); the same
    # renaming of the config's fields to the options
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        message = str(e)
        for field in ("batch_sizes", "min_seconds", "sync_debug", "archs", "dtype",
                      "device", "repeats", "warmup", "threads"):
            message = re.sub(rf"\b{field}\b", "--" + field.replace("_", "-"), message)
        raise UsageError(message) from None
    run_and_write(cfg, args.out)
    return 0


# ---- prepare -------------------------------------------------------------------------------------

def _add_prepare(bench: SubParsers) -> None:
    p = add_command(bench, "prepare", cmd_bench_prepare, "rows/s per core of `recsys data "
                    "prepare table` on a 20-column table from CSV and Parquet, and its peak "
                    "memory against the input's size")
    p.add_argument("--out", default="bench-results", help="where prepare.json / prepare.md go")
    p.add_argument("--rows", type=int, help="rows of the generated table (default 2,000,000)")
    p.add_argument("--repeats", type=int, help="best of this many per case (default 1)")
    p.add_argument("--all-cores", action="store_true", help="do not pin to one core")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks every code path")


def cmd_bench_prepare(args: argparse.Namespace) -> int:
    from recsys.bench import run_and_write
    from recsys.bench.prepare import NAME, PrepareBenchConfig, format_result, run

    def config() -> PrepareBenchConfig:
        base = PrepareBenchConfig.quick() if args.quick else PrepareBenchConfig()
        given = {k: v for k, v in (("rows", args.rows), ("repeats", args.repeats))
                 if v is not None}
        return PrepareBenchConfig(**{**vars(base), **given, "one_core": not args.all_cores})

    cfg = check_options(config, "--rows", "--repeats")
    run_and_write(NAME, lambda c: run(c, progress=not args.quick)[0], format_result, cfg,
                  args.out)
    return 0


# ---- all (and the benchmarks that only it runs) ---------------------------------------------------

def _add_all(bench: SubParsers) -> None:
    p = add_command(bench, "all", cmd_bench_all,
                    "every benchmark (JSON + table each) and a summary")
    p.add_argument("--out", default="bench-results",
                   help="where NAME.json / NAME.md go for each (default bench-results)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks every code path")
    p.add_argument("--only", nargs="+", choices=BENCHES,
                   help="run only these benchmarks (default: all of them)")


def cmd_bench_all(args: argparse.Namespace) -> int:
    import logging

    from recsys.bench.all import AllConfig, run_all

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    summary = run_all(AllConfig(Path(args.out), quick=args.quick), args.only)
    print(f"\n{summary}\n\nwrote {args.out}/NAME.json and NAME.md for each")
    return 0
