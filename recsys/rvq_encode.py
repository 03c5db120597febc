"""Offline user codes: RVQ of a trained run's frozen user embedding table, written into the data.

``recsys rvq encode RUN_DIR --out DIR`` reads the run's last checkpoint (in one process, whatever
number of processes trained it: the checkpoint is resharded on load), fits an RVQ to the rows of
the user-id table (:func:`recsys.quantization.rvq.fit_offline`), and writes a copy of the run's
dataset with one more column, ``rvq_code``: per row, the L trie-node ids of its user's code
prefixes. A spec then trains on it with ``data.source = "parquet"``, ``data.path = DIR`` and
``loss.hierarchical.codes = "data"``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.data.parquet import dataset_write, partial_path
from recsys.data.schema import RVQ_CODE, ColumnInfo, ColumnRole, DatasetManifest, num_nodes
from recsys.errors import DataError, RunError
from recsys.fsutil import writing
from recsys.progress import progress_bar
from recsys.quantization.rvq import ResidualVQ, code_perplexity, fit_offline
from recsys.run_dir import RunDir
from recsys.spec import RVQSpec, Side

log = logging.getLogger("recsys.rvq")


def encode_run(run_dir: str | Path, out: str | Path, *, rvq: RVQSpec | None = None,
               field: str = "user_id", iters: int = 10, batch_size: int = 1024, seed: int = 0,
               force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fit an RVQ to the run's ``field`` table and write the dataset with ``rvq_code`` to ``out``.

    Args:
        run_dir: a run directory with checkpoints (``recsys train``).
        out: the new dataset directory.
        rvq: levels, codes and EMA settings (default: the run spec's ``loss.hierarchical.rvq``).
        field: the user-id feature whose table is quantised.
        iters, batch_size, seed: :func:`fit_offline`'s EMA epochs, batch and seed.
        force: replace an existing ``out``.

    Returns:
        A summary: rows per split, per-level code perplexity over the table, reconstruction error.

    Example:
        >>> encode_run("runs/quickstart-demo", "data/quickstart-codes")["perplexity"]
        [24.1, 19.7, 15.2]
    """
    run_dir, out = Path(run_dir), Path(out)
    run = RunDir(run_dir)
    spec = run.spec()
    try:
        f = spec.features.field(field)
    except KeyError as e:
        raise RunError(str(run_dir), f"--field '{field}': {e.args[0]}") from None
    if f.side != Side.USER:
        raise RunError(str(run_dir), f"--field '{field}' is not a user feature of this run "
                       f"(its side is '{f.side}')")
    rvq = rvq or spec.loss.hierarchical.rvq
    source = DatasetManifest.load(spec.data.path)
    if out.exists() and not force:  # before the slow part; checked again under the lock
        raise RunError(str(out), "exists; pass --force to replace it")
    # everything goes to OUT.partial under the dataset's lock and takes OUT's name only when
    # complete, so a failure (a bad row, a full disk) leaves no half-written dataset behind and
    # --force replaces the old one only by a whole new one
    with writing(out), dataset_write(out):
        if out.exists() and not force:
            raise RunError(str(out), "exists; pass --force to replace it")
        summary = _encode(run, spec.features.table_of(f).name, partial_path(out),
                          f.source_column, rvq, source, field=field, iters=iters,
                          batch_size=batch_size, seed=seed, progress=progress)
        publish(partial_path(out), out)
    return summary


def _encode(run: RunDir, table_name: str, dest: Path, user_column: str, rvq: RVQSpec,
            source: DatasetManifest, *, field: str, iters: int, batch_size: int, seed: int,
            progress: bool) -> dict[str, Any]:
    """Fit the RVQ to the run's table ``table_name`` and write the coded dataset, the model and
    its summary into ``dest``."""
    table = run.table_weight(table_name)[0].float()
    model = fit_offline(table, iters=iters, batch_size=batch_size, seed=seed, levels=rvq.levels,
                        codes=rvq.codes, ema_decay=rvq.ema_decay,
                        dead_code_threshold=rvq.dead_code_threshold, normalize=rvq.normalize)
    codes = model.encode(table)
    ids = model.prefix_ids(codes).numpy()
    summary = {"run": str(run.path), "field": field, "users": int(table.shape[0]),
               "levels": rvq.levels, "codes": rvq.codes,
               "perplexity": [round(float(p), 2) for p in code_perplexity(codes, rvq.codes)],
               "recon_error": _recon_error(model, table), "rows": {}}
    shutil.rmtree(dest, ignore_errors=True)  # left by a killed run
    write_coded_dataset(source, dest, user_column, ids, summary, progress)
    buffer = io.BytesIO()  # torch.save reports a full disk as a RuntimeError; Python as OSError
    torch.save(model.state_dict(), buffer)
    (dest / "rvq.pt").write_bytes(buffer.getvalue())
    (dest / "rvq.json").write_text(json.dumps(summary, indent=2))
    return summary


def publish(partial: Path, out: Path) -> None:
    """Rename the finished ``partial`` to ``out``; an old ``out`` is moved aside first and removed
    after, so a crash in between leaves one whole dataset, never a half-deleted one."""
    if out.exists():
        old = out.with_name(f".{out.name}.replaced")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old)
    else:
        partial.rename(out)


def _recon_error(model: ResidualVQ, table: torch.Tensor) -> float:
    q = model.quantize(table)
    x = q.residuals[:, 0]
    return float((x - q.reconstruction).pow(2).sum(1).mean() / x.pow(2).sum(1).mean())


def write_coded_dataset(source: DatasetManifest, out: Path, user_column: str, ids: np.ndarray,
                        summary: dict[str, Any], progress: bool) -> None:
    """A copy of ``source`` in ``out`` with the column ``rvq_code``: per row, ``ids[user]`` (the L
    trie-node ids of its user's code prefixes). ``summary`` needs ``run`` (where the codes came
    from) and ``codes`` (per level); its ``rows`` are counted here."""
    assert source.root is not None
    levels = ids.shape[1]
    files = [(view, split, rel) for view, splits in source.views.items()
             for split, rels in splits.items() for rel in rels]
    out.mkdir(parents=True)
    for view, split, rel in progress_bar(files, desc="writing rvq_code", unit="file",
                                         disable=not progress):
        src = source.root / rel
        try:
            meta = pq.ParquetFile(src).metadata
            table = pq.read_table(src)
        except FileNotFoundError:
            raise DataError(str(src), "data file not found (listed in the dataset's manifest)"
                            ) from None
        except (OSError, pa.ArrowException) as e:
            raise DataError(str(src), f"not a readable Parquet file: {e}") from None
        users = table.column(user_column).to_numpy()
        if users.min(initial=0) < 0 or users.max(initial=0) >= len(ids):
            raise DataError(str(src), f"column '{user_column}' holds ids outside the user "
                            f"table's {len(ids)} rows [0, {len(ids)})")
        flat = ids[users].reshape(-1)
        offsets = np.arange(0, len(flat) + 1, levels, dtype=np.int32)
        codes = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        row_group = meta.row_group(0).num_rows if meta.num_row_groups else None
        pq.write_table(table.append_column(RVQ_CODE, codes), dest, row_group_size=row_group)
        summary["rows"][f"{view}/{split}"] = summary["rows"].get(f"{view}/{split}", 0) \
            + table.num_rows
    info = ColumnInfo(name=RVQ_CODE, role=ColumnRole.MULTI_SPARSE, side=Side.USER,
                      cardinality=num_nodes(levels, summary["codes"]),
                      description=f"trie-node ids of the user's RVQ code prefixes, levels 1..{levels}")
    digest = hashlib.sha256(f"{source.config_hash}:{ids.tobytes().hex()}".encode()).hexdigest()
    manifest = source.model_copy(update={
        "columns": [c for c in source.columns if c.name != RVQ_CODE] + [info],
        "source": {**source.source, "rvq_codes_from": summary["run"]},
        "config_hash": digest[:16], "root": None})
    manifest.save(out)
