"""Shared fixtures: a tiny synthetic dataset (generated once per session), a Spec that matches it,
and a helper that writes small hand-made Parquet files."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from recsys.data.schema import BatchSchema, DatasetManifest, SparseColumn
from recsys.data.synthetic import generate
from recsys.spec import OOVPolicy, Spec, SyntheticSpec, validate_spec

TINY_SYNTHETIC: dict[str, Any] = {
    "seed": 11,
    "num_users": 300,
    "num_items": 400,
    "num_categories": 12,
    "cluster_branching": [2, 2, 2],
    "requests": {"train": 3000, "valid": 500, "test": 500},
    "retrieved_per_request": 20,
    "preranked_per_request": 10,
    "ranked_per_request": 6,
    "exposed_per_request": 3,
    "rows_per_shard": 4000,
    "row_group_size": 1000,
}

# Under pytest-xdist the workers share the machine's cores: one intra-op thread each, or the
# workers' OpenMP pools spin against each other and an in-process training step takes many times
# longer (subprocess tests set OMP_NUM_THREADS=1 themselves)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# item_brand cardinality of the tiny world: max(8, num_items // 20)
TINY_NUM_BRANDS = 20


def tiny_spec_dict(path: str | Path) -> dict[str, Any]:
    """The raw (TOML-shaped) spec of the tiny synthetic dataset at ``path``."""

    def sparse(name: str, side: str, n: int) -> dict[str, Any]:
        return {"name": name, "side": side, "kind": "sparse", "num_embeddings": n}

    def dense(name: str, side: str) -> dict[str, Any]:
        return {"name": name, "side": side, "kind": "dense"}

    return {
        "name": "tiny",
        "data": {"source": "parquet", "path": str(path), "view": "impressions",
                 "labels": ["click", "conversion"], "shuffle_window_batches": 4},
        "features": {
            "embedding_dim": 8,
            "tables": [{"name": "category", "num_embeddings": TINY_SYNTHETIC["num_categories"]}],
            "fields": [
                sparse("user_id", "user", TINY_SYNTHETIC["num_users"]),
                sparse("user_age", "user", 7),
                sparse("user_region", "user", 16),
                {"name": "user_hist_categories", "side": "user", "kind": "multi_sparse",
                 "table": "category", "pooling": "mean"},
                dense("user_activity", "user"),
                sparse("item_id", "item", TINY_SYNTHETIC["num_items"]),
                {"name": "item_category", "side": "item", "kind": "sparse", "table": "category"},
                sparse("item_brand", "item", TINY_NUM_BRANDS),
                dense("item_price", "item"),
                dense("item_popularity", "item"),
                sparse("hour", "context", 24),
                sparse("device", "context", 4),
            ],
        },
        "model": {"arch": "mlp", "tasks": ["click", "conversion"]},
        "train": {"batch_size": 64, "seed": 3},
    }


@pytest.fixture(scope="session")
def tiny_synthetic_cfg() -> SyntheticSpec:
    return SyntheticSpec(**TINY_SYNTHETIC)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory,
                 tiny_synthetic_cfg: SyntheticSpec) -> DatasetManifest:
    """The tiny synthetic dataset, generated once per session (read-only for tests)."""
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate(tiny_synthetic_cfg, out, progress=False)
    return DatasetManifest.load(out)


@pytest.fixture(scope="session")
def tiny_spec(tiny_dataset: DatasetManifest) -> Spec:
    return validate_spec(tiny_spec_dict(tiny_dataset.root), "tiny.toml")


@pytest.fixture(scope="session")
def tiny_schema(tiny_spec: Spec, tiny_dataset: DatasetManifest) -> BatchSchema:
    return BatchSchema.from_spec(tiny_spec, tiny_dataset)


# ---- hand-made files with several (uneven) row groups (the loader's tests) -----------------------

FILE_SIZES = [(23, 5), (17, 4), (0, 4), (31, 8)]  # (rows, row_group_size) per file


@pytest.fixture
def handmade(tmp_path: Path) -> tuple[list[Path], BatchSchema]:
    def rows_of(rid: np.ndarray) -> pa.Table:
        return pa.table({
            "rid": rid,
            "x": (rid * 0.5).astype(np.float32),
            "tags": pa.array([[int(r) % 7] * (int(r) % 3) for r in rid], type=pa.list_(pa.int64())),
            "y": (rid % 2).astype(np.int8),
        })

    files = []
    for i, (rows, rg) in enumerate(FILE_SIZES):
        path = tmp_path / f"part-{i:05d}.parquet"
        pq.write_table(rows_of(np.arange(rows, dtype=np.int64) + 1000 * i), path,
                       row_group_size=rg)
        files.append(path)
    # a file whose middle row group is empty (kept in metadata, skipped by the loader)
    path = tmp_path / "part-00004.parquet"
    with pq.ParquetWriter(path, pq.read_schema(files[0])) as w:
        for rid in (np.arange(4000, 4003), np.arange(0), np.arange(4003, 4006)):
            w.write_table(rows_of(rid.astype(np.int64)))
    files.append(path)
    assert pq.read_metadata(path).num_row_groups == 3
    bschema = BatchSchema(dense=["x"],
                          sparse=[SparseColumn("rid", "rid", 10_000, OOVPolicy.ERROR, False),
                                  SparseColumn("tags", "tags", 7, OOVPolicy.ERROR, True)],
                          labels=["y"], groups={"request": "rid"})
    return files, bschema


@pytest.fixture
def write_parquet(tmp_path: Path) -> Callable[..., Path]:
    """``write_parquet(name, columns_or_table, row_group_size=None, schema=None) -> path``.

    ``columns_or_table`` is a ``pa.Table`` or a dict of column name -> values (Python lists or Arrow
    arrays); the file goes under the test's tmp_path.
    """

    def write(name: str, data: pa.Table | dict[str, Any], row_group_size: int | None = None,
              schema: pa.Schema | None = None) -> Path:
        table = data if isinstance(data, pa.Table) else pa.table(data, schema=schema)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=row_group_size)
        return path

    return write


@pytest.fixture(scope="session")
def parity_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny world with enough requests that test metrics are stable to ~0.001 AUC
    (60k train rows, 12k test rows)."""
    cfg = SyntheticSpec(**{**TINY_SYNTHETIC,
                           "requests": {"train": 20000, "valid": 2000, "test": 4000}})
    out = tmp_path_factory.mktemp("parity") / "data"
    generate(cfg, out, progress=False)
    return out


def processes_with(marker: str) -> list[tuple[int, str]]:
    """``(pid, command line)`` of every other process whose command line names ``marker``, in pid
    order (how tests find the workers they kill: workers sit in their own process groups)."""
    found = []
    for pid_dir in sorted((p for p in Path("/proc").iterdir() if p.name.isdigit()),
                          key=lambda p: int(p.name)):
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and int(pid_dir.name) != os.getpid():
            found.append((int(pid_dir.name), cmdline))
    return found


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``small_fs(size="256k", read_only=False)``: a fresh tmpfs of that size mounted under
    tmp_path (unmounted after the test); skips where mounting is not permitted."""
    mounts: list[Path] = []

    def mount(size: str = "256k", read_only: bool = False) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"mounting a small tmpfs is not permitted here (needs root or "
                        f"CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounts.append(where)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        return where

    yield mount
    for where in reversed(mounts):
        subprocess.run(["umount", "-l", str(where)], check=False)


# `make test` runs two workers that take whole files (pytest-xdist --dist loadfile), each taking
# the next file in collection order when it runs dry. Starting with the longest files (by their
# time in a full run, `--junitxml`, longest first) keeps one of them from being the last thing
# running on an otherwise idle machine; the rest keep their order.
LONGEST_FIRST = ("test_world_size.py", "test_torchx_launch.py", "test_train.py", "test_resume.py",
                 "test_bench_all.py", "test_report_ranking.py", "test_interaction_training.py",
                 "test_report_tuned.py", "test_report.py", "test_export.py",
                 "test_bad_input_cli.py", "test_precision.py", "test_hierarchical_training.py",
                 "test_planning.py", "test_serve_http.py", "test_bench_archs.py", "test_tune.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))


# The prologue of a subprocess script that must run with torch alone: any import of the heavy
# packages (or of a submodule) raises ImportError, and every attempt made from recsys code (even
# one a ``try`` swallows) is recorded in ``attempts`` as (module, the recsys frame that asked).
# Format ``{why}`` with what the script checks. Used by test_pure_torch and test_bench_archs.
IMPORT_BLOCKER = r'''
import importlib.abc
import sys
import traceback
from pathlib import Path

BLOCKED = ("torchrec", "fbgemm_gpu", "pydantic", "pyarrow")
RECSYS = str(Path.cwd() / "recsys")
attempts = []


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCKED:
            return None
        ours = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()
                if f.filename.startswith(RECSYS)]
        if ours:
            attempts.append((name, ours[-1]))
        raise ImportError(f"{name} is blocked: WHY")


assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "imported before the test"
sys.meta_path.insert(0, Block())
'''


def import_blocker(why: str) -> str:
    """:data:`IMPORT_BLOCKER` with the reason its ImportError gives."""
    return IMPORT_BLOCKER.replace("WHY", why)


def standardized(raw: list[float] | np.ndarray, train_rows: int) -> np.ndarray:
    """``raw`` scaled as the MovieLens adapter scales a dense column: (x - mean) / std with the
    population moments of the first ``train_rows`` values (std 1 where they are constant)."""
    x = np.asarray(raw, dtype=np.float64)
    std = x[:train_rows].std()
    return (x - x[:train_rows].mean()) / (std if std > 0 else 1.0)


class OutputShapes(TorchDispatchMode):
    """Records ``(op name, output shape)`` of every aten op that runs inside: what a block
    allocates and writes (a tuple result gives one entry per tensor).

    Example:
        >>> with OutputShapes() as rec:
        ...     torch.zeros(2, 3).sum()
        >>> rec.calls
        [('aten::zeros', (2, 3)), ('aten::sum', ())]
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.calls.append((func.name(), tuple(t.shape)))
        return out
