"""The model side of ``recsys serve``: an export loaded for online scoring, micro-batched.

:class:`ScoringService` loads an export directory (``model.pt`` through
:class:`~recsys.export.predictor.Predictor`; for a two-tower export also ``user_tower.pt``,
``scorer.pt`` and ``item_cache.pt``; its vocabularies when it has them), warms it up, and scores
request bodies:

* ``{"rows": [{field: value, ...}, ...]}`` -> the ranker's probabilities per task, row by row;
* ``{"user": {user and context fields}, "candidates": [item id, ...]}`` (two-tower exports) ->
  the user tower once, the candidates' cached representations, the scorer: one probability per
  candidate, in candidate order.

Each kind of request has its own :class:`~recsys.serve.batching.MicroBatcher`; both hand their
model calls to the same single worker thread, so calls never overlap and torch's intra-op
threads are the only parallelism inside a call.

Example:
    >>> service = ScoringService.load("exports/qs", ServeConfig())
    >>> service.warm_up()
    >>> service.start()                                         # (in the event loop)
    >>> await service.score({"rows": [row]})
    {'scores': {'click': [0.031]}, 'model': 'quickstart@3f2a9c1d0b7e', 'rows': 1}
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.data.schema import DenseScaling
from recsys.errors import DataError
from recsys.export.predictor import MANIFEST_FILE, Predictor
from recsys.export.raw import export_dense_scaling, export_vocabularies
from recsys.serve.batching import Flat, MicroBatcher, merge_flat, split_rows
from recsys.serve.schema import CandidateIndex, RawIds, RequestError, RowParser

MIB = 2**20
ITEM_FEATURE = "item_id"  # the feature the item cache is keyed by (recsys.export.two_tower)
WARMUP_CALLS = 3  # TorchScript's profiling executor specialises a graph over its first calls


@dataclass
class ServeConfig:
    """How the server listens and batches.

    Args:
        host, port: where to listen (port 0: any free port, printed at startup).
        max_batch_rows: a model call takes at most this many rows (candidates for two-tower
            requests) from the queued requests; a larger single request runs alone.
        max_wait_ms: how long the first queued request may wait for others to join its batch.
        max_body_bytes: larger request bodies are refused with 413.
        threads: torch intra-op threads for the model calls (None: torch's default).

    Example:
        >>> ServeConfig(port=0, max_batch_rows=256).max_wait_ms
        2.0
    """

    host: str = "127.0.0.1"
    port: int = 8080
    max_batch_rows: int = 1024
    max_wait_ms: float = 2.0
    max_body_bytes: int = 8 * MIB
    threads: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {self.max_batch_rows}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass
class TwoTower:
    """A two-tower export's serving split, loaded: the user side's parser and tower, the
    scorer and the item cache."""

    parser: RowParser
    user_tower: torch.jit.ScriptModule
    scorer: torch.jit.ScriptModule
    reprs: torch.Tensor  # (N, H, d) cached item representations, rows in item id order
    prepared: torch.Tensor | None  # the scorer's user-free part of each, when cached
    index: CandidateIndex
    task: str


def default_threads() -> int:
    """torch threads for the model calls of ``recsys serve``: every core but one, which is left
    to the event loop (HTTP, JSON, parsing the next requests while a call runs)."""
    return max(1, (os.cpu_count() or 1) - 1)


def load_raw_ids(export_dir: Path, manifest: dict[str, Any]) -> dict[str, RawIds]:
    """The export's vocabularies (``manifest.json`` ``vocabularies``, files under ``vocab/``) as
    column -> raw value mapping; ``{}`` when it has none."""
    return {column: RawIds(str(v.info.value_type), v.ids,
                           0 if str(v.info.kind) == "vocab" else None)
            for column, v in export_vocabularies(export_dir, manifest).items()}


def _side_predictor(predictor: Predictor, module: torch.jit.ScriptModule,
                    split: dict[str, Any], where: str) -> Predictor:
    """A Predictor over the user side's inputs (``user_dense``, ``user_features``), for its
    checks and conversion; ``module`` is the user tower."""
    m = predictor.manifest
    features = list(split["user_features"])
    keep = set(features)
    sub = {
        "inputs": {"dense": list(split["user_dense"]), "features": features,
                   "feature_columns": {f: predictor.feature_columns[f] for f in features},
                   "oov": {f: predictor.oov[f] for f in features}},
        "tables": [{**t, "features": [f for f in t["features"] if f in keep]}
                   for t in m["tables"] if keep.intersection(t["features"])],
        "tasks": [],
    }
    return Predictor(module, sub, where)


def load_two_tower(export_dir: Path, predictor: Predictor, multi: set[str] | None,
                   raw_ids: dict[str, RawIds],
                   scaling: dict[str, DenseScaling] | None = None) -> TwoTower | None:
    """The serving split of a two-tower export, or None for a plain ranker."""
    split = predictor.manifest.get("serving_split")
    if not split:
        return None
    where = str(export_dir / MANIFEST_FILE)
    try:
        user_tower = torch.jit.load(str(export_dir / "user_tower.pt"), map_location="cpu")
        scorer = torch.jit.load(str(export_dir / "scorer.pt"), map_location="cpu")
        cache = torch.load(export_dir / "item_cache.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise DataError(str(export_dir), f"cannot load the two-tower serving split: {e}") from None
    lacking = [k for k in ("item_id", "repr") if not isinstance(cache, dict) or k not in cache]
    if lacking:
        raise DataError(str(export_dir / "item_cache.pt"), f"lacks {lacking} (is it a recsys "
                        "item cache?)")
    user = _side_predictor(predictor, user_tower, split, where)
    column = predictor.feature_columns.get(ITEM_FEATURE, ITEM_FEATURE)
    return TwoTower(
        parser=RowParser(user, multi, raw_ids, scaling), user_tower=user_tower.eval(),
        scorer=scorer.eval(), reprs=cache["repr"], prepared=cache.get("prepared"),
        index=CandidateIndex(cache["item_id"].numpy(), column, raw_ids.get(column)),
        task=predictor.tasks[0])


class ScoringService:
    """An export ready to score requests (see the module docstring for the request forms).

    Example:
        >>> service = ScoringService.load("exports/qs", ServeConfig(max_batch_rows=256))
        >>> service.metadata()["tasks"]
        ['click', 'conversion']
    """

    def __init__(self, export_dir: Path, predictor: Predictor, cfg: ServeConfig,
                 raw_ids: dict[str, RawIds]) -> None:
        self.export_dir, self.predictor, self.cfg = export_dir, predictor, cfg
        multi = predictor.manifest["inputs"].get("multi_valued")
        multi_set = set(multi) if multi is not None else None
        scaling = export_dense_scaling(export_dir, predictor.manifest)
        self.parser = RowParser(predictor, multi_set, raw_ids, scaling)
        self.two_tower = load_two_tower(export_dir, predictor, multi_set, raw_ids, scaling)
        m = predictor.manifest
        self.model_name = f"{m.get('spec', 'model')}@{str(m.get('spec_hash', '?'))[:12]}"
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        # one thread: model calls run one at a time, each with torch's intra-op threads
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recsys-model")
        self.rows_batcher: MicroBatcher[Flat, dict[str, np.ndarray]] = MicroBatcher(
            self._score_flats, cfg.max_batch_rows, cfg.max_wait_ms, self.executor)
        self.user_batcher: MicroBatcher[tuple[Flat, np.ndarray], dict[str, np.ndarray]] = \
            MicroBatcher(self._score_users, cfg.max_batch_rows, cfg.max_wait_ms, self.executor)
        self.ready = False
        self.started = time.time()

    @classmethod
    def load(cls, export_dir: str | Path, cfg: ServeConfig) -> ScoringService:
        """Load an export directory (a DataError naming what is wrong with it)."""
        export_dir = Path(export_dir)
        if not export_dir.is_dir():
            raise DataError(str(export_dir), "export directory not found (make one with "
                            "`recsys export RUN_DIR --out DIR`)")
        predictor = Predictor.load(export_dir)
        return cls(export_dir, predictor, cfg, load_raw_ids(export_dir, predictor.manifest))

    # ---- lifecycle ----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """A few model calls on valid inputs (id 0 of every table) at two batch sizes, so that
        the first requests do not pay for TorchScript's specialisation; then ``ready``."""
        n_features = len(self.predictor.features)
        for b in (1, min(64, self.cfg.max_batch_rows)):
            flat = _zeros(b, len(self.predictor.dense), n_features)
            for _ in range(WARMUP_CALLS):
                self._score_flats([flat])
        if self.two_tower is not None:
            tt = self.two_tower
            user = _zeros(1, len(tt.parser.dense), len(tt.parser.predictor.features))
            items = np.arange(min(16, len(tt.index.item_ids)))
            for _ in range(WARMUP_CALLS):
                self._score_users([(user, items)])
        self.ready = True

    def start(self) -> None:
        """Start the batchers (in the running event loop)."""
        self.rows_batcher.start()
        self.user_batcher.start()

    async def stop(self) -> None:
        """Stop the batchers (queued requests fail with 503) and the model thread."""
        self.ready = False
        await self.rows_batcher.stop()
        await self.user_batcher.stop()
        self.executor.shutdown(wait=True)

    # ---- requests -----------------------------------------------------------------------------

    async def score(self, body: Any) -> dict[str, Any]:
        """Score one request body (parsed JSON); RequestError for a bad one."""
        if not isinstance(body, dict):
            raise RequestError(422, 'the body must be a JSON object: {"rows": [...]}'
                               + (' or {"user": {...}, "candidates": [...]}'
                                  if self.two_tower else ""))
        if "rows" in body:
            _only(body, ("rows",))
            return await self._score_rows(body["rows"])
        if "user" in body or "candidates" in body:
            if self.two_tower is None:
                raise RequestError(422, "user/candidates requests need a two-tower export "
                                   f"(this is a '{self.predictor.manifest.get('arch')}' ranker); "
                                   'send {"rows": [...]}', field="user")
            _only(body, ("user", "candidates"))
            return await self._score_candidates(body.get("user"), body.get("candidates"))
        raise RequestError(422, f"unknown key(s) {sorted(body)}; expected 'rows'"
                           + (" or 'user' and 'candidates'" if self.two_tower else ""),
                           field=str(next(iter(body), "rows")))

    async def _score_rows(self, rows: Any) -> dict[str, Any]:
        flat = self.parser.parse(rows, where="rows")
        if flat.rows == 0:
            scores = {t: np.zeros(0, np.float32) for t in self.predictor.tasks}
        else:
            scores = await self.rows_batcher.submit(flat, flat.rows)
        return {"scores": {t: s.tolist() for t, s in scores.items()}, "model": self.model_name,
                "rows": flat.rows}

    async def _score_candidates(self, user: Any, candidates: Any) -> dict[str, Any]:
        tt = self.two_tower
        assert tt is not None
        if not isinstance(user, dict):
            raise RequestError(422, "expects an object of the user's and the context's fields",
                               field="user")
        if candidates is None:
            raise RequestError(422, "missing: the item ids to score", field="candidates")
        try:
            flat = tt.parser.parse([user], where="user")
        except RequestError as e:  # one user: "user", not "row 0"
            raise RequestError(e.status, f"user: {e.detail}", field=e.field) from None
        positions = tt.index.positions(candidates)
        if len(positions) == 0:
            scores = {tt.task: np.zeros(0, np.float32)}
        else:
            scores = await self.user_batcher.submit((flat, positions), len(positions))
        return {"scores": {t: s.tolist() for t, s in scores.items()}, "model": self.model_name,
                "rows": len(positions)}

    # ---- model calls (in the worker thread) ----------------------------------------------------

    def _score_flats(self, flats: list[Flat]) -> list[dict[str, np.ndarray]]:
        """One ranker call on several requests' rows; each request's probabilities."""
        merged = merge_flat(flats, len(self.predictor.features))
        scores = self.predictor.predict(merged.dense, merged.values, merged.lengths,
                                        where="batch")
        return split_rows(scores, [f.rows for f in flats])

    @torch.inference_mode()
    def _score_users(self, jobs: list[tuple[Flat, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """One user-tower call for several requests' users, then the scorer on each one's
        cached candidates."""
        tt = self.two_tower
        assert tt is not None
        merged = merge_flat([flat for flat, _ in jobs], len(tt.parser.predictor.features))
        users = tt.user_tower(merged.dense, merged.values, merged.lengths)
        out = []
        for i, (_, positions) in enumerate(jobs):
            idx = torch.from_numpy(positions)
            prepared = tt.prepared[idx] if tt.prepared is not None else None
            logits = tt.scorer(users[i], tt.reprs[idx], prepared)
            out.append({tt.task: torch.sigmoid(logits).to(torch.float32).numpy()})
        return out

    # ---- description --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The batchers' counters (model calls, requests, rows)."""
        out = {"rows": self.rows_batcher.stats.as_dict()}
        if self.two_tower is not None:
            out["candidates"] = self.user_batcher.stats.as_dict()
        return out

    def metadata(self) -> dict[str, Any]:
        """What ``GET /metadata`` returns: the model, its input fields, tasks, versions,
        batching settings and counters."""
        import aiohttp

        from recsys import __version__

        m = self.predictor.manifest
        out: dict[str, Any] = {
            "model": self.model_name, "export": str(self.export_dir),
            "spec": m.get("spec"), "spec_hash": m.get("spec_hash"), "arch": m.get("arch"),
            "format": m.get("format"), "quantize": m.get("quantize"),
            "tasks": self.predictor.tasks, "fields": self.parser.describe(),
            "dense": self.predictor.dense, "features": self.predictor.features,
            "vocabularies": m.get("vocabularies") or {},
            "versions": {"export": m.get("versions", {}),
                         "server": {"recsys": __version__, "torch": torch.__version__,
                                    "aiohttp": aiohttp.__version__}},
            "batching": {**asdict(self.cfg), "torch_threads": torch.get_num_threads()},
            "stats": self.stats(), "uptime_s": time.time() - self.started,
            "two_tower": None,
        }
        if self.two_tower is not None:
            tt = self.two_tower
            out["two_tower"] = {"user_fields": tt.parser.describe(), "task": tt.task,
                                "item_field": tt.index.column,
                                "items_cached": len(tt.index.item_ids)}
        return out

    def summary(self) -> str:
        """One line: what was served."""
        parts = []
        for name, s in self.stats().items():
            parts.append(f"{s['requests']:,} request(s), {s['rows']:,} {name} in "
                         f"{s['batches']:,} model call(s) (mean {s['mean_rows_per_batch']:.1f} "
                         f"{name} per call, {s['model_seconds']:.2f} s in the model)")
        return "; ".join(parts)


def _only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    extra = [k for k in body if k not in allowed]
    if extra:
        raise RequestError(422, f"unknown key(s) {extra}; expected only {list(allowed)}",
                           field=str(extra[0]))


def _zeros(rows: int, n_dense: int, n_features: int) -> Flat:
    """Valid inputs for a warm-up: zero dense features, id 0 of every table once per row."""
    return Flat(torch.zeros(rows, n_dense), torch.zeros(n_features * rows, dtype=torch.int64),
                torch.ones(n_features * rows, dtype=torch.int32))
