"""``recsys bench serve-http``: the scoring server under concurrent load, beside the bare model.

One export (``--export DIR``, or by default a random-weight ranker on the stress spec exported on
the fly: timings do not depend on training) is measured two ways in one run:

* **HTTP** -- ``recsys serve`` started as a subprocess on a free loopback port; once ``/health``
  answers, ``clients`` concurrent asyncio clients (aiohttp, one connection each) send ``POST
  /score`` requests of ``rows_per_request`` random valid rows until ``requests`` have been sent
  or ``seconds`` have passed. Each request's latency is the client's wall time from sending to
  the whole response; requests/s and rows/s are over the whole driven period. The server's own
  batching counters (model calls, rows per call) come from ``/metadata``.
* **in-process** -- the same requests, converted to the model's flat inputs beforehand, scored by
  calling the TorchScript module directly in this process: p50/p99 per call. The difference is
  what HTTP, JSON, queueing and batching cost (or, under load, what batching wins).

The first responses are checked against the in-process scores of the same rows (max abs diff), so
a server that answers fast but wrong is caught. The server is stopped with SIGTERM (killed if it
does not exit) on every path out of the benchmark; its exit status is recorded.

Example:
    >>> result = run(ServeHttpBenchConfig(quick=True))
    >>> result["http"]["p50_ms"], result["inprocess"]["p50_ms"]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from recsys.errors import RunError
from recsys.tables import format_table

NAME = "serve-http"
PARITY_TOL = 1e-5  # served vs in-process probability: the same module, only batch shapes differ
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 60.0
DISTINCT_REQUESTS = 64  # request bodies made up front and cycled (each a distinct random batch)


@dataclass
class ServeHttpBenchConfig:
    """How the benchmark runs.

    Args:
        export: an export directory to serve; None: a random-weight stress model exported into a
            temporary directory (``tables`` x ``rows`` x ``dim``, ``dense`` dense features).
        clients: concurrent clients (one connection each).
        requests: requests to send at most (after ``warmup`` untimed ones).
        rows_per_request: rows in each request.
        seconds: stop sending after this long even if ``requests`` were not all sent.
        max_batch_rows, max_wait_ms, threads: the server's batching and torch threads
            (``recsys serve`` options; threads None: its default, every core but one); the
            in-process calls use the same number of threads.
        inprocess_calls: timed calls of the in-process module.
        warmup: untimed requests (and in-process calls) first.
        quick: tiny sizes (checks every code path in seconds).
        seed: seeds the weights and the requests.

    Example:
        >>> ServeHttpBenchConfig(clients=16, rows_per_request=1)
    """

    export: str | None = None
    tables: int = 26
    rows: int = 100_000
    dim: int = 16
    dense: int = 13
    clients: int = 8
    requests: int = 2000
    rows_per_request: int = 16
    seconds: float = 60.0
    max_batch_rows: int = 1024
    max_wait_ms: float = 2.0
    threads: int | None = None
    inprocess_calls: int = 500
    warmup: int = 20
    quick: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quick:
            self.tables, self.rows = min(self.tables, 4), min(self.rows, 1000)
            self.clients, self.requests = min(self.clients, 4), min(self.requests, 100)
            self.seconds, self.inprocess_calls = min(self.seconds, 20.0), min(self.inprocess_calls,
                                                                              50)
            self.warmup = min(self.warmup, 5)
        for name in ("tables", "rows", "dim", "clients", "requests", "rows_per_request",
                     "max_batch_rows", "inprocess_calls"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dense < 0 or self.warmup < 0 or not self.seconds > 0 or self.max_wait_ms < 0:
            raise ValueError(f"need dense >= 0, warmup >= 0, seconds > 0, max_wait_ms >= 0; got "
                             f"{self.dense}, {self.warmup}, {self.seconds}, {self.max_wait_ms}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


# ---- the export ---------------------------------------------------------------------------------

def export_untrained(spec: Any, out: str | Path, seed: int = 0, quantize: str = "none") -> Path:
    """A random-weight ranker of ``spec`` exported as ``recsys export`` writes one: model.pt and
    manifest.json, the dataset's vocabularies when it has some, and for a two-tower arch the
    serving split and item cache (read from the spec's dataset). ``out`` must not exist; it
    appears only once complete.

    Example:
        >>> export_untrained(stress_spec(4, 1000), "exports/random")
        PosixPath('exports/random')
    """
    from recsys.export.torchscript import (
        MANIFEST_FILE,
        MODEL_FILE,
        raw_value_maps,
        script_ranker,
    )
    from recsys.export.two_tower import export_split
    from recsys.fsutil import staging_dir
    from recsys.models.archs import arch_of
    from recsys.models.ranker import Ranker, RankerConfig

    out = Path(out)
    if out.exists():
        raise RunError(str(out), "exists; the random-weight export needs a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    ranker = Ranker(RankerConfig(spec, device="cpu")).eval()
    exported = script_ranker(spec, ranker, quantize)
    staging = staging_dir(out)
    try:
        exported.module.save(str(staging / MODEL_FILE))
        info = {**exported.manifest, "run": None, "weights": f"random (seed {seed})"}
        info.update(raw_value_maps(spec, staging))
        if arch_of(spec.model).two_tower:
            info["serving_split"] = export_split(spec, ranker, staging)
        (staging / MANIFEST_FILE).write_text(json.dumps(info, indent=2))
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def random_rows(manifest: dict[str, Any], export_dir: Path, n: int, rng: np.random.Generator
                ) -> list[dict[str, Any]]:
    """``n`` valid request rows for an export: standard normal dense values, uniform ids of each
    table (1-3 per row for a multi-valued field), or raw values of its vocabulary."""
    inputs = manifest["inputs"]
    rows_of = {f: int(t["rows"]) for t in manifest["tables"] for f in t["features"]}
    multi = set(inputs.get("multi_valued") or [])
    columns = {inputs["feature_columns"].get(f, f): f for f in inputs["features"]}
    vocab_values = _vocab_values(manifest, export_dir)
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for c in inputs["dense"]:
        for row, v in zip(out, rng.standard_normal(n).tolist(), strict=True):
            row[c] = v
    for c, f in columns.items():
        pool = vocab_values.get(c)
        for row in out:
            k = int(rng.integers(1, 4)) if f in multi else 1
            ids = ([pool[i] for i in rng.integers(0, len(pool), k)] if pool
                   else rng.integers(0, rows_of[f], k).tolist())
            row[c] = ids if f in multi else ids[0]
    return out


def _vocab_values(manifest: dict[str, Any], export_dir: Path) -> dict[str, list[Any]]:
    """column -> the raw values of its vocabulary file (hashed columns: made-up strings)."""
    out: dict[str, list[Any]] = {}
    for column, info in (manifest.get("vocabularies") or {}).items():
        if info.get("file"):
            out[column] = pq.read_table(export_dir / info["file"]).column("value").to_pylist()
        else:
            out[column] = [f"{column}-{i}" for i in range(1000)]
    return out


# ---- the server ---------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``recsys serve`` as a child process, its output in ``log``; stopped on exit.

    Example:
        >>> with ServerProcess(export, cfg, threads=1, log=Path("serve.log")) as server:
        ...     server.wait_healthy()
    """

    def __init__(self, export: Path, cfg: ServeHttpBenchConfig, threads: int, log: Path
                 ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "recsys.cli", "serve", str(export), "--host", "127.0.0.1",
               "--port", str(self.port), "--max-batch-rows", str(cfg.max_batch_rows),
               "--max-wait-ms", str(cfg.max_wait_ms), "--threads", str(threads)]
        self.cmd = cmd
        self.exit_status: int | None = None
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Poll ``/health`` until 200; a RunError with the server's log if it exits first."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RunError(self.url, f"the server exited with status "
                               f"{self.proc.returncode} before it was healthy:\n{self.tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError), \
                    urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.1)
        raise RunError(self.url, f"no healthy answer from /health within {timeout:g} s:\n"
                       f"{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> int:
        """SIGTERM (a graceful shutdown), then SIGKILL if it is still running after a while;
        the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_status = self.proc.returncode
        return self.exit_status

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- the clients --------------------------------------------------------------------------------

@dataclass
class Driven:
    """What the clients measured: per-request latency (s) of the successful requests, the
    errors, the wall time, and the scores of the first pass over the bodies."""

    latency: list[float]
    errors: list[str]
    seconds: float
    scores: dict[int, dict[str, list[float]]]


async def drive(url: str, bodies: list[bytes], clients: int, total: int, seconds: float,
                progress: bool = True) -> Driven:
    """``clients`` concurrent clients send ``total`` requests (bodies cycled) to ``url/score``,
    stopping early after ``seconds``."""
    import aiohttp

    from recsys.progress import progress_bar

    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    latency: list[float] = []
    errors: list[str] = []
    scores: dict[int, dict[str, list[float]]] = {}
    sent = 0
    bar = progress_bar(total=total, unit="req", desc="serve-http", disable=not progress)
    headers = {"Content-Type": "application/json"}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < total and loop.time() < deadline:
            i, sent = sent, sent + 1
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/score", data=bodies[i % len(bodies)],
                                        headers=headers) as r:
                    payload = await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError) as e:
                errors.append(f"request {i}: {type(e).__name__}: {e}")
                continue
            elapsed = time.perf_counter() - start
            bar.update(1)
            if status != 200:
                errors.append(f"request {i}: HTTP {status}: {payload[:200]!r}")
                continue
            latency.append(elapsed)
            if i < len(bodies):
                scores[i] = json.loads(payload)["scores"]

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    start = time.perf_counter()
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(client(session) for _ in range(clients)))
    finally:
        bar.close()
    return Driven(latency, errors, time.perf_counter() - start, scores)


async def _get_json(url: str) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return await r.json()


# ---- the benchmark ------------------------------------------------------------------------------

def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50 / p99 / mean in milliseconds (NaN when empty)."""
    if not seconds:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


def batching_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The server's batching counters over the timed requests only (``/metadata`` ``stats``
    read before and after them)."""
    out = {k: after[k] - before[k] for k in ("requests", "rows", "batches", "failed_batches",
                                            "model_seconds")}
    out["mean_rows_per_batch"] = out["rows"] / out["batches"] if out["batches"] else 0.0
    out["mean_requests_per_batch"] = out["requests"] / out["batches"] if out["batches"] else 0.0
    out["largest_batch"] = after["largest_batch"]  # (over the whole run, warm-up included)
    return out


def time_inprocess(module: Any, inputs: list[Any], calls: int, warmup: int
                   ) -> tuple[list[float], list[dict[str, np.ndarray]]]:
    """Latency (s) of ``calls`` module calls (inputs cycled) after ``warmup`` untimed ones, and
    the outputs of one call per input."""
    outputs = []
    with torch.inference_mode():
        for x in inputs:
            outputs.append({t: p.to(torch.float32).numpy() for t, p in module(*x).items()})
        for i in range(warmup):
            module(*inputs[i % len(inputs)])
        latency = []
        for i in range(calls):
            x = inputs[i % len(inputs)]
            start = time.perf_counter()
            module(*x)
            latency.append(time.perf_counter() - start)
    return latency, outputs


def max_abs_diff(served: dict[int, dict[str, list[float]]],
                 local: list[dict[str, np.ndarray]]) -> float:
    """The largest |served - in-process| probability over the checked requests."""
    diffs = [float(np.max(np.abs(np.asarray(s[t], dtype=np.float64) - local[i][t])))
             for i, s in served.items() for t in s if len(s[t])]
    return max(diffs) if diffs else float("nan")


def run(cfg: ServeHttpBenchConfig, progress: bool = True) -> dict[str, Any]:
    """Serve the export over HTTP and drive it; time the module in-process; return the result
    (JSON-ready; ``table(result)``). This process's torch threads are restored afterwards."""
    from recsys.bench.train import stress_spec
    from recsys.serve.service import default_threads

    saved_threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="recsys-serve-http-") as tmp:
            if cfg.export:
                export = Path(cfg.export)
            else:
                spec = stress_spec(cfg.tables, cfg.rows, cfg.dim, cfg.dense, batch_size=64)
                export = export_untrained(spec, Path(tmp) / "export", seed=cfg.seed)
            return _measure(cfg, export, cfg.threads or default_threads(),
                            Path(tmp) / "server.log", progress)
    finally:
        torch.set_num_threads(saved_threads)


def _measure(cfg: ServeHttpBenchConfig, export: Path, threads: int, log: Path,
             progress: bool) -> dict[str, Any]:
    """Both measurements of one export (see the module docstring)."""
    from recsys.serve.service import ScoringService, ServeConfig

    # the in-process side: the same loading, parsing and module as the server's
    service = ScoringService.load(export, ServeConfig(threads=threads))
    manifest = service.predictor.manifest
    rng = np.random.default_rng(cfg.seed)
    bodies = [random_rows(manifest, export, cfg.rows_per_request, rng)
              for _ in range(min(DISTINCT_REQUESTS, cfg.requests))]
    encoded = [json.dumps({"rows": rows}).encode() for rows in bodies]
    flats = [service.parser.parse(rows) for rows in bodies]

    with ServerProcess(export, cfg, threads, log) as server:
        started = time.perf_counter()
        server.wait_healthy()
        startup_s = time.perf_counter() - started
        if cfg.warmup:
            asyncio.run(drive(server.url, encoded[-1:], cfg.clients, cfg.warmup, cfg.seconds,
                              progress=False))
        before = asyncio.run(_get_json(f"{server.url}/metadata"))
        driven = asyncio.run(drive(server.url, encoded, cfg.clients, cfg.requests, cfg.seconds,
                                   progress))
        after = asyncio.run(_get_json(f"{server.url}/metadata"))
        exit_status = server.stop()
        log_tail = server.tail(5)
    local_latency, local_out = time_inprocess(
        service.predictor.module, [(f.dense, f.values, f.lengths) for f in flats],
        cfg.inprocess_calls, cfg.warmup)
    asyncio.run(service.stop())

    ok = len(driven.latency)
    per_s = ok / driven.seconds if driven.seconds > 0 else 0.0
    http = {**percentiles(driven.latency), "requests": ok, "errors": len(driven.errors),
            "first_errors": driven.errors[:5], "seconds": driven.seconds,
            "requests_per_s": per_s, "rows_per_s": per_s * cfg.rows_per_request,
            "stopped_by_time_limit": ok + len(driven.errors) < cfg.requests}
    local_s = float(np.sum(local_latency))
    calls_per_s = len(local_latency) / local_s if local_s > 0 else 0.0
    inprocess = {**percentiles(local_latency), "calls": len(local_latency),
                 "calls_per_s": calls_per_s, "rows_per_s": calls_per_s * cfg.rows_per_request,
                 "threads": threads}
    diff = max_abs_diff(driven.scores, local_out)
    return {
        "config": asdict(cfg),
        "export": {"path": cfg.export or "(random weights, temporary)",
                   "spec": manifest.get("spec"), "arch": manifest.get("arch"),
                   "features": len(manifest["inputs"]["features"]),
                   "dense": len(manifest["inputs"]["dense"]), "tasks": manifest["tasks"]},
        "http": http,
        "inprocess": inprocess,
        "batching": batching_delta(before["stats"]["rows"], after["stats"]["rows"]),
        "server": {"startup_s": startup_s, "exit_status": exit_status, "log_tail": log_tail,
                   "torch_threads": after["batching"]["torch_threads"]},
        "parity": {"requests_checked": len(driven.scores), "max_abs_diff": diff,
                   "tolerance": PARITY_TOL, "ok": bool(diff <= PARITY_TOL)},
    }


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table and a summary."""
    cfg, http, local = result["config"], result["http"], result["inprocess"]
    batching, parity, server = result["batching"], result["parity"], result["server"]
    r = cfg["rows_per_request"]
    text = format_table(
        ["path", "requests", "rows/request", "p50 ms", "p99 ms", "requests/s", "rows/s"],
        [[f"HTTP POST /score, {cfg['clients']} clients", http["requests"], r, http["p50_ms"],
          http["p99_ms"], http["requests_per_s"], http["rows_per_s"]],
         ["in-process TorchScript call", local["calls"], r, local["p50_ms"], local["p99_ms"],
          local["calls_per_s"], local["rows_per_s"]]])
    e = result["export"]
    yes = {True: "yes", False: "NO"}
    text += (
        f"\n\n'{e['spec']}' ({e['arch']}, {e['features']} sparse features, {e['dense']} dense; "
        f"{e['path']}). HTTP: client wall time per request over loopback, requests/s over "
        f"{http['seconds']:.1f} s of driving; {http['errors']} error(s)"
        f"{' (stopped by the time limit)' if http['stopped_by_time_limit'] else ''}. In-process: "
        f"the same requests' flat inputs, one module call each, {local['threads']} torch "
        f"thread(s).\n"
        f"Server batching: {batching.get('batches', 0):,} model calls for "
        f"{batching.get('requests', 0):,} requests (mean "
        f"{batching.get('mean_requests_per_batch', 0.0):.2f} requests, "
        f"{batching.get('mean_rows_per_batch', 0.0):.1f} rows per call; max_batch_rows "
        f"{cfg['max_batch_rows']}, max_wait_ms {cfg['max_wait_ms']}). Startup to healthy "
        f"{server['startup_s']:.1f} s; exit status after SIGTERM {server['exit_status']}.\n"
        f"Served == in-process within {parity['tolerance']:g} on {parity['requests_checked']} "
        f"requests: {yes[parity['ok']]} (max abs diff {parity['max_abs_diff']:.1e}).")
    return text


def run_and_write(cfg: ServeHttpBenchConfig, out_dir: str | Path, echo: bool = True) -> Path:
    """run + write ``serve-http.json`` / ``.md`` into out_dir (+ print the table)."""
    from recsys.bench import run_and_write as write

    return write(NAME, run, table, cfg, out_dir, echo)


def config_from_args(args: argparse.Namespace) -> ServeHttpBenchConfig:
    """A config from parsed CLI options (absent or None options keep the defaults)."""
    d = ServeHttpBenchConfig
    names = ("tables", "rows", "dim", "dense", "clients", "requests", "rows_per_request",
             "seconds", "max_batch_rows", "max_wait_ms", "inprocess_calls", "warmup", "seed")
    values = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return d(export=getattr(args, "export", None), threads=getattr(args, "threads", None),
             quick=bool(getattr(args, "quick", False)), **values)
