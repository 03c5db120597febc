"""`recsys bench all --quick`: every benchmark runs end to end at tiny sizes (so none rots) and
writes its JSON and table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.bench.all import BENCHES
from recsys.cli import main


@pytest.mark.slow
@pytest.mark.distributed  # the scaling benchmark launches 1 and 2 processes
def test_bench_all_quick_writes_every_result(tmp_path: Path, capsys) -> None:
    assert main(["bench", "all", "--quick", "--out", str(tmp_path)]) == 0
    summary = capsys.readouterr().out
    for name in BENCHES:
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["benchmark"] == name and result["quick"] is True
        assert (tmp_path / f"{name}.md").read_text().strip()
        assert f"| {name}" in summary
    scaling = json.loads((tmp_path / "scaling.json").read_text())
    one, two = scaling["runs"]["1"], scaling["runs"]["2"]
    # table-wise on 2 ranks: each rank holds part of the tables, together all of them
    assert max(two["embedding_bytes_per_rank"]) < one["embedding_bytes_per_rank"][0]
    assert sum(two["embedding_bytes_per_rank"]) == one["embedding_bytes_per_rank"][0]
