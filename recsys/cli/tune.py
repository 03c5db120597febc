"""``recsys tune``: hyper-parameter search over a spec's ``[tune]`` space on Optuna."""

from __future__ import annotations

import argparse
from pathlib import Path

from recsys.cli.common import SubParsers, add_command, add_spec
from recsys.errors import UsageError


def register(sub: SubParsers) -> None:
    p = add_command(sub, "tune", cmd_tune, "search a spec's hyper-parameters on Optuna (TPE, "
                    "median pruning; each trial one training run); resumable")
    add_spec(p)
    p.add_argument("--trials", type=int, required=True,
                   help="trials to run now (a resumed study gains this many more)")
    p.add_argument("--jobs", type=int, default=1, help="trials at a time (default 1), each in "
                   "its own process")
    p.add_argument("--study", help="the study's name (default: the spec's name)")
    p.add_argument("--study-dir", default="studies",
                   help="where the study's directory goes (default studies/: studies/NAME)")
    p.add_argument("--storage", help="an Optuna storage URL to share the study between "
                   "machines, e.g. postgresql://user@host/db (default: sqlite in "
                   "STUDY_DIR/NAME/study.db)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: every trial stops after 20 steps, validating every 5")


def cmd_tune(args: argparse.Namespace) -> int:
    for option, value in (("--trials", args.trials), ("--jobs", args.jobs)):
        if value < 1:  # (before importing torch: a usage error is quick)
            raise UsageError(f"{option} must be >= 1, got {value}")
    from recsys.tune import TuneOptions, run_study

    overrides = list(args.overrides)
    if args.quick:
        overrides += ["train.max_steps=20", "train.eval_every_steps=5"]
    result = run_study(args.spec, TuneOptions(
        trials=args.trials, jobs=args.jobs, study=args.study, storage=args.storage,
        study_dir=Path(args.study_dir), overrides=overrides))
    print(f"study {result.study_dir}: "
          + ", ".join(f"{n} {s.lower()}" for s, n in sorted(result.states.items())))
    if result.best_spec is not None:
        print(f"best: trial {result.best_number}, value {result.best_value:.6g}; "
              f"spec {result.best_spec}")
    return 0
