"""``recsys bench data`` with loader workers: rows/s in total and per core, cores restored."""

from __future__ import annotations

import os

import pytest

from recsys.bench.data import DataBenchConfig, allowed_cores, cores, run
from recsys.spec import Spec


def test_workers_case_reports_total_and_per_core(tiny_spec: Spec) -> None:
    before = os.sched_getaffinity(0)
    result, table = run(tiny_spec, DataBenchConfig(view="impressions", repeats=1, num_workers=1),
                        progress=False)
    case = "loader -> Batch (shuffled, 1 workers)"
    assert result["num_workers"] == 1
    assert result["rows"] == 9000  # the tiny impressions of train, every row once
    assert result["cores"] == {"bare pyarrow read": 1, "loader -> Batch (file order)": 1,
                               "loader -> Batch (shuffled)": 1,
                               case: min(2, len(before))}
    per_core = result["rows_per_s_per_core"]
    assert per_core[case] == pytest.approx(result["rows_per_s"][case] / result["cores"][case])
    assert per_core["loader -> Batch (shuffled)"] == result["rows_per_s"][
        "loader -> Batch (shuffled)"]
    assert result["ratio_to_bare"][case] == pytest.approx(
        per_core[case] / result["rows_per_s"]["bare pyarrow read"])
    assert "rows/s per core" in table and case in table
    assert os.sched_getaffinity(0) == before


def test_no_workers_case_without_workers(tiny_spec: Spec) -> None:
    result, _ = run(tiny_spec, DataBenchConfig(view="impressions", repeats=1), progress=False)
    assert tiny_spec.data.num_workers == 0 and result["num_workers"] == 0
    assert set(result["cores"].values()) == {1} and len(result["cores"]) == 3


def test_cores_widens_then_restores() -> None:
    allowed = allowed_cores()
    before = os.sched_getaffinity(0)
    with cores(2, allowed) as got:
        assert got == min(2, len(allowed)) and os.sched_getaffinity(0) == set(allowed[:2])
    assert os.sched_getaffinity(0) == before
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        DataBenchConfig(num_workers=-1)


def test_shuffled_cases_use_the_specs_shuffle_window(tiny_spec: Spec,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark shuffles as training would: windows of ``data.shuffle_window_batches``."""
    import recsys.bench.data as bench_data
    from recsys.data.loader import ParquetLoader

    seen: list[tuple[bool, int]] = []

    class Recording(ParquetLoader):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            seen.append((self.shuffle, self.window_batches))

    monkeypatch.setattr(bench_data, "ParquetLoader", Recording)
    spec = tiny_spec.model_copy(update={"data": tiny_spec.data.model_copy(
        update={"shuffle_window_batches": 3})})
    result, table = run(spec, DataBenchConfig(view="impressions", repeats=1), progress=False)
    assert result["window_batches"] == 3 and "shuffle windows of 3 batches" in table
    assert sorted(set(seen)) == [(False, 16), (True, 3)]
