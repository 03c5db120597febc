"""``recsys bench archs``: training and inference samples/s of every over-arch, in pure torch.

Each over-arch runs above a Criteo-shaped batch of pooled embeddings: 26 sparse fields of dim 16
(``pooled`` ``(B, 416)``) and 13 dense features, random data, one task (a binary logit and BCE, plus
AdaEnsemble's auxiliary router loss). A **training step** is forward, backward (into the
parameters and into ``pooled``, as the embedding tables' backward would receive it) and an Adam
step; an **inference step** is an eval-mode forward under ``torch.inference_mode``. Every arch is
timed at every batch size (default 2048 and 32768) in fp32 and under bf16 autocast, each dtype on
its own copy of the models built from the same seed; each repeat times every arch once in turn,
in each dtype one right after the other, so machine noise hits all alike, and each timed block
runs enough steps to last ``min_seconds`` (counted from the warm-up). Samples/s come from the best
repeat.
Step-time ratios: each arch against ``dcn``, ``dynint`` against ``pin``, and bf16 against fp32.

The models are built here from the pure-torch layers of :mod:`recsys.modules` and the loss of
:mod:`recsys.losses`, never from ``recsys.models.archs`` (pydantic, torchrec): the benchmark runs
where only torch is installed (``PYTHONPATH=. python -m recsys.cli bench archs --device cuda``; see
``tools/bench_archs_device.sh``). Each mirrors its arch's ``build`` with the defaults of the arch
and of its spec under ``specs/`` (``tests/test_bench_archs.py`` checks the parameter shapes against
the registry's models):

- ``mlp``: ``[pooled ; MLP_64(dense)]`` -> MLP 256-128-64 -> head (``dense_arch = [64]``).
- ``dcn``: the same input through a 3-layer full-rank DCN-v2 cross, then the tower.
- ``pin``: stacked fields ``(B, 27, 16)`` (the dense arch 64-16 is the 27th) -> PIN (4 layers,
  h = 1, residual, linear; the ``[model.pin]`` defaults) -> flatten -> the tower.
- ``xdeepint``: stacked fields -> PIN (4 layers, h = 4: specs/xdeepint.toml) -> xDeepInt readout.
- ``dynint``: stacked fields -> DynamicPIN (3 layers, h = 4, A1 + B1: specs/dynint.toml) ->
  readout; ``dynint-B2`` .. ``dynint-B4`` change the parameter mode (rank 4, 4 bases), and
  ``dynint-static`` (no dynamic activation or parameter) is the same recursion with a static W,
  the like-for-like baseline of the dynamic modes.
- ``moe``: stacked fields -> AdaEnsemble (5 experts, top 3, 4 depths: specs/adaensemble.toml) at
  its steady state, ``anneal_steps = 0``: the spec anneals k from 5 to 3 over its first 1,000
  steps, and annealing reads the step counter on the host every forward.
- ``dlrm``: a pure-torch equivalent of ``torchrec.models.dlrm``'s ``DenseArch`` (an MLP 64-16, ReLU
  on every layer) and ``InteractionArch`` (the upper triangle of the Gram matrix of
  ``[dense ; e_1 .. e_26]``, after the dense vector), then the tower.
- ``deepfm``: the ``mlp`` tower's logit plus the FM term ``½ Σ_d [(Σ_i v_i)² − Σ_i v_i²]`` of the
  26 fields (written out here as in ``recsys/models/archs/deepfm.py``).
- ``ranktower`` / ``dssm``: two towers (heads 4 x 32, hidden 128: specs/ranktower.toml); with no
  sides in Criteo, sparse fields 0-12 and the 13 dense features (one more field) feed the user
  tower, fields 13-25 the item tower; trained here with BCE, not the cascade objective.

On CUDA the timings are taken with CUDA events after a synchronize; ``compile`` wraps each model
in ``torch.compile``; ``sync_debug`` runs every training forward + backward (not the optimizer step)
under ``torch.cuda.set_sync_debug_mode("error")``, so an arch that synchronizes host and device
fails with the offending call and is reported (its training is then not timed). The first
training step of each arch (lazy state, allocations, compilation) runs outside that mode.

Example:
    >>> cfg = ArchBenchConfig(archs=("mlp", "dcn"), batch_sizes=(64,), dtypes=("fp32",),
    ...                       repeats=1, warmup=1, min_seconds=0.0, progress=False)
    >>> result = run(cfg)
    >>> sorted(result["results"]["fp32"]["64"])
    ['dcn', 'mlp']
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recsys.bench import run_and_write as bench_run_and_write
from recsys.bench import write_result
from recsys.bench.arch_models import (
    ARCHS,
    DIM,
    NUM_DENSE,
    NUM_FIELDS,
    Output,
    build_arch,
)
from recsys.losses.pointwise import bce
from recsys.process_settings import tune_process
from recsys.tables import format_table

NAME = "archs"

ADAM_LR = 1e-3  # train.dense_optimizer's default
DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: no autocast


# ---- configuration --------------------------------------------------------------------------------

@dataclass
class ArchBenchConfig:
    """What to time. ``threads`` applies on CPU (None: torch's default); ``min_seconds`` is the
    least time of one timed block (its step count comes from the warm-up, at most ``max_steps``)."""

    archs: tuple[str, ...] = ARCHS
    batch_sizes: tuple[int, ...] = (2048, 32768)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    device: str = "cpu"
    repeats: int = 3
    warmup: int = 2
    min_seconds: float = 0.3
    max_steps: int = 200
    threads: int | None = 1
    compile: bool = False
    sync_debug: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        # tuples also when given lists (argparse, JSON); the messages name the fields, which the
        # command turns into its options
        self.archs, self.batch_sizes, self.dtypes = (
            tuple(self.archs), tuple(self.batch_sizes), tuple(self.dtypes))
        unknown = [a for a in self.archs if a not in ARCHS]
        if unknown or not self.archs:
            raise ValueError(f"archs: unknown {', '.join(unknown) or '(none given)'}; expected "
                             f"some of: {', '.join(ARCHS)}")
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            raise ValueError(f"dtype: unknown {', '.join(bad) or '(none given)'}; expected "
                             f"fp32 and/or bf16")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be >= 1, got {list(self.batch_sizes)}")
        for name in ("repeats", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.min_seconds < 0:
            raise ValueError(f"warmup and min_seconds must be >= 0, got {self.warmup} and "
                             f"{self.min_seconds}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: torch sees no CUDA device here")
        if self.sync_debug and self.device != "cuda":
            raise ValueError("sync_debug needs device cuda (a CPU run never syncs)")

    @classmethod
    def quick(cls, **overrides: Any) -> ArchBenchConfig:
        """Tiny sizes: every arch, both dtypes, one short step each (CI: the code paths never
        rot)."""
        return cls(**{"batch_sizes": (128,), "repeats": 1, "warmup": 1, "min_seconds": 0.0,
                      **overrides})


def config_from_args(args: Any) -> ArchBenchConfig:
    """A config from the command's options (None: the default, or ``--quick``'s)."""
    given = {key: getattr(args, opt) for key, opt in (
        ("archs", "archs"), ("batch_sizes", "batch_sizes"), ("dtypes", "dtype"),
        ("device", "device"), ("repeats", "repeats"), ("warmup", "warmup"),
        ("min_seconds", "min_seconds"), ("threads", "threads"))
        if getattr(args, opt, None) is not None}
    if "both" in given.get("dtypes", ()):
        given["dtypes"] = ("fp32", "bf16")
    flags = {"compile": bool(getattr(args, "compile", False)),
             "sync_debug": bool(getattr(args, "sync_debug", False)),
             "progress": not getattr(args, "no_progress", False)}
    if getattr(args, "all_cores", False):
        flags["threads"] = None
    return (ArchBenchConfig.quick if getattr(args, "quick", False) else ArchBenchConfig)(
        **given, **flags)


# ---- timing ---------------------------------------------------------------------------------------

@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``threads`` intra-op threads inside (None: unchanged); the previous setting comes back."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextmanager
def sync_debug_errors(on: bool) -> Iterator[None]:
    """With ``on``, every CUDA host-device synchronization inside raises (a RuntimeError)."""
    if not on:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def seconds_per_call(fn: Callable[[], None], calls: int, cuda: bool) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls; on CUDA between two events, after a
    synchronize (the queue holds no earlier work) and up to the end event's completion."""
    if not cuda:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / calls


def random_batch(batch: int, device: torch.device, seed: int,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pooled (B, 416), dense (B, 13), labels (B,))``; ``pooled`` is a leaf that requires
    grad, so backward also computes what the embedding tables would receive."""
    gen = torch.Generator().manual_seed(seed)
    pooled = torch.randn(batch, NUM_FIELDS * DIM, generator=gen)
    dense = torch.randn(batch, NUM_DENSE, generator=gen)
    labels = (torch.rand(batch, generator=gen) < 0.25).float()  # Criteo-like CTR
    return pooled.to(device).requires_grad_(), dense.to(device), labels.to(device)


class Case:
    """One arch's training and inference steps on one batch and dtype."""

    def __init__(self, model: nn.Module, call: Callable[..., Output], opt: torch.optim.Optimizer,
                 data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], device: torch.device,
                 dtype: torch.dtype | None) -> None:
        self.model, self.call, self.opt = model, call, opt
        self.pooled, self.dense, self.labels = data
        self.device_type = device.type
        self.dtype = dtype
        self.sync_debug = False  # set once the priming step has run

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def train_step(self) -> None:
        """Forward, BCE (+ aux), backward, Adam; only forward + backward under sync debug."""
        with sync_debug_errors(self.sync_debug):
            with self.autocast():
                logit, aux = self.call(self.pooled, self.dense)
                loss = bce(logit.float(), self.labels)
                if aux is not None:
                    loss = loss + aux.float()
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.pooled.grad = None

    def infer_step(self) -> None:
        with torch.inference_mode(), self.autocast():
            self.call(self.pooled, self.dense)

    def reset(self) -> None:
        """After a failed step: no gradients left behind for the next one."""
        self.opt.zero_grad(set_to_none=True)
        self.pooled.grad = None


def _say(cfg: ArchBenchConfig, message: str) -> None:
    if cfg.progress:
        print(f"[bench archs] {message}", file=sys.stderr, flush=True)


def _error_line(e: BaseException) -> str:
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _warm(cfg: ArchBenchConfig, case: Case, phase: str, cuda: bool) -> int:
    """Warm up one phase (``train`` / ``infer``) and return its timed step count."""
    step = case.train_step if phase == "train" else case.infer_step
    case.model.train(phase == "train")
    if phase == "train":  # the first step (lazy init, allocations, compile) is never sync-debugged
        case.sync_debug = False
        step()
        case.sync_debug = cfg.sync_debug
    last = 0.0
    for _ in range(cfg.warmup):
        last = seconds_per_call(step, 1, cuda)
    if cfg.min_seconds <= 0:
        return 1
    if last <= 0:
        last = seconds_per_call(step, 1, cuda)
    return max(1, min(cfg.max_steps, math.ceil(cfg.min_seconds / max(last, 1e-9))))


def _bench_group(cfg: ArchBenchConfig, cases: dict[str, Case], batch: int,
                 label: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Time every case of one (dtype, batch): ``({arch: numbers}, {arch: sync-debug verdict})``."""
    cuda = cfg.device == "cuda"
    steps: dict[str, dict[str, int]] = {}
    verdict: dict[str, str] = {}
    for name, case in cases.items():
        _say(cfg, f"{label}: warm-up {name}")
        steps[name] = {}
        for phase in ("train", "infer"):
            try:
                steps[name][phase] = _warm(cfg, case, phase, cuda)
            except RuntimeError as e:
                if not (cfg.sync_debug and phase == "train"):
                    raise
                verdict[name] = _error_line(e)
                case.reset()
        if cfg.sync_debug:
            verdict.setdefault(name, "pass")
    times: dict[str, dict[str, list[float]]] = {n: {"train": [], "infer": []} for n in cases}
    for r in range(cfg.repeats):
        _say(cfg, f"{label}: repeat {r + 1}/{cfg.repeats}")
        for name, case in cases.items():
            for phase, n in list(steps[name].items()):
                case.model.train(phase == "train")
                step = case.train_step if phase == "train" else case.infer_step
                try:
                    times[name][phase].append(seconds_per_call(step, n, cuda))
                except RuntimeError as e:  # a sync that the warm-up did not meet
                    if not (cfg.sync_debug and phase == "train"):
                        raise
                    verdict[name] = _error_line(e)
                    case.reset()
                    del steps[name]["train"]
                    times[name]["train"] = []
    out: dict[str, Any] = {}
    for name, case in cases.items():
        out[name] = {"params": sum(p.numel() for p in case.model.parameters())}
        for phase in ("train", "infer"):
            t = times[name][phase]
            out[name][phase] = None if not t else {
                "best_s": min(t), "median_s": statistics.median(t),
                "samples_per_s": batch / min(t), "steps": steps[name][phase]}
    return out, verdict


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """``a``'s best step time over ``b``'s (None when either was not timed)."""
    if not a or not b:
        return None
    return a["best_s"] / b["best_s"]


def machine(device: str) -> dict[str, Any]:
    """What the numbers were measured on (no pyarrow: this benchmark runs with torch alone)."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu": platform.processor() or platform.machine(),
                            "cores": os.cpu_count()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def run(cfg: ArchBenchConfig,
        partial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Build every arch, time it at every batch size and dtype, and return the result
    (JSON-ready; :func:`table` renders it). ``partial`` gets the result so far after each
    batch size (all dtypes): a run cut short by a time limit still leaves its finished groups."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    tune_process()  # the allocator and float modes of a training process
    results: dict[str, dict[str, Any]] = {}
    sync: dict[str, dict[str, dict[str, str]]] = {}
    with torch_threads(cfg.threads if device.type == "cpu" else None):
        # one set of models per dtype, each from the same seed: a dtype starts from the weights
        # the other started from, not from where the other's steps left them (AdaEnsemble's
        # routing, hence its work per step, moves as it trains)
        models: dict[str, dict[str, nn.Module]] = {}
        for dtype in cfg.dtypes:
            torch.manual_seed(cfg.seed)
            models[dtype] = {name: build_arch(name).to(device) for name in cfg.archs}
        calls = {dtype: {name: torch.compile(m) if cfg.compile else m for name, m in ms.items()}
                 for dtype, ms in models.items()}
        opts = {dtype: {name: torch.optim.Adam(m.parameters(), lr=ADAM_LR)
                        for name, m in ms.items()} for dtype, ms in models.items()}
        threads = torch.get_num_threads() if device.type == "cpu" else None

        gemm = ({str(b): gemm_bf16_vs_fp32(b, device, cfg) for b in cfg.batch_sizes}
                if {"fp32", "bf16"} <= set(cfg.dtypes) else {})

        def result(done: bool) -> dict[str, Any]:
            return {"config": asdict(cfg), "device": cfg.device,
                    "machine": machine(cfg.device), "threads": threads,
                    "complete": done, "results": results, "ratios": ratios(results, cfg.archs),
                    "gemm_bf16_vs_fp32": gemm, "targets": targets(results, cfg.device, gemm),
                    "sync_debug": sync if cfg.sync_debug else None}

        for dtype in cfg.dtypes:
            results[dtype], sync[dtype] = {}, {}
        for batch in cfg.batch_sizes:
            data = random_batch(batch, device, cfg.seed)
            # every dtype's cases in one group, an arch's dtypes one after the other: each
            # repeat times an arch in bf16 right after fp32, not minutes later
            cases = {f"{name} {dtype}": Case(models[dtype][name], calls[dtype][name],
                                             opts[dtype][name], data, device, DTYPES[dtype])
                     for name in cfg.archs for dtype in cfg.dtypes}
            out, verdict = _bench_group(cfg, cases, batch,
                                        f"{cfg.device} {'+'.join(cfg.dtypes)} batch {batch}")
            for dtype in cfg.dtypes:
                results[dtype][str(batch)] = {name: out[f"{name} {dtype}"] for name in cfg.archs}
                sync[dtype][str(batch)] = {name: verdict[f"{name} {dtype}"]
                                           for name in cfg.archs if f"{name} {dtype}" in verdict}
            del cases, data
            if partial is not None:
                partial(result(False))
    return result(True)


def gemm_bf16_vs_fp32(batch: int, device: torch.device, cfg: ArchBenchConfig) -> float:
    """The device's own bf16 / fp32 time of one matrix product of the benchmark's size, ``(batch,
    416) x (416, 416)`` (the width of the concatenated fields), under autocast as the arches run:
    the bf16 goal asks the arches to gain what the hardware gains, and on a CPU without bf16
    matrix units (AMX) bf16 products are slower than fp32 ones, so no arch can meet it there."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(batch, NUM_FIELDS * DIM, generator=gen).to(device)
    w = torch.randn(NUM_FIELDS * DIM, NUM_FIELDS * DIM, generator=gen).to(device)
    cuda = device.type == "cuda"
    best: dict[str, float] = {}
    for dtype in ("fp32", "bf16"):
        context = (nullcontext() if DTYPES[dtype] is None
                   else torch.autocast(device.type, dtype=DTYPES[dtype]))
        with context:
            for _ in range(max(1, cfg.warmup)):
                x @ w
            calls = 10 if cfg.min_seconds > 0 else 1
            best[dtype] = min(seconds_per_call(lambda: x @ w, calls, cuda)
                              for _ in range(cfg.repeats))
    return best["bf16"] / best["fp32"]


def _both_dtypes(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(batch, fp32 row)`` of the batch sizes timed in fp32 and in bf16."""
    bf16 = results.get("bf16", {})
    return [(b, row) for b, row in results.get("fp32", {}).items() if b in bf16]


def ratios(results: dict[str, Any], archs: tuple[str, ...]) -> dict[str, Any]:
    """Step-time ratios: ``vs_dcn[dtype][batch][arch]`` (train and infer) and
    ``bf16_vs_fp32[batch][arch]`` when both dtypes ran."""
    out: dict[str, Any] = {"vs_dcn": {}, "bf16_vs_fp32": {}}
    for dtype, by_batch in results.items():
        out["vs_dcn"][dtype] = {}
        for batch, row in by_batch.items():
            dcn = row.get("dcn")
            out["vs_dcn"][dtype][batch] = {
                name: {phase: _ratio(row[name][phase], dcn and dcn[phase])
                       for phase in ("train", "infer")} for name in archs}
    for batch, row in _both_dtypes(results):
        out["bf16_vs_fp32"][batch] = {
            name: {phase: _ratio(results["bf16"][batch][name][phase], row[name][phase])
                   for phase in ("train", "infer")} for name in archs}
    return out


def targets(results: dict[str, Any], device: str,
            gemm: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The issue's goals, each where this run measured it: moe <= 4x dcn's training step (CUDA,
    batch 32768), dynint <= 1.5x pin's (every device), bf16 never slower than fp32. A bf16 goal
    carries ``gemm``, the device's own bf16 / fp32 matrix-product time at that batch size
    (:func:`gemm_bf16_vs_fp32`), and is ``met = None`` (not applicable) where that is above 1."""
    out: list[dict[str, Any]] = []
    gemm = gemm or {}

    def goal(what: str, dtype: str, batch: str, value: float | None, limit: float) -> None:
        if value is not None:
            out.append({"target": what, "dtype": dtype, "batch": int(batch), "value": value,
                        "limit": limit, "met": value <= limit})
            if "bf16 step" in what and batch in gemm:
                out[-1]["gemm"] = gemm[batch]
                if gemm[batch] > 1.0:
                    out[-1]["met"] = None

    for dtype, by_batch in results.items():
        for batch, row in by_batch.items():
            if device == "cuda" and batch == "32768" and "moe" in row and "dcn" in row:
                goal("moe train step <= 4x dcn's", dtype, batch,
                     _ratio(row["moe"]["train"], row["dcn"]["train"]), 4.0)
            if "dynint" in row and "pin" in row:
                goal("dynint train step <= 1.5x pin's", dtype, batch,
                     _ratio(row["dynint"]["train"], row["pin"]["train"]), 1.5)
    for batch, row in _both_dtypes(results):
        for name, numbers in row.items():
            for phase in ("train", "infer"):
                goal(f"{name} {phase}: bf16 step <= fp32's", "bf16", batch,
                     _ratio(results["bf16"][batch][name][phase], numbers[phase]), 1.0)
    return out


def table(result: dict[str, Any]) -> str:
    """The result as Markdown tables (samples/s and ratios; bf16 against fp32) and a summary."""
    cfg = result["config"]
    sync = result.get("sync_debug")
    headers = ["arch", "dtype", "batch", "train samples/s", "infer samples/s", "train ms/step",
               "train vs dcn", "infer vs dcn", "params"] + (["sync-free"] if sync else [])
    rows = []
    for dtype, by_batch in result["results"].items():
        for batch, row in by_batch.items():
            for name, numbers in row.items():
                train, infer = numbers["train"], numbers["infer"]
                vs = result["ratios"]["vs_dcn"][dtype][batch][name]
                cells: list[object] = [
                    name, dtype, int(batch), train and train["samples_per_s"],
                    infer and infer["samples_per_s"], train and train["best_s"] * 1e3,
                    vs["train"], vs["infer"], numbers["params"]]
                if sync:
                    verdict = sync[dtype][batch].get(name, "-")
                    cells.append("yes" if verdict == "pass" else "NO")
                rows.append(cells)
    text = format_table(headers, rows)
    bf16 = result["ratios"]["bf16_vs_fp32"]
    if bf16:
        text += "\n\nbf16 autocast / fp32 step time (< 1: bf16 faster)\n\n" + format_table(
            ["arch", "batch", "train", "infer"],
            [[name, int(batch), r["train"], r["infer"]]
             for batch, row in bf16.items() for name, r in row.items()])
    where = (f"{result['device']}" + (f" ({result['machine'].get('gpu')})"
                                      if result["device"] == "cuda" else
                                      f", {result['threads']} thread(s)"))
    text += (f"\n\nPure-torch over-arches on a Criteo-shaped batch ({NUM_FIELDS} fields x dim "
             f"{DIM} + {NUM_DENSE} dense), {where}{', torch.compile' if cfg['compile'] else ''}; "
             f"train = forward + backward + Adam, infer = eval forward; best of {cfg['repeats']} "
             f"repeats, each >= {cfg['min_seconds']} s.")
    if not result.get("complete", True):
        text += " PARTIAL: the run stopped before its last batch size or dtype."
    goals = result["targets"]
    if goals:
        met = sum(1 for g in goals if g["met"])
        applicable = sum(1 for g in goals if g["met"] is not None)
        text += f" Targets met: {met}/{applicable}" + (
            f" ({len(goals) - applicable} n/a on this device)." if applicable < len(goals) else ".")
        for g in goals:
            if "bf16 step" not in g["target"]:
                text += (f"\n- {g['target']} ({g['dtype']}, batch {g['batch']}): "
                         f"{g['value']:.2f}x {'ok' if g['met'] else 'MISSED'}")
        slower = [g for g in goals if "bf16 step" in g["target"] and g["value"] > g["limit"]]
        gemm = result.get("gemm_bf16_vs_fp32") or {}
        if gemm:
            text += ("\n- the device's own bf16 / fp32 matrix-product time: " + ", ".join(
                f"{r:.2f}x (batch {b})" for b, r in gemm.items())
                + ("; bf16 goals are n/a where it is above 1" if max(gemm.values()) > 1 else ""))
        if any("bf16 step" in g["target"] for g in goals):
            text += ("\n- bf16 step <= fp32's: " + (
                "every arch and phase" if not slower else "missed by " + ", ".join(
                    f"{g['target'].split(':')[0]} ({g['batch']}) {g['value']:.2f}x"
                    for g in slower)))
    if sync:
        failed = sorted({f"{name}: {v}" for by_batch in sync.values()
                         for row in by_batch.values() for name, v in row.items() if v != "pass"})
        text += ("\n\nsync debug (training forward + backward under "
                 "set_sync_debug_mode('error')): " + ("every arch passes" if not failed else
                                                      "failing:\n- " + "\n- ".join(failed)))
    return text


def run_and_write(cfg: ArchBenchConfig, out_dir: str | Path, echo: bool = True) -> Path:
    """:func:`run`, then write ``archs.json`` / ``archs.md`` into ``out_dir`` (and print the
    table)."""
    # each finished batch size / dtype group is written as it completes, so a cut run keeps it
    def run_writing(c: ArchBenchConfig) -> dict[str, Any]:
        return run(c, partial=lambda so_far: write_result(out_dir, NAME, so_far, table(so_far)))

    return bench_run_and_write(NAME, run_writing, table, cfg, out_dir, echo)
