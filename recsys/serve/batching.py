"""Micro-batching across concurrent requests: many small requests, one model call.

Requests put a job on a queue and await its future. One batcher task takes the first job, then
whatever else is queued (waiting at most ``max_wait_ms`` for more) until ``max_batch_rows`` rows,
runs ONE call of ``run_many`` on the whole batch in a worker thread (the event loop keeps
accepting and parsing requests meanwhile), and hands each job its own slice of the results.
While a call runs, new requests queue up, so under load batches fill by themselves and
``max_wait_ms`` only matters when traffic is light.

The flat-input helpers (:func:`merge_flat`, :func:`split_rows`) merge several requests' inputs in
the exported module's feature-major layout and cut the probabilities back per request.

Example:
    >>> batcher = MicroBatcher(run_many, max_batch_rows=1024, max_wait_ms=2.0, executor=pool)
    >>> batcher.start()
    >>> scores = await batcher.submit(flat, rows=flat.rows)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch

P = TypeVar("P")  # what one request hands the model
R = TypeVar("R")  # what it gets back


@dataclass(frozen=True)
class Flat:
    """One request's checked model inputs: ``dense (B, n_dense)``, ``values``, ``lengths``
    ``(n_features * B,)`` feature-major, as :meth:`Predictor.tensors` returns them."""

    dense: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.dense.shape[0])


def merge_flat(parts: Sequence[Flat], n_features: int) -> Flat:
    """Several requests' inputs as one batch, rows in order (request after request).

    ``lengths`` is feature-major, so each feature's lengths (and its ids) are gathered across the
    parts before the next feature's.

    Example:
        >>> merge_flat([a, b], n_features=3).rows == a.rows + b.rows
        True
    """
    if len(parts) == 1:
        return parts[0]
    lengths = [p.lengths.reshape(n_features, p.rows) for p in parts]
    per_feature = [torch.split(p.values, ls.sum(dim=1).tolist())
                   for p, ls in zip(parts, lengths, strict=True)]
    values = [chunks[f] for f in range(n_features) for chunks in per_feature]
    return Flat(dense=torch.cat([p.dense for p in parts]),
                values=torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
                lengths=torch.cat(lengths, dim=1).reshape(-1))


def split_rows(scores: dict[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Per-task arrays over a merged batch, cut back into each request's ``rows``."""
    bounds = np.cumsum([0, *rows])
    return [{t: s[bounds[i]:bounds[i + 1]] for t, s in scores.items()} for i in range(len(rows))]


@dataclass
class BatcherStats:
    """What the batcher did: ``batches`` is the number of model calls; ``requests`` the jobs they
    served; ``rows`` their rows; ``largest_batch`` the most rows one call took."""

    requests: int = 0
    rows: int = 0
    batches: int = 0
    largest_batch: int = 0
    failed_batches: int = 0
    model_seconds: float = 0.0

    def record(self, jobs: int, rows: int, seconds: float, ok: bool) -> None:
        self.requests += jobs
        self.rows += rows
        self.batches += 1
        self.largest_batch = max(self.largest_batch, rows)
        self.failed_batches += not ok
        self.model_seconds += seconds

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_rows_per_batch"] = self.rows / self.batches if self.batches else 0.0
        d["mean_requests_per_batch"] = self.requests / self.batches if self.batches else 0.0
        return d


@dataclass
class _Job(Generic[P, R]):
    payload: P
    rows: int
    future: asyncio.Future[R] = field(repr=False)


class ShuttingDown(Exception):
    """The batcher stopped before this job ran (the server is shutting down)."""


class MicroBatcher(Generic[P, R]):
    """Queue jobs from concurrent requests; run them in batches, one model call per batch.

    Args:
        run_many: the model call: a list of payloads in, one result per payload out (in order).
            It runs in ``executor``'s thread; an exception it raises fails that batch's jobs.
        max_batch_rows: a batch stops growing at this many rows (a single larger job still runs,
            alone).
        max_wait_ms: how long the first job of a batch may wait for others to join it.
        executor: where ``run_many`` runs (one thread: model calls never overlap).

    Example:
        >>> batcher = MicroBatcher(lambda xs: [x * 2 for x in xs], 64, 1.0, pool)
        >>> batcher.start()
        >>> await batcher.submit(21, rows=1)
        42
    """

    def __init__(self, run_many: Callable[[list[P]], list[R]], max_batch_rows: int,
                 max_wait_ms: float, executor: Executor) -> None:
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run_many = run_many
        self.max_batch_rows = max_batch_rows
        self.max_wait = max_wait_ms / 1000
        self.executor = executor
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[_Job[P, R]] = asyncio.Queue()
        self._held: _Job[P, R] | None = None  # the job that did not fit the last batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def submit(self, payload: P, rows: int) -> R:
        """Queue ``payload`` (``rows`` rows of model work) and wait for its result."""
        if self._task is None or self._task.done():
            raise ShuttingDown("the batcher is not running")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(payload, rows, future))
        return await future

    async def stop(self) -> None:
        """Stop batching; jobs still queued fail with :class:`ShuttingDown`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        pending = [self._held] if self._held else []
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server is shutting down"))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            payloads = [job.payload for job in batch]
            rows = sum(job.rows for job in batch)
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run_many, payloads)
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                self.stats.record(len(batch), rows, time.perf_counter() - start, ok=False)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            self.stats.record(len(batch), rows, time.perf_counter() - start, ok=True)
            for job, result in zip(batch, results, strict=True):
                if not job.future.done():  # (a client that went away leaves a cancelled one)
                    job.future.set_result(result)

    async def _collect(self) -> list[_Job[P, R]]:
        """The next batch: the first job, then what is queued or arrives within max_wait, up to
        max_batch_rows rows."""
        first = self._held if self._held is not None else await self._queue.get()
        self._held = None
        batch, rows = [first], first.rows
        deadline = time.monotonic() + self.max_wait
        while rows < self.max_batch_rows:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if rows + job.rows > self.max_batch_rows:
                self._held = job  # first in the next batch: order is kept
                break
            batch.append(job)
            rows += job.rows
        return batch
