"""``recsys bench serve``: latency, throughput and artifact size of the ranker as served.

One ranker (random weights by default: timings and sizes do not depend on training; or a trained
run's latest checkpoint with ``run_dir``) is served four ways, measured side by side in one run:

* **eager** -- :class:`~recsys.export.torchscript.ServingRanker` in eval mode under
  ``inference_mode``, the float EmbeddingBagCollection (what a PyTorch user serves first);
* **scripted fp32 / fp16 / int8** -- :func:`~recsys.export.torchscript.script_ranker` with
  ``quantize`` none / fp16 / int8: what ``recsys export`` writes (FBGEMM quantized tables).

For each batch size every variant gets the same random valid inputs (one uniform id per feature
per row, standard normal dense features), a few untimed warm-up calls, then timed calls, one
perf_counter reading per call. The timed calls are cut into ``repeats`` rounds; each round runs
every variant for a block of calls, the order rotating from round to round, so that machine noise
(and the caches a variant leaves behind) hits all alike. Every timed call gets a distinct input, so
batch-1 latency is not flattered by the same rows staying in cache. p50/p99 latency and throughput
(rows/s = batch / p50 latency) are reported per (variant, batch).

Artifact sizes: each scripted module saved with ``module.save`` (what ``model.pt`` weighs), and
the eager model's ``torch.save(state_dict)``. Correctness is checked on the timed outputs
themselves: scripted fp32 must equal eager within 1e-5; the quantized variants' max abs diffs are
recorded.

Example:
    >>> result = run(ServeBenchConfig())            # 26 x 100k x dim 64, about 40 s
    >>> result["goals"]["size_ratio_int8_fp32"] <= 0.35
    True
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.tables import format_table

NAME = "serve"
VARIANTS = ("eager", "scripted fp32", "scripted fp16", "scripted int8")
QUANTIZE_OF = {"scripted fp32": "none", "scripted fp16": "fp16", "scripted int8": "int8"}
PARITY_TOL = 1e-5  # scripted fp32 vs eager: the same float kernels, so only summation order differs
GOAL_SIZE_RATIO = 0.35  # int8 model.pt / fp32 model.pt (ideal 0.25 + per-row scale/bias + MLP)
GOAL_THROUGHPUT_RATIO = 1.0  # scripted int8 rows/s / eager rows/s at the largest batch
MIB = 2**20

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # dense, values, lengths


@dataclass
class ServeBenchConfig:
    """How the benchmark runs.

    Args:
        tables, rows, dim, dense: the stress spec (``stress_spec``) of the random-weight ranker;
            ignored when ``run_dir`` is given. dim 64 by default: FBGEMM pads every quantized row
            to 16 bytes (with its 8-byte scale/bias), so int8 only saves in proportion at dim >= 32.
        batch_sizes: the batch sizes timed, in order.
        repeats: rounds the timed calls are cut into (variants interleaved per round).
        calls: timed calls per (variant, batch); None: :func:`default_calls` of the batch size.
        warmup: untimed calls per (variant, batch) first (TorchScript's profiling executor
            specialises a graph on its first calls for each input shape).
        all_cores: torch's default threads; False: one core and one torch thread.
        run_dir: a training run to serve (its spec and latest checkpoint) instead of random weights.
        seed: the seed of the weights and the inputs.

    Example:
        >>> ServeBenchConfig(batch_sizes=(1, 64), repeats=3)
    """

    tables: int = 26
    rows: int = 100_000
    dim: int = 64
    dense: int = 13
    batch_sizes: tuple[int, ...] = (1, 64, 1024)
    repeats: int = 5
    calls: int | None = None
    warmup: int = 5
    all_cores: bool = False
    run_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be >= 1, got {self.batch_sizes}")
        if self.repeats < 1 or (self.calls is not None and self.calls < 1) or self.warmup < 0:
            raise ValueError(f"need repeats >= 1, calls >= 1, warmup >= 0; got {self.repeats}, "
                             f"{self.calls}, {self.warmup}")


def default_calls(batch: int) -> int:
    """Timed calls per variant at a batch size: enough for a p99 at small batches, few at large
    ones, where each call costs tens of ms (the default run stays well under 3 minutes)."""
    if batch < 16:
        return 200
    if batch < 512:
        return 100
    return 20


def random_inputs(feature_rows: list[int], n_dense: int, batch: int, n: int,
                  gen: torch.Generator) -> list[Inputs]:
    """``n`` flat inputs of ``batch`` rows: one uniform id per feature per row (feature-major, in
    the serving module's feature order), standard normal dense features."""
    rows = torch.tensor(feature_rows, dtype=torch.float64)[:, None]
    out = []
    for _ in range(n):
        ids = (torch.rand(len(feature_rows), batch, generator=gen, dtype=torch.float64) * rows)
        out.append((torch.randn(batch, n_dense, generator=gen),
                    ids.long().clamp_max(rows.long() - 1).reshape(-1),
                    torch.ones(len(feature_rows) * batch, dtype=torch.int32)))
    return out


def build_model(cfg: ServeBenchConfig) -> tuple[Any, Any]:
    """(spec, eval-mode ranker): a trained run's, or random weights on the stress spec."""
    from recsys.bench.train import stress_spec
    from recsys.models.ranker import Ranker, RankerConfig
    from recsys.run_dir import RunDir

    if cfg.run_dir:
        run = RunDir(cfg.run_dir)
        return run.spec(), run.trained_ranker("cpu")[0]
    torch.manual_seed(cfg.seed)
    spec = stress_spec(tables=cfg.tables, rows=cfg.rows, dim=cfg.dim, dense=cfg.dense,
                       batch_size=max(cfg.batch_sizes))
    return spec, Ranker(RankerConfig(spec, device="cpu")).eval()


def artifact_bytes(variants: dict[str, Any]) -> dict[str, int]:
    """Bytes on disk: ``module.save`` for scripted variants, ``torch.save(state_dict)`` for eager."""
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="recsys-serve-") as tmp:
        for name, module in variants.items():
            path = os.path.join(tmp, "model.pt")
            if isinstance(module, torch.jit.ScriptModule):
                module.save(path)
            else:
                torch.save(module.state_dict(), path)
            sizes[name] = os.path.getsize(path)
            os.remove(path)  # one file at a time: the fp32 artifact alone is ~0.7 GB by default
    return sizes


def time_batch(variants: dict[str, Callable[..., dict[str, torch.Tensor]]], inputs: list[Inputs],
               warmup: list[Inputs], repeats: int
               ) -> tuple[dict[str, list[float]], dict[str, list[dict[str, torch.Tensor]]]]:
    """Per variant: the latency (s) of each timed call and its outputs, input i -> entry i.
    ``warmup`` inputs are run untimed first (inputs of their own: no timed row is pre-cached)."""
    names = list(variants)
    for name in names:
        for x in warmup:
            variants[name](*x)
    n = len(inputs)
    bounds = [n * r // repeats for r in range(repeats + 1)]
    latency: dict[str, list[float]] = {name: [0.0] * n for name in names}
    outputs: dict[str, list[dict[str, torch.Tensor]]] = {name: [{}] * n for name in names}
    for r in range(repeats):
        # rotate who goes first: a variant never always follows the same neighbour
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, lat, outs = variants[name], latency[name], outputs[name]
            for i in range(bounds[r], bounds[r + 1]):
                start = time.perf_counter()
                out = fn(*inputs[i])
                lat[i] = time.perf_counter() - start
                outs[i] = out
    return latency, outputs


def max_abs_diff(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> float:
    """The largest |a - b| over every call and task."""
    return max(float((x[t] - y[t]).abs().max()) for x, y in zip(a, b, strict=True) for t in x)


def run(cfg: ServeBenchConfig) -> dict[str, Any]:
    """Build, export and time the variants; return the result (JSON-ready; ``table(result)``)."""
    from recsys.bench.data import one_core
    from recsys.export.torchscript import ServingRanker, script_ranker

    spec, ranker = build_model(cfg)
    eager = ServingRanker(ranker, list(spec.model.tasks), spec.model.esmm).eval()
    modules: dict[str, Any] = {"eager": eager}
    for name, quantize in QUANTIZE_OF.items():
        modules[name] = script_ranker(spec, ranker, quantize).module
    sizes = artifact_bytes(modules)

    configs = ranker.ebc.embedding_bag_configs()
    # ServingRanker.keys: the features table by table, the input layout's order
    feature_rows = [c.num_embeddings for c in configs for _ in c.feature_names]
    n_dense = len(spec.features.dense_fields())
    gen = torch.Generator().manual_seed(cfg.seed)
    latency: dict[str, dict[str, dict[str, float]]] = {name: {} for name in modules}
    diffs: dict[str, dict[str, float]] = {name: {} for name in modules if name != "eager"}
    with one_core(not cfg.all_cores), torch.inference_mode():
        threads = torch.get_num_threads()
        for batch in cfg.batch_sizes:
            calls = cfg.calls or default_calls(batch)
            inputs = random_inputs(feature_rows, n_dense, batch, calls + cfg.warmup, gen)
            times, outs = time_batch(modules, inputs[:calls], inputs[calls:],
                                     min(cfg.repeats, calls))
            for name, t in times.items():
                ms = np.array(t) * 1e3
                p50 = float(np.percentile(ms, 50))
                latency[name][str(batch)] = {
                    "p50_ms": p50, "p99_ms": float(np.percentile(ms, 99)),
                    "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
                    "rows_per_s": batch / (p50 / 1e3), "calls": calls}
            for name in diffs:
                diffs[name][str(batch)] = max_abs_diff(outs[name], outs["eager"])

    big = str(max(cfg.batch_sizes))
    size_ratio = sizes["scripted int8"] / sizes["scripted fp32"]
    speedup = latency["scripted int8"][big]["rows_per_s"] / latency["eager"][big]["rows_per_s"]
    fp32_diff = max(diffs["scripted fp32"].values())
    return {
        "config": asdict(cfg),
        "spec": spec.name,
        "tables": [{"name": c.name, "rows": c.num_embeddings, "dim": c.embedding_dim,
                    "features": len(c.feature_names)} for c in configs],
        "embedding_parameters": sum(c.num_embeddings * c.embedding_dim for c in configs),
        "tasks": list(spec.model.tasks),
        "threads": threads,
        "variants": list(modules),
        "latency": latency,
        "artifact_bytes": sizes,
        "max_abs_diff_vs_eager": {name: max(d.values()) for name, d in diffs.items()},
        "max_abs_diff_vs_eager_per_batch": diffs,
        "parity": {"fp32_max_abs_diff": fp32_diff, "fp32_ok": fp32_diff <= PARITY_TOL,
                   "tolerance": PARITY_TOL,
                   "int8_max_abs_diff": max(diffs["scripted int8"].values()),
                   "fp16_max_abs_diff": max(diffs["scripted fp16"].values())},
        "ranktower_cached_scoring": _ranktower_scoring(cfg),
        "goals": {"size_ratio_int8_fp32": size_ratio, "size_goal": GOAL_SIZE_RATIO,
                  "size_met": size_ratio <= GOAL_SIZE_RATIO,
                  "throughput_batch": int(big),
                  "throughput_ratio_int8_eager": speedup,
                  "throughput_goal": GOAL_THROUGHPUT_RATIO,
                  "throughput_met": speedup >= GOAL_THROUGHPUT_RATIO},
    }


def _ranktower_scoring(cfg: ServeBenchConfig) -> dict[str, dict[str, float]]:
    """The two-tower pre-rankers' online cost: 1,000 cached candidates for one request."""
    from recsys.bench.data import one_core
    from recsys.bench.ranktower import ranktower_scoring_isolated

    with one_core(not cfg.all_cores):  # the process it starts inherits the core
        return ranktower_scoring_isolated(max(10, cfg.repeats * 10))


def table(result: dict[str, Any]) -> str:
    """The result as two Markdown tables (latency per batch; size and parity) and a summary."""
    lat, sizes = result["latency"], result["artifact_bytes"]
    diffs = result["max_abs_diff_vs_eager"]
    batches = list(lat["eager"])
    rows = [[name, int(b), t["p50_ms"], t["p99_ms"], t["rows_per_s"],
             t["rows_per_s"] / lat["eager"][b]["rows_per_s"], t["calls"]]
            for b in batches for name in result["variants"] for t in [lat[name][b]]]
    text = format_table(["variant", "batch", "p50 ms", "p99 ms", "rows/s", "vs eager", "calls"],
                        rows)
    fp32 = sizes["scripted fp32"]
    size_rows = [[name, sizes[name] / MIB, sizes[name] / fp32,
                  "-" if name == "eager" else f"{diffs[name]:.2e}"] for name in result["variants"]]
    text += "\n\n" + format_table(["variant", "artifact MiB", "vs scripted fp32",
                                   "max abs diff vs eager"], size_rows)
    scoring = result.get("ranktower_cached_scoring", {})
    if scoring:
        text += "\n\n" + format_table(
            ["two-tower online scorer", "candidates", "p50 ms", "p99 ms"],
            [[n, r["candidates"], r["p50_ms"], r["p99_ms"]] for n, r in sorted(scoring.items())])
    cfg, goals, parity = result["config"], result["goals"], result["parity"]
    dims = sorted({t["dim"] for t in result["tables"]})
    threads = "one core, 1 thread" if not cfg["all_cores"] else f"{result['threads']} threads"
    source = f"run {cfg['run_dir']} (trained)" if cfg["run_dir"] else "random weights"
    yes = {True: "yes", False: "NO"}
    text += (
        f"\n\n'{result['spec']}' ({source}): {len(result['tables'])} tables, "
        f"{result['embedding_parameters']:,} embedding parameters, dim "
        f"{'/'.join(map(str, dims))}; {threads}; p50/p99 over the timed calls (each on a distinct "
        f"input, variants interleaved in {cfg['repeats']} rounds); rows/s = batch / p50. "
        f"eager's artifact is torch.save(state_dict), the others module.save.\n"
        f"int8 size / fp32 size = {goals['size_ratio_int8_fp32']:.3f} (goal <= "
        f"{goals['size_goal']}: {yes[goals['size_met']]}); scripted int8 / eager rows/s at batch "
        f"{goals['throughput_batch']} = {goals['throughput_ratio_int8_eager']:.2f}x (goal >= "
        f"{goals['throughput_goal']}: {yes[goals['throughput_met']]}); scripted fp32 == eager "
        f"within {parity['tolerance']:g}: {yes[parity['fp32_ok']]} "
        f"(max abs diff {parity['fp32_max_abs_diff']:.1e}).\n"
        "FBGEMM pads each quantized row (plus its 8-byte fp16 scale/bias for int8) to 16-byte "
        "alignment, so int8 saves in proportion only at dim >= 32; dim 64 is the default for that "
        "reason.")
    return text


def run_and_write(cfg: ServeBenchConfig, out_dir: str | Path, echo: bool = True) -> Path:
    """run + write ``NAME.json`` / ``.md`` into out_dir (+ print the table)."""
    from recsys.bench import run_and_write as write

    return write(NAME, run, table, cfg, out_dir, echo)


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    """A config from parsed CLI options (absent or None options keep the defaults)."""
    d = ServeBenchConfig

    def opt(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    run_dir = getattr(args, "run_dir", None)
    return ServeBenchConfig(
        tables=opt("tables", d.tables), rows=opt("rows", d.rows), dim=opt("dim", d.dim),
        dense=opt("dense", d.dense), batch_sizes=tuple(opt("batch_sizes", d.batch_sizes)),
        repeats=opt("repeats", d.repeats), calls=opt("calls", d.calls),
        warmup=opt("warmup", d.warmup), all_cores=bool(getattr(args, "all_cores", False)),
        run_dir=str(run_dir) if run_dir else None, seed=opt("seed", d.seed))
