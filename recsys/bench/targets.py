"""The stack's speed targets, each read from the benchmark that measures it, with whether it is met:
``recsys bench all`` writes them as ``targets.json`` / ``targets.md`` (the README shows the table).

Example:
    >>> summary, table = targets({"models": models_result, "moe": moe_result})
    >>> summary["targets"][0]["met"]
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from recsys.tables import format_table

Row = dict[str, Any]


def _models(r: dict[str, Any]) -> Iterator[Row]:
    names = {"moe_vs_dcn": "AdaEnsemble full CPU training >= 0.4x DCN's samples/s",
             "xdeepint_gftrl_vs_adagrad": "xDeepInt with gftrl >= 0.5x its rowwise_adagrad "
                                          "samples/s (26 x 262k tables)"}
    for key, v in r.get("ratios", {}).items():
        measured = f"{v['value']:.2f}x"
        if v.get("interleaved"):  # beside it, the median of the repeats' pairs
            measured += f" (in turns; separate runs {v['median_of_pairs']:.2f}x)"
        yield {"target": names.get(key, key), "measured": measured, "met": v["met"],
               "benchmark": "models"}


def _moe(r: dict[str, Any]) -> Iterator[Row]:
    ratio = r["ratio_depth4_to_depth1"]["best"]
    yield {"target": "AdaEnsemble inference: depth-1 exit >= 2.5x faster than depth 4",
           "measured": f"{ratio:.2f}x", "met": ratio >= 2.5, "benchmark": "moe"}


def _ranktower(r: dict[str, Any]) -> Iterator[Row]:
    rt = r["results"]["ranktower"]
    dssm = r["results"].get("dssm", {})
    yield {"target": "RankTower, 1,000 cached candidates, 1 thread: p50 <= 2 ms, p99 <= 4 ms",
           "measured": f"p50 {rt['p50_ms']:.2f} ms, p99 {rt['p99_ms']:.2f} ms"
                       + (f" (DSSM p50 {dssm['p50_ms']:.2f} ms)" if dssm else ""),
           "met": rt["p50_ms"] <= 2.0 and rt["p99_ms"] <= 4.0, "benchmark": "ranktower"}


def _data(r: dict[str, Any]) -> Iterator[Row]:
    ratio = r["ratio_to_bare"]["loader -> Batch (shuffled)"]
    measured = f"{ratio:.2f}x"
    workers = r.get("num_workers") or 0
    if workers:  # reported beside it: the rows/s of worker processes, in total and per core
        name = f"loader -> Batch (shuffled, {workers} workers)"
        measured += (f" ({workers} workers: {r['rows_per_s'][name] / 1e6:.2f}M rows/s on "
                     f"{r['cores'][name]} cores, {r['rows_per_s_per_core'][name] / 1e6:.2f}M "
                     "per core)")
    yield {"target": "shuffled loading >= 0.5x a bare pyarrow read of the same columns",
           "measured": measured, "met": ratio >= 0.5, "benchmark": "data"}


def _small(r: dict[str, Any]) -> Iterator[Row]:
    if "skipped" in r:
        yield {"target": "DCN-v2 on MovieLens, batch 1024, 1 process: >= 100k samples/s",
               "measured": r["skipped"], "met": None, "benchmark": "small"}
        return
    sps = r["samples_per_s"]["sharded"]
    yield {"target": "DCN-v2 on MovieLens, batch 1024, 1 process: >= 100k samples/s",
           "measured": f"{sps:,.0f} samples/s ({r['ratio']:.2f}x plain PyTorch)",
           "met": sps >= 100_000, "benchmark": "small"}


def _archs(r: dict[str, Any]) -> Iterator[Row]:
    device = r.get("device", "cpu")
    by_kind: dict[tuple[str, Any], list[Row]] = {}
    for t in r.get("targets", []):
        kind = "bf16" if "bf16 step" in t["target"] else t["target"]
        by_kind.setdefault((kind, t["batch"]), []).append(t)
    for (kind, batch), items in sorted(by_kind.items(), key=lambda kv: str(kv[0])):
        if kind == "bf16":
            slower = [t["target"].split(":")[0] for t in items if t["value"] > t["limit"]]
            pairs = f"{len(items) - len(slower)} of {len(items)} arch/phase pairs"
            gemm = items[0].get("gemm")
            # where the device's own bf16 products are slower than fp32 ones, no arch can gain
            na = gemm is not None and gemm > 1.0
            measured = (f"n/a here: a bf16 matrix product itself takes {gemm:.2f}x fp32's on "
                        f"this {device} (no bf16 matrix units); bf16 no slower in {pairs}" if na
                        else pairs + (f"; slower: {', '.join(slower)}" if slower else ""))
            yield {"target": f"bf16 autocast never slower than fp32 ({device}, batch {batch})",
                   "measured": measured, "met": None if na else not slower,
                   "benchmark": "archs"}
            continue
        for t in items:
            yield {"target": f"{t['target']} ({device}, batch {batch}, {t['dtype']})",
                   "measured": f"{t['value']:.2f}x", "met": t["met"], "benchmark": "archs"}


def _prepare(r: dict[str, Any]) -> Iterator[Row]:
    per_core = r["rows_per_s_per_core"]
    yield {"target": "table adapter >= 200k rows/s per core on a 20-column table",
           "measured": ", ".join(f"{fmt} {v:,.0f}" for fmt, v in per_core.items()),
           "met": all(v >= 200_000 for v in per_core.values()), "benchmark": "prepare"}


_READERS: dict[str, Callable[[dict[str, Any]], Iterator[Row]]] = {
    "models": _models, "small": _small, "moe": _moe, "ranktower": _ranktower, "data": _data,
    "archs": _archs, "prepare": _prepare,
}


def targets(results: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Every target whose benchmark is in ``results``, as (summary dict, markdown table)."""
    rows: list[Row] = []
    for name, read in _READERS.items():
        if name in results:
            try:
                rows.extend(read(results[name]))
            except (KeyError, TypeError) as e:  # a benchmark's layout changed: say so
                rows.append({"target": f"({name})", "measured": f"unreadable: {e!r}",
                             "met": None, "benchmark": name})
    table = format_table(["target", "measured", "met", "benchmark"],
                         [[r["target"], r["measured"],
                           "n/a" if r["met"] is None else ("yes" if r["met"] else "no"),
                           f"recsys bench {r['benchmark']}"] for r in rows])
    met = sum(1 for r in rows if r["met"])
    applicable = sum(1 for r in rows if r["met"] is not None)
    na = f" ({len(rows) - applicable} n/a here)" if applicable < len(rows) else ""
    table += (f"\n\n{met} of {applicable} targets met on this machine{na}. Targets measured on CUDA "
              "(AdaEnsemble's training step <= 4x DCN's at batch 32768, the sync-debug run) come "
              "from `recsys bench archs --device cuda` (tools/bench_archs_device.sh).")
    return {"targets": rows, "met": met, "applicable": applicable, "total": len(rows)}, table
