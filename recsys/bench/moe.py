"""``recsys bench moe``: AdaEnsemble inference time per example against exit depth.

One eval-mode model, the same inputs, every row forced to exit at depth 1, 2, ... (and once with the
learned exit router), timed side by side: each repeat times every case once in turn, so machine
noise hits all alike; best and median per case are reported. torch runs on one thread by default.
Before timing, one untimed forward per case with forward hooks counts the SparseMoE layer calls,
which shows that a forced exit truncates the stack: deeper layers are never called. With the
learned exit router every depth's layer is called; ``layer_rows`` (the model's ``rows_per_depth``)
counts the rows that reached each depth and ``expert_rows_computed`` (its ``rows_computed``) the
rows each expert of each depth computed: all of them with the static dispatch, only the routed
rows still in the stack with the gather dispatch (``dispatch``: the one that ran, the CPU's
default being gather).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from recsys.models.archs.moe import MoESpec
from recsys.modules.moe import AdaEnsemble, resolve_dispatch
from recsys.tables import format_table

NAME = "moe"


@dataclass
class MoEBenchConfig:
    num_fields: int = 26  # m
    dim: int = 16  # D: n = m·D = 416 bit-level values per row
    batch_size: int = 2048
    repeats: int = 10  # timed forwards per case; best and median reported
    warmup: int = 2  # untimed forwards per case first
    one_core: bool = True  # torch.set_num_threads(1)
    seed: int = 0
    moe: MoESpec = field(default_factory=MoESpec)

    def __post_init__(self) -> None:
        # named as the command's options (--fields is num_fields)
        for name, label in (("num_fields", "fields"), ("dim", "dim"),
                            ("batch_size", "batch_size"), ("repeats", "repeats")):
            if getattr(self, name) < 1:
                raise ValueError(f"{label} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


@contextmanager
def torch_threads(one: bool) -> Iterator[None]:
    """One intra-op thread inside (when asked); the previous setting comes back on exit."""
    saved = torch.get_num_threads()
    if one:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def count_layer_calls(model: AdaEnsemble, x0: torch.Tensor) -> list[int]:
    """One forward with hooks: SparseMoE calls per depth."""
    calls = [0] * len(model.blocks)
    handles = []
    for d, block in enumerate(model.blocks):
        def hook(_mod: torch.nn.Module, _args: tuple[Any, ...], _out: Any, d: int = d) -> None:
            calls[d] += 1
        handles.append(block.moe.register_forward_hook(hook))
    try:
        model(x0)
    finally:
        for h in handles:
            h.remove()
    return calls


def run(cfg: MoEBenchConfig) -> dict[str, Any]:
    """Time the cases and return the result (JSON-ready; ``table(result)`` renders it)."""
    torch.manual_seed(cfg.seed)
    model = AdaEnsemble(cfg.num_fields, cfg.dim, num_outputs=1, **cfg.moe.model_dump(mode="json")
                        ).eval()
    x0 = torch.randn(cfg.batch_size, cfg.num_fields, cfg.dim)
    depths = cfg.moe.depths
    cases = {f"depth {d + 1}": d for d in range(depths)} | {"router": -1}
    layer_calls: dict[str, list[int]] = {}
    layer_rows: dict[str, list[int]] = {}
    expert_rows_computed: dict[str, list[list[int]]] = {}
    expert_load: dict[str, list[list[int]]] = {}
    times: dict[str, list[float]] = {name: [] for name in cases}
    router_exits: list[int] = []
    with torch_threads(cfg.one_core), torch.inference_mode():
        for name, depth in cases.items():
            model.force_exit_depth(depth)
            layer_calls[name] = count_layer_calls(model, x0)
            layer_rows[name] = model.rows_per_depth.tolist()
            expert_load[name] = model.expert_load.tolist()  # the routing
            expert_rows_computed[name] = model.rows_computed.tolist()  # the cost
            if depth < 0:
                router_exits = model.exits_per_depth.tolist()
            for _ in range(cfg.warmup):
                model(x0)
        for _ in range(cfg.repeats):
            for name, depth in cases.items():
                model.force_exit_depth(depth)
                start = time.perf_counter()
                model(x0)
                times[name].append((time.perf_counter() - start) / cfg.batch_size * 1e6)
        model.force_exit_depth(-1)
    us = {name: {"best": min(t), "median": statistics.median(t)} for name, t in times.items()}
    first, last = us["depth 1"], us[f"depth {depths}"]
    return {
        "config": asdict(cfg) | {"moe": cfg.moe.model_dump(mode="json")},
        "width": cfg.num_fields * cfg.dim,
        "threads": 1 if cfg.one_core else torch.get_num_threads(),
        "dispatch": resolve_dispatch(model.dispatch, x0.device.type),
        "us_per_example": us,
        f"ratio_depth{depths}_to_depth1": {"best": last["best"] / first["best"],
                                           "median": last["median"] / first["median"]},
        "layer_calls": layer_calls,
        "layer_rows": layer_rows,
        "expert_rows_computed": expert_rows_computed,
        "expert_load": expert_load,
        "experts": [str(e) for e in cfg.moe.experts],
        "router_exit_counts": router_exits,
        "router_exit_fractions": [c / cfg.batch_size for c in router_exits],
    }


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table plus a summary line."""
    us = result["us_per_example"]
    base = us["depth 1"]["best"]
    rows = [[name, t["best"], t["median"], t["best"] / base,
             " ".join(map(str, result["layer_calls"][name])),
             " ".join(str(sum(r)) for r in result["expert_rows_computed"][name])]
            for name, t in us.items()]
    text = format_table(["exit", "µs/example best", "median", "vs depth 1",
                         "SparseMoE calls per depth", "expert rows computed per depth"], rows)
    cfg = result["config"]
    depths = cfg["moe"]["depths"]
    ratio = result[f"ratio_depth{depths}_to_depth1"]
    dist = " ".join(f"{f:.3f}" for f in result["router_exit_fractions"])
    text += (f"\n\nAdaEnsemble eval, m={cfg['num_fields']} x D={cfg['dim']} (n={result['width']}), "
             f"{result['dispatch']} dispatch, "
             f"batch {cfg['batch_size']}, {result['threads']} thread(s), best/median of "
             f"{cfg['repeats']}. depth {depths} / depth 1: {ratio['best']:.2f}x (best), "
             f"{ratio['median']:.2f}x (median). Untrained router's exit fractions per depth: {dist}.")
    return text


def run_and_write(cfg: MoEBenchConfig, out_dir: str | Path, echo: bool = True) -> Path:
    """run + write ``NAME.json`` / ``.md`` into out_dir (+ print the table)."""
    from recsys.bench import run_and_write as write

    return write(NAME, run, table, cfg, out_dir, echo)


def config_from_args(args: argparse.Namespace, moe: MoESpec | None = None) -> MoEBenchConfig:
    """A config from parsed CLI options; ``moe`` (e.g. the spec's model.moe) or the defaults."""
    return MoEBenchConfig(
        num_fields=getattr(args, "fields", MoEBenchConfig.num_fields),
        dim=getattr(args, "dim", MoEBenchConfig.dim),
        batch_size=getattr(args, "batch_size", None) or MoEBenchConfig.batch_size,
        repeats=getattr(args, "repeats", None) or MoEBenchConfig.repeats,
        warmup=getattr(args, "warmup", MoEBenchConfig.warmup),
        one_core=not getattr(args, "all_cores", False),
        moe=moe or MoESpec(),
    )
