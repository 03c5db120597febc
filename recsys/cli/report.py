"""``recsys report``: quality experiments over seeds (mean ± std tables)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recsys.cli.common import SubParsers, add_command
from recsys.errors import UsageError

# the experiments, in the order `recsys report` runs them (cmd_report maps each to its runner)
REPORTS = ("interactions", "sparsity", "ranking-losses", "ranktower")


def register(sub: SubParsers) -> None:
    p = add_command(sub, "report", cmd_report,
                    "quality experiments over seeds (mean ± std tables)")
    p.add_argument("--only", nargs="+", choices=REPORTS,
                   help=f"run only these experiments (default: all: {', '.join(REPORTS)})")
    p.add_argument("--seeds", type=int, help="seeds per variant (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the code paths")
    p.add_argument("--out", default="report", help="where NAME.json / NAME.md and runs/ go")


def cmd_report(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
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
               "ranktower": lambda out: run_ranktower(RankTowerConfig(**sizes), out)}
    out = Path(args.out)
    for name in args.only or REPORTS:
        result, table = runners[name](out)
        path = write_result(out, name, {"command": f"recsys report --only {name}", **result},
                            table)
        print(f"\n{table}\n\nwrote {path}")
    print(f"wrote {write_report(out)}")
    return 0
