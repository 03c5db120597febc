#!/usr/bin/env bash
# Create .venv and install the matched torch 2.13 / fbgemm-gpu 1.8 / torchrec 1.8 triple, then recsys.
#
# torchrec declares a dependency on `fbgemm-gpu` (the CUDA build). On a machine without CUDA that
# package and `fbgemm-gpu-cpu` overwrite each other's files and `import torchrec` fails, so torchrec is
# installed with --no-deps beside the variant that fits the machine, and its own dependencies are
# installed explicitly. Idempotent: a stamp records what was installed; a second run on a ready .venv
# only checks the stamp and the imports (a few seconds).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RECSYS_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION="2.13.0"
FBGEMM_VERSION="1.8.0"
TORCHREC_VERSION="1.8.0"
# torchrec's own dependencies (its METADATA, less fbgemm-gpu), pinned where torchrec pins them.
TORCHREC_DEPS=("tensordict" "torchmetrics==1.0.3" "tqdm" "pyre-extensions" "iopath")

if [[ -n "${RECSYS_FBGEMM_VARIANT:-}" ]]; then
  FBGEMM_PKG="$RECSYS_FBGEMM_VARIANT"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FBGEMM_PKG="fbgemm-gpu"
else
  FBGEMM_PKG="fbgemm-gpu-cpu"
fi

# The stamp changes whenever anything that decides the install changes.
stamp_of() {
  {
    echo "torch=$TORCH_VERSION fbgemm=$FBGEMM_PKG==$FBGEMM_VERSION torchrec=$TORCHREC_VERSION"
    echo "${TORCHREC_DEPS[*]}"
    cat "$ROOT/pyproject.toml"
  } | sha256sum | cut -d' ' -f1
}
STAMP_FILE="$VENV/.recsys-bootstrap"
WANT="$(stamp_of)"

if [[ -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$WANT" ]] &&
   "$VENV/bin/python" -c "
import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('torch', 'torchrec', 'fbgemm_gpu', 'recsys')))" >/dev/null 2>&1; then
  echo "bootstrap: $VENV is ready ($FBGEMM_PKG)"
  exit 0
fi

step() { echo "bootstrap: $*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
  step "creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
# pip here warns about absent local indexes for every package: keep the log to what matters.
pip_quiet() {
  local log rc=0
  log="$(mktemp)"
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
  grep -vE "^WARNING: Location .* is ignored|BuildBackendWarning|^ +(!!|\*+|corresp|with strategy|Please|By 20|See https|name as your package)|^ *$|requires fbgemm-gpu, which is not installed|dependency resolver does not currently" "$log" || true
  rm -f "$log"
  return "$rc"
}
PIP=(pip_quiet)
"${PIP[@]}" install -q --upgrade pip

step "torch==$TORCH_VERSION"
"${PIP[@]}" install -q "torch==$TORCH_VERSION"

# Remove the other variant if an earlier install left it: the two share files.
OTHER="fbgemm-gpu"; [[ "$FBGEMM_PKG" == "fbgemm-gpu" ]] && OTHER="fbgemm-gpu-cpu"
if "${PIP[@]}" show -q "$OTHER" >/dev/null 2>&1; then
  step "removing $OTHER (conflicts with $FBGEMM_PKG)"
  "${PIP[@]}" uninstall -q -y "$OTHER"
fi
step "$FBGEMM_PKG==$FBGEMM_VERSION"
"${PIP[@]}" install -q "$FBGEMM_PKG==$FBGEMM_VERSION" "torch==$TORCH_VERSION"

step "torchrec==$TORCHREC_VERSION (--no-deps) and its dependencies"
"${PIP[@]}" install -q --no-deps "torchrec==$TORCHREC_VERSION"
"${PIP[@]}" install -q "${TORCHREC_DEPS[@]}" "torch==$TORCH_VERSION"

step "recsys (editable) with dev extras"
"${PIP[@]}" install -q -e "$ROOT[dev]" "torch==$TORCH_VERSION"

step "checking imports"
"$VENV/bin/python" - <<'PY'
import torch, fbgemm_gpu, torchrec, recsys  # noqa: F401
print(f"bootstrap: torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec, '__version__') else '?'}")
PY
echo "$WANT" > "$STAMP_FILE"
step "done"
