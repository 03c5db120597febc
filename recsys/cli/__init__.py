"""The ``recsys`` command line: thin wrappers over the library.

    recsys spec show SPEC [--set k=v ...]
    recsys spec init DATASET --arch ARCH -o SPEC.toml
    recsys data synth SPEC [--out DIR] [--force]
    recsys data prepare FORMAT --input PATH --out DIR [...]
    recsys data inspect SPEC [--view V]
    recsys train SPEC [--set k=v ...] [--run-dir DIR] [--resume | --overwrite] [--init-from RUN]
                                                           (one process, or under torchrun)
    recsys evaluate RUN_DIR [--scores PARQUET]
    recsys plan SPEC --world-size 64 --device cuda
    recsys tune SPEC --trials N [--jobs J] [--study NAME] [--storage URL] [--study-dir DIR]
    recsys export RUN_DIR --out DIR [--quantize int8|fp16|none]
    recsys predict EXPORT_DIR --data PARQUET --out PARQUET
    recsys serve EXPORT_DIR [--host H] [--port N] [--max-batch-rows R] [--max-wait-ms W]
    recsys rvq encode RUN_DIR --out DIR
    recsys bench data|train|small|models|moe|serve|serve-http|prepare|archs|hgr|ranktower|scaling|rvq|all
                 [--out DIR] [--quick]
    recsys report [--only NAME ...] [--seeds N] [--quick] [--out DIR]

One module per command group registers its parsers beside its handlers (``spec``, ``data``,
``train``: train, evaluate and plan; ``tune``; ``export``: export and predict; ``serve``, ``rvq``,
``bench``, ``report``); ``common`` holds what they share and turns errors into exit statuses. Handlers
import torch and the library when they run, so ``recsys --help`` stays fast.

The text from the exit statuses on is the epilog of ``recsys --help``:

exit status:
  0    success
  1    internal error: an unexpected exception (a bug in recsys); its traceback, then one
       "internal error: ..." line
  2    usage, spec or data error: one "error: ..." line naming what is wrong and where
       (bad options, an invalid spec, unreadable data, an output that cannot be written)
  130  interrupted (Ctrl-C)
  141  stdout closed early (e.g. piped into head)

examples:
  recsys spec show specs/quickstart.toml --set train.batch_size=4096
  recsys data synth specs/quickstart.toml
  recsys data prepare movielens --input ../shared/data/ml-latest-small --out data/movielens
  recsys data prepare table --input events.parquet --out data/events --label clicked \\
      --user user_id --item item_id --time ts --sparse city:user,device --dense price
  recsys spec init data/events --arch dcn -o specs/events.toml
  recsys train specs/quickstart.toml --run-dir runs/qs
  recsys train specs/quickstart.toml --run-dir runs/qs-warm --init-from runs/qs
  recsys evaluate runs/qs --scores qs-test.parquet
  recsys export runs/qs --out exports/qs --quantize int8
  recsys predict exports/qs --data data/quickstart/impressions/test --out scores.parquet
  recsys serve exports/qs --port 8080
  recsys plan specs/industrial.toml --world-size 64 --device cuda
  recsys tune specs/quickstart.toml --trials 40 --jobs 2
  recsys bench data --out bench-results
  recsys bench all --quick --out bench-results
  # several processes, with torchrun or torchx (locally, Slurm, Kubernetes: docs/launching.md)
  torchrun --standalone --nproc_per_node 2 -m recsys.cli train specs/quickstart.toml \\
      --run-dir runs/qs2
  torchx run -s local_cwd apps/components.py:train -j 1x2 --spec specs/quickstart.toml \\
      --run_dir runs/qs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from recsys.cli import bench, data, export, report, rvq, serve, spec, train, tune
from recsys.cli.common import EXIT_PIPE, drop_stdout, error, internal_error, run_handler
from recsys.cli.report import REPORTS
from recsys.fsutil import output_error

__all__ = ["REPORTS", "build_parser", "main"]

# the command groups, in the order `recsys --help` lists them
GROUPS = (spec, data, train, tune, export, serve, rvq, bench, report)


def build_parser() -> argparse.ArgumentParser:
    """The ``recsys`` parser: each command's namespace has ``func``, the handler to run."""
    from recsys import __version__

    doc = __doc__ or ""  # (None under python -OO)
    parser = argparse.ArgumentParser(
        prog="recsys", description=doc.split("\n\n")[0].replace("``", ""),
        epilog=doc[doc.find("\nexit status:\n") + 1:].rstrip() if "\nexit status:\n" in doc
        else None, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"recsys {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND",
                                help="what to run (recsys COMMAND --help for its options)")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status: 0 ok, 1 internal error (a traceback and one
    ``internal error: ...`` line), 2 an error the user can fix (one ``error: ...`` line; argparse
    exits with 2 itself on bad usage).

    Under torchrun every rank runs this: each prints its own error once, and a rank whose peer
    failed first says so in one line instead of a traceback from the collective it was in.
    """
    args = build_parser().parse_args(argv)
    code = run_handler(args)
    try:
        # here, where a failure can be reported, not in the exit flush as "Exception ignored"
        sys.stdout.flush()
    except BrokenPipeError:
        drop_stdout()
        return code or EXIT_PIPE
    except OSError as e:  # stdout goes to a full disk
        drop_stdout()
        failed = output_error(e, "stdout")
        if failed is None:
            return internal_error(e)
        return error(str(failed))
    return code
