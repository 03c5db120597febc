"""Writing the Criteo-format world (:mod:`recsys.data.adapters.criteo_world`): its rows as Kaggle-layout
TSV, streamed by chunks, and ``world.json``, the config, the planted terms and per split the
oracle's AUC and log-loss (:func:`exact_auc`, :func:`log_loss`).

Example:
    >>> info = write_criteo_world(Path("data/cw"), CriteoWorldConfig(rows=200_000))
    >>> info["splits"]["test"]["oracle_auc"] > info["splits"]["test"]["first_order_auc"]
    True
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as csv

from recsys.data.adapters.common import split_sizes
from recsys.data.adapters.criteo_world import (
    CARDINALITIES,
    CAT_MISSING,
    CAT_NAMES,
    DENSE,
    DENSE_BETAS,
    DENSE_CROSS,
    FIRST_ORDER,
    GENERATOR,
    GENERATOR_VERSION,
    INT_FIELDS,
    INT_NAMES,
    PAIRS,
    TRIPLES,
    CriteoWorldConfig,
    World,
    WorldRows,
)
from recsys.fsutil import atomic_write_text
from recsys.progress import progress_bar


def write_criteo_world(out_dir: Path, cfg: CriteoWorldConfig, progress: bool = True) -> dict:
    """Write ``out_dir/train.txt`` (Criteo TSV, streamed by chunks) and ``out_dir/world.json``
    (the config, the planted terms, and per split the oracle's AUC and log-loss); returns the
    contents of ``world.json``.

    ``train.txt`` is written under a temporary name and renamed only when complete, so an
    interrupted run never leaves a partial ``train.txt``; ``world.json`` is removed first and
    written last, so its absence marks a run that did not finish. Memory: the label and two
    logits of every row (17 bytes a row, for the split metrics) plus one chunk of rows.

    Example:
        >>> info = write_criteo_world(Path("data/cw"), CriteoWorldConfig(rows=200_000))
        >>> info["splits"]["test"]["rows"]
        20000
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target, info_path = out_dir / "train.txt", out_dir / "world.json"
    info_path.unlink(missing_ok=True)  # a stale description must not outlive its file
    world = World.from_config(cfg)
    labels = np.empty(cfg.rows, dtype=np.int8)
    logits = np.empty(cfg.rows, dtype=np.float64)
    first = np.empty(cfg.rows, dtype=np.float64)
    tmp = out_dir / f".train.txt.{os.getpid()}.tmp"
    options = csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    bar = progress_bar(total=cfg.rows, desc="criteo world", unit="row", unit_scale=True,
                       disable=not progress)
    try:
        with open(tmp, "wb") as f:
            writer = csv.CSVWriter(f, _SCHEMA, write_options=options)
            done = 0
            for pieces in world.iter_pieces(0, cfg.rows, cfg.chunk_rows):
                # one table per block slice, joined without a copy: cheaper than concatenating
                # the rows' arrays first
                writer.write_table(pa.concat_tables([_to_table(world, p) for p in pieces]))
                for part in pieces:
                    labels[done:done + len(part)] = part.labels
                    logits[done:done + len(part)] = part.logits
                    first[done:done + len(part)] = part.first_order_logits
                    done += len(part)
                bar.update(sum(len(p) for p in pieces))
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    info = _describe(world, labels, logits, first)
    atomic_write_text(info_path, _json(info))
    if progress:
        test = info["splits"]["test"]
        seconds = time.perf_counter() - started
        print(f"criteo world: {cfg.rows} rows, ctr {info['label_mean']:.4f}, oracle test AUC "
              f"{_fmt(test['oracle_auc'])}, first-order test AUC {_fmt(test['first_order_auc'])}"
              f", {seconds:.1f} s")
    return info


def exact_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The exact ROC AUC of ``scores`` for 0/1 ``labels`` (the Mann-Whitney statistic, ties
    counted as half); None when one class is absent.

    Example:
        >>> exact_auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.4, 0.4, 0.9]))
        0.875
    """
    y = np.asarray(labels).astype(bool)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return None
    _, inverse, counts = np.unique(np.asarray(scores), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mid_rank = ends - (counts - 1) / 2.0  # the average 1-based rank of each run of ties
    rank_sum = float(mid_rank[inverse][y].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def log_loss(labels: np.ndarray, logits: np.ndarray) -> float | None:
    """Mean binary cross-entropy of sigmoid(``logits``) (stable in the logit); None when empty.

    Example:
        >>> round(log_loss(np.array([1, 0]), np.array([0.0, 0.0])), 4)
        0.6931
    """
    if len(labels) == 0:
        return None
    y = np.asarray(labels, dtype=np.float64)
    x = np.asarray(logits, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, x) - y * x))


# ---- helpers -------------------------------------------------------------------------------------

_SCHEMA = pa.schema([("label", pa.int8())] + [(n, pa.int64()) for n in INT_NAMES]
                    + [(n, pa.string()) for n in CAT_NAMES])


def _to_table(world: World, rows: WorldRows) -> pa.Table:
    """Rows -> the Arrow table whose CSV text is the TSV lines (nulls write as empty fields)."""
    n = len(rows)
    columns: list[pa.Array] = [pa.array(rows.labels, type=pa.int8())]
    for j in range(len(INT_NAMES)):
        columns.append(pa.array(rows.ints[:, j], type=pa.int64(), mask=~rows.int_present[:, j]))
    offsets = pa.py_buffer(np.arange(0, 8 * n + 1, 8, dtype=np.int32))
    for j in range(len(CAT_NAMES)):
        ids = rows.cats[:, j]
        digits = world.hex_text[j][np.maximum(ids, 0)]  # (a missing id's digits are masked)
        missing = ids < 0
        validity = pa.array(~missing).buffers()[1] if missing.any() else None
        columns.append(pa.StringArray.from_buffers(n, offsets, pa.py_buffer(digits.tobytes()),
                                                   validity, int(missing.sum())))
    return pa.Table.from_arrays(columns, schema=_SCHEMA)


def _describe(world: World, labels: np.ndarray, logits: np.ndarray, first: np.ndarray) -> dict:
    cfg = world.config
    sizes = split_sizes(cfg.rows, cfg.valid_fraction, cfg.test_fraction)
    splits = {}
    lo = 0
    for name, size in zip(("train", "valid", "test"), sizes, strict=True):
        y, x, f = labels[lo:lo + size], logits[lo:lo + size], first[lo:lo + size]
        splits[name] = {"rows": size,
                        "positive_rate": float(y.mean()) if size else None,
                        "oracle_auc": exact_auc(y, x), "oracle_log_loss": log_loss(y, x),
                        "first_order_auc": exact_auc(y, f)}
        lo += size
    return {
        "generator": GENERATOR, "generator_version": GENERATOR_VERSION,
        "config": asdict(cfg),
        "cardinalities": dict(zip(CAT_NAMES, CARDINALITIES, strict=True)),
        "missing_rates": {**dict(zip(CAT_NAMES, CAT_MISSING, strict=True)),
                          **{n: f[2] for n, f in zip(INT_NAMES, INT_FIELDS, strict=True)}},
        "bias": world.bias,
        "first_order": list(FIRST_ORDER),
        "dense": dict(zip(DENSE, DENSE_BETAS, strict=True)),
        "pairs": [list(p) for p in PAIRS],
        "triples": [list(t) for t in TRIPLES],
        "dense_cross": list(DENSE_CROSS),
        "label_mean": float(labels.mean()),
        "splits": splits,
    }


def _json(info: dict) -> str:
    return json.dumps(info, indent=2) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
