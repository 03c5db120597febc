"""``recsys rvq encode``: residual vector quantization codes of a trained run's user table."""

from __future__ import annotations

import argparse

from recsys.cli.common import SubParsers, add_command, add_group


def register(sub: SubParsers) -> None:
    rvq = add_group(sub, "rvq", "residual vector quantization of user embeddings")

    p = add_command(rvq, "encode", cmd_rvq_encode, "codes of a trained run's user table, "
                    "written into a copy of its dataset (column rvq_code)")
    p.add_argument("run_dir", help="a run directory with checkpoints")
    p.add_argument("--out", required=True, help="the new dataset directory")
    p.add_argument("--field", default="user_id", help="the user-id feature (default user_id)")
    p.add_argument("--iters", type=int, default=10, help="EMA epochs after k-means")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per EMA step")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the sample, the epoch shuffles, the k-means and the dead-code "
                        "draws (default 0)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def cmd_rvq_encode(args: argparse.Namespace) -> int:
    import json

    from recsys.rvq_encode import encode_run

    summary = encode_run(args.run_dir, args.out, field=args.field, iters=args.iters,
                         batch_size=args.batch_size, seed=args.seed, force=args.force)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}: train on it with data.source = 'parquet', data.path = '{args.out}',"
          " loss.hierarchical.codes = 'data'")
    return 0
