"""``recsys bench prepare``: rows/s per core of ``recsys data prepare table`` on a 20-column
table, from CSV and from Parquet, and its peak memory against the input's size.

The table is generated (seeded) in a temporary folder: a 0/1 label, a string user id (Zipf over
``users``), an integer item id, 10 string sparse columns of cardinality 10 to 1M, one multi column
of 0-5 tags (a list column in Parquet, ``|``-joined text in CSV) and 6 dense columns, split at
random. Each case converts it in a new process pinned to one core (Arrow on one thread), which
reports its wall time and its peak RSS above what it held when it started; the same runs on a
quarter of the rows show whether memory grows with the input (it should stay flat: only the
vocabularies and the spill's write buffers grow).

Example:
    >>> result, table = run(PrepareBenchConfig(rows=20_000, repeats=1))
    >>> result["rows_per_s_per_core"]["parquet"] > 0
    True
"""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
import pyarrow.parquet as pq

from recsys.clean_start import clean_context
from recsys.tables import format_table

NAME = "prepare"
GOAL_ROWS_PER_S = 200_000  # per core, on the 20-column table
SPARSE_CARDINALITIES = (10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 1_000_000)
DENSE_COLUMNS = 6
FORMATS = ("csv", "parquet")


@dataclass
class PrepareBenchConfig:
    rows: int = 2_000_000
    users: int = 200_000
    items: int = 50_000
    repeats: int = 1  # best of this many per case
    one_core: bool = True
    seed: int = 0
    small_fraction: float = 0.25  # the smaller input that peak memory is compared with

    def __post_init__(self) -> None:
        for name in ("rows", "users", "items", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.small_fraction < 1:
            raise ValueError(f"small_fraction must be in (0, 1), got {self.small_fraction}")

    @classmethod
    def quick(cls) -> PrepareBenchConfig:
        """Tiny sizes that still run every code path."""
        return cls(rows=20_000, users=2_000, items=500, repeats=1)


def make_table(rows: int, users: int, items: int, seed: int) -> pa.Table:
    """The seeded 20-column table (the multi column ``tags`` as lists of strings).

    Example:
        >>> make_table(1000, 100, 50, seed=0).num_columns
        20
    """
    rng = np.random.default_rng(seed)

    def strings(prefix: str, ids: np.ndarray) -> pa.Array:
        return pc.binary_join_element_wise(prefix, pc.cast(pa.array(ids), pa.string()), "")

    # Zipf-like popularity: a few users and items hold most rows, as in real logs
    user = np.minimum(rng.zipf(1.3, rows), users) - 1
    item = np.minimum(rng.zipf(1.2, rows), items) * 7919 % 1_000_003  # sparse integer ids
    data: dict[str, pa.Array] = {
        "clicked": pa.array((rng.random(rows) < 0.2).astype(np.int8)),
        "user": strings("u", user),
        "item": pa.array(item.astype(np.int64)),
    }
    for i, card in enumerate(SPARSE_CARDINALITIES):
        data[f"cat{i}"] = strings(f"c{i}_", rng.integers(0, card, rows))
    lengths = rng.integers(0, 6, rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    tags = strings("t", rng.integers(0, 1000, int(offsets[-1])))
    data["tags"] = pa.ListArray.from_arrays(pa.array(offsets), tags)
    for i in range(DENSE_COLUMNS):
        x = rng.lognormal(0.0, 1.5, rows)
        data[f"x{i}"] = pa.array(np.where(rng.random(rows) < 0.02, np.nan, x), from_pandas=True)
    return pa.table(data)


def write_inputs(table: pa.Table, folder: Path) -> dict[str, Path]:
    """The table as Parquet and as CSV (tags joined by ``|``) under ``folder``."""
    paths = {"parquet": folder / "table.parquet", "csv": folder / "table.csv"}
    pq.write_table(table, paths["parquet"], row_group_size=1 << 17)
    text = table.set_column(table.schema.get_field_index("tags"), "tags",
                            pc.binary_join(table.column("tags"), "|"))
    csv.write_csv(text, paths["csv"])
    return paths


def options_for(path: Path) -> dict[str, Any]:
    """The prepare options of the benchmark table (a PrepareSpec's keyword arguments)."""
    return {"input": str(path), "label": "clicked", "user": "user", "item": "item",
            "sparse": [f"cat{i}" for i in range(len(SPARSE_CARDINALITIES))], "multi": ["tags"],
            "dense": [f"x{i}" for i in range(DENSE_COLUMNS)], "split": "random",
            "dense_scale": "log"}


def _status_bytes(key: str) -> int | None:
    """A memory figure of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _start_peak() -> int:
    """Reset this process's peak RSS to its current RSS (Linux: ``clear_refs`` 5; a forked
    child would otherwise report its parent's peak) and return that baseline in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    now = _status_bytes("VmRSS")
    return now if now is not None else _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = _status_bytes("VmHWM")
    # getrusage as the fallback: Linux reports KiB, macOS bytes (then this overstates)
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _convert_in_child(path: str, out: str, one_core: bool, queue: Any) -> None:
    """Runs in a new process: convert once, send (seconds, rows, baseline RSS, peak RSS)."""
    from recsys.bench.data import one_core as pin
    from recsys.data.adapters import prepare
    from recsys.spec import PrepareSpec

    options = PrepareSpec(**options_for(Path(path)))
    baseline = _start_peak()
    try:
        with pin(one_core):
            start = time.perf_counter()
            manifest = prepare("table", path, out, options, progress=False)
            seconds = time.perf_counter() - start
        queue.put((seconds, sum(manifest.rows["impressions"].values()), baseline,
                   _peak_rss_bytes()))
    except BaseException as e:  # the parent reports it (a child's traceback would be lost)
        queue.put(e)


def measure(path: Path, out: Path, one_core: bool) -> dict[str, float]:
    """Convert ``path`` into ``out`` in a new process; its seconds, rows and memory.

    The process starts clean (:mod:`recsys.clean_start`: a fork of this process, where earlier
    benchmarks left threads, could inherit a lock held for good); the conversion is timed after
    its imports, and its peak RSS is reset when it starts."""
    ctx = clean_context(["recsys.bench.prepare", "recsys.data.adapters"])
    queue = ctx.Queue()
    child = ctx.Process(target=_convert_in_child, args=(str(path), str(out), one_core, queue))
    child.start()
    got = _result(queue, child)
    child.join()
    if isinstance(got, BaseException):
        raise got
    seconds, rows, baseline, peak = got
    return {"seconds": seconds, "rows": rows, "rows_per_s": rows / seconds,
            "baseline_rss_mb": baseline / 2**20, "peak_rss_mb": peak / 2**20,
            "peak_above_baseline_mb": (peak - baseline) / 2**20}


def _result(queue: Any, child: Any) -> Any:
    """What ``child`` puts on ``queue``; RuntimeError if it dies without (killed, out of memory)."""
    while True:
        try:
            return queue.get(timeout=5)
        except Empty:
            if not child.is_alive():
                raise RuntimeError(f"the conversion's process exited (code {child.exitcode}) "
                                   "without a result") from None


def run(cfg: PrepareBenchConfig, progress: bool = True) -> tuple[dict[str, Any], str]:
    """Generate, convert each format at the full and the small size, and tabulate."""
    sizes = {"full": cfg.rows, "small": max(1, int(cfg.rows * cfg.small_fraction))}
    cases: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="recsys-bench-prepare-") as tmp:
        folder = Path(tmp)
        for size, rows in sizes.items():
            (folder / size).mkdir()
            inputs = write_inputs(make_table(rows, cfg.users, cfg.items, cfg.seed),
                                  folder / size)
            for fmt in FORMATS:
                best: dict[str, float] | None = None
                for rep in range(cfg.repeats):
                    got = measure(inputs[fmt], folder / f"out-{size}-{fmt}-{rep}", cfg.one_core)
                    if progress:
                        print(f"  {fmt:<8} {size:<6} {got['rows']:>12,} rows "
                              f"{got['rows_per_s']:>12,.0f} rows/s  peak "
                              f"{got['peak_above_baseline_mb']:,.0f} MB above baseline")
                    if best is None or got["rows_per_s"] > best["rows_per_s"]:
                        best = got
                assert best is not None
                best["input_mb"] = inputs[fmt].stat().st_size / 2**20
                cases[f"{fmt}/{size}"] = best
    per_core = {fmt: cases[f"{fmt}/full"]["rows_per_s"] for fmt in FORMATS}  # one core each
    result = {
        "config": asdict(cfg),
        "columns": 20,
        "cases": cases,
        "rows_per_s_per_core": per_core,
        "goal_rows_per_s_per_core": GOAL_ROWS_PER_S,
        "meets_goal": {fmt: rate >= GOAL_ROWS_PER_S for fmt, rate in per_core.items()},
        "memory_growth": {fmt: cases[f"{fmt}/full"]["peak_above_baseline_mb"]
                          / max(cases[f"{fmt}/small"]["peak_above_baseline_mb"], 1e-9)
                          for fmt in FORMATS},
    }
    return result, format_result(result)


def format_result(result: dict[str, Any]) -> str:
    """The markdown table of a result, with the goal and what was measured."""
    rows = []
    for name, c in result["cases"].items():
        fmt, size = name.split("/")
        rows.append([fmt, size, int(c["rows"]), c["input_mb"], c["rows_per_s"],
                     c["peak_above_baseline_mb"], c["peak_rss_mb"],
                     ("yes" if result["meets_goal"][fmt] else "no") if size == "full" else "-"])
    table = format_table(["input", "size", "rows", "input MB", "rows/s per core",
                          "peak MB above baseline", "peak RSS MB", "goal met"], rows)
    cfg = result["config"]
    growth = ", ".join(f"{fmt} x{g:.2f}" for fmt, g in result["memory_growth"].items())
    return (f"{table}\n\n`recsys data prepare table` of a {result['columns']}-column table "
            f"(label, user, item, 10 sparse, 1 multi, 6 dense; random split, log scaling), "
            f"{'one core' if cfg['one_core'] else 'all cores'}, best of {cfg['repeats']}. "
            f"Goal: >= {result['goal_rows_per_s_per_core']:,} rows/s per core. Peak memory "
            f"above baseline, full input against {cfg['small_fraction']:g} of it: {growth} "
            "(flat memory: well under the input's growth).")
