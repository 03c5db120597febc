"""Export a trained ranker to TorchScript: quantized embeddings, flat tensor inputs, a manifest.

``recsys export RUN_DIR --out DIR [--quantize int8|fp16|none]`` writes:

- ``model.pt``: a TorchScript module ``forward(dense, values, lengths) -> Dict[str, Tensor]`` of
  probabilities per task. ``dense`` is ``(B, n_dense)`` float32 in the manifest's ``dense`` order;
  ``values`` holds every sparse feature's ids, feature after feature in the manifest's
  ``features`` order; ``lengths`` ``(n_features * B,)`` int32 holds the number of ids of each row,
  feature-major (TorchRec's KeyedJaggedTensor layout). Loading needs torch and fbgemm_gpu only.
- ``manifest.json``: feature order, dense columns, tables (rows, dim, quantization), tasks,
  versions and the spec hash.
- ``vocab/<column>.parquet``, when the run's dataset maps raw values to ids: its vocabularies
  (the manifest's ``vocabularies``), so that ``recsys serve`` takes raw values from the export
  alone.

The path: the run's spec builds a plain (unsharded) ranker on CPU; its weights come from the run's
latest checkpoint (``torch.distributed.checkpoint`` reshards a checkpoint written by any number of
processes); TorchRec's ``quantize_embeddings`` swaps the EmbeddingBagCollection for a quantized one
(int8 or fp16 rows, FBGEMM kernels); TorchRec's fx tracer traces the module with the over-arch as a
leaf (its data-dependent steps, e.g. AdaEnsemble's early exit, stay real control flow), and
``torch.jit.script`` compiles the graph.
"""

# no "from __future__ import annotations": fx and TorchScript read forward()'s real type hints

import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchrec
import torchrec.fx
from torch import nn
from torchrec.inference.modules import quantize_embeddings
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys import __version__
from recsys.errors import DataError, RunError
from recsys.export.inputs import flat_inputs
from recsys.export.two_tower import export_split, time_cached_scoring
from recsys.fsutil import sibling_lock, staging_dir, writing
from recsys.models.archs import arch_of
from recsys.models.ranker import Ranker
from recsys.run_dir import RunDir
from recsys.spec import FeatureKind, Spec, spec_hash

QUANTIZE = {"none": None, "fp16": torch.float16, "int8": torch.qint8}
MODEL_FILE, MANIFEST_FILE = "model.pt", "manifest.json"


class ServingRanker(nn.Module):
    """The ranker as served: flat tensors in, probabilities per task out.

    Args:
        ranker: a trained (plain, unsharded) ranker.
        tasks: the task names, in the model's order.
        esmm: conversion is pCTR · pCVR.

    Example:
        >>> serving = ServingRanker(ranker, ["click"], esmm=False)
        >>> serving(dense, values, lengths)["click"].shape
        torch.Size([B])
    """

    def __init__(self, ranker: Ranker, tasks: list[str], esmm: bool) -> None:
        super().__init__()
        self.ebc = ranker.ebc
        self.over = ranker.over
        self.keys = list(ranker.feature_order)
        self.pooled_input = ranker.pooled_input
        self.tasks = list(tasks)
        self.esmm = esmm

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=values, lengths=lengths)
        logits = self.over(self.pooled_input(self.ebc(kjt), kjt), dense)
        probs = {t: torch.sigmoid(logits[t]) for t in self.tasks}
        if self.esmm:
            probs["conversion"] = probs["click"] * probs["conversion"]
        return probs


@dataclass
class Exported:
    """An exported model in memory: the scripted module and its manifest."""

    module: torch.jit.ScriptModule
    manifest: dict[str, Any]


def script_ranker(spec: Spec, ranker: Ranker, quantize: str = "none") -> Exported:
    """Quantize, trace and script a trained ranker (``ranker`` is left untouched)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got '{quantize}'")
    import copy

    serving = ServingRanker(copy.deepcopy(ranker), list(spec.model.tasks), spec.model.esmm).eval()
    dtype = QUANTIZE[quantize]
    if dtype is not None:
        quantize_embeddings(serving, dtype=dtype, inplace=True)
    graph = torchrec.fx.symbolic_trace(serving, leaf_modules=[type(serving.over).__name__])
    module = torch.jit.script(graph)
    return Exported(module, manifest(spec, ranker, serving.keys, quantize))


def manifest(spec: Spec, ranker: Ranker, keys: list[str], quantize: str) -> dict[str, Any]:
    import fbgemm_gpu

    return {
        "format": "recsys-torchscript-1",
        "spec": spec.name, "spec_hash": spec_hash(spec),
        "inputs": {
            "dense": [f.source_column for f in spec.features.dense_fields()],
            "features": keys,
            "feature_columns": {f.name: f.source_column for f in spec.features.sparse_fields()},
            # how training treated an id outside its table; predict applies the same
            "oov": {f.name: str(f.oov) for f in spec.features.sparse_fields()},
            # the features that take a list of ids per row (the others take one id)
            "multi_valued": [f.name for f in spec.features.sparse_fields()
                             if f.kind == FeatureKind.MULTI_SPARSE],
            "layout": "forward(dense (B, n_dense) float32, values (sum of lengths,) int64, "
                      "lengths (n_features * B,) int32 feature-major)",
        },
        "tables": [{"name": c.name, "rows": c.num_embeddings, "dim": c.embedding_dim,
                    "features": list(c.feature_names)}
                   for c in ranker.ebc.embedding_bag_configs()],
        "tasks": list(spec.model.tasks), "esmm": spec.model.esmm,
        "arch": str(spec.model.arch), "quantize": quantize,
        "versions": {"recsys": __version__, "torch": torch.__version__,
                     "torchrec": getattr(torchrec, "__version__", "?"),
                     "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?"),
                     "python": platform.python_version()},
    }


# how far the exported module may move from eager PyTorch (max |diff| of a probability) and, for
# unquantized exports, the AUC from the one the run recorded, before the export is refused
PARITY_TOLERANCE = {"none": 1e-5, "fp16": 5e-3, "int8": 5e-2}
RECORDED_AUC_TOLERANCE = 1e-5


def export_run(run_dir: str | Path, out: str | Path, quantize: str = "none",
               check: bool = True) -> dict[str, Any]:
    """Export a run's latest checkpoint to ``out/model.pt`` + ``out/manifest.json``.

    Everything is written to a temporary folder beside ``out`` first; with ``check``, the
    exported module is scored on the run's test split against eager PyTorch and against the test
    metrics the run itself recorded (:func:`parity`, kept in the manifest). Only when that
    passes are the files published, together, in place of ``out``: a failed export leaves an
    earlier export at ``out`` as it was. ``out`` must be absent, empty or an earlier export.

    Example:
        >>> export_run("runs/quickstart-demo", "exports/qs-int8", quantize="int8")["quantize"]
        'int8'
    """
    run_dir, out = Path(run_dir), Path(out)
    _check_replaceable(out)
    with sibling_lock(out, f"export {out}"), writing(out.parent):
        run = RunDir(run_dir)
        spec = run.spec()
        ranker, path = run.trained_ranker("cpu", purpose="export")
        exported = script_ranker(spec, ranker, quantize)
        staging = staging_dir(out)
        try:
            exported.module.save(str(staging / MODEL_FILE))
            info = {**exported.manifest, "run": str(run_dir), "checkpoint": path.name,
                    "model_bytes": (staging / MODEL_FILE).stat().st_size}
            if check:
                info["parity"] = parity(spec, ranker, exported.module)
                info["parity"]["recorded"] = _against_recorded(run_dir, path, info["parity"])
                _require_parity(out, info["parity"], quantize)
            info.update(raw_value_maps(spec, staging))
            if arch_of(spec.model).two_tower:
                info["serving_split"] = export_split(spec, ranker, staging)
                info["serving_split"]["score_1000_cached"] = time_cached_scoring(staging)
            (staging / MANIFEST_FILE).write_text(json.dumps(info, indent=2))
            _publish(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return info


def raw_value_maps(spec: Spec, out: Path) -> dict[str, Any]:
    """What an export needs to take raw values as the data preparation read them, from the run's
    dataset (read once): ``vocabularies`` (column -> VocabInfo, their files copied into ``out``),
    ``dense_scaling`` (how the model's dense columns were scaled) and ``raw_input`` (raw column
    names, for ``recsys predict --raw``; :mod:`recsys.export.raw`), each only where the dataset
    has it; ``{}`` when the dataset is not there.

    Example:
        >>> info.update(raw_value_maps(spec, staging))   # manifest.json's entries
    """
    from recsys.data.schema import MANIFEST, DatasetManifest
    from recsys.export.raw import describe_raw_input

    root = Path(spec.data.path)
    if not (root / MANIFEST).is_file():
        return {}
    dataset = DatasetManifest.load(root)
    for column, info in dataset.vocabularies.items():
        if info.file is None:  # a hashed column: its VocabInfo is the whole mapping
            continue
        source, target = root / info.file, out / info.file
        if not source.is_file():
            raise DataError(str(root / MANIFEST), f"the vocabulary of column '{column}' names "
                            f"{info.file}, which is missing")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    dense = {f.source_column for f in spec.features.dense_fields()}
    maps: dict[str, Any] = {
        "vocabularies": {c: info.model_dump(mode="json")
                         for c, info in dataset.vocabularies.items()},
        "dense_scaling": {c: s.model_dump(mode="json")
                          for c, s in dataset.dense_scaling.items() if c in dense},
        "raw_input": describe_raw_input(dataset),
    }
    return {k: v for k, v in maps.items() if v}


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise RunError(str(out), "exists and is not a directory; choose another --out")
    entries = [p.name for p in out.iterdir()]
    if entries and MANIFEST_FILE not in entries:
        raise RunError(str(out), f"holds files that are not an export ({', '.join(sorted(entries)[:5])}"
                       f"{', ...' if len(entries) > 5 else ''}); refusing to replace it, choose "
                       "another --out")


def _publish(staging: Path, out: Path) -> None:
    """Put the staged export in place of ``out`` (renames: at any moment ``out`` is the old
    export or the new one, never a mix)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _against_recorded(run_dir: Path, path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """The exported module's test AUC per task against the AUC the run recorded in metrics.json
    when it finished (its final checkpoint is the one exported)."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        steps = int(json.loads((run_dir / "run.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return {"available": False, "why": "the run recorded no metrics (unfinished?)"}
    if path.name != f"step-{steps:07d}":
        return {"available": False, "why": f"the run's metrics are of step {steps}, the "
                                           f"checkpoint exported is {path.name}"}
    tasks = {}
    for t, v in result["tasks"].items():
        recorded = (metrics.get("tasks", {}).get("test", {}).get(t, {}) or {}).get("auc")
        if recorded is None:
            continue
        tasks[t] = {"auc_recorded": float(recorded),
                    "auc_change": v["auc_exported"] - float(recorded)}
    return {"available": True, "tasks": tasks}


def _require_parity(out: Path, result: dict[str, Any], quantize: str) -> None:
    problems = []
    tol = PARITY_TOLERANCE[quantize]
    for t, v in result["tasks"].items():
        if not v["max_abs_diff"] <= tol:
            problems.append(f"{t}: exported probabilities differ from eager PyTorch by up to "
                            f"{v['max_abs_diff']:.3g} (tolerance {tol:g})")
    recorded = result["recorded"]
    if quantize == "none" and recorded.get("available"):
        for t, v in recorded["tasks"].items():
            if not abs(v["auc_change"]) <= RECORDED_AUC_TOLERANCE:
                problems.append(f"{t}: exported test AUC {v['auc_recorded'] + v['auc_change']:.6f}"
                                f" but the run recorded {v['auc_recorded']:.6f}")
    if problems:
        raise RunError(str(out), "parity check failed, nothing was written: "
                       + "; ".join(problems))


@torch.no_grad()
def parity(spec: Spec, ranker: Ranker, module: torch.jit.ScriptModule, split: str = "test",
           max_rows: int | None = None) -> dict[str, Any]:
    """Eager (the trained ranker in PyTorch) against the exported module on a split of the run's
    data: the largest absolute difference of the probabilities and the AUC of both, per task."""
    from recsys.datasets import ensure_dataset, make_loader
    from recsys.evaluate.metrics import auc

    eager = ServingRanker(ranker, list(spec.model.tasks), spec.model.esmm).eval()
    loader = make_loader(spec, ensure_dataset(spec, progress=False), split, training=False)
    probs: dict[str, list[list[torch.Tensor]]] = {t: [[], []] for t in spec.model.tasks}
    labels: dict[str, list[torch.Tensor]] = {t: [] for t in spec.model.tasks}
    rows = 0
    for batch in loader.epoch(0):
        inputs = flat_inputs(batch, eager.keys)
        a, b = eager(*inputs), module(*inputs)
        for t in spec.model.tasks:
            probs[t][0].append(a[t])
            probs[t][1].append(b[t])
            labels[t].append(batch.labels[t])
        rows += batch.batch_size
        if max_rows and rows >= max_rows:
            break
    out: dict[str, Any] = {"split": split, "rows": rows, "tasks": {}}
    for t in spec.model.tasks:
        p_eager, p_export = torch.cat(probs[t][0]), torch.cat(probs[t][1])
        y = torch.cat(labels[t]).numpy()
        auc_eager, auc_export = auc(y, p_eager.numpy()), auc(y, p_export.numpy())
        out["tasks"][t] = {"max_abs_diff": float((p_eager - p_export).abs().max()),
                           "auc_eager": auc_eager, "auc_exported": auc_export,
                           "auc_change": auc_export - auc_eager}
    return out
