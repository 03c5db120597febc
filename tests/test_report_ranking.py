"""`recsys report --quick`, second half: the ranking-loss and RankTower studies end to end at tiny
sizes (the first half is in tests/test_report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_report import FIRST_HALF, check_tables

from recsys.cli import REPORTS, main

SECOND_HALF = tuple(r for r in REPORTS if r not in FIRST_HALF)


@pytest.mark.slow
def test_report_quick_writes_the_ranking_tables(tmp_path: Path) -> None:
    assert SECOND_HALF == ("ranking-losses", "ranktower")
    assert main(["report", "--quick", "--out", str(tmp_path), "--only", *SECOND_HALF]) == 0
    report = check_tables(tmp_path, SECOND_HALF)
    ranktower = json.loads((tmp_path / "ranktower.json").read_text())["rows"]
    assert len(ranktower) == 6  # RankTower, three ablations, DSSM, the ranker
    for plot in ("gauc.png", "recall_at_k.png"):
        assert (tmp_path / "plots" / plot).is_file() and f"plots/{plot}" in report
