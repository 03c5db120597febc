"""``recsys report``: quality experiments over seeds (mean ± std tables)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recsys.cli.common import SubParsers, add_command
from recsys.errors import UsageError

# the experiments, in the order `recsys report` runs them (cmd_report maps each to its runner)
REPORTS = ("interactions", "sparsity", "ranking-losses", "ranktower")
# long studies that run only when named with --only
ON_REQUEST = ("tuned", "hgr-sweep")


def register(sub: SubParsers) -> None:
    p = add_command(sub, "report", cmd_report,
                    "quality experiments over seeds (mean ± std tables)")
    p.add_argument("--only", nargs="+", choices=REPORTS + ON_REQUEST,
                   help=f"run only these experiments (default: {', '.join(REPORTS)}; "
                        f"{' and '.join(ON_REQUEST)} run only when named: they take hours on "
                        "2 cores)")
    p.add_argument("--seeds", type=int, help="seeds per variant (default 3; --quick 1)")
    p.add_argument("--trials", type=int,
                   help="tuned: Optuna trials per arch and dataset (default 8; --quick 2)")
    p.add_argument("--jobs", type=int, help="tuned: trials at a time (default 1: in this "
                   "process; more: each in its own worker process)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the code paths")
    p.add_argument("--out", default="report", help="where NAME.json / NAME.md and runs/ go")


def cmd_report(args: argparse.Namespace) -> int:
    for option, value in (("--seeds", args.seeds), ("--trials", args.trials),
                          ("--jobs", args.jobs)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")
    import logging

    from recsys.bench import write_result
    from recsys.experiments.hgr_sweep import run_hgr_sweep
    from recsys.experiments.interactions import (
        InteractionsConfig,
        run_interactions,
        run_sparsity,
    )
    from recsys.experiments.ranking_losses import RankingLossesConfig, run_ranking_losses
    from recsys.experiments.ranktower import RankTowerConfig, run_ranktower
    from recsys.experiments.report import write_report
    from recsys.experiments.tuned import run_tuned

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # --quick: a smoke run of every code path (CI): tiny data, few steps, one seed
    sizes: dict[str, Any] = {"seeds": args.seeds or 3}
    if args.quick:
        sizes = {"seeds": args.seeds or 1, "synthetic_requests": 3000, "eval_requests": 1000,
                 "max_steps": 20}
    interactions = InteractionsConfig(**sizes, **({"l1_values": (0.0, 0.1)} if args.quick
                                                  else {}))
    runners = {"interactions": lambda out: run_interactions(interactions, out),
               "sparsity": lambda out: run_sparsity(interactions, out),
               "ranking-losses": lambda out: run_ranking_losses(RankingLossesConfig(**sizes),
                                                                out),
               "ranktower": lambda out: run_ranktower(RankTowerConfig(**sizes), out),
               "tuned": lambda out: run_tuned(_tuned_config(args), out),
               "hgr-sweep": lambda out: run_hgr_sweep(_hgr_config(args), out)}
    # absolute, so that the specs (which hold data paths under it) and their hashes are the same
    # whatever the working directory: a rerun keeps the finished runs
    out = Path(args.out).resolve()
    if (args.trials is not None or args.jobs is not None) and "tuned" not in (args.only or ()):
        raise UsageError("--trials and --jobs are options of --only tuned")
    for name in args.only or REPORTS:
        result, table = runners[name](out)
        path = write_result(out, name, {"command": f"recsys report --only {name}", **result},
                            table)
        print(f"\n{table}\n\nwrote {path}")
    print(f"wrote {write_report(out)}")
    return 0


def _tuned_config(args: argparse.Namespace) -> Any:
    from recsys.experiments.tuned import TunedConfig

    given = {k: v for k, v in (("trials", args.trials), ("jobs", args.jobs),
                               ("seeds", args.seeds)) if v is not None}
    if args.quick:  # every code path on tiny data: 2 trials, one seed, 20 steps a run
        return TunedConfig(**{"trials": 2, "seeds": 1, "startup_trials": 1,
                              "synthetic_requests": 3000, "eval_requests": 1000,
                              "criteo_rows": 20_000, "criteo_hash_size": 4096, "max_steps": 20,
                              **given})
    return TunedConfig(**given)


def _hgr_config(args: argparse.Namespace) -> Any:
    from recsys.experiments.hgr_sweep import HgrSweepConfig

    given = {"seeds": args.seeds} if args.seeds is not None else {}
    if args.quick:  # two worlds, one choice of each kind, one seed, 20 steps a run
        return HgrSweepConfig(**{"synthetic_requests": 3000, "eval_requests": 1000,
                                 "max_steps": 20, "seeds": 1, "worlds": ((0.9, None), (0.9, 1)),
                                 "level_weights": ((0.2, 0.3, 0.5),), "codes_choices": (4,),
                                 **given})
    return HgrSweepConfig(**given)
