#!/usr/bin/env bash
# `recsys bench archs` on a GPU machine with a stock PyTorch image (torch alone: no torchrec,
# fbgemm, pydantic or pyarrow, and recsys not installed): it runs from the repository root with
# PYTHONPATH=. and needs nothing else.
#
#   1. sync-debug pass: every arch's training forward + backward under
#      torch.cuda.set_sync_debug_mode("error") at batch 2048, fp32 and bf16 (which arches never
#      synchronize host and device; short timings, not the ones to quote);
#   2. the timed run: batch 2048 and 32768, fp32 and bf16 autocast, best of 3.
#
# Results go to $OUT (the device tool's folder that comes back), else bench-results/archs-device:
#   sync/archs.{json,md}, timed/archs.{json,md}, env.txt, log.txt.
# Each pass is bounded by `timeout`, so the whole script ends within about 8 minutes.
#
#   tools/bench_archs_device.sh                   # both passes
#   COMPILE=1 tools/bench_archs_device.sh         # and a third: torch.compile, batch 32768, fp32
#   PYTHON=/opt/torch/.venv/bin/python3 tools/bench_archs_device.sh
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST="${OUT:-bench-results/archs-device}"
mkdir -p "$DEST/sync" "$DEST/timed"
export PYTHONPATH=. PYTHONUNBUFFERED=1
LOG="$DEST/log.txt"
: >"$LOG"

say() { echo "== $(date +%H:%M:%S) $*" | tee -a "$LOG"; }

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available()
else None)'
} >"$DEST/env.txt" 2>&1
cat "$DEST/env.txt" | tee -a "$LOG"
if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    say "torch sees no CUDA device: nothing to run"
    exit 1
fi

status=0
run() {  # run SECONDS OUTDIR [options...]
    local seconds="$1" dest="$2"
    shift 2
    say "recsys bench archs $* (at most ${seconds}s)"
    timeout --signal=INT --kill-after=15 "$seconds" \
        "$PY" -m recsys.cli bench archs --device cuda --out "$dest" "$@" 2>&1 | tee -a "$LOG"
    local rc="${PIPESTATUS[0]}"
    [ "$rc" -eq 0 ] || { say "exit status $rc"; status=1; }
}

run 150 "$DEST/sync" --sync-debug --batch-sizes 2048 --dtype fp32 bf16 --repeats 1 \
    --warmup 1 --min-seconds 0.02
run 300 "$DEST/timed" --batch-sizes 2048 32768 --dtype fp32 bf16 --repeats 3 --min-seconds 0.2
if [ "${COMPILE:-0}" = 1 ]; then
    mkdir -p "$DEST/compiled"
    # the arches of the CUDA targets, in the targets' fp32 (AdaEnsemble's static dispatch traces
    # as one graph: tests/test_moe_sync.py)
    run 240 "$DEST/compiled" --compile --archs dcn pin dynint moe --batch-sizes 32768 \
        --dtype fp32 --repeats 2 --min-seconds 0.2
fi
say "done (results under $DEST)"
exit "$status"
