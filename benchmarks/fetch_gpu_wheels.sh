#!/usr/bin/env bash
# Run HERE (a machine that reaches the package registry), before lending the working tree to a
# GPU machine that has Python, torch (CUDA), transformers and peft but no DeepSpeed and no
# registry. Fills benchmarks/.gpu_wheels/ (git-ignored; carry it with the working tree):
#
#   deepspeed-<v>-py3-none-any.whl   built here from the sdist with DS_BUILD_OPS=0 (pure Python:
#                                    no op is compiled; DS_ACCELERATOR=cuda is recorded in it)
#   hjson, py-cpuinfo, einops, pydantic, annotated-types, typing-inspection, nvidia-ml-py
#                                    pure-Python wheels
#   msgpack, pydantic-core           binary wheels for CPython 3.10-3.13 (the GPU box's Python is
#   ninja                            not known in advance; GPU_PY_VERSIONS overrides the list)
#   tokenizer/                       the tiny test Llama's tokenizer (SmolLM2's), ~3.5 MB: the GPU
#                                    check generates the random 2-layer Llama from it
#   MANIFEST.json                    every file with its size and sha256
#
# Versions are those of this venv (so the GPU box runs what the CPU tests run). The total must
# stay under 40 MiB (the working tree plus carried files must fit in 64 MiB).
#
# Usage: bash benchmarks/fetch_gpu_wheels.sh [DEST]        (default benchmarks/.gpu_wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${1:-benchmarks/.gpu_wheels}
PY_VERSIONS=${GPU_PY_VERSIONS:-"3.10 3.11 3.12 3.13"}
LIMIT_MIB=40
export PIP_DISABLE_PIP_VERSION_CHECK=1

ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pin() { local v; if v=$(ver "$1" 2>/dev/null); then echo "$1==$v"; else echo "$1"; fi; }

mkdir -p "$DEST"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# 1. DeepSpeed: the registry has an sdist only; build a pure-Python wheel from it here.
DS=$(pin deepspeed)
if ! ls "$DEST"/deepspeed-*.whl >/dev/null 2>&1; then
  echo "[fetch] $DS (sdist) -> wheel, DS_BUILD_OPS=0"
  "$PY" -m pip download -q --no-deps --no-binary deepspeed -d "$TMP/sdist" "$DS"
  DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index \
    -w "$DEST" "$TMP"/sdist/deepspeed-*.tar.gz
fi

# 2. Pure-Python dependencies that torch / transformers / peft do not bring.
PURE=("$(pin hjson)" "$(pin py-cpuinfo)" "$(pin einops)" "$(pin pydantic)" "$(pin annotated-types)"
      "$(pin typing-inspection)" nvidia-ml-py)
echo "[fetch] ${PURE[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" "${PURE[@]}"

# 3. Binary dependencies, one wheel per CPython version (ninja is one py3-none wheel).
BIN=("$(pin msgpack)" "$(pin pydantic-core)" "$(pin ninja)")
for v in $PY_VERSIONS; do
  abi="cp${v/./}"
  echo "[fetch] ${BIN[*]} for CPython $v"
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
    --implementation cp --python-version "$v" --abi "$abi" --abi abi3 --abi none \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    "${BIN[@]}"
done

# 4. The tiny test Llama's tokenizer (the weights are generated on the GPU box, not carried).
TOK_SRC=$("$PY" -c "from kale_ray.models import resolve_model; print(resolve_model('builtin:tiny-llama'))")
mkdir -p "$DEST/tokenizer"
for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
  [ -f "$TOK_SRC/$f" ] && cp "$TOK_SRC/$f" "$DEST/tokenizer/$f"
done

# 5. Manifest and the size limit.
"$PY" - "$DEST" "$LIMIT_MIB" <<'EOF'
import hashlib, json, sys
from pathlib import Path
dest, limit = Path(sys.argv[1]), float(sys.argv[2])
files = sorted(p for p in dest.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
rows = [{"file": str(p.relative_to(dest)), "bytes": p.stat().st_size,
         "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files]
total = sum(r["bytes"] for r in rows)
(dest / "MANIFEST.json").write_text(json.dumps({"total_bytes": total, "files": rows}, indent=1) + "\n")
for r in rows:
    print(f"  {r['bytes'] / 2**20:7.2f} MiB  {r['file']}")
print(f"[fetch] {len(rows)} files, {total / 2**20:.2f} MiB in {dest}")
if total > limit * 2**20:
    sys.exit(f"[fetch] over the {limit:g} MiB limit")
EOF
