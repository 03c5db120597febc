"""ParquetLoader with worker processes: the same batches in the same order as in-process,
windows packed into shared memory and back, the workers' buffer pools (a buffer reused only
once no batch reads it), and the pipe where /dev/shm is short."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.data.batch import Batch, BatchBuilder, Window
from recsys.data.loader import ParquetLoader, SharedWindows
from recsys.data.parquet import ParquetSplit
from recsys.data.schema import BatchSchema, SparseColumn
from recsys.spec import OOVPolicy


def compare_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.dense, y.dense)
        assert torch.equal(x.sparse.values(), y.sparse.values())
        assert torch.equal(x.sparse.lengths(), y.sparse.lengths())
        for k in x.labels:
            assert torch.equal(x.labels[k], y.labels[k])
        for k in x.groups:
            assert torch.equal(x.groups[k], y.groups[k])


@pytest.mark.parametrize(("window_batches", "num_workers", "start_step"), [(3, 2, 7), (1, 3, 9)])
def test_workers_give_the_same_batches_in_the_same_order(tiny_dataset, tiny_schema,
                                                         window_batches, num_workers, start_step):
    """Workers build runs of WINDOWS_PER_ITEM windows in turn; with one window per 128-row batch
    (18 windows) three workers take several turns each, and a restart begins mid-run."""
    start = time.perf_counter()
    files = tiny_dataset.files("impressions", "train")
    split = ParquetSplit(files, tiny_schema)
    kwargs = {"rank": 1, "world_size": 2, "seed": 8, "window_batches": window_batches,
              "drop_last": False}
    plain = list(ParquetLoader(split, 128, num_workers=0, **kwargs).epoch(1))
    workers = list(ParquetLoader(split, 128, num_workers=num_workers, **kwargs).epoch(1))
    assert len(plain) == -(-4500 // 128)
    compare_batches(plain, workers)
    restarted = list(ParquetLoader(split, 128, num_workers=num_workers, **kwargs)
                     .epoch(1, start_step=start_step))
    compare_batches(plain[start_step:], restarted)
    assert time.perf_counter() - start < 30


def test_shared_windows_give_back_every_array(handmade):
    """A run of windows packed into one shared buffer comes back with every array equal (dtype,
    shape, values; bool masks and Nones included) and as views of that buffer."""
    files, schema = handmade
    loader = ParquetLoader(ParquetSplit(files, schema), 4, seed=2, window_batches=2,
                           drop_last=False)
    originals = [loader.window(0, w) for w in range(loader.num_windows())]
    # and one with a null single id (a bool mask for lengths) and per-id weights
    table = pa.table({"rid": pa.array([3, None, 0, 9]), "x": pa.array([1, 2, 3, 4], pa.float32()),
                      "tags": pa.array([[1, 2], [], None, [4]]),
                      "tag_w": pa.array([[0.5, 0.25], [], None, [2.0]], pa.list_(pa.float32())),
                      "y": pa.array([0, 1, 0, 1], pa.int8())})
    nulls = BatchSchema(dense=["x"], labels=["y"], sparse=[
        SparseColumn("rid", "rid", 10, OOVPolicy.ERROR, False),
        SparseColumn("tags", "tags", 7, OOVPolicy.ERROR, True, weights="tag_w")])
    builder = BatchBuilder(nulls)
    originals.append(builder.window(builder.columns(table), np.array([2, 0, 3, 1]), [0, 2, 4]))
    assert originals[-1].lengths[0].dtype == bool and originals[-1].weights[0] is None
    shared = pickle.loads(ForkingPickler.dumps(SharedWindows.of(originals)))  # as a worker sends
    assert shared.buffer.is_shared()
    copies = shared.windows()
    assert len(copies) == len(originals)
    base = shared.buffer.numpy()
    for a, b in zip(originals, copies, strict=True):
        for f in dataclasses.fields(Window):
            x, y = getattr(a, f.name), getattr(b, f.name)
            items = (list(zip(x, y, strict=True)) if isinstance(x, list)
                     else [(x[k], y[k]) for k in x] if isinstance(x, dict) else [(x, y)])
            for u, v in items:
                if isinstance(u, np.ndarray):
                    assert v.dtype == u.dtype and v.shape == u.shape and np.array_equal(u, v)
                    assert np.shares_memory(v, base)
                else:
                    assert u == v


def test_buffer_pool_reuses_a_slot_only_once_released() -> None:
    from recsys.data.loader import BufferPool, _release

    pool = BufferPool(2)
    first, slot = pool.take(100)
    assert slot == 0 and first.is_shared() and first.numel() == 100
    assert pool.free.tolist() == [0, 1]
    assert pool.take(100)[1] == 1
    own, slot = pool.take(100)  # every slot busy: a buffer outside the pool
    assert slot == -1 and own.is_shared() and pool.free.tolist() == [0, 0]
    _release(pool.free, 0)
    again, slot = pool.take(120)  # within the quarter of headroom: the same memory
    assert slot == 0 and again.data_ptr() == first.data_ptr() and again.numel() == 120
    _release(pool.free, 0)
    bigger, slot = pool.take(1000)  # past it: the slot gets a larger buffer
    assert slot == 0 and bigger.numel() == 1000 and bigger.data_ptr() != first.data_ptr()


def test_a_pooled_buffer_is_released_only_when_its_last_batch_is_gone(handmade):
    """Received (unpickled) windows hold their slot while any view of them, or any batch made
    from them, lives; then the slot is free for the worker's next run."""
    import gc

    from recsys.data.loader import BufferPool

    files, schema = handmade
    loader = ParquetLoader(ParquetSplit(files, schema), 4, seed=2, window_batches=2,
                           drop_last=False)
    pool = BufferPool(2)
    sent = SharedWindows.of([loader.window(0, 0)], pool)
    assert sent.slot == 0 and pool.free.tolist() == [0, 1]
    received = pickle.loads(ForkingPickler.dumps(sent))
    del sent
    [window] = received.windows()
    assert received.windows()[0].dense.base is window.dense.base  # a second call: same views
    batch = loader.builder.batch(window, 0)
    del received, window
    gc.collect()
    assert pool.free.tolist() == [0, 1]  # the batch still reads the buffer
    del batch
    gc.collect()
    assert pool.free.tolist() == [1, 1]


def test_workers_reuse_buffers_without_touching_batches_still_held(tiny_dataset, tiny_schema):
    """Many runs per worker, so that buffers go round the pools, while some batches are kept to
    the end: each must still hold its rows when compared with the same epoch read in-process."""
    split = ParquetSplit(tiny_dataset.files("impressions", "train"), tiny_schema)
    kwargs = {"seed": 5, "window_batches": 1, "drop_last": False}
    plain = list(ParquetLoader(split, 32, num_workers=0, **kwargs).epoch(0))
    kept: dict[int, Batch] = {}
    for step, batch in enumerate(ParquetLoader(split, 32, num_workers=2, **kwargs).epoch(0)):
        compare_batches([plain[step]], [batch])
        if step % 7 == 0:
            kept[step] = batch
    assert len(plain) > 8 * 4 * 2  # more runs per worker than its pool has slots
    compare_batches([plain[k] for k in kept], list(kept.values()))


def test_short_shared_memory_sends_windows_through_the_pipe(tiny_dataset, tiny_schema, monkeypatch,
                                                             caplog):
    """With too little free in /dev/shm for what the workers keep in flight, a worker's runs are
    pickled through the pipe instead, and the main process logs the worker's warning once (a
    worker's own log goes nowhere); the batches are the same."""
    import recsys.data.loader as loader_module

    split = ParquetSplit(tiny_dataset.files("impressions", "train"), tiny_schema)
    kwargs = {"seed": 3, "window_batches": 2, "drop_last": False}
    loader = ParquetLoader(split, 128, **kwargs)
    assert isinstance(next(iter(loader_module._WindowDataset(loader, 0, 0))), SharedWindows) or \
        loader_module.shared_memory_free() is None  # room enough: shared (on Linux)
    monkeypatch.setattr(loader_module, "shared_memory_free", lambda: 0)
    # what a worker sends, as the pipe carries it
    items = [ForkingPickler.loads(ForkingPickler.dumps(item))
             for item in loader_module._WindowDataset(loader, 0, 0)]
    assert len(items) > 1 and all(isinstance(item, loader_module._Piped) for item in items)
    assert items[0].warning and not any(item.warning for item in items[1:])
    with caplog.at_level("WARNING", logger="recsys.data"):
        windows = [w for item in items for w in loader_module._unwrapped(item, {})]
    assert caplog.text.count("/dev/shm has 0 MB free") == 1
    plain = list(ParquetLoader(split, 128, num_workers=0, **kwargs).epoch(0))
    compare_batches(plain, [b for w in windows for b in loader.builder.batches(w)])


HELD_GENERATOR = """
import sys
import threading

import torch

from recsys.data.loader import ParquetLoader
from recsys.data.parquet import ParquetSplit
from recsys.data.schema import BatchSchema, DatasetManifest
from recsys.spec import load_spec


def draw(stop):
    while not stop.is_set():
        torch.randn(4_000_000)  # holds torch's default generator while it fills


if __name__ == "__main__":
    spec = load_spec(sys.argv[1])
    manifest = DatasetManifest.load(spec.data.path)
    split = ParquetSplit(manifest.files("impressions", "train"),
                         BatchSchema.from_spec(spec, manifest))
    stop = threading.Event()
    thread = threading.Thread(target=draw, args=(stop,))
    thread.start()
    try:
        for epoch in range(3):
            loader = ParquetLoader(split, 256, seed=epoch, num_workers=2)
            print(sum(batch.batch_size for batch in loader.epoch(epoch)))
    finally:
        stop.set()
        thread.join()
"""


def test_workers_start_while_another_thread_holds_a_lock(tiny_spec, tmp_path):
    """A worker forked from the training process inherits every lock as it was: here torch's
    default generator, which another thread holds nearly all the time, and which every
    DataLoader worker takes to seed itself. Forked, the first epoch hangs; started from the fork
    server, three epochs end."""
    from recsys.spec import dump_toml

    (tmp_path / "spec.toml").write_text(dump_toml(tiny_spec))
    (tmp_path / "held.py").write_text(HELD_GENERATOR)
    try:
        done = subprocess.run([sys.executable, str(tmp_path / "held.py"),
                               str(tmp_path / "spec.toml")], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("loader workers hung at start while another thread held torch's generator")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [int(line) for line in done.stdout.split()]
    assert len(rows) == 3 and len(set(rows)) == 1 and rows[0] > 0


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores and sched_setaffinity")
def test_workers_run_on_the_cores_of_the_process_that_reads(tiny_dataset, tiny_schema):
    """Workers come from the fork server, whose cores are those it started with; they take the
    reading process's cores of the moment, as forked ones would."""
    split = ParquetSplit(tiny_dataset.files("impressions", "train"), tiny_schema)
    before = os.sched_getaffinity(0)
    list(ParquetLoader(split, 256, num_workers=1).epoch(0))  # the fork server is up (its cores)
    one = {min(before)}
    os.sched_setaffinity(0, one)
    try:
        batches = ParquetLoader(split, 64, window_batches=1, num_workers=2).epoch(0)
        next(batches)  # the workers are up
        servers = [p for p in _children(os.getpid())
                   if b"forkserver" in Path(f"/proc/{p}/cmdline").read_bytes()]
        workers = [w for s in servers for w in _children(s)]
        assert len(workers) == 2
        assert all(os.sched_getaffinity(w) == one for w in workers)
        batches.close()
    finally:
        os.sched_setaffinity(0, before)
