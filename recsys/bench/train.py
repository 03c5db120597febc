"""``recsys bench train``: samples/s of the sharded ranker against the same model in plain PyTorch.

Two sides train the same ranker on the same batches with the same optimizers (by name and
hyper-parameters), for the same number of steps, on the same number of threads:

* **sharded** -- the trainer's path: the ranker's EmbeddingBagCollection sharded by
  DistributedModelParallel (one process, the planner's plan), the sparse optimizer fused into the
  backward (FBGEMM TBE: no embedding gradient is materialised), the dense optimizer and the
  trainer's TorchRec train pipeline (``recsys.train.pipeline``) driving forward, backward and step.
* **plain** -- what a PyTorch user writes first: one ``nn.EmbeddingBag`` per table (sum or mean as
  the table pools) with dense gradients, the same dense arch, interaction and heads
  (:class:`PlainRanker`), the same loss, and ``torch.optim`` optimizers: the sparse one over the
  embedding weights (``rowwise_adagrad`` has no ``torch.optim`` form: plain uses ``Adagrad``), the
  dense one over the rest; ``loss.backward(); opt.step()``.

The batches are materialised once, up front (from the spec's training loader, or random ids for a
``--tables N --rows R`` stress spec) and saved; each side runs in its own subprocess that loads the
identical list, so that peak RSS is per side. Repeats alternate the sides (and their order) and
the best repeat of each is reported. Only the training steps after ``warmup`` are timed.

The dense arch, interaction and heads cost the same on both sides, so the ratio shrinks as they
grow: on 26 x 100k tables (one core) it was about 6-8x with the spec's default MLP (256, 128, 64)
and about 11x with a one-layer MLP of 64.

Example:
    >>> spec = stress_spec(tables=26, rows=100_000)
    >>> cfg = TrainBenchConfig(steps=50, repeats=3)
    >>> result, table = run(spec, cfg, random_batches(spec, cfg.warmup + cfg.steps))
    >>> round(result["ratio"], 1)          # sharded samples/s / plain samples/s
    7.8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.bench.plain import PLAIN_DENSE, PLAIN_SPARSE, PlainSide
from recsys.data.batch import Batch
from recsys.errors import DataError
from recsys.models.tables import embedding_bag_configs
from recsys.process_settings import tune_process
from recsys.spec import (
    SparseOptimizer,
    Spec,
    apply_override,
    spec_hash,
    validate_spec,
)
from recsys.sysinfo import peak_rss_bytes, tensor_bytes
from recsys.tables import format_table
from recsys.train.optim import TrainOptimizer
from recsys.train.pipeline import make_pipeline
from recsys.train.sharded import build_sharded_model

GOAL_RATIO = 5.0  # sharded / plain samples/s on a Criteo-like width (~12x measured at that width)
SIDES = ("sharded", "plain")
MIB = 2**20

# what the plain side uses for each sparse optimizer of the spec (all with dense gradients)
_ROWWISE_NOTE = "; torch.optim has no row-wise Adagrad: one accumulator per weight"
# the variables a torchrun launch sets: a side's subprocess is a one-process world of its own
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@dataclass
class TrainBenchConfig:
    """How the benchmark runs.

    Args:
        steps: timed training steps per side and repeat.
        warmup: untimed steps before them (allocations, the pipeline filling up).
        repeats: runs of each side (alternating); the best is reported.
        one_core: one core and one torch thread for both sides; False: torch's default threads.
        seed: the seed of the random batches of a stress spec.

    Example:
        >>> TrainBenchConfig(steps=20, repeats=1)
    """

    steps: int = 50
    warmup: int = 5
    repeats: int = 3
    one_core: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


# --------------------------------------------------------------------------------------------------
# workloads


def stress_spec(tables: int, rows: int, dim: int = 16, dense: int = 13, batch_size: int = 2048,
                overrides: Iterable[str] = ()) -> Spec:
    """A Criteo-shaped spec built in code: ``dense`` dense features and ``tables`` single-id
    sparse features with a table of ``rows`` rows of ``dim`` each (no data files: pair it with
    :func:`random_batches`). ``overrides`` are ``--set`` items applied before validation.

    Example:
        >>> spec = stress_spec(26, 100_000)            # the Criteo-like width of GOAL_RATIO
        >>> len(spec.features.sparse_fields()), spec.train.batch_size
        (26, 2048)
    """
    if tables < 1 or rows < 1 or dim < 1 or dense < 0 or batch_size < 1:
        raise ValueError(f"stress spec needs tables, rows, dim, batch_size >= 1 and dense >= 0; "
                         f"got {tables}, {rows}, {dim}, {batch_size}, {dense}")
    fields: list[dict[str, Any]] = [
        {"name": f"dense_{i}", "side": "context", "kind": "dense"} for i in range(dense)]
    fields += [{"name": f"sparse_{i}", "side": "context", "kind": "sparse",
                "num_embeddings": rows} for i in range(tables)]
    raw: dict[str, Any] = {
        "name": f"stress-{tables}x{rows}",
        "description": "random ids in memory (recsys bench train --tables/--rows)",
        # never read: the batches are generated by random_batches
        "data": {"source": "parquet", "path": "<in-memory random batches>", "labels": ["click"]},
        "features": {"embedding_dim": dim, "fields": fields},
        "model": {"arch": "mlp", "tasks": ["click"]},
        "train": {"batch_size": batch_size},
    }
    where = f"<stress spec {tables}x{rows}>"
    for item in overrides:
        apply_override(raw, item, where)
    return validate_spec(raw, where)


def random_batches(spec: Spec, n: int, seed: int = 0) -> list[Batch]:
    """``n`` batches of ``spec.train.batch_size`` rows: one uniform random id per sparse feature,
    standard normal dense features, Bernoulli(0.25) labels per task.

    Example:
        >>> batches = random_batches(stress_spec(3, 1000), n=4)
        >>> batches[0].sparse.keys()[:2], batches[0].batch_size
        (['sparse_0', 'sparse_1'], 2048)
    """
    rng = np.random.default_rng(seed)
    b = spec.train.batch_size
    sparse = spec.features.sparse_fields()
    sizes = np.array([spec.features.table_of(f).num_embeddings for f in sparse], dtype=np.int64)
    n_dense = len(spec.features.dense_fields())
    out = []
    for _ in range(n):
        ids = (rng.random((len(sparse), b)) * sizes[:, None]).astype(np.int64)
        kjt = KeyedJaggedTensor(keys=[f.name for f in sparse],
                                values=torch.from_numpy(ids.reshape(-1)),
                                lengths=torch.ones(len(sparse) * b, dtype=torch.int32))
        out.append(Batch(
            dense=torch.from_numpy(rng.standard_normal((b, n_dense), dtype=np.float32)),
            sparse=kjt,
            labels={t: torch.from_numpy((rng.random(b) < 0.25).astype(np.float32))
                    for t in spec.model.tasks}))
    return out


def loader_batches(spec: Spec, n: int, progress: bool = False) -> list[Batch]:
    """The first ``n`` batches of the spec's training loader (epoch 0), the list repeated when
    the split has fewer.

    Example:
        >>> batches = loader_batches(load_spec("specs/quickstart.toml"), n=55)
    """
    from recsys.datasets import ensure_dataset, make_loader

    manifest = ensure_dataset(spec, progress=progress)
    loader = make_loader(spec, manifest, "train")
    out: list[Batch] = []
    for batch in loader.epoch(0):
        out.append(batch)
        if len(out) == n:
            break
    if not out:
        raise DataError(spec.data.path, f"the train split has no batch of "
                        f"{spec.train.batch_size} rows (lower train.batch_size)")
    return [out[i % len(out)] for i in range(n)]


def save_batches(batches: Sequence[Batch], path: str | Path) -> None:
    """Write what the ranker reads of each batch (dense, ids, labels) as plain tensors.

    Example:
        >>> save_batches(batches, "/tmp/batches.pt"); load_batches("/tmp/batches.pt")[0].batch_size
        2048
    """
    payload = [{"dense": b.dense, "keys": list(b.sparse.keys()), "values": b.sparse.values(),
                "lengths": b.sparse.lengths(), "weights": b.sparse.weights_or_none(),
                "labels": dict(b.labels)} for b in batches]
    torch.save(payload, path)


def load_batches(path: str | Path) -> list[Batch]:
    """Read what :func:`save_batches` wrote (``weights_only``: no code runs from the file)."""
    payload = torch.load(path, weights_only=True)
    return [Batch(dense=p["dense"],
                  sparse=KeyedJaggedTensor(keys=p["keys"], values=p["values"],
                                           lengths=p["lengths"], weights=p["weights"]),
                  labels=p["labels"]) for p in payload]


# --------------------------------------------------------------------------------------------------
# the sharded model (the trainer's construction, recsys.train.trainer.Trainer._build_model)


@dataclass
class ShardedSide:
    """The ranker under DistributedModelParallel with fused sparse optimizers, the trainer's
    optimizer and the trainer's train pipeline; :meth:`step` is one ``pipeline.progress``.

    Needs a process group (``recsys.train.distributed.init_distributed``).

    Example:
        >>> ctx = init_distributed("cpu")
        >>> side = ShardedSide.build(spec, ctx.device, total_steps=100)
        >>> loss = side.step(iter(batches))
    """

    model: DistributedModelParallel
    optimizer: TrainOptimizer
    pipeline: TrainPipelineBase | TrainPipelineSparseDist
    sharding_types: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, spec: Spec, device: torch.device, total_steps: int) -> ShardedSide:
        world_size = torch.distributed.get_world_size()
        built = build_sharded_model(spec, device, world_size, total_steps)
        dmp, optimizer, plan = built.dmp, built.optimizer, built.plan
        # the pipeline recsys train would use on this world (recsys.train.pipeline)
        pipeline = make_pipeline(dmp, optimizer, device, world_size)
        kinds = Counter(str(p.sharding_type) for m in plan.plan.values()
                        for p in m.values())  # type: ignore[attr-defined]
        return cls(dmp, optimizer, pipeline, dict(kinds))

    def step(self, batches: Iterator[Batch]) -> torch.Tensor:
        # the wrapper's second output: (loss.detach(), logits, labels)
        return self.pipeline.progress(batches)[0]

    def param_bytes(self) -> int:
        return tensor_bytes(self.model.state_dict())

    def optimizer_state_bytes(self) -> int:
        return tensor_bytes(dict(self.optimizer.state))

    def grad_bytes(self) -> int:
        return tensor_bytes([p.grad for p in self.model.parameters()
                             if getattr(p, "grad", None) is not None])


# --------------------------------------------------------------------------------------------------
# one side, one repeat (in a subprocess of its own)


def run_side(side: str, spec: Spec, batches: Sequence[Batch], steps: int, warmup: int
             ) -> dict[str, Any]:
    """Train ``side`` on ``batches[:warmup + steps]`` in this process, timing the last ``steps``.

    Returns samples/s, the first and last loss, parameter / optimizer-state / gradient bytes after
    the last step, and the peak RSS (with the RSS before the model was built).

    Example:
        >>> run_side("plain", spec, batches, steps=50, warmup=5)["samples_per_s"]
    """
    from recsys.train.distributed import init_distributed, seed_everything, shutdown

    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got '{side}'")
    tune_process()  # as recsys train does, on both sides alike
    if len(batches) < warmup + steps:
        raise ValueError(f"{len(batches)} batches for {warmup} + {steps} steps")
    rss_before = peak_rss_bytes()
    seed_everything(spec.train.seed, 0)
    losses: list[float] = []
    result: dict[str, Any] = {"side": side}
    if side == "sharded":
        ctx = init_distributed("cpu")
        try:
            sharded = ShardedSide.build(spec, ctx.device, total_steps=warmup + steps)
            it = iter(batches[:warmup + steps])
            for _ in range(warmup):
                losses.append(float(sharded.step(it)))
            start = time.perf_counter()
            for _ in range(steps):
                losses.append(float(sharded.step(it)))
            seconds = time.perf_counter() - start
            result.update(param_bytes=sharded.param_bytes(),
                          optimizer_state_bytes=sharded.optimizer_state_bytes(),
                          grad_bytes=sharded.grad_bytes(), sharding_types=sharded.sharding_types,
                          pipeline=type(sharded.pipeline).__name__)
        finally:
            shutdown()
    else:
        plain = PlainSide.build(spec)
        for batch in batches[:warmup]:
            losses.append(float(plain.step(batch)))
        start = time.perf_counter()
        for batch in batches[warmup:warmup + steps]:
            losses.append(float(plain.step(batch)))
        seconds = time.perf_counter() - start
        result.update(param_bytes=plain.param_bytes(),
                      optimizer_state_bytes=plain.optimizer_state_bytes(),
                      grad_bytes=plain.grad_bytes())
    rows = sum(b.batch_size for b in batches[warmup:warmup + steps])
    result.update(samples_per_s=rows / seconds, seconds=seconds, steps=steps, rows=rows,
                  first_loss=losses[0], last_loss=losses[-1], threads=torch.get_num_threads(),
                  rss_before_build_bytes=rss_before, peak_rss_bytes=peak_rss_bytes())
    return result


def run_interleaved(specs: Sequence[Spec], batches: Sequence[Batch], steps: int, warmup: int,
                    chunk: int = 2) -> dict[str, Any]:
    """Train the sharded side of every spec in this one process, in turns of ``chunk`` steps
    (model 1, model 2, ..., model 1, ...), each on ``batches[:warmup + steps]``, and time each
    model's turns: a slow phase of the machine then falls on every model alike, which runs in
    separate processes, seconds or minutes apart, cannot promise.

    Returns each model's samples/s (in the order of ``specs``) over its ``steps`` timed steps.

    Example:
        >>> r = run_interleaved([dcn_spec, moe_spec], batches, steps=20, warmup=3)
        >>> r["samples_per_s"][1] / r["samples_per_s"][0]  # moe's speed as a share of dcn's
    """
    from recsys.train.distributed import init_distributed, seed_everything, shutdown

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if len(batches) < warmup + steps:
        raise ValueError(f"{len(batches)} batches for {warmup} + {steps} steps")
    tune_process()
    ctx = init_distributed("cpu")
    try:
        sides, feeds = [], []
        for spec in specs:
            seed_everything(spec.train.seed, 0)
            sides.append(ShardedSide.build(spec, ctx.device, total_steps=warmup + steps))
            feeds.append(iter(batches[:warmup + steps]))
        for side, feed in zip(sides, feeds, strict=True):
            for _ in range(warmup):
                side.step(feed)
        seconds = [0.0] * len(sides)
        for first in range(0, steps, chunk):
            for i, (side, feed) in enumerate(zip(sides, feeds, strict=True)):
                start = time.perf_counter()
                for _ in range(min(chunk, steps - first)):
                    side.step(feed)
                seconds[i] += time.perf_counter() - start
    finally:
        shutdown()
    rows = sum(b.batch_size for b in batches[warmup:warmup + steps])
    return {"samples_per_s": [rows / t for t in seconds], "seconds": seconds, "steps": steps,
            "chunk": chunk, "rows": rows, "threads": torch.get_num_threads()}


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    root = str(Path(__file__).resolve().parents[2])  # the checkout, when recsys is not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_child(cmd: list[str], what: str, env: Mapping[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    """Run a benchmark's measuring process ``cmd`` (the checkout importable, no torchrun
    variables, ``env`` added); RuntimeError naming ``what`` with the tail of its output if it
    fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**_child_env(), **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(_child_failed(what, proc))
    return proc


def _child_failed(what: str, proc: subprocess.CompletedProcess[str]) -> str:
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
    return f"{what} failed (exit {proc.returncode}):\n{tail}"


def _run_child(side: str, work: Path, cfg: TrainBenchConfig, repeat: int,
               specs: Sequence[Path] | None = None) -> dict[str, Any]:
    """One side's run in a subprocess (``work/spec.json`` on ``work/batches.pt``); with
    ``specs``, the sharded sides of those specs in turns (:func:`run_interleaved`)."""
    out = work / f"{side}-{repeat}.json"
    spec_args = [a for p in (specs or [work / "spec.json"]) for a in ("--spec-json", str(p))]
    cmd = [sys.executable, "-m", "recsys.bench.train", "--side", side, *spec_args,
           "--batches", str(work / "batches.pt"), "--steps", str(cfg.steps),
           "--warmup", str(cfg.warmup), "--result", str(out)]
    if not cfg.one_core:
        cmd.append("--all-cores")
    what = f"the {side} side" if not specs else "the interleaved models"
    proc = run_child(cmd, what)
    if not out.is_file():
        raise RuntimeError(_child_failed(what, proc))
    return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------------
# the benchmark


def repeat_line(rep: int, repeats: int, label: str, r: Mapping[str, Any]) -> str:
    """One repeat's progress line: samples/s and the first and last loss of ``label``'s run."""
    return (f"  repeat {rep + 1}/{repeats}  {label:<17} {r['samples_per_s']:>10,.0f} samples/s  "
            f"(loss {r['first_loss']:.4f} -> {r['last_loss']:.4f})")


def run(spec: Spec, cfg: TrainBenchConfig, batches: Sequence[Batch] | None = None,
        progress: bool = True) -> tuple[dict[str, Any], str]:
    """Both sides, ``cfg.repeats`` times each, alternating; returns (result dict, table).

    Args:
        spec: the model, optimizers and batch size (and the data, when ``batches`` is None).
        cfg: steps, warm-up, repeats, threads.
        batches: the batches to train on (at least ``warmup + steps``); default: the first ones
            of the spec's training loader.
        progress: print each repeat's samples/s.

    Example:
        >>> spec = stress_spec(26, 100_000)
        >>> result, table = run(spec, TrainBenchConfig(), random_batches(spec, 55))
        >>> print(table)
    """
    need = cfg.warmup + cfg.steps
    if batches is None:
        batches = loader_batches(spec, need, progress=progress)
    if len(batches) < need:
        raise ValueError(f"{len(batches)} batches for {cfg.warmup} + {cfg.steps} steps")
    batches = list(batches[:need])
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory(prefix="recsys-bench-train-") as tmp:
        work = Path(tmp)
        (work / "spec.json").write_text(spec.model_dump_json())
        save_batches(batches, work / "batches.pt")
        for rep in range(cfg.repeats):
            order = SIDES if rep % 2 == 0 else SIDES[::-1]  # neither side always goes first
            for side in order:
                r = _run_child(side, work, cfg, rep)
                runs[side].append(r)
                if progress:
                    print(repeat_line(rep, cfg.repeats, side, r), flush=True)
    return summarise(spec, cfg, runs)


def summarise(spec: Spec, cfg: TrainBenchConfig, runs: Mapping[str, Sequence[Mapping[str, Any]]]
              ) -> tuple[dict[str, Any], str]:
    """The result dict and the table from each side's repeats (best samples/s, largest RSS)."""
    best = {s: max(r["samples_per_s"] for r in runs[s]) for s in SIDES}
    peak = {s: max(r["peak_rss_bytes"] for r in runs[s]) for s in SIDES}
    before = {s: min(r["rss_before_build_bytes"] for r in runs[s]) for s in SIDES}
    last = {s: runs[s][-1] for s in SIDES}
    params = {s: last[s]["param_bytes"] for s in SIDES}
    state = {s: last[s]["optimizer_state_bytes"] for s in SIDES}
    grads = {s: last[s]["grad_bytes"] for s in SIDES}
    ratio = best["sharded"] / best["plain"]
    configs = embedding_bag_configs(spec.features)
    sparse_opt = spec.train.sparse_optimizer.name
    rowwise = SparseOptimizer.ROWWISE_ADAGRAD
    result: dict[str, Any] = {
        "spec": spec.name,
        "spec_hash": spec_hash(spec),
        "tables": len(configs),
        "rows": sum(c.num_embeddings for c in configs),
        "embedding_parameters": sum(c.num_embeddings * c.embedding_dim for c in configs),
        "batch_size": spec.train.batch_size,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "one_core": cfg.one_core,
        "threads": last["plain"]["threads"],
        "sparse_optimizer": sparse_opt.value,
        "plain_sparse_optimizer": f"torch.optim.{PLAIN_SPARSE[sparse_opt].__name__} "
                                  f"(dense gradients{_ROWWISE_NOTE * (sparse_opt == rowwise)})",
        "dense_optimizer": spec.train.dense_optimizer.name.value,
        "sharding_types": last["sharded"].get("sharding_types", {}),
        "pipeline": last["sharded"].get("pipeline", "TorchRec's train pipeline"),
        "samples_per_s": best,
        "ratio": ratio,
        "goal_ratio": GOAL_RATIO,
        "meets_goal": ratio >= GOAL_RATIO,
        "peak_rss_bytes": peak,
        "rss_before_build_bytes": before,
        "param_bytes": params,
        "optimizer_state_bytes": state,
        "param_state_bytes": {s: params[s] + state[s] for s in SIDES},
        "grad_bytes": grads,
        "runs": {s: [dict(r) for r in runs[s]] for s in SIDES},
    }
    table = format_table(
        ["side", "samples/s", "ratio vs plain", "peak RSS MiB", "param+state MiB"],
        [[s, best[s], best[s] / best["plain"], peak[s] / MIB,
          (params[s] + state[s]) / MIB] for s in SIDES])
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(result["sharding_types"].items()))
    threads = "one core, 1 thread" if cfg.one_core else f"{result['threads']} threads"
    table += (
        f"\n\n'{spec.name}': {len(configs)} tables, {result['rows']:,} rows "
        f"({result['embedding_parameters']:,} embedding parameters), batch "
        f"{spec.train.batch_size}; best of {cfg.repeats} x {cfg.steps} timed steps after "
        f"{cfg.warmup} warm-up steps, same batches for both sides, "
        f"{threads}.\n"
        f"sharded: DistributedModelParallel ({kinds}), {sparse_opt.value} fused into the "
        f"backward (FBGEMM), {result['dense_optimizer']} dense, {result['pipeline']}. "
        f"plain: nn.EmbeddingBag per table + {result['plain_sparse_optimizer']}, "
        f"torch.optim.{PLAIN_DENSE[spec.train.dense_optimizer.name].__name__} dense.\n"
        f"Peak RSS per side in its own process ({before['plain'] / MIB:,.0f} MiB before the "
        f"model is built: imports and batches); gradients after a step: sharded "
        f"{grads['sharded'] / MIB:,.1f} MiB, plain {grads['plain'] / MIB:,.1f} MiB. "
        f"Goal: sharded >= {GOAL_RATIO:g}x plain at a Criteo-like width "
        f"({'met' if result['meets_goal'] else 'not met'} here: {ratio:.2f}x).")
    return result, table


# --------------------------------------------------------------------------------------------------
# a side's subprocess: python -m recsys.bench.train --side sharded ...


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one side's subprocess (what :func:`run` starts)."""
    p = argparse.ArgumentParser(prog="python -m recsys.bench.train",
                                description="one side of recsys bench train (internal)")
    p.add_argument("--side", choices=SIDES, required=True)
    p.add_argument("--spec-json", required=True, type=Path, action="append",
                   help="repeated (sharded side only): the models train in turns in one process")
    p.add_argument("--batches", required=True, type=Path)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--result", required=True, type=Path)
    p.add_argument("--all-cores", action="store_true")
    args = p.parse_args(argv)
    from recsys.bench.data import one_core

    specs = [Spec.model_validate_json(path.read_text()) for path in args.spec_json]
    if len(specs) > 1 and args.side != "sharded":
        p.error("several --spec-json take --side sharded")
    batches = load_batches(args.batches)
    with one_core(not args.all_cores):
        result = (run_side(args.side, specs[0], batches, args.steps, args.warmup)
                  if len(specs) == 1 else
                  run_interleaved(specs, batches, args.steps, args.warmup))
    args.result.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
