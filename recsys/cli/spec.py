"""``recsys spec show``: the resolved spec and its hash."""

from __future__ import annotations

import argparse

from recsys.cli.common import SubParsers, add_command, add_group, add_spec, load


def register(sub: SubParsers) -> None:
    spec = add_group(sub, "spec", "inspect experiment specs")

    p = add_command(spec, "show", cmd_spec_show,
                    "print the resolved spec (defaults filled in) and its hash")
    add_spec(p)


def cmd_spec_show(args: argparse.Namespace) -> int:
    from recsys.spec import dump_toml, spec_hash

    spec = load(args)
    print(f"# resolved spec {args.spec}, hash {spec_hash(spec)}")
    print(dump_toml(spec))
    return 0
