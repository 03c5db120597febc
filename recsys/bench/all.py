"""``recsys bench all``: every benchmark in one command, each writing ``NAME.json`` / ``NAME.md``,
then one summary table.

The benchmarks: data loader (``data``), sharded training vs plain PyTorch (``train``), full
training of every ranking arch on one Criteo-shaped world (``models``), AdaEnsemble
early exit (``moe``), serving latency and artifact size (``serve``), training and inference
samples/s of every over-arch in pure torch (``archs``), the step-time overhead of the
hierarchical group-wise loss (``hgr``), RankTower's online scoring of 1,000 cached candidates
(``ranktower``), training throughput and per-rank embedding memory on 1 and 2 processes with
table-wise sharding (``scaling``) and RVQ encoding throughput (``rvq``). ``--quick`` runs every one
at tiny sizes (CI: the code paths never rot); the defaults take about 20 minutes on 2 cores.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recsys.bench import write_result
from recsys.tables import format_table

log = logging.getLogger("recsys.bench")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class AllConfig:
    out: Path
    quick: bool = False


def _synthetic_spec(cfg: AllConfig, requests: int, **model: Any):  # type: ignore[no-untyped-def]
    """The quickstart spec on a world of ``requests`` training requests, under ``out/data``."""
    from recsys.experiments.runner import deep_merge, read_spec_file
    from recsys.spec import validate_spec

    raw = read_spec_file("specs/quickstart.toml")
    raw = deep_merge(raw, {"data": {"path": str(cfg.out / "data" / f"synthetic-{requests}"),
                                    "synthetic": {"requests": {"train": requests,
                                                               "valid": 2000, "test": 2000}}},
                           "train": {"checkpoint_every_steps": None, "eval_cascade": False},
                           "distributed": {"world_size": 1}, **model})
    raw["train"] = {k: v for k, v in raw["train"].items() if v is not None}
    return validate_spec(raw, "specs/quickstart.toml (bench)")


def bench_data(cfg: AllConfig) -> tuple[dict[str, Any], str]:
    from recsys.bench.data import DataBenchConfig, run

    spec = _synthetic_spec(cfg, 5000 if cfg.quick else 100_000)
    # two loader workers as well: their rows/s in total and per core (on at most 3 cores)
    return run(spec, DataBenchConfig(repeats=1 if cfg.quick else 3, num_workers=2))


def bench_train(cfg: AllConfig) -> tuple[dict[str, Any], str]:
    from recsys.bench.train import TrainBenchConfig, random_batches, run, stress_spec

    tables, rows = (4, 5000) if cfg.quick else (26, 100_000)
    spec = stress_spec(tables, rows, 16, 13, 2048, [])
    tcfg = TrainBenchConfig(steps=5 if cfg.quick else 50, warmup=2 if cfg.quick else 5,
                            repeats=1 if cfg.quick else 3)
    return run(spec, tcfg, random_batches(spec, tcfg.warmup + tcfg.steps, tcfg.seed))


SMALL_SPEC = "specs/movielens.toml"


def bench_small(cfg: AllConfig) -> tuple[dict[str, Any], str]:
    """A small model at full speed: DCN-v2 on MovieLens (specs/movielens.toml), batch 1024, one
    process, torch's default threads, against the same model in plain PyTorch (``recsys bench
    train``'s sides). Needs ml-latest-small where the spec's ``data.prepare.input`` says (it is
    prepared on first use); without it the benchmark says so and is skipped."""
    import tomllib

    from recsys.bench.train import TrainBenchConfig, loader_batches, run
    from recsys.spec import load_spec

    # the raw data is checked before the spec is loaded (loading it refuses a missing input)
    raw = tomllib.loads((ROOT / SMALL_SPEC).read_text())
    source = raw.get("data", {}).get("prepare", {}).get("input")
    if source is None or not (ROOT / source).exists():
        note = f"skipped: {SMALL_SPEC}'s data.prepare.input ({source}) is not on this machine"
        return {"skipped": note}, note
    spec = load_spec(ROOT / SMALL_SPEC, ["train.batch_size=1024", "distributed.world_size=1",
                                         f"data.path={cfg.out / 'data' / 'movielens'}",
                                         f"data.prepare.input={ROOT / source}"])
    tcfg = TrainBenchConfig(steps=5 if cfg.quick else 60, warmup=2 if cfg.quick else 10,
                            repeats=1 if cfg.quick else 3, one_core=False)
    return run(spec, tcfg, loader_batches(spec, tcfg.warmup + tcfg.steps))


def bench_moe(cfg: AllConfig) -> tuple[dict[str, Any], str]:
    from recsys.bench.moe import MoEBenchConfig, run, table

    mcfg = MoEBenchConfig(batch_size=256, repeats=2) if cfg.quick else MoEBenchConfig()
    result = run(mcfg)
    return result, table(result)


def bench_serve(cfg: AllConfig) -> tuple[dict[str, Any], str]:
    from recsys.bench.serve import ServeBenchConfig, run, table

    scfg = ServeBenchConfig(tables=3, rows=2000, dim=32, dense=2, batch_sizes=(1, 64),
                            repeats=2) if cfg.quick else ServeBenchConfig()
    result = run(scfg)
    return result, table(result)


def bench_prepare(cfg: AllConfig) -> tuple[dict[str, Any], str]:
    """``recsys data prepare table`` on a 20-column table (CSV and Parquet), rows/s per core."""
    from recsys.bench.prepare import PrepareBenchConfig, format_result, run

    result, _ = run(PrepareBenchConfig.quick() if cfg.quick else PrepareBenchConfig(),
                    progress=not cfg.quick)
    return result, format_result(result)


def bench_serve_http(cfg: AllConfig) -> tuple[dict[str, Any], str]:
    """``recsys serve`` under concurrent HTTP clients on the loopback, against in-process calls."""
    from recsys.bench.serve_http import ServeHttpBenchConfig, run, table

    result = run(ServeHttpBenchConfig(quick=cfg.quick), progress=not cfg.quick)
    return result, table(result)


def bench_models(cfg: AllConfig) -> tuple[dict[str, Any], str]:
    """Full sharded training of every ranking arch on one Criteo-shaped world (quick: dcn and
    xdeepint with gftrl only, 2 tables of 1,000 rows, batch 256, 2 steps, one repeat)."""
    from recsys.bench.models import ModelsBenchConfig, run

    mcfg = (ModelsBenchConfig(tables=2, rows=1000, batch_size=256, steps=2, warmup=1, repeats=1,
                              models=["dcn", "xdeepint"]) if cfg.quick else ModelsBenchConfig())
    return run(mcfg, progress=not cfg.quick)


def bench_archs(cfg: AllConfig) -> tuple[dict[str, Any], str]:
    """Training and inference samples/s of every over-arch on this machine's CPU, one thread
    (quick: batch 128, one step each; else batch 2048, fp32 and bf16, timed blocks of at least a
    second: the slowest arch's step takes about 0.25 s, and at the command's default 0.3 s its
    blocks held one or two steps, too few for a bf16/fp32 ratio near 1 to come out the same twice)."""
    from recsys.bench.archs import ArchBenchConfig, run, table

    acfg = (ArchBenchConfig.quick(progress=False) if cfg.quick else
            ArchBenchConfig(batch_sizes=(2048,), min_seconds=1.0, progress=False))
    result = run(acfg)
    return result, table(result)


def bench_hgr(cfg: AllConfig) -> tuple[dict[str, Any], str]:
    """Seconds per training step with BCE alone and with the hierarchical group-wise loss (online
    RVQ codes), same data and batches, one process."""
    from recsys.train.run import run_training

    steps = 30 if cfg.quick else 300
    requests = 5000 if cfg.quick else 100_000
    times = {}
    variants = {
        "bce": {},
        "bce+hierarchical": {"loss": {"hierarchical": {"weight": 0.3,
                                                       "rvq": {"levels": 3, "codes": 8}}}},
    }
    for name, patch in variants.items():
        spec = _synthetic_spec(cfg, requests, **patch)
        spec = spec.model_copy(update={
            "train": spec.train.model_copy(update={"max_steps": steps}),
            "data": spec.data.model_copy(update={"request_batches": True})})
        metrics = run_training(spec, cfg.out / "runs" / f"hgr-{name}", progress=False,
                               overwrite=True)  # the benchmark's own run: a rerun replaces it
        times[name] = metrics["timing"]["seconds_per_step"]
    ratio = times["bce+hierarchical"] / times["bce"]
    table = format_table(["objective", "ms / step", "vs bce"],
                         [[n, t * 1000, t / times["bce"]] for n, t in times.items()])
    table += (f"\n\nQuickstart DCN-v2, batch {spec.train.batch_size}, {steps} steps, one process; "
              f"the hierarchical loss (RVQ update + 3 levels of group-wise softmax) costs "
              f"{(ratio - 1) * 100:.1f}% per step.")
    return {"seconds_per_step": times, "ratio": ratio, "steps": steps}, table


def bench_ranktower(cfg: AllConfig) -> tuple[dict[str, Any], str]:
    """RankTower's online part (see :func:`recsys.bench.ranktower.ranktower_scoring`)."""
    from recsys.bench.ranktower import ranktower_scoring_isolated

    # one thread (the target's terms), in a process of its own as a server's scorer is
    results = ranktower_scoring_isolated(20 if cfg.quick else 200)
    table = format_table(["model", "p50 ms", "p99 ms"],
                         [[n, r["p50_ms"], r["p99_ms"]] for n, r in results.items()])
    table += "\n\n1,000 cached candidates scored for one request, 1 thread; 4 heads x 32 dims."
    return {"candidates": 1000, "threads": 1, "results": results}, table


def bench_scaling(cfg: AllConfig) -> tuple[dict[str, Any], str]:
    """Training samples/s and per-rank embedding memory on 1 and 2 processes (torchrun, gloo),
    every table table-wise, the same global batch."""
    from recsys.spec import dump_toml

    requests = 5000 if cfg.quick else 100_000
    steps = 6 if cfg.quick else 200
    rows = []
    out: dict[str, Any] = {"runs": {}}
    for world in (1, 2):
        from recsys.spec import validate_spec

        base = _synthetic_spec(cfg, requests)
        raw = json.loads(base.model_dump_json())
        raw["train"].update({"max_steps": steps, "batch_size": 2048})  # global, split over ranks
        raw["distributed"].update({"world_size": world, "sharding": [
            {"table": t.name, "types": ["table_wise"]} for t in base.features.resolved_tables()]})
        spec = validate_spec(raw, "scaling")
        path = cfg.out / "runs" / f"scaling-{world}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_toml(spec))
        run_dir = cfg.out / "runs" / f"scaling-{world}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", "-m", "recsys.cli", "train", str(path),
               "--run-dir", str(run_dir), "--no-progress", "--overwrite"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"scaling run on {world} process(es) failed:\n"
                               f"{done.stderr[-2000:]}")
        info = json.loads((run_dir / "run.json").read_text())
        t = info["timing"]
        samples = t["steps"] * 2048 / t["train_seconds"]
        per_rank = info["embedding_bytes_per_rank"]
        out["runs"][str(world)] = {"samples_per_s": samples, "embedding_bytes_per_rank": per_rank}
        rows.append([world, samples, max(per_rank) / 2**20, sum(per_rank) / 2**20])
    out["speedup"] = rows[1][1] / rows[0][1]
    table = format_table(["processes", "samples/s", "max MiB / rank", "total MiB"], rows)
    table += (f"\n\nQuickstart DCN-v2, global batch 2048, {steps} steps, table-wise sharding, gloo "
              f"on this machine's cores; 2 processes: {out['speedup']:.2f}x the samples/s of 1. "
              "Memory is weights plus the fused optimizer's state, from the sharding plan.")
    return out, table


def bench_rvq(cfg: AllConfig) -> tuple[dict[str, Any], str]:
    """Vectors per second through ResidualVQ.encode and through a training update (EMA)."""
    from recsys.quantization.rvq import ResidualVQ

    n = 4096 if cfg.quick else 65_536
    rows = []
    out: dict[str, Any] = {}
    for dim, codes in ((64, 32), (64, 256)):
        rvq = ResidualVQ(dim, levels=3, codes=codes, kmeans_init_batches=1, distributed=False)
        x = torch.randn(n, dim)
        rvq.update(x)  # k-means initialisation
        calls: dict[str, Callable[[], Any]] = {
            "encode": lambda rvq=rvq, x=x: rvq.encode(x),
            "update": lambda rvq=rvq, x=x: rvq.update(x)}
        for name, fn in calls.items():
            fn()
            start = time.perf_counter()
            reps = 3
            for _ in range(reps):
                fn()
            rate = n * reps / (time.perf_counter() - start)
            out[f"{name}_d{dim}_k{codes}"] = rate
            rows.append([name, dim, codes, rate])
    table = format_table(["call", "dim", "codes per level", "vectors/s"], rows)
    table += f"\n\n3 levels, batches of {n:,} vectors, {torch.get_num_threads()} thread(s)."
    return out, table


BENCHES: dict[str, Callable[[AllConfig], tuple[dict[str, Any], str]]] = {
    "data": bench_data, "train": bench_train, "small": bench_small, "models": bench_models,
    "moe": bench_moe,
    "serve": bench_serve, "serve-http": bench_serve_http, "prepare": bench_prepare,
    "archs": bench_archs, "hgr": bench_hgr, "ranktower": bench_ranktower,
    "scaling": bench_scaling, "rvq": bench_rvq,
}


def headline(name: str, result: dict[str, Any]) -> str:
    """One line per benchmark for the summary."""
    try:
        if name == "data":
            r = result["rows_per_s"]
            return f"shuffled loader {r['loader -> Batch (shuffled)']:,.0f} rows/s"
        if name == "train":
            return f"sharded / plain samples/s: {result['ratio']:.2f}x"
        if name == "small":
            if "skipped" in result:
                return result["skipped"]
            return (f"DCN-v2 on MovieLens, batch 1024: {result['samples_per_s']['sharded']:,.0f} "
                    f"samples/s ({result['ratio']:.2f}x plain PyTorch)")
        if name == "models":
            return "; ".join([f"{k} {v['value']:.2f}x (target {v['target']:g}x)"
                              for k, v in result["ratios"].items()]
                             or [f"{m} {v:,.0f} samples/s"
                                 for m, v in result["samples_per_s"].items()])
        if name == "moe":
            ratio = result["ratio_depth4_to_depth1"]["best"]
            return f"depth 4 / depth 1 time per example: {ratio:.2f}x"
        if name == "serve":
            g = result["goals"]
            return (f"int8 / fp32 size {g['size_ratio_int8_fp32']:.3f}; int8 / eager throughput "
                    f"{g['throughput_ratio_int8_eager']:.2f}x")
        if name == "prepare":
            per_core = result["rows_per_s_per_core"]
            return "; ".join(f"{fmt} {v:,.0f} rows/s per core" for fmt, v in per_core.items())
        if name == "serve-http":
            http = result["http"]
            return (f"HTTP p50 {http['p50_ms']:.1f} ms, {http['requests_per_s']:,.0f} "
                    "requests/s")
        if name == "archs":
            row = next(iter(result["results"]["fp32"].values()))
            return (f"fp32 train samples/s: dcn {row['dcn']['train']['samples_per_s']:,.0f}, "
                    f"moe {row['moe']['train']['samples_per_s']:,.0f}")
        if name == "hgr":
            return f"hierarchical / bce step time: {result['ratio']:.3f}x"
        if name == "ranktower":
            p50 = result["results"]["ranktower"]["p50_ms"]
            return f"RankTower, 1,000 cached candidates: {p50:.2f} ms p50"
        if name == "scaling":
            return f"2 / 1 processes samples/s: {result['speedup']:.2f}x"
        if name == "rvq":
            return f"encode {result['encode_d64_k32']:,.0f} vectors/s (dim 64, K 32)"
    except (KeyError, TypeError):
        pass
    return "see the JSON"


def run_all(cfg: AllConfig, only: list[str] | None = None) -> str:
    """Run the benchmarks (all, or ``only``), write each one's JSON + table, return a summary."""
    from recsys.bench.targets import targets

    rows = []
    results: dict[str, dict[str, Any]] = {}
    for name in only or list(BENCHES):
        started = time.perf_counter()
        log.info("bench %s%s ...", name, " (quick)" if cfg.quick else "")
        result, table = BENCHES[name](cfg)
        result = {**result, "quick": cfg.quick}
        results[name] = result
        write_result(cfg.out, name, result, table)
        rows.append([name, headline(name, result), round(time.perf_counter() - started, 1)])
    # the targets of every result in the directory, this run's and earlier ones' (`--only`)
    for path in sorted(Path(cfg.out).glob("*.json")):
        if path.stem != "targets" and path.stem not in results:
            results[path.stem] = json.loads(path.read_text())
    summary, table = targets(results)
    if summary["targets"]:
        quick = any(r.get("quick") for r in results.values())
        write_result(cfg.out, "targets", {**summary, "quick": quick}, table)
    return format_table(["benchmark", "headline", "seconds"], rows)
