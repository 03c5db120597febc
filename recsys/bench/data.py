"""``recsys bench data``: rows/s from Parquet to Batch against a bare pyarrow read of the same files.

Both run in one process pinned to one core (Arrow and torch limited to one thread), alternating
repeats so that machine noise hits both alike; the best repeat of each is reported. With
``data.num_workers`` > 0 in the spec (``--set data.num_workers=2``), one more case reads with that
many loader worker processes on ``num_workers + 1`` cores (as many as there are), and the table
gives its rows/s in total and per core, the figure to hold against the one-core cases.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.data.loader import ParquetLoader
from recsys.data.parquet import ParquetSplit
from recsys.data.schema import BatchSchema
from recsys.datasets import ensure_dataset
from recsys.spec import Spec
from recsys.tables import format_table

GOAL_ROWS_PER_S = 500_000
GOAL_RATIO = 0.5


@dataclass
class DataBenchConfig:
    view: str = "cascade"  # the larger view of the quickstart data: the same columns, more rows
    split: str = "train"
    batch_size: int | None = None  # default: the spec's train.batch_size
    repeats: int = 3
    one_core: bool = True
    num_workers: int | None = None  # default: the spec's data.num_workers

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@contextmanager
def one_core(enabled: bool = True) -> Iterator[None]:
    """One core for everything inside: the process, Arrow's pools and torch's intra-op threads;
    the previous settings come back on exit."""
    if not enabled:
        yield
        return
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    saved = (pa.cpu_count(), pa.io_thread_count(), torch.get_num_threads())
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        if affinity:
            os.sched_setaffinity(0, affinity)
        pa.set_cpu_count(saved[0])
        pa.set_io_thread_count(saved[1])
        torch.set_num_threads(saved[2])


def bare_read(split: ParquetSplit) -> int:
    """Decode every row group's columns with pyarrow alone (the floor a loader can approach)."""
    rows = 0
    for path in split.files:
        f = pq.ParquetFile(path, memory_map=True)
        for g in range(f.num_row_groups):
            rows += f.read_row_group(g, columns=split.columns, use_threads=False).num_rows
    return rows


def loader_read(split: ParquetSplit, batch_size: int, shuffle: bool, num_workers: int = 0,
                window_batches: int = 16) -> int:
    loader = ParquetLoader(split, batch_size, shuffle=shuffle, drop_last=False,
                           num_workers=num_workers, window_batches=window_batches)
    return sum(b.batch_size for b in loader.epoch(0))


def allowed_cores() -> list[int]:
    """The cores this process may run on (one, where the platform cannot tell)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]


@contextmanager
def cores(n: int, allowed: list[int]) -> Iterator[int]:
    """Run on the first ``n`` of the ``allowed`` cores (processes started inside inherit them),
    yielding how many that is; the previous cores come back on exit.

    Example:
        >>> with one_core(), cores(3, allowed_cores()) as got:
        ...     rows = loader_read(split, 2048, True, num_workers=2)  # got = min(3, cores)
    """
    if not hasattr(os, "sched_setaffinity"):
        yield 1
        return
    before = os.sched_getaffinity(0)
    chosen = set(allowed[:n]) or before
    os.sched_setaffinity(0, chosen)
    try:
        yield len(chosen)
    finally:
        os.sched_setaffinity(0, before)


def run(spec: Spec, cfg: DataBenchConfig, progress: bool = True) -> tuple[dict[str, Any], str]:
    manifest = ensure_dataset(spec, progress=progress)
    schema = BatchSchema.from_spec(spec, manifest)
    files = manifest.files(cfg.view, cfg.split)
    batch_size = cfg.batch_size or spec.train.batch_size
    workers = spec.data.num_workers if cfg.num_workers is None else cfg.num_workers
    window = spec.data.shuffle_window_batches  # the shuffle that training would do
    # (read, cores it asks for): the single-process cases run on the one core
    cases: dict[str, tuple[Callable[[ParquetSplit], int], int]] = {
        "bare pyarrow read": (bare_read, 1),
        "loader -> Batch (file order)": (lambda s: loader_read(s, batch_size, False), 1),
        "loader -> Batch (shuffled)": (lambda s: loader_read(s, batch_size, True, 0, window), 1),
    }
    if workers:
        cases[f"loader -> Batch (shuffled, {workers} workers)"] = (
            lambda s: loader_read(s, batch_size, True, workers, window), workers + 1)
    allowed = allowed_cores()
    with one_core(cfg.one_core):
        best: dict[str, float] = {}
        used: dict[str, int] = {}
        rows = 0
        for rep in range(cfg.repeats):
            for name, (fn, want) in cases.items():
                split = ParquetSplit(files, schema)  # fresh handles: no case inherits another's cache
                with cores(want, allowed) if want > 1 else nullcontext(1) as got:
                    start = time.perf_counter()
                    rows = fn(split)
                    rate = rows / (time.perf_counter() - start)
                used[name] = got
                best[name] = max(best.get(name, 0.0), rate)
                if progress:
                    print(f"  repeat {rep + 1}/{cfg.repeats}  {name:<30} {rate:>12,.0f} rows/s"
                          + (f" on {got} cores" if got > 1 else ""))
    bare = best["bare pyarrow read"]
    per_core = {k: v / used[k] for k, v in best.items()}
    loaders = {k: v for k, v in per_core.items() if k != "bare pyarrow read"}
    meets = {k: v >= GOAL_ROWS_PER_S and v / bare >= GOAL_RATIO for k, v in loaders.items()}
    shuffled = best["loader -> Batch (shuffled)"]
    result = {
        "rows": rows,
        "files": len(files),
        "columns": len(schema.columns),
        "batch_size": batch_size,
        "window_batches": window,
        "one_core": cfg.one_core,
        "num_workers": workers,
        "rows_per_s": best,
        "cores": used,
        "rows_per_s_per_core": per_core,
        "ratio_loader_to_bare": shuffled / bare,
        "ratio_to_bare": {k: v / bare for k, v in loaders.items()},
        "goal_rows_per_s": GOAL_ROWS_PER_S,
        "goal_ratio": GOAL_RATIO,
        "meets_goals": meets,
    }
    table = format_table(
        ["reader", "rows/s", "cores", "rows/s per core", "per core vs bare read", "goals met"],
        [[name, rate, used[name], per_core[name], per_core[name] / bare,
          ("yes" if meets[name] else "no") if name in meets else "-"]
         for name, rate in best.items()],
    )
    table += (f"\n\n{rows:,} rows x {len(schema.columns)} columns of {Path(files[0]).parent}, "
              f"batch {batch_size}, shuffle windows of {window} batches, "
              f"{'one core' if cfg.one_core else 'all cores'} "
              f"(workers: {workers + 1 if workers else 1} processes). Goals, per core: "
              f">= {GOAL_ROWS_PER_S:,} rows/s and >= {GOAL_RATIO:g}x the bare read.")
    return result, table
