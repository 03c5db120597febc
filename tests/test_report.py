"""`recsys report --quick`: every quality experiment runs end to end at tiny sizes and writes its
JSON and table (the full sizes are what `make report` runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.cli import REPORTS, main


@pytest.mark.slow
def test_report_quick_writes_every_table(tmp_path: Path) -> None:
    assert main(["report", "--quick", "--out", str(tmp_path)]) == 0
    for name in REPORTS:
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["command"] == f"recsys report --only {name}"
        assert "±" in (tmp_path / f"{name}.md").read_text()
    interactions = json.loads((tmp_path / "interactions.json").read_text())
    synthetic = interactions["datasets"]["synthetic"]
    assert {r["variant"] for r in synthetic["rows"]} == {"mlp", "dcn", "dlrm", "deepfm", "pin",
                                                          "xdeepint", "dynint", "adaensemble"}
    assert 0.5 < synthetic["oracle_auc"] < 1.0
    sparsity = json.loads((tmp_path / "sparsity.json").read_text())["rows"]
    assert sparsity[0]["embedding_rows_zero"] == 0.0  # λ1 = 0: no exact zeros
    ranktower = json.loads((tmp_path / "ranktower.json").read_text())["rows"]
    assert len(ranktower) == 6  # RankTower, three ablations, DSSM, the ranker
    report = (tmp_path / "report.md").read_text()
    for plot in ("curves-synthetic.png", "gauc.png", "recall_at_k.png"):
        assert (tmp_path / "plots" / plot).is_file() and f"plots/{plot}" in report
