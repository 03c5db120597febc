"""``recsys export | predict``: a TorchScript artifact of a run, and scoring Parquet with it."""

from __future__ import annotations

import argparse

from recsys.cli.common import SubParsers, add_command
from recsys.errors import UsageError
from recsys.fsutil import writing


def register(sub: SubParsers) -> None:
    _add_export(sub)
    _add_predict(sub)


# ---- export ---------------------------------------------------------------------------------------

def _add_export(sub: SubParsers) -> None:
    p = add_command(sub, "export", cmd_export, "TorchScript export of a run's latest checkpoint "
                    "(quantized embeddings, flat inputs, manifest)")
    p.add_argument("run_dir", help="a run directory with checkpoints")
    p.add_argument("--out", required=True, help="directory for model.pt and manifest.json")
    p.add_argument("--quantize", choices=["none", "fp16", "int8"], default="none",
                   help="embedding rows as stored in the artifact (default none: fp32)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the parity check against eager PyTorch on the test split")


def cmd_export(args: argparse.Namespace) -> int:
    from recsys.export.torchscript import export_run
    from recsys.tables import format_table

    info = export_run(args.run_dir, args.out, args.quantize, check=not args.no_check)
    print(f"exported {args.run_dir} ({info['arch']}, embeddings {info['quantize']}) to "
          f"{args.out}: model.pt {info['model_bytes']:,} bytes, manifest.json")
    if "serving_split" in info:
        split = info["serving_split"]
        timing = split["score_1000_cached"]
        print(f"serving split: {', '.join(split['files'])} ({split['items_cached']:,} items "
              f"cached); scoring 1,000 cached candidates for one request: p50 "
              f"{timing['p50_ms']:.2f} ms, p99 {timing['p99_ms']:.2f} ms")
    if "parity" in info:
        p = info["parity"]
        print(f"\nparity on {p['rows']:,} {p['split']} rows (eager PyTorch vs exported):")
        recorded = p.get("recorded", {})
        rec = recorded.get("tasks", {}) if recorded.get("available") else {}
        print(format_table(
            ["task", "max |diff|", "AUC eager", "AUC exported", "AUC the run recorded"],
            [[t, v["max_abs_diff"], v["auc_eager"], v["auc_exported"],
              rec[t]["auc_recorded"] if t in rec else float("nan")]
             for t, v in p["tasks"].items()]))
        if not rec:
            print(f"(not compared with the run's metrics: {recorded.get('why', 'none recorded')})")
    return 0


# ---- predict --------------------------------------------------------------------------------------

def _add_predict(sub: SubParsers) -> None:
    p = add_command(sub, "predict", cmd_predict,
                    "score a Parquet file (or directory) with an export or a trained run")
    p.add_argument("export_dir", metavar="EXPORT_OR_RUN_DIR",
                   help="a directory written by recsys export, or a run directory (its latest "
                        "checkpoint, scored in eager PyTorch)")
    p.add_argument("--data", required=True, help="Parquet file or directory of part files")
    p.add_argument("--out", required=True, help="output Parquet: ids and <task>_prob columns")
    p.add_argument("--batch-size", type=int, default=8192,
                   help="rows per call of the model (default 8192)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--raw", action="store_true",
                   help="the data is raw, as `recsys data prepare table` read it (its column "
                        "names, raw ids, unscaled numbers): map it through the export's "
                        "vocabularies and dense scaling first")


def cmd_predict(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    from recsys.export.predictor import predict_parquet

    with writing(args.out):
        s = predict_parquet(args.export_dir, args.data, args.out, batch_size=args.batch_size,
                            progress=not args.no_progress, raw=args.raw)
    means = ", ".join(f"{t} {v:.4f}" for t, v in s["mean_prob"].items() if v is not None)
    print(f"scored {s['rows']:,} rows from {s['files']} file(s) in {s['seconds']:.1f} s "
          f"({s['rows_per_s']:,.0f} rows/s); mean probability: {means or '-'}; wrote {s['out']}")
    return 0
