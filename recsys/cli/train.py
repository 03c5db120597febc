"""``recsys train | evaluate | plan``: train a spec's model, re-evaluate a run, plan its sharding."""

from __future__ import annotations

import argparse
from pathlib import Path

from recsys.cli.common import SubParsers, add_command, add_spec, load
from recsys.errors import UsageError
from recsys.fsutil import writing


def register(sub: SubParsers) -> None:
    _add_train(sub)
    _add_evaluate(sub)
    _add_plan(sub)


# ---- train ----------------------------------------------------------------------------------------

def _add_train(sub: SubParsers) -> None:
    p = add_command(sub, "train", cmd_train, "train and evaluate a spec's model (torchrun for "
                    "several processes); writes a run directory")
    add_spec(p)
    p.add_argument("--run-dir", help="run directory (default: runs/NAME-HASH)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run directory's latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in the run directory (without it, training into "
                        "a directory that holds a run is an error)")
    p.add_argument("--init-from", metavar="RUN_DIR",
                   help="warm start: begin from another run's latest weights (tables matched by "
                        "name, rows through the datasets' vocabularies; optimizer state fresh)")


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:  # (before importing torch: a usage error is quick)
        raise UsageError("--resume and --overwrite exclude each other")
    from recsys.train.run import run_training

    run_training(load(args), args.run_dir, progress=not args.no_progress, resume=args.resume,
                 overwrite=args.overwrite, init_from=args.init_from)
    return 0


# ---- evaluate -------------------------------------------------------------------------------------

def _add_evaluate(sub: SubParsers) -> None:
    p = add_command(sub, "evaluate", cmd_evaluate, "re-evaluate a run directory from its last "
                    "complete checkpoint, on any number of processes; writes evaluation.json")
    p.add_argument("run_dir", help="a run directory written by recsys train")
    p.add_argument("--scores", help="also write the test split's probabilities here (Parquet, "
                   "one row per test row in file order)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from recsys.train.run import evaluate_run

    evaluate_run(args.run_dir, scores=args.scores)
    return 0


# ---- plan -----------------------------------------------------------------------------------------

def _add_plan(sub: SubParsers) -> None:
    p = add_command(sub, "plan", cmd_plan, "plan how the spec's embedding tables shard over a "
                    "cluster (on the meta device: nothing is allocated)")
    add_spec(p)
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


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from recsys.datasets import sized_spec
    from recsys.fsutil import atomic_write_text
    from recsys.sysinfo import peak_rss_bytes
    from recsys.train.plan_report import plan_report, plan_summary
    from recsys.train.planning import plan_spec

    spec = sized_spec(load(args))
    world_size = spec.distributed.world_size if args.world_size is None else args.world_size
    try:
        result = plan_spec(spec, world_size, args.device, batch_size=args.batch_size,
                           local_world_size=args.local_world_size, hbm_gb=args.hbm_gb,
                           ddr_gb=args.ddr_gb)
    except ValueError as e:  # constraints the device cannot run, or no plan fits
        raise UsageError(f"{args.spec}: {e}") from e
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
