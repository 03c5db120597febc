"""Evaluation over many batches and ranks: :class:`EvalAccumulator` collects per-batch tensors and
computes :mod:`recsys.evaluate.metrics` on the global evaluation set (every rank's rows gathered,
never an average of per-rank metrics); :func:`flatten_for_report` shapes one task's result for
``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from recsys.evaluate.metrics import HEADLINE_KEYS, _check_k, metrics_of

__all__ = ["ORACLE_KEY", "EvalAccumulator", "flatten_for_report"]

# The key under which EvalAccumulator.compute returns the metrics of the oracle probabilities.
ORACLE_KEY = "oracle"


@dataclass(frozen=True)
class _Layout:
    """Which columns an accumulator holds; every batch and every rank must agree on it."""

    tasks: tuple[str, ...]
    groups: tuple[str, ...]
    oracle: tuple[str, ...]

    def float_columns(self) -> list[str]:
        return ([f"probs/{t}" for t in self.tasks] + [f"labels/{t}" for t in self.tasks]
                + [f"oracle/{t}" for t in self.oracle])

    def int_columns(self) -> list[str]:
        return [f"groups/{g}" for g in self.groups]


def _to_numpy(name: str, x: torch.Tensor | np.ndarray, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu").numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor of shape (B,), got shape {a.shape}")
    if np.dtype(dtype).kind == "i" and a.dtype.kind not in "biu":
        raise ValueError(f"{name} must hold integer group ids, got dtype {a.dtype}")
    return a.astype(dtype, copy=True)


class EvalAccumulator:
    """Collects a model's probabilities, labels and group ids over batches, then computes metrics on
    the whole evaluation set, across ranks.

    Arrays are kept as CPU NumPy chunks. :meth:`compute` is collective when ``torch.distributed`` is
    initialised with more than one rank: every rank must call it; each rank's rows are gathered to
    every rank (sizes first, then padded tensors) and the metrics are computed on the global rows,
    never averaged over ranks. With one process (or no process group) nothing distributed is used.

    Args:
        gauc_group: the group kind GAUC is computed over (``"user"`` by default); GAUC keys are
            absent when the batches carry no such group.
        ranking_group: the group kind NDCG@K / Recall@K rank within (``"request"``); those keys
            are absent when the batches carry no such group.
        process_group: the process group to gather over (default: the world).

    Example:
        >>> acc = EvalAccumulator()
        >>> for batch in loader:
        ...     acc.add({"click": model_probs}, batch.labels, batch.groups, oracle=batch.oracle)
        >>> result = acc.compute(ks=(5, 10))
        >>> result["click"]["auc"], result["oracle"]["click"]["auc"]
        >>> flatten_for_report(result, "click")["gauc"]
    """

    def __init__(self, gauc_group: str = "user", ranking_group: str = "request",
                 process_group: dist.ProcessGroup | None = None) -> None:
        self.gauc_group = gauc_group
        self.ranking_group = ranking_group
        self.process_group = process_group
        self._layout: _Layout | None = None
        self._chunks: dict[str, list[np.ndarray]] = {}
        self._batches = 0

    @property
    def rows(self) -> int:
        """Rows collected on this rank."""
        if self._layout is None:
            return 0
        return sum(c.size for c in self._chunks[f"probs/{self._layout.tasks[0]}"])

    def reset(self) -> None:
        """Forget every collected batch."""
        self._layout = None
        self._chunks = {}
        self._batches = 0

    def add(self, probs: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor],
            groups: Mapping[str, torch.Tensor] | None = None,
            oracle: Mapping[str, torch.Tensor] | None = None) -> None:
        """Collect one batch.

        Args:
            probs: task -> ``(B,)`` predicted probabilities in [0, 1]; the keys are the tasks.
            labels: label name -> ``(B,)`` 0/1 labels; must hold every task (extras are ignored).
            groups: group kind -> ``(B,)`` int64 ids (e.g. ``request``, ``user``).
            oracle: label name -> ``(B,)`` true probabilities; kept for the tasks among ``probs``.
        """
        where = f"batch {self._batches}"
        groups = groups or {}
        oracle = oracle or {}
        if not probs:
            raise ValueError(f"{where}: probs is empty; pass task -> (B,) probabilities")
        if ORACLE_KEY in probs:
            raise ValueError(f"{where}: a task may not be called {ORACLE_KEY!r} (the key of the "
                             "oracle metrics in the result); rename the task")
        missing = [t for t in probs if t not in labels]
        if missing:
            raise ValueError(f"{where}: labels lack the tasks {missing}; labels has {sorted(labels)}")
        layout = _Layout(tasks=tuple(sorted(probs)), groups=tuple(sorted(groups)),
                         oracle=tuple(sorted(t for t in oracle if t in probs)))
        if self._layout is not None and layout != self._layout:
            raise ValueError(f"{where}: columns {layout} differ from the earlier batches' "
                             f"{self._layout}; every batch must carry the same tasks, groups, oracle")

        columns: dict[str, np.ndarray] = {}
        for t in layout.tasks:
            columns[f"probs/{t}"] = _to_numpy(f"{where}: probs[{t!r}]", probs[t], np.float64)
            columns[f"labels/{t}"] = _to_numpy(f"{where}: labels[{t!r}]", labels[t], np.float64)
        for t in layout.oracle:
            columns[f"oracle/{t}"] = _to_numpy(f"{where}: oracle[{t!r}]", oracle[t], np.float64)
        for g in layout.groups:
            columns[f"groups/{g}"] = _to_numpy(f"{where}: groups[{g!r}]", groups[g], np.int64)
        sizes = {k: v.size for k, v in columns.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{where}: tensors have different lengths {sizes}")
        for name, a in columns.items():
            if name.startswith("groups/"):
                continue
            kind = name.split("/")[0]
            bad = ~np.isfinite(a) | ((a != 0) & (a != 1) if kind == "labels" else (a < 0) | (a > 1))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                need = "0 or 1" if kind == "labels" else "a finite probability in [0, 1]"
                raise ValueError(f"{where}: {name.replace('/', '[')}][{i}] = {a[i]}; expected {need}")

        self._layout = layout
        for name, a in columns.items():
            self._chunks.setdefault(name, []).append(a)
        self._batches += 1

    def _local(self) -> dict[str, np.ndarray]:
        assert self._layout is not None
        columns = self._layout.float_columns() + self._layout.int_columns()
        return {c: np.concatenate(self._chunks[c]) for c in columns}

    def _gather(self) -> tuple[_Layout, dict[str, np.ndarray]]:
        """Every rank's rows on every rank (rank order), or this rank's rows without a group."""
        distributed = dist.is_available() and dist.is_initialized()
        if not distributed or dist.get_world_size(self.process_group) == 1:
            if self._layout is None:
                raise ValueError("EvalAccumulator.compute: no batch was added")
            return self._layout, self._local()

        group = self.process_group
        world = dist.get_world_size(group)
        layouts: list[_Layout | None] = [None] * world
        dist.all_gather_object(layouts, self._layout, group=group)
        known = {lay for lay in layouts if lay is not None}
        # Every rank sees the same list, so every rank raises together (no rank left waiting).
        if not known:
            raise ValueError("EvalAccumulator.compute: no batch was added on any rank")
        if len(known) > 1:
            raise ValueError(f"EvalAccumulator.compute: ranks collected different columns: {layouts}")
        layout = known.pop()
        local = self._local() if self._layout is not None else None

        backend = dist.get_backend(group)
        device = (torch.device("cuda", torch.cuda.current_device())
                  if backend == dist.Backend.NCCL else torch.device("cpu"))
        n_local = 0 if local is None else next(iter(local.values())).size
        sizes_t = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(sizes_t, torch.tensor([n_local], dtype=torch.int64, device=device),
                        group=group)
        sizes = [int(t.item()) for t in sizes_t]
        longest = max(sizes)

        out: dict[str, np.ndarray] = {}
        for columns, dtype in ((layout.float_columns(), np.float64),
                               (layout.int_columns(), np.int64)):
            if not columns:
                continue
            block = np.zeros((longest, len(columns)), dtype=dtype)
            if local is not None:
                block[:n_local] = np.stack([local[c] for c in columns], axis=1)
            mine = torch.from_numpy(block).to(device)
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine, group=group)
            full = np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, sizes, strict=True)])
            for j, c in enumerate(columns):
                out[c] = np.ascontiguousarray(full[:, j])
        return layout, out

    def compute(self, ks: Iterable[int] = (5, 10)) -> dict[str, Any]:
        """See :meth:`compute_with_arrays`; the metrics alone."""
        return self.compute_with_arrays(ks)[0]

    def compute_with_arrays(self, ks: Iterable[int] = (5, 10),
                            ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
        """Metrics of the collected rows (of all ranks when distributed; collective then).

        Returns:
            ``{task: {"auc", "logloss", "ne", "calibration", "ece", "gauc_uniform",
            "gauc_impressions", "gauc_groups", "ndcg@K", "recall@K", "ranking_groups", "rows",
            "positive_rate"}}`` (GAUC keys when ``gauc_group`` was collected, ranking keys when
            ``ranking_group`` was), plus ``"oracle": {task: {...same keys...}}`` computed with
            the oracle probabilities in place of the model's, when an oracle was given; and the
            gathered rows as ``{"probs": {task: array}, "labels": {...}, "oracle": {...}}`` (for
            plots such as the reliability diagram).
        """
        ks = tuple(_check_k(k) for k in ks)
        layout, data = self._gather()
        groups = {g: data[f"groups/{g}"] for g in layout.groups}

        def metrics(task: str, probs: np.ndarray) -> dict[str, float]:
            return metrics_of(data[f"labels/{task}"], probs, groups, self.gauc_group,
                               self.ranking_group, ks)

        result: dict[str, Any] = {t: metrics(t, data[f"probs/{t}"]) for t in layout.tasks}
        if layout.oracle:
            result[ORACLE_KEY] = {t: metrics(t, data[f"oracle/{t}"]) for t in layout.oracle}
        arrays = {kind: {t: data[f"{kind}/{t}"] for t in names}
                  for kind, names in (("probs", layout.tasks), ("labels", layout.tasks),
                                      ("oracle", layout.oracle))}
        return result, arrays


def flatten_for_report(result: Mapping[str, Any], task: str = "click") -> dict[str, float]:
    """The headline metrics of one task for ``metrics.json``.

    ``gauc`` is the impressions-weighted GAUC (the common industry convention); both named variants
    stay alongside it. Headline keys come first (``auc, gauc, logloss, ne, calibration, ece``), then
    the rest. Pass ``result["oracle"]`` to flatten the oracle's metrics the same way.

    Example:
        >>> result = {"click": {"auc": 0.7, "gauc_uniform": 0.6, "gauc_impressions": 0.65}}
        >>> flatten_for_report(result, "click")
        {'auc': 0.7, 'gauc': 0.65, 'gauc_uniform': 0.6, 'gauc_impressions': 0.65}
    """
    if task not in result or task == ORACLE_KEY:
        tasks = [t for t in result if t != ORACLE_KEY]
        raise KeyError(f"no metrics for task {task!r}; the result has tasks {tasks}")
    metrics = dict(result[task])
    if "gauc_impressions" in metrics:
        metrics["gauc"] = metrics["gauc_impressions"]
    head = {k: metrics[k] for k in HEADLINE_KEYS if k in metrics}
    return head | {k: v for k, v in metrics.items() if k not in head}
