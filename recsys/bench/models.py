"""``recsys bench models``: full sharded training samples/s of every ranking arch on one
Criteo-shaped world, side by side, with the ratios the stack's targets are stated in.

Each model is the over-arch and optimizers of its spec in ``specs/`` (``dcn`` is the quickstart's;
``mlp`` and ``pin`` are that spec with the arch changed) on the same stress world: 26 single-id tables of 262,144 rows x 16 (uniform random ids: every step
touches about 2048 x 26 distinct rows, the worst case for a row-sparse optimizer), 13 dense
features, batch 2048, one process, the trainer's path (DistributedModelParallel, FBGEMM lookups,
the train pipeline of ``recsys.train.pipeline``). ``xdeepint`` runs twice: with its spec's group-lasso FTRL on the sharded
tables (``gftrl``) and with ``rowwise_adagrad``; ``moe`` runs at its annealed top-k (the steady
state of a long run). Each model trains in its own subprocess on the same
saved batches; repeats go round the models (the order reversed every other repeat) and the table
keeps the best repeat of each. A target's ratio compares its two models side by side: after the
repeats, the two train once more in one process, in turns of two steps
(``recsys.bench.train.run_interleaved``), so that a slow phase of the machine falls on both
alike; the machine's speed drifts within seconds as well as minutes, and on one day the pairs of
separate runs gave 0.34-0.51 for the same code. The repeats still run each target's two models
one right after the other, and the median of those pairs' ratios is kept beside it.

Example:
    >>> result, table = run(ModelsBenchConfig(steps=20, repeats=3))
    >>> sorted(result["ratios"])
    ['moe_vs_dcn', 'xdeepint_gftrl_vs_adagrad']
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# torch, torchrec and the spec are imported inside the functions: the CLI builds its options from
# this module, and `recsys --help` must not import them

NAME = "models"
ROOT = Path(__file__).resolve().parents[2]
# model name -> (spec file whose optimizers (and model, unless given) it takes, the model section
# or None, extra --set items applied last)
MODELS: dict[str, tuple[str, dict[str, Any] | None, tuple[str, ...]]] = {
    "mlp": ("quickstart.toml", {"arch": "mlp"}, ()),
    "dcn": ("quickstart.toml", None, ()),
    "dlrm": ("dlrm.toml", None, ()),
    "deepfm": ("deepfm.toml", None, ()),
    "pin": ("quickstart.toml", {"arch": "pin"}, ()),
    "xdeepint": ("xdeepint.toml", None, ()),  # gftrl, as its spec
    "xdeepint_adagrad": ("xdeepint.toml", None, ("train.sparse_optimizer.name=rowwise_adagrad",
                                                 "train.sparse_optimizer.lr=0.1")),
    "dynint": ("dynint.toml", None, ()),
    # the steady state of a long run: the spec's top-k annealing (k = 5 falling to 3 over 1,000
    # steps) is a sliver of an epoch, but all of a 20-step benchmark
    "moe": ("adaensemble.toml", None, ("model.moe.anneal_steps=0",)),
}
# (numerator, denominator, target): numerator samples/s >= target x denominator's
TARGETS: dict[str, tuple[str, str, float]] = {
    "moe_vs_dcn": ("moe", "dcn", 0.4),
    "xdeepint_gftrl_vs_adagrad": ("xdeepint", "xdeepint_adagrad", 0.5),
}
_TRAIN_KEYS = ("sparse_optimizer", "dense_optimizer", "interaction_optimizer")


@dataclass
class ModelsBenchConfig:
    tables: int = 26
    rows: int = 262_144
    dense: int = 13
    batch_size: int = 2048
    steps: int = 20  # timed steps per repeat
    warmup: int = 3
    repeats: int = 3
    one_core: bool = False  # torch.set_num_threads(1) in each child
    models: list[str] = field(default_factory=lambda: list(MODELS))

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise ValueError(f"models: unknown name(s) {unknown}; known: {', '.join(MODELS)}")
        for name in ("tables", "rows", "batch_size", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def run_order(models: list[str]) -> list[str]:
    """``models`` with each target's numerator moved right after its denominator, so that every
    ratio compares two runs next to each other in time (in either direction of a repeat).

    Example:
        >>> run_order(["mlp", "dcn", "pin", "moe"])
        ['mlp', 'dcn', 'moe', 'pin']
    """
    order = list(models)
    for num, den, _ in TARGETS.values():
        if num in order and den in order:
            order.remove(num)
            order.insert(order.index(den) + 1, num)
    return order


def model_spec(name: str, cfg: ModelsBenchConfig) -> dict[str, Any]:
    """The stress world with the model section and optimizers of ``name``'s spec, as a raw dict."""
    from recsys.bench.train import stress_spec
    from recsys.spec.io import apply_override

    spec_file, model, overrides = MODELS[name]
    full = tomllib.loads((ROOT / "specs" / spec_file).read_text())
    if model is not None:
        full["model"] = model
    base = stress_spec(cfg.tables, cfg.rows, dense=cfg.dense, batch_size=cfg.batch_size)
    raw = json.loads(base.model_dump_json())
    raw["name"] = f"{name}-{cfg.tables}x{cfg.rows}"
    raw["model"] = {**full["model"], "tasks": ["click"]}
    for key in _TRAIN_KEYS:
        if key in full.get("train", {}):
            raw["train"][key] = full["train"][key]
    for item in overrides:  # after the spec's optimizers, which they may replace
        apply_override(raw, item, f"<bench models: {name}>")
    return raw


def run(cfg: ModelsBenchConfig, progress: bool = True) -> tuple[dict[str, Any], str]:
    """Train every model ``cfg.repeats`` times in turn; returns (result dict, table)."""
    from recsys.bench.train import (
        TrainBenchConfig,
        _run_child,
        random_batches,
        repeat_line,
        save_batches,
    )
    from recsys.spec import validate_spec

    specs = {m: validate_spec(model_spec(m, cfg), f"<bench models: {m}>") for m in cfg.models}
    first = next(iter(specs.values()))
    train_cfg = TrainBenchConfig(steps=cfg.steps, warmup=cfg.warmup, repeats=1,
                                 one_core=cfg.one_core)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.models}
    with tempfile.TemporaryDirectory(prefix="recsys-bench-models-") as tmp:
        shared = Path(tmp)
        if progress:
            print(f"bench models: {cfg.warmup + cfg.steps} batches of {cfg.batch_size} "
                  f"({cfg.tables} tables x {cfg.rows:,} rows)", flush=True)
        save_batches(random_batches(first, cfg.warmup + cfg.steps), shared / "batches.pt")
        paired = run_order(cfg.models)
        for rep in range(cfg.repeats):
            order = paired if rep % 2 == 0 else paired[::-1]
            for m in order:
                work = shared / m
                work.mkdir(exist_ok=True)
                (work / "spec.json").write_text(specs[m].model_dump_json())
                (work / "batches.pt").unlink(missing_ok=True)
                (work / "batches.pt").symlink_to(shared / "batches.pt")
                r = _run_child("sharded", work, train_cfg, rep)
                runs[m].append(r)
                if progress:
                    print(repeat_line(rep, cfg.repeats, m, r), flush=True)
        # each target's two models once more, now in turns of two steps in one process
        interleaved: dict[str, dict[str, Any]] = {}
        for i, (key, (num, den, _)) in enumerate(TARGETS.items()):
            if num in specs and den in specs:
                r = _run_child("sharded", shared, train_cfg, i,
                               specs=[shared / den / "spec.json", shared / num / "spec.json"])
                interleaved[key] = {den: r["samples_per_s"][0], num: r["samples_per_s"][1],
                                    "chunk": r["chunk"], "steps": r["steps"]}
                if progress:
                    print(f"  interleaved  {num} / {den}: {r['samples_per_s'][1]:,.0f} / "
                          f"{r['samples_per_s'][0]:,.0f} samples/s", flush=True)
    return summarise(cfg, specs, runs, interleaved)


def summarise(cfg: ModelsBenchConfig, specs: dict[str, Any],
              runs: dict[str, list[dict[str, Any]]],
              interleaved: dict[str, dict[str, Any]] | None = None,
              ) -> tuple[dict[str, Any], str]:
    """The table and the ratios: a target's ratio is its interleaved run's where there is one,
    else the median of the side-by-side pairs of the repeats."""
    from recsys.tables import format_table

    best = {m: max(r["samples_per_s"] for r in rs) for m, rs in runs.items()}
    dcn = best.get("dcn")
    ratios: dict[str, Any] = {}
    for key, (num, den, target) in TARGETS.items():
        if num in best and den in best:
            # the pairs that ran side by side in each repeat (run_order)
            pairs = [a["samples_per_s"] / b["samples_per_s"]
                     for a, b in zip(runs[num], runs[den], strict=True)]
            turns = (interleaved or {}).get(key)
            value = turns[num] / turns[den] if turns else statistics.median(pairs)
            ratios[key] = {"value": value, "interleaved": turns, "per_repeat": pairs,
                           "median_of_pairs": statistics.median(pairs),
                           "of_best": best[num] / best[den], "target": target,
                           "met": value >= target}
    result = {
        "config": asdict(cfg),
        "samples_per_s": best,
        "vs_dcn": {m: v / dcn for m, v in best.items()} if dcn else {},
        "ratios": ratios,
        "sparse_optimizer": {m: specs[m].train.sparse_optimizer.name.value for m in best},
        "optimizer_state_bytes": {m: runs[m][-1]["optimizer_state_bytes"] for m in best},
        "param_bytes": {m: runs[m][-1]["param_bytes"] for m in best},
        "runs": runs,
    }
    rows = [[m, specs[m].train.sparse_optimizer.name.value, best[m],
             best[m] / dcn if dcn else float("nan")] for m in best]
    table = format_table(["model", "sparse optimizer", "samples/s", "vs dcn"], rows)
    lines = [f"{k}: {v['value']:.2f}x"
             + (f" in turns of {v['interleaved']['chunk']} steps in one process; "
                if v["interleaved"] else "; ")
             + f"the median of the side-by-side pairs {v['median_of_pairs']:.2f}x "
             f"({', '.join(f'{p:.2f}' for p in v['per_repeat'])}) (target >= {v['target']:g}x: "
             f"{'met' if v['met'] else 'not met'})" for k, v in ratios.items()]
    threads = "1 thread" if cfg.one_core else "all cores"
    table += (f"\n\n{cfg.tables} tables x {cfg.rows:,} rows x 16, {cfg.dense} dense, batch "
              f"{cfg.batch_size}, 1 process, {threads}; best of {cfg.repeats} x {cfg.steps} "
              f"timed steps after {cfg.warmup} warm-up steps, the same batches for every "
              "model. A target's ratio comes from its two models trained in turns of a few "
              "steps in one process (a slow phase of the machine falls on both alike); the "
              "median of the repeats' side-by-side pairs is given beside it.\n"
              + "\n".join(lines))
    return result, table


def config_from(args: argparse.Namespace) -> ModelsBenchConfig:
    """The config from the options that were given (a ValueError names a bad one)."""
    given = {k: getattr(args, k) for k in ("tables", "rows", "batch_size", "steps", "warmup",
                                           "repeats") if getattr(args, k) is not None}
    if args.models:
        given["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    return ModelsBenchConfig(**given, one_core=args.one_core)
