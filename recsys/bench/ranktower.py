"""RankTower's and DSSM's online scoring of 1,000 cached candidates for one request: the
``ranktower`` benchmark of ``recsys bench all`` and a part of the ``serve`` benchmark.

The timing runs in a fresh process of its own (:func:`ranktower_scoring_isolated`), as a server's
scorer does: inside ``recsys bench all``, after the training benchmarks, the same scorer took
1.76 ms at p50 against 1.34-1.47 ms in a process of its own (thread pools and heap left behind by
the benchmarks before it).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from recsys.process_settings import tune_process


def ranktower_scoring(repeats: int) -> dict[str, dict[str, float]]:
    """One request's user representation against 1,000 cached item representations (and what the
    item cache keeps of them beside: ``prepare``) through the scripted online scorer (RankTower:
    gated cross-attention + max-sim; DSSM: a dot product), with untrained weights (the cost does
    not depend on their values), in this process."""
    from recsys.export.two_tower import ScorerModule, time_scoring
    from recsys.models.archs.ranktower import RankTowerSpec
    from recsys.modules.ranktower import DSSMNet, RankTowerNet

    tune_process()  # a serving process's settings (recsys serve does the same)
    spec = RankTowerSpec()
    torch.manual_seed(0)
    results = {}
    for name, net in (("ranktower", RankTowerNet(7, 5, 16, heads=spec.heads,
                                                 head_dim=spec.head_dim, hidden=spec.hidden,
                                                 late_interaction=spec.late_interaction,
                                                 init_temperature=spec.init_temperature)),
                      ("dssm", DSSMNet(7, 5, 16, list(spec.hidden), spec.head_dim))):
        scorer = torch.jit.script(ScorerModule(net).eval())
        with torch.no_grad():
            user = net.user_tower(torch.randn(1, 7, 16))[0]
            items = net.item_tower(torch.randn(1000, 5, 16))
            prepared = scorer.prepare(items)  # cached beside the items, as the export does
        results[name] = time_scoring(lambda u, i, s=scorer, p=prepared: s(u, i, p), user, items,
                                     repeats)
    return results


def ranktower_scoring_isolated(repeats: int) -> dict[str, dict[str, float]]:
    """:func:`ranktower_scoring` on one thread in a fresh Python process (it inherits this one's
    cores), the result read back from its output.

    Example:
        >>> ranktower_scoring_isolated(200)["ranktower"]["p50_ms"]
    """
    from recsys.bench.train import run_child

    proc = run_child([sys.executable, "-m", "recsys.bench.ranktower", "--repeats", str(repeats)],
                     "the scoring benchmark's process", {"OMP_NUM_THREADS": "1"})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Entry point of :func:`ranktower_scoring_isolated`'s process: the results as one JSON
    line."""
    parser = argparse.ArgumentParser(prog="python -m recsys.bench.ranktower")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(1)  # the online target is stated for one CPU thread
    print(json.dumps(ranktower_scoring(args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
