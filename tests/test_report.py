"""`recsys report --quick`: every quality experiment runs end to end at tiny sizes and writes its
JSON and table (the full sizes are what `make report` runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.cli import REPORTS, main

# the two halves run in separate files (tests/test_report_ranking.py), so that `make test`'s two
# workers share them
FIRST_HALF = ("interactions", "sparsity")


def check_tables(out: Path, names: tuple[str, ...]) -> str:
    """Each report's JSON and table are written; the report.md text."""
    for name in names:
        result = json.loads((out / f"{name}.json").read_text())
        assert result["command"] == f"recsys report --only {name}"
        assert "±" in (out / f"{name}.md").read_text()
    return (out / "report.md").read_text()


@pytest.mark.slow
def test_report_quick_writes_the_interaction_tables(tmp_path: Path) -> None:
    assert set(FIRST_HALF) < set(REPORTS)
    assert main(["report", "--quick", "--out", str(tmp_path), "--only", *FIRST_HALF]) == 0
    report = check_tables(tmp_path, FIRST_HALF)
    interactions = json.loads((tmp_path / "interactions.json").read_text())
    synthetic = interactions["datasets"]["synthetic"]
    assert {r["variant"] for r in synthetic["rows"]} == {"mlp", "dcn", "dlrm", "deepfm", "pin",
                                                          "xdeepint", "dynint", "adaensemble"}
    assert 0.5 < synthetic["oracle_auc"] < 1.0
    sparsity = json.loads((tmp_path / "sparsity.json").read_text())["rows"]
    assert sparsity[0]["embedding_rows_zero"] == 0.0  # λ1 = 0: no exact zeros
    plot = "curves-synthetic.png"
    assert (tmp_path / "plots" / plot).is_file() and f"plots/{plot}" in report
