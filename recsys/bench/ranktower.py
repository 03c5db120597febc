"""RankTower's and DSSM's online scoring of 1,000 cached candidates for one request: the
``ranktower`` benchmark of ``recsys bench all`` and a part of the ``serve`` benchmark."""

from __future__ import annotations

import torch

from recsys.malloc import tune_malloc


def ranktower_scoring(repeats: int) -> dict[str, dict[str, float]]:
    """One request's user representation against 1,000 cached item representations (and what the
    item cache keeps of them beside: ``prepare``) through the scripted online scorer (RankTower: gated cross-attention + max-sim; DSSM: a dot product),
    with untrained weights (the cost does not depend on their values)."""
    from recsys.export.two_tower import ScorerModule, time_scoring
    from recsys.models.archs.ranktower import RankTowerSpec
    from recsys.modules.ranktower import DSSMNet, RankTowerNet

    tune_malloc()  # a serving process's allocator settings (recsys serve does the same)
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
