#!/usr/bin/env bash
# The GPU check in one command (< 10 minutes), for a lent CUDA machine that has Python, torch
# (CUDA), transformers and peft but no Ray, no vLLM, no DeepSpeed and no package registry:
#
#   bash benchmarks/fetch_gpu_wheels.sh              # HERE, once: fills benchmarks/.gpu_wheels
#   bash benchmarks/gpu_check.sh --out results.json  # THERE, with benchmarks/.gpu_wheels carried
#   bash benchmarks/gpu_check.sh --dry-run           # any machine: plan + loss checks on the CPU
#
# It installs what the GPU box lacks from the wheel folder (pip --no-index --find-links, into a
# scratch --target folder put on PYTHONPATH; DS_BUILD_OPS=0: nothing is compiled), then runs
# benchmarks/gpu_check.py: loss checks on CUDA (KA, DPO, InfoNCE; fp32 and bf16 inputs), one
# DeepSpeed ZeRO-2 and one ZeRO-3 step (LoRA, bf16, nccl, world size 1, tiny test Llama), the
# KA loss benchmark on the GPU. One JSON file of results (--out; default $OUT/gpu_check.json
# when $OUT is set, else benchmarks/results/gpu_check.json). Exit 0 only when every check passed.
set -uo pipefail
CALLER=$PWD
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

usage() {
  cat <<'EOF'
usage: bash benchmarks/gpu_check.sh [--out FILE] [--dry-run] [--checks losses,zero2,zero3,bench]
                                    [--wheels DIR] [--work DIR] [--python PY] [--timeout S] [--strict]
  --out FILE     result JSON (default $OUT/gpu_check.json, else benchmarks/results/gpu_check.json)
  --dry-run      no CUDA needed: parse, check the plan (files, wheel folder), loss checks on the CPU
  --checks LIST  comma list of losses,zero2,zero3,bench (default all)
  --wheels DIR   folder filled by benchmarks/fetch_gpu_wheels.sh (default benchmarks/.gpu_wheels)
  --work DIR     scratch: installed wheels, the generated tiny Llama (default $TMPDIR/kale_gpu_check)
  --python PY    interpreter (default .venv/bin/python if present, else python3)
  --timeout S    limit for the whole check (default 540)
  --strict       dry run: fail when a selected check is blocked (e.g. no wheel folder)
  --device D     torch device (default cuda); --device cpu runs the real path on a CPU (gloo, fp32)
EOF
}

DRY=0 DEVICE="" OUT_FILE="" CHECKS="all" WHEELS="$ROOT/benchmarks/.gpu_wheels" WORK="" PY="" TIMEOUT=540 STRICT=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_FILE=${2:?--out needs a file}; shift 2 ;;
    --out=*) OUT_FILE=${1#*=}; shift ;;
    --dry-run) DRY=1; shift ;;
    --checks) CHECKS=${2:?--checks needs a list}; shift 2 ;;
    --checks=*) CHECKS=${1#*=}; shift ;;
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --wheels=*) WHEELS=${1#*=}; shift ;;
    --work) WORK=${2:?--work needs a folder}; shift 2 ;;
    --work=*) WORK=${1#*=}; shift ;;
    --python) PY=${2:?--python needs an interpreter}; shift 2 ;;
    --python=*) PY=${1#*=}; shift ;;
    --timeout) TIMEOUT=${2:?--timeout needs seconds}; shift 2 ;;
    --timeout=*) TIMEOUT=${1#*=}; shift ;;
    --strict) STRICT=1; shift ;;
    --device) DEVICE=${2:?--device needs a device}; shift 2 ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
case "$TIMEOUT" in ''|*[!0-9]*) echo "gpu_check.sh: --timeout must be whole seconds, got '$TIMEOUT'" >&2; exit 2 ;; esac
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check.sh: no Python interpreter '$PY'" >&2; exit 2; }
WORK=${WORK:-${TMPDIR:-/tmp}/kale_gpu_check}
mkdir -p "$WORK"

ARGS=(--checks "$CHECKS" --wheels "$WHEELS" --work "$WORK")
case "$OUT_FILE" in ''|/*) ;; *) OUT_FILE="$CALLER/$OUT_FILE" ;; esac  # relative to where it was called from
[ -n "$OUT_FILE" ] && ARGS+=(--out "$OUT_FILE")
[ "$STRICT" = 1 ] && ARGS+=(--strict)
[ -n "$DEVICE" ] && ARGS+=(--device "$DEVICE")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  exec timeout "$TIMEOUT" "$PY" benchmarks/gpu_check.py --dry-run "${ARGS[@]}"
fi

# -- the real run: a GPU, then what is missing from the wheel folder
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
ACC=cuda; case "$DEVICE" in cpu*) ACC=cpu ;; esac
export DS_BUILD_OPS=0 DS_ACCELERATOR=$ACC DS_SKIP_CUDA_CHECK=1
export KALE_RAY_CACHE="$WORK/cache" TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}"
SITE="$WORK/site"
MISSING=$(PYTHONPATH="$SITE:$PYTHONPATH" "$PY" -c \
  "import sys; sys.path.insert(0, 'benchmarks'); import gpu_check; print(' '.join(gpu_check.missing_wheel_dists()))")
if [ -n "$MISSING" ]; then
  echo "[gpu_check.sh] installing from $WHEELS into $SITE: $MISSING"
  [ -d "$WHEELS" ] || { echo "[gpu_check.sh] no wheel folder $WHEELS: run benchmarks/fetch_gpu_wheels.sh where a registry is reachable and carry the folder" >&2; }
  # shellcheck disable=SC2086
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --target "$SITE" \
      --disable-pip-version-check $MISSING \
      || echo "[gpu_check.sh] pip install failed; the ZeRO checks will report it" >&2
  else  # no pip: unzip the matching wheels (pure Python or this interpreter's tag)
    "$PY" benchmarks/gpu_check.py --wheels "$WHEELS" --unpack-into "$SITE" $MISSING \
      || echo "[gpu_check.sh] unpacking the wheels failed; the ZeRO checks will report it" >&2
  fi
fi
export PYTHONPATH="$SITE:$PYTHONPATH"
timeout "$TIMEOUT" "$PY" benchmarks/gpu_check.py "${ARGS[@]}"
rc=$?
[ "$rc" = 124 ] && echo "[gpu_check.sh] stopped after $TIMEOUT s; the result file has the checks that finished" >&2
exit "$rc"
