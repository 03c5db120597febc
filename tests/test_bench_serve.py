"""recsys bench serve: a tiny run writes every field, the scripted fp32 model matches eager, int8
shrinks the artifact. No timing comparison is asserted: machines are noisy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from recsys.bench.serve import VARIANTS, ServeBenchConfig, config_from_args, run_and_write, table

TINY = ServeBenchConfig(tables=3, rows=2000, dim=32, dense=2, batch_sizes=(1, 8), repeats=2,
                        calls=6, warmup=1)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("serve")
    path = run_and_write(TINY, out, echo=False)
    return path, json.loads(path.read_text())


def test_writes_json_and_table(written: tuple[Path, dict[str, Any]]) -> None:
    path, result = written
    assert path.name == "serve.json" and result["benchmark"] == "serve"
    for key in ("config", "machine", "latency", "artifact_bytes", "parity", "goals",
                "max_abs_diff_vs_eager", "threads", "embedding_parameters"):
        assert key in result, key
    assert result["variants"] == list(VARIANTS)
    assert result["threads"] == 1  # one core unless all_cores
    md = (path.parent / "serve.md").read_text()
    assert md.startswith("| variant") and "scripted int8" in md
    assert md.strip() == table(result).strip()


def test_latency_fields(written: tuple[Path, dict[str, Any]]) -> None:
    lat = written[1]["latency"]
    for name in VARIANTS:
        assert set(lat[name]) == {"1", "8"}
        for t in lat[name].values():
            assert 0 < t["min_ms"] <= t["p50_ms"] <= t["p99_ms"]
            assert t["rows_per_s"] > 0 and t["calls"] == TINY.calls


def test_parity_and_sizes(written: tuple[Path, dict[str, Any]]) -> None:
    result = written[1]
    parity, sizes, goals = result["parity"], result["artifact_bytes"], result["goals"]
    assert parity["fp32_max_abs_diff"] < 1e-5 and parity["fp32_ok"] is True
    assert 0 <= parity["int8_max_abs_diff"] < 0.1  # sigmoid outputs: int8 rows stay close
    assert sizes["scripted int8"] < sizes["scripted fp16"] < sizes["scripted fp32"]
    assert all(b > 0 for b in sizes.values())
    assert goals["size_ratio_int8_fp32"] == pytest.approx(
        sizes["scripted int8"] / sizes["scripted fp32"])
    assert goals["throughput_batch"] == 8 and goals["throughput_ratio_int8_eager"] > 0


def test_config_from_args() -> None:
    assert config_from_args(argparse.Namespace()) == ServeBenchConfig()
    cfg = config_from_args(argparse.Namespace(tables=4, rows=10, dim=8, dense=1,
                                              batch_sizes=[2, 3], repeats=None, all_cores=True,
                                              run_dir=Path("runs/x")))
    assert cfg.batch_sizes == (2, 3) and cfg.repeats == ServeBenchConfig.repeats
    assert cfg.all_cores and cfg.run_dir == "runs/x" and cfg.tables == 4


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="batch_sizes"):
        ServeBenchConfig(batch_sizes=(0,))
    with pytest.raises(ValueError, match="repeats"):
        ServeBenchConfig(repeats=0)
