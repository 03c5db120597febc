"""The Criteo 1TB layout (:mod:`recsys.data.adapters.criteo`): a directory of ``day_0`` ...
``day_23`` files, plain or ``.gz``, split by days (the last ``test_days`` are test, the
``valid_days`` before them valid) and converted in parallel worker processes (``workers``), each
day into shards of its own, listed in day order, so that the output is the same for any number of
workers. Each line is parsed by the single-file adapter's own reader and transform.
"""

from __future__ import annotations

import gzip
import logging
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from recsys.data.adapters.common import (
    SNIFF_BYTES,
    VIEW,
    check_head,
    check_text,
    hint_cut_short,
    label_threshold,
    source_info,
)
from recsys.data.adapters.criteo_format import (
    ARROW_SCHEMA,
    BLOCK_BYTES,
    BUCKET_COLUMNS,
    DAY_FILE,
    DEFAULT_LABEL_THRESHOLD,
    FRACTION_OPTIONS,
    GZ,
    describe_columns,
    open_reader,
    raise_located,
    raise_unreadable,
    refuse_options,
    transform,
)
from recsys.data.parquet import DatasetWriter, ShardWriter
from recsys.data.schema import SPLITS, DatasetManifest
from recsys.errors import DataError, RunError
from recsys.progress import progress_bar
from recsys.spec import PrepareSpec
from recsys.tables import format_table

log = logging.getLogger("recsys.data")


@dataclass(frozen=True)
class DayFile:
    """One ``day_N`` or ``day_N.gz`` file of a day directory."""

    day: int
    path: Path


@dataclass(frozen=True)
class DayTask:
    """What one worker needs to convert one day: plain values only, so it pickles cheaply."""

    day: int
    path: Path
    split: str
    shard_dir: Path  # the day's own folder under OUT.partial/impressions/<split>
    hash_size: int
    threshold: float
    rows_per_shard: int
    row_group_size: int
    block_size: int


@dataclass(frozen=True)
class DayResult:
    """What converting one day wrote: its shard names (within ``shard_dir``) and a summary."""

    day: int
    split: str
    files: list[str]
    rows: int
    clicks: int
    bucket_top: dict[str, int]  # per bucket column: the largest id seen + 1
    in_bytes: int
    seconds: float


class _Stopped(Exception):
    """Another day failed: this worker stops after its current block."""


def find_day_files(directory: Path) -> list[DayFile]:
    """The day files of ``directory`` in day order: a run of consecutive days, each once.

    Names that are not ``day_N`` or ``day_N.gz`` are skipped with one warning; no day file at all,
    a day given twice (``day_3`` and ``day_3.gz``) or a missing day between two others is a
    DataError naming the directory and the days.

    Example:
        >>> [d.path.name for d in find_day_files(Path("criteo-1tb"))][:2]
        ['day_0.gz', 'day_1.gz']
    """
    found: dict[int, Path] = {}
    ignored: list[str] = []
    for path in sorted(directory.iterdir()):
        match = DAY_FILE.fullmatch(path.name)
        if match is None or not path.is_file():
            ignored.append(path.name + ("/" if path.is_dir() else ""))
            continue
        day = int(match.group(1))
        if day in found:
            raise DataError(str(directory), f"holds day {day} twice ({found[day].name} and "
                            f"{path.name}); keep one of them")
        found[day] = path
    if ignored:
        log.warning("%s: ignoring what is not a day_N or day_N.gz file (%d): %s", directory,
                    len(ignored), ", ".join(ignored[:10]) + (" ..." if len(ignored) > 10 else ""))
    if not found:
        seen = f" (it holds {', '.join(ignored[:5])})" if ignored else " (it is empty)"
        raise DataError(str(directory), "holds no Criteo day files day_N or day_N.gz" + seen
                        + "; give the file itself for a single TSV such as train.txt")
    days = sorted(found)
    missing = sorted(set(range(days[0], days[-1] + 1)) - set(days))
    if missing:
        raise DataError(str(directory), f"day files must be consecutive: it has day_{days[0]} to "
                        f"day_{days[-1]} but not {', '.join(f'day_{d}' for d in missing)}")
    return [DayFile(d, found[d]) for d in days]


def split_days(days: list[int], valid_days: int, test_days: int, where: str) -> dict[int, str]:
    """Day -> split: the last ``test_days`` are test, the ``valid_days`` before them valid, the
    rest train (at least one day).

    Example:
        >>> split_days([0, 1, 2, 3], valid_days=1, test_days=1, where="d")
        {0: 'train', 1: 'train', 2: 'valid', 3: 'test'}
    """
    n_train = len(days) - valid_days - test_days
    if n_train < 1:
        raise DataError(where, f"holds {len(days)} day file(s) (day_{days[0]} .. day_{days[-1]}); "
                        f"test_days = {test_days} and valid_days = {valid_days} leave none for "
                        "train")
    splits = ["train"] * n_train + ["valid"] * valid_days + ["test"] * test_days
    return dict(zip(days, splits, strict=True))


def convert_days(directory: Path, out: Path, options: PrepareSpec, *, config_hash: str,
                 progress: bool = True, block_size: int = BLOCK_BYTES) -> DatasetManifest:
    """Convert a directory of day files, one day per task on ``options.workers`` processes, into
    the prepared dataset (see the module docstring).

    Example:
        >>> convert_days(Path("criteo-1tb"), Path("data/criteo-1tb"),
        ...              PrepareSpec(input="criteo-1tb", workers=4), config_hash="0123456789abcdef")
    """
    refuse_options(options, FRACTION_OPTIONS, f"{directory} is a directory of day files, split "
                    "by days (valid_days / test_days); valid_fraction / test_fraction split a "
                    "single file")
    days = find_day_files(directory)
    split_of = split_days([d.day for d in days], options.valid_days, options.test_days,
                          str(directory))
    for d in days:
        _check_day_text(d.path)
    threshold = label_threshold(options, DEFAULT_LABEL_THRESHOLD)
    columns = describe_columns(options.hash_size, threshold)
    source = {**source_info("criteo", directory, options), "layout": "days",
              "days": {split: [d for d in split_of if split_of[d] == split] for split in SPLITS},
              "files": [d.path.name for d in days]}
    writer = DatasetWriter(out, "criteo", source, config_hash, columns, ARROW_SCHEMA,
                           rows_per_shard=options.rows_per_shard,
                           row_group_size=options.row_group_size)
    width = max(2, len(str(days[-1].day)))
    tasks = [DayTask(d.day, d.path, split_of[d.day],
                     writer.partial / VIEW / split_of[d.day] / f"day_{d.day:0{width}d}",
                     options.hash_size, threshold, options.rows_per_shard,
                     options.row_group_size, block_size) for d in days]
    results = run_days(tasks, options.workers, progress)
    for split in SPLITS:  # every split is listed, even an empty one
        writer.adopt(VIEW, split, [], 0)
    by_name = {c.name: c for c in columns}
    for task, result in zip(tasks, results, strict=True):
        folder = task.shard_dir.relative_to(writer.partial).as_posix()
        writer.adopt(VIEW, result.split, [f"{folder}/{f}" for f in result.files], result.rows)
        for c, top in result.bucket_top.items():
            by_name[c].cardinality = max(by_name[c].cardinality or 1, top)
    if progress:
        print(day_summary(tasks, results), file=sys.stderr)
    return writer.finish()


def _check_day_text(path: Path) -> None:
    """:func:`check_text` of a day file, decompressing the first bytes of a ``.gz`` one."""
    if not path.name.endswith(GZ):
        if path.stat().st_size == 0:
            raise DataError(str(path), "is empty (0 bytes); expected Criteo TSV lines")
        check_text(path)
        return
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except gzip.BadGzipFile as e:
        raise DataError(str(path), f"is not valid gzip data: {e}") from None
    except EOFError:
        raise DataError(str(path), "the gzip stream ends early; was the file cut short?") from None
    except OSError as e:
        raise DataError(str(path), f"cannot read: {e.strerror or e}") from None
    if not head:
        raise DataError(str(path), "is empty; expected Criteo TSV lines")
    # a character cut by the end of the sniffed bytes is not an error (check_head knows that only
    # when it gets the full SNIFF_BYTES)
    check_head(path, head, utf8=True)


def run_days(tasks: list[DayTask], workers: int, progress: bool) -> list[DayResult]:
    """Convert every day, on ``workers`` processes (in this one when 1), with one progress bar
    over the input bytes of all days; results in the order of ``tasks``.

    Example:
        >>> [r.rows for r in run_days(tasks, workers=2, progress=False)]
        [195841983, 199563535]
    """
    total = sum(t.path.stat().st_size for t in tasks)
    with progress_bar(total=total, desc="criteo days -> parquet", unit="B", unit_scale=True,
                      disable=not progress) as bar:
        if workers == 1 or len(tasks) == 1:
            return [convert_day(t, bar.update, lambda: False) for t in tasks]
        return _run_in_pool(tasks, min(workers, len(tasks)), bar)


def _run_in_pool(tasks: list[DayTask], workers: int, bar: tqdm) -> list[DayResult]:
    # spawn, not fork: forking a process whose Arrow thread pools have run can deadlock
    ctx = multiprocessing.get_context("spawn")
    read_bytes, stop = ctx.Value("q", 0), ctx.Event()
    results: dict[int, DayResult] = {}
    shown = 0
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(read_bytes, stop)) as pool:
        pending = {pool.submit(_convert_day_in_worker, t) for t in tasks}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    result = _result(future)  # re-raises a worker's DataError here
                    results[result.day] = result
                shown = _show_progress(bar, read_bytes, shown)
        except BaseException:
            stop.set()  # the running days stop after their current block
            for future in pending:
                future.cancel()
            raise
    _show_progress(bar, read_bytes, shown)
    return [results[t.day] for t in tasks]


def _result(future: Future[DayResult]) -> DayResult:
    try:
        return future.result()
    except BrokenProcessPool:
        raise RunError("criteo day workers", "a worker process died without an error (killed "
                       "for memory? its own message, if any, is above); try fewer --workers"
                       ) from None


def _show_progress(bar: tqdm, read_bytes: Synchronized, shown: int) -> int:
    now = read_bytes.value
    bar.update(now - shown)
    return now


_WORKER: tuple[Synchronized, EventType] | None = None  # (bytes read, stop) in a worker process


def _init_worker(read_bytes: Synchronized, stop: EventType) -> None:
    global _WORKER
    _WORKER = (read_bytes, stop)


def _convert_day_in_worker(task: DayTask) -> DayResult:
    assert _WORKER is not None, "the pool's initializer sets _WORKER"
    read_bytes, stop = _WORKER

    def report(n: int) -> None:
        with read_bytes.get_lock():
            read_bytes.value += n

    return convert_day(task, report, stop.is_set)


def convert_day(task: DayTask, report: Callable[[int], object],
                stopped: Callable[[], bool]) -> DayResult:
    """Stream one day file into its own shards under ``task.shard_dir``.

    ``report(n)`` is told of every ``n`` input bytes read (the progress bar); ``stopped()`` is
    asked before each block, so that a failure elsewhere stops this day soon.

    Example:
        >>> convert_day(task, report=bar.update, stopped=lambda: False).rows
        195841983
    """
    start = time.perf_counter()
    size = task.path.stat().st_size
    shards = ShardWriter(task.shard_dir, ARROW_SCHEMA, task.rows_per_shard, task.row_group_size)
    top = dict.fromkeys(BUCKET_COLUMNS, 1)
    rows = clicks = reported = 0
    gz = task.path.name.endswith(GZ)
    with hint_cut_short(*([] if gz else [task.path])), pa.OSFile(str(task.path)) as raw:
        reader = open_reader(pa.CompressedInputStream(raw, "gzip") if gz else raw, task.path,
                       task.block_size)
        while True:
            if stopped():
                raise _Stopped(f"day {task.day}")
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as e:
                raise_located(task.path, rows, e)
            except (OSError, pa.ArrowException) as e:
                raise_unreadable(task.path, rows, e)
            table = transform(batch, task.hash_size, task.threshold, task.path, rows + 1)
            for c in BUCKET_COLUMNS:
                top[c] = max(top[c], int(np.max(table.column(c).to_numpy(), initial=0)) + 1)
            clicks += int(np.count_nonzero(table.column("click").to_numpy()))
            shards.write(table)
            rows += table.num_rows
            report(raw.tell() - reported)
            reported = raw.tell()
    if rows == 0:
        raise DataError(str(task.path), "holds no lines; expected Criteo TSV lines")
    files = shards.close()
    report(size - reported)
    return DayResult(task.day, task.split, files, rows, clicks, top, size,
                     time.perf_counter() - start)


def day_summary(tasks: list[DayTask], results: list[DayResult]) -> str:
    """One line per day (file, split, rows, click rate, input size, the speed of the process that
    converted it) and a total.

    Example:
        >>> print(day_summary(tasks, results))
        | day | file     | split |    rows | click rate | MB in | rows/s |
        ...
    """
    def line(label: object, name: str, split: str, rs: list[DayResult]) -> list[object]:
        n, seconds = sum(r.rows for r in rs), sum(r.seconds for r in rs)
        return [label, name, split, n, f"{sum(r.clicks for r in rs) / max(n, 1):.4f}",
                f"{sum(r.in_bytes for r in rs) / 1e6:.1f}", round(n / max(seconds, 1e-9))]

    body = [line(t.day, t.path.name, r.split, [r]) for t, r in zip(tasks, results, strict=True)]
    body.append(line("all", f"{len(results)} files", "", results))
    return format_table(["day", "file", "split", "rows", "click rate", "MB in", "rows/s"], body)
