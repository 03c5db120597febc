"""``recsys spec show | init``: the resolved spec and its hash; a spec written for a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from recsys.cli.common import SubParsers, add_command, add_group, add_spec, load
from recsys.fsutil import writing


def register(sub: SubParsers) -> None:
    spec = add_group(sub, "spec", "inspect experiment specs, or write one for a dataset")

    p = add_command(spec, "show", cmd_spec_show,
                    "print the resolved spec (defaults filled in) and its hash")
    add_spec(p)

    p = add_command(spec, "init", cmd_spec_init,
                    "write a complete, commented spec for a prepared dataset (its fields, sides, "
                    "kinds and labels from dataset.json)")
    p.add_argument("dataset", help="a prepared dataset directory (holds dataset.json)")
    p.add_argument("--arch", default="dcn", help="the over-arch (default dcn; see the README's "
                   "model zoo)")
    p.add_argument("-o", "--out", required=True, type=Path, help="the spec file to write")
    p.add_argument("--name", help="the spec's name (default: the dataset's)")
    p.add_argument("--labels", help="comma-separated label columns to train on (default: all)")
    p.add_argument("--view", help="dataset view (default impressions when there is one)")
    p.add_argument("--force", action="store_true", help="replace an existing file")


def cmd_spec_show(args: argparse.Namespace) -> int:
    from recsys.spec import dump_toml, spec_hash

    spec = load(args)
    print(f"# resolved spec {args.spec}, hash {spec_hash(spec)}")
    print(dump_toml(spec))
    return 0


def cmd_spec_init(args: argparse.Namespace) -> int:
    from recsys.errors import UsageError
    from recsys.fsutil import atomic_write_text
    from recsys.spec_init import init_spec

    if args.out.exists() and not args.force:
        raise UsageError(f"{args.out} exists; pass --force to replace it")
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    text = init_spec(args.dataset, args.arch, name=args.name, labels=labels, view=args.view)
    with writing(args.out):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
    fields = text.count("[[features.fields]]")
    print(f"wrote {args.out}: {args.arch} over {fields} fields of {args.dataset}; table sizes "
          f"are read from its dataset.json. Next: recsys train {args.out}")
    return 0
