"""Deterministic, sharded, restartable batches from Parquet row groups.

The order of an epoch is a pure function of (seed, epoch), computed from metadata alone:

1. the split's row groups are permuted by (seed, epoch) and concatenated into one stream of rows;
2. rank ``r`` of ``W`` takes the contiguous rows ``[N·r/W, N·(r+1)/W)`` of that stream (ranks differ
   by at most one row, and each reads only its share);
3. a rank's rows are cut into windows of ``window_batches × batch_size`` rows; each window is
   permuted by (seed, epoch, rank, window) and cut into batches, so no batch straddles two windows.

Step ``k`` is therefore batch ``k mod window_batches`` of window ``k // window_batches``: a restart at
any step reads only that window onwards, never replaying data. With ``num_workers`` worker processes,
worker ``j`` builds the runs of four windows ``j, j+n, ...`` and the batches come out in the same
order as with none.

How a window is made: each row group it touches is decoded (its needed columns only) and checked
once, the last one kept for the next window; every column is then gathered once into batch order
(:class:`~recsys.data.batch.Window`), and each batch is assembled from slices of those as it is asked
for, so that it reuses the memory of the batch consumed before it.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recsys.clean_start import clean_context
from recsys.data.batch import Batch, BatchBuilder, Columns, Window
from recsys.data.parquet import ParquetSplit, RowGroupRef
from recsys.errors import RecsysError, SpecError

log = logging.getLogger("recsys.data")


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Each rank's share of a global batch (``train.batch_size`` is the global batch, so that a
    spec is one experiment whatever the number of processes).

    Example:
        >>> per_rank_batch(2048, 2)
        1024
    """
    if global_batch % world_size:
        raise SpecError("spec", [f"train.batch_size: {global_batch} is the global batch and must "
                                 f"split evenly over {world_size} processes (use a multiple of "
                                 f"{world_size})"])
    return global_batch // world_size


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of one row group."""

    ref: RowGroupRef
    start: int
    stop: int


class ParquetLoader:
    """Batches of one split for one rank.

    Args:
        split: the split's row groups (checked at open).
        batch_size: rows per batch.
        rank, world_size: this process's share of every epoch.
        seed: with the epoch, decides every permutation.
        shuffle: permute row groups and rows within windows; False keeps file order.
        window_batches: batches per shuffle window (the memory a window needs is that many batches).
        drop_last: drop the rows past the last full batch that every rank can make (training);
            False yields every row of this rank, the last batch shorter (evaluation).
        num_workers: worker processes that read and build windows (0 = in this process).
        group_column: with shuffling, permute whole groups of rows (runs of equal values in this
            column, e.g. ``request_id``) instead of rows, and cut each batch at a group boundary
            near its nominal end, so a group's rows share a batch; batch sizes then vary around
            ``batch_size`` and the number of batches is unchanged. Groups that the row stream
            itself cuts (at a window's edges, or where a row group ends inside one) are the
            exception.

    Example:
        >>> loader = ParquetLoader(split, batch_size=2048, rank=0, world_size=2, seed=7)
        >>> for step, batch in enumerate(loader.epoch(0, start_step=100), start=100): ...
    """

    def __init__(self, split: ParquetSplit, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 window_batches: int = 16, drop_last: bool = True, num_workers: int = 0,
                 group_column: str | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size <= 0 or window_batches <= 0:
            raise ValueError("batch_size and window_batches must be > 0")
        self.split = split
        self.builder = BatchBuilder(split.schema)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.window_batches = window_batches
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.group_column = group_column
        if group_column is not None and group_column not in split.schema.groups.values():
            raise ValueError(f"group_column '{group_column}' is not a group column of the split "
                             f"(known: {sorted(split.schema.groups.values())})")
        self._cached_ref: RowGroupRef | None = None
        self._cached_cols: Columns | None = None

    # ---- the plan (metadata only) -------------------------------------------------------------

    @property
    def rank_rows(self) -> tuple[int, int]:
        """This rank's [lo, hi) range of the epoch's row stream."""
        n = self.split.num_rows
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def steps_per_epoch(self) -> int:
        """Batches this rank yields per epoch (the same on every rank when drop_last)."""
        if self.drop_last:
            return (self.split.num_rows // self.world_size) // self.batch_size
        lo, hi = self.rank_rows
        return -(-(hi - lo) // self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def rows_per_epoch(self) -> int:
        lo, hi = self.rank_rows
        return self.steps_per_epoch() * self.batch_size if self.drop_last else hi - lo

    def _row_group_order(self, epoch: int) -> list[RowGroupRef]:
        groups = self.split.row_groups
        if not self.shuffle:
            return list(groups)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(groups))
        return [groups[i] for i in perm]

    def _pieces(self, order: list[RowGroupRef], lo: int, hi: int) -> list[Piece]:
        """The row-group pieces that hold stream rows [lo, hi)."""
        out: list[Piece] = []
        start = 0
        for ref in order:
            end = start + ref.num_rows
            if end > lo and start < hi:
                out.append(Piece(ref, max(lo - start, 0), min(hi, end) - start))
            if end >= hi:
                break
            start = end
        return out

    def num_windows(self) -> int:
        return -(-self.steps_per_epoch() // self.window_batches)

    # ---- reading ------------------------------------------------------------------------------

    def read_window(self, epoch: int, window: int, order: list[RowGroupRef] | None = None,
                    ) -> list[Batch]:
        """Every batch of one window, built and checked."""
        return list(self.builder.batches(self.window(epoch, window, order)))

    def window(self, epoch: int, window: int, order: list[RowGroupRef] | None = None) -> Window:
        """The rows of one window, checked and gathered in batch order (permuted when shuffling),
        with the cuts that make them batches: one gather per column for the whole window."""
        order = order if order is not None else self._row_group_order(epoch)
        lo, a, b = self._window_rows(window)
        cols = self._rows(order, lo + a, lo + b)
        cuts = [*range(0, cols.n, self.batch_size), cols.n]
        if not self.shuffle:
            return self.builder.window(cols, None, cuts)
        rng = np.random.default_rng([self.seed, epoch, self.rank, window])
        if self.group_column is None:
            return self.builder.window(cols, rng.permutation(cols.n), cuts)
        groups = cols.values[self.group_column]
        starts, lengths = _runs(groups)
        shuffled = rng.permutation(len(starts))
        perm = _ranges(starts[shuffled], lengths[shuffled])
        return self.builder.window(cols, perm, _group_cuts(groups[perm], len(cuts) - 1))

    def _window_rows(self, window: int) -> tuple[int, int, int]:
        """(this rank's first stream row, the window's first and end row within the rank)."""
        rows = self.window_batches * self.batch_size
        lo, _ = self.rank_rows
        return lo, window * rows, min((window + 1) * rows, self.rows_per_epoch())

    def _rows(self, order: list[RowGroupRef], lo: int, hi: int) -> Columns:
        """Stream rows [lo, hi) as columns (views where they lie in one row group)."""
        parts = []
        for p in self._pieces(order, lo, hi):
            cols = self._row_group_columns(p.ref)
            parts.append(cols.slice(p.start, p.stop) if p.start or p.stop < p.ref.num_rows
                         else cols)
        return Columns.concat(parts)

    def __getstate__(self) -> dict[str, Any]:
        # what a worker receives: the plan, not this process's cached row group
        return {**self.__dict__, "_cached_ref": None, "_cached_cols": None}

    def _row_group_columns(self, ref: RowGroupRef) -> Columns:
        """One row group, read and checked once; the last one is kept, since consecutive windows
        share the row group that straddles their boundary."""
        if self._cached_ref != ref:
            cols = self.builder.columns(self.split.read(ref), self.split.where(ref),
                                        ref.first_row)
            self._cached_ref, self._cached_cols = ref, cols
        return self._cached_cols

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_step`` on (a restart reads nothing before it)."""
        steps = self.steps_per_epoch()
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step {start_step} is outside the epoch's {steps} steps")
        if start_step == steps:
            return
        first_window, skip = divmod(start_step, self.window_batches)
        if self.num_workers == 0:
            order = self._row_group_order(epoch)
            windows: Iterator[Window] = (self.window(epoch, w, order)
                                         for w in range(first_window, self.num_windows()))
        else:
            # workers read, check and gather runs of windows; the cheap assembly into batches
            # happens here, since sending one shared buffer costs far less than many tensors
            loader = DataLoader(_WindowDataset(self, epoch, first_window), batch_size=None,
                                num_workers=self.num_workers,
                                # forked from a fork server: see recsys.clean_start
                                multiprocessing_context=clean_context([__name__]))
            # the workers' pooled buffers stay mapped here for the epoch: a buffer sent again
            # then arrives as the storage already mapped, not as a new mapping whose every page
            # faults on first read
            mapped: dict[tuple[int, int], torch.UntypedStorage] = {}
            windows = (w for item in loader for w in _unwrapped(item, mapped))
        for w, window in enumerate(windows):
            # built one at a time: a batch reuses the memory of the one just consumed
            yield from self.builder.batches(window, skip if w == 0 else 0)


def _runs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each run of equal consecutive values."""
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, int)
    return starts, np.diff(np.r_[starts, len(ids)])


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of ``range(s, s + n)`` for each (s, n), vectorised."""
    total = int(lengths.sum())
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total) - offsets)


def _group_cuts(ids: np.ndarray, num_batches: int) -> list[int]:
    """``num_batches + 1`` cut points at run boundaries, each as near as it can be to its even
    share of the rows, strictly increasing (every batch keeps at least one row)."""
    n = len(ids)
    bounds, _ = _runs(ids)
    bounds = np.r_[bounds, n]
    cuts = [0]
    for k in range(1, num_batches):
        target = round(k * n / num_batches)
        i = int(np.clip(np.searchsorted(bounds, target), 1, len(bounds) - 1))
        best = min((bounds[i - 1], bounds[i]), key=lambda b: abs(int(b) - target))
        # keep room for the batches still to come and move past the previous cut
        cuts.append(int(min(max(best, cuts[-1] + 1), n - (num_batches - k))))
    return [*cuts, n]


WINDOWS_PER_ITEM = 4  # consecutive windows a worker builds in one go (see _WindowDataset)


class _WindowDataset(IterableDataset):
    """Worker ``j`` of ``n`` builds the runs of ``WINDOWS_PER_ITEM`` consecutive windows
    ``j, j + n, ...`` (counted from ``first``); the DataLoader takes one item from each worker in
    turn, so windows arrive in order. A run, not a single window, since consecutive windows share
    the row group between them: each worker reads it only at the ends of its runs.

    Each run travels as one :class:`SharedWindows` buffer in shared memory, taken from the
    worker's :class:`BufferPool`, so the main process maps it instead of unpickling a copy of
    every array; where shared memory is short (a container's small ``/dev/shm``), pickled through
    the pipe (:class:`_Piped`), with a warning, rather than fail when a shared page cannot be
    backed."""

    def __init__(self, loader: ParquetLoader, epoch: int, first_window: int) -> None:
        self.loader, self.epoch, self.first = loader, epoch, first_window
        # the cores the training process may use now, which a forked worker would have had (the
        # fork server's are those of the process when it started)
        self.cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def __iter__(self) -> Iterator[SharedWindows | _Piped | _Raised]:
        info = get_worker_info()
        if info is not None and self.cores:
            os.sched_setaffinity(0, self.cores)
        j, n = (info.id, info.num_workers) if info else (0, 1)
        order = self.loader._row_group_order(self.epoch)
        end = self.loader.num_windows()
        warned = False
        pool: BufferPool | None = None  # made at the first run that goes through shared memory
        for start in range(self.first + j * WINDOWS_PER_ITEM, end, n * WINDOWS_PER_ITEM):
            try:
                windows = [self.loader.window(self.epoch, w, order)
                           for w in range(start, min(start + WINDOWS_PER_ITEM, end))]
                layout, arrays = _flattened(windows)
                # what the workers keep: each its pool of buffers, a run in each
                need = sum(a.nbytes for a in arrays) * n * POOL_SLOTS
                free = shared_memory_free()
                if free is None or free >= need:
                    pool = pool or BufferPool(POOL_SLOTS)
                    yield SharedWindows(layout, arrays, pool)
                    continue
                note = None
                if not warned:  # logged by the main process, whose log is the run's
                    warned = True
                    note = (f"loader worker {j}: {SHM} has {free >> 20} MB free, less than the "
                            f"about {need >> 20} MB that the workers keep in flight; windows go "
                            "through a pipe instead (slower). Give the process more shared "
                            "memory (docker run --shm-size=1g)")
                yield _Piped(windows, note)
            except RecsysError as e:
                # torch re-raises a worker's exception as its type built from one message
                # string, which our errors (where + message) do not take: it would surface as a
                # RuntimeError traceback. Send the error itself to the main process instead.
                yield _Raised(e)
                return


SHM = "/dev/shm"  # where torch's shared tensors live on Linux


def shared_memory_free() -> int | None:
    """Bytes free in :data:`SHM` (None where there is no such folder: other systems)."""
    try:
        return shutil.disk_usage(SHM).free
    except OSError:
        return None


def _flattened(windows: list[Window]) -> tuple[list[Window], list[np.ndarray]]:
    """Every array of ``windows`` in one list, and the windows with each array replaced by its
    :class:`_Slot` in that list (what :class:`SharedWindows` packs)."""
    arrays: list[np.ndarray] = []
    return [_slots(w, arrays) for w in windows], arrays


POOL_SLOTS = 4  # buffers a worker reuses: two runs queued, one being cut, one still in batches


class BufferPool:
    """A worker's shared-memory buffers, each used again once the main process has let go of it.

    A fresh shared buffer costs its first touch: about 2 ms per 3.3 MB (page faults and zeroing),
    against 0.06 ms to copy into one already touched. Slot ``i`` is free while ``free[i]`` is 1;
    the worker clears it when it sends the buffer, and the main process sets it again when the
    last view of its copy of the buffer is gone (:meth:`SharedWindows.windows`), so a buffer is
    never written while a batch still reads it. With every slot busy (a consumer that keeps its
    batches), a run gets a buffer of its own, outside the pool.

    Example:
        >>> pool = BufferPool(4)
        >>> buffer, slot = pool.take(1 << 20)  # a shared uint8 tensor of 1 MiB, slot 0
    """

    def __init__(self, slots: int) -> None:
        self.id = secrets.randbits(62)  # tells the pools of one epoch's workers apart
        self.free = torch.ones(slots, dtype=torch.int32).share_memory_()
        self._flags = self.free.numpy()  # the same shared memory, read without torch's overhead
        self._buffers: list[torch.Tensor | None] = [None] * slots

    def take(self, nbytes: int) -> tuple[torch.Tensor, int]:
        """A shared uint8 tensor of ``nbytes`` and its slot (-1: outside the pool)."""
        for i, buffer in enumerate(self._buffers):
            if not self._flags[i]:
                continue
            if buffer is None or buffer.numel() < nbytes:
                # a quarter more, so that a run a little longer than the last still fits
                buffer = _shared_bytes(nbytes + nbytes // 4)
                self._buffers[i] = buffer
            self._flags[i] = 0
            return buffer[:nbytes], i
        return _shared_bytes(nbytes), -1


def _shared_bytes(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8).share_memory_()


def _release(free: torch.Tensor, slot: int) -> None:
    free[slot] = 1


class SharedWindows:
    """Windows whose arrays are packed into one shared-memory byte tensor.

    Pickled between processes (as a DataLoader worker sends its items), a tensor in shared memory
    passes as a handle that the receiver maps, where numpy arrays would be copied into the pickle,
    through a pipe and out of it again in the receiver. With fresh buffers, packing cost the worker
    more than pickling (about 3.6 against 2 ms per 32k-row window, mostly the first touch of shared
    pages), which a :class:`BufferPool` saves: two workers on 2 cores gave 3.3-3.6M rows/s pooled
    against 2.5-2.7M with a fresh buffer per run (epochs alternating in one process). On the
    main process, which trains, two workers' windows cost 0.7 s per 9M-row epoch this way and
    1.5-2.2 s pickled. :meth:`windows` gives views of the buffer, which stays alive (and out of
    its pool) while any of them does.

    Built from :func:`_flattened` windows (one walk of them serves the caller's size check too),
    or with :meth:`of` from the windows themselves.

    Example:
        >>> shared = SharedWindows.of([loader.window(0, 0)])
        >>> [window] = shared.windows()  # the same arrays, now views of shared.buffer
    """

    _ALIGN = 64

    @classmethod
    def of(cls, windows: list[Window], pool: BufferPool | None = None) -> SharedWindows:
        return cls(*_flattened(windows), pool)

    def __init__(self, layout: list[Window], arrays: list[np.ndarray],
                 pool: BufferPool | None = None) -> None:
        self.layout = layout
        self.specs: list[tuple[int, np.dtype, tuple[int, ...]]] = []
        offset = 0
        for a in arrays:
            self.specs.append((offset, a.dtype, a.shape))
            offset += -(-a.nbytes // self._ALIGN) * self._ALIGN
        self.free: torch.Tensor | None = None
        self.pool_id, self.slot = 0, -1
        self._raw: np.ndarray | None = None
        if pool is None:
            self.buffer = _shared_bytes(offset)
        else:
            self.buffer, self.slot = pool.take(offset)
            self.free, self.pool_id = pool.free, pool.id
        raw = self.buffer.numpy()
        for a, view in zip(arrays, self._views(raw), strict=True):
            np.copyto(view, a)

    def _views(self, raw: np.ndarray) -> list[np.ndarray]:
        return [raw[o:o + dtype.itemsize * int(np.prod(shape))].view(dtype).reshape(shape)
                for o, dtype, shape in self.specs]

    def windows(self) -> list[Window]:
        """The windows, as views of the buffer (in the process that received it). The buffer
        goes back to its worker's pool once this object, every view and every batch made from
        them are gone: each view, and each tensor made from one, keeps the one array they all
        derive from alive (not the tensor ``buffer``, which ``numpy()`` does not keep)."""
        if self._raw is None:
            self._raw = self.buffer.numpy()
            if self.free is not None and self.slot >= 0:
                weakref.finalize(self._raw, _release, self.free, self.slot)
        views = self._views(self._raw)
        return [_filled(w, views) for w in self.layout]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_raw": None}  # the receiver makes its own views


@dataclass(frozen=True)
class _Slot:
    """Where an array went in a :class:`SharedWindows` buffer."""

    index: int


def _slots(window: Window, arrays: list[np.ndarray]) -> Window:
    """``window`` with every array appended to ``arrays`` and replaced by its :class:`_Slot`."""
    def slot(a: np.ndarray) -> _Slot:
        arrays.append(a)
        return _Slot(len(arrays) - 1)

    return _mapped(window, np.ndarray, slot)


def _filled(layout: Window, views: list[np.ndarray]) -> Window:
    """The inverse of :func:`_slots`: every slot replaced by its array's view."""
    return _mapped(layout, _Slot, lambda s: views[s.index])


def _mapped(obj: Any, kind: type, fn: Callable[[Any], Any]) -> Any:
    """``obj`` (a Window, or a list, dict or value inside one) with every ``kind`` in it
    replaced by ``fn`` of it."""
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, Window):
        return Window(**{f.name: _mapped(getattr(obj, f.name), kind, fn) for f in fields(obj)})
    if isinstance(obj, list):
        return [_mapped(x, kind, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: _mapped(v, kind, fn) for k, v in obj.items()}
    return obj


@dataclass
class _Piped:
    """A run of windows sent through the pipe, with the worker's warning about it the first
    time (a worker's own log goes nowhere: it is a fresh process, see :mod:`recsys.clean_start`)."""

    windows: list[Window]
    warning: str | None = None


class _Raised:
    """A user-facing error met in a loader worker, carried to the main process as an item."""

    def __init__(self, error: RecsysError) -> None:
        self.error = error


def _unwrapped(item: SharedWindows | _Piped | _Raised,
               mapped: dict[tuple[int, int], torch.UntypedStorage]) -> list[Window]:
    if isinstance(item, _Raised):
        raise item.error
    if isinstance(item, _Piped):
        if item.warning:
            log.warning(item.warning)
        return item.windows
    if item.slot >= 0:
        mapped[item.pool_id, item.slot] = item.buffer.untyped_storage()
    return item.windows()
