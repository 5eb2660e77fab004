#!/usr/bin/env bash
# The GPU proof (issue #15), one command: the CUDA test subset (pytest -m cuda), then the
# paper-scale measurements (bench/bench_gpu.py). Writes tests.log, bench.log, gpu.json and
# gpu.md (the table for bench/README.md) to $OUT, else bench/gpu-out/.
#
#   bash bench/gpu.sh --prepare       # here, once, with .venv and PyPI: .gpu/ = the wheels the GPU
#                                     # machine lacks + the embedded model's tokenizer (no weights)
#   bash bench/gpu.sh                 # on the GPU machine (about 5 minutes on one H100/H200)
#   bash bench/gpu.sh --cpu-dry-run   # every step, tiny shapes, on the CPU (tests/bench/test_gpu_dry_run.py)
#
# With the device tool: run(command="bash bench/gpu.sh", carry=[".gpu", "client/romegw_client/_pb"]).
# That machine has python3 with torch, transformers, grpcio, protobuf, safetensors, prometheus-client,
# pytest and psutil, and no network; the gateway runs from this tree (PYTHONPATH), nothing is installed
# but the wheels of .gpu/wheels (into /tmp, first on the path).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MODE=gpu
case "${1:-}" in
  --cpu-dry-run) MODE=dry ;;
  --prepare) MODE=prepare ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--cpu-dry-run | --prepare]" >&2; exit 2 ;;
esac
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if [ "$MODE" = prepare ]; then
  set -e
  rm -rf .gpu && mkdir -p .gpu/wheels
  # the versions this tree is tested with (pyproject, .venv); cp312 manylinux wheels for that machine
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
    protobuf==7.36.2 psycopg==3.3.9 psycopg-binary==3.3.9 psycopg-pool==3.3.3
  "$PY" - <<'EOF'
from transformers import AutoTokenizer
from rome_engine.loading import ensure_embedded_folder
AutoTokenizer.from_pretrained(ensure_embedded_folder()).save_pretrained(".gpu/tokenizer")
EOF
  [ -f client/romegw_client/_pb/gateway_pb2.py ] || "$PY" client/gen_stubs.py
  du -sh .gpu client/romegw_client/_pb
  exit 0
fi

OUTDIR=${OUT:-$ROOT/bench/gpu-out}
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing is fetched: a stray lookup fails at once
if [ "$MODE" = gpu ] && { [ ! -d .gpu/wheels ] || [ ! -d .gpu/tokenizer ]; }; then
  echo ".gpu/ did not travel: run 'bash bench/gpu.sh --prepare' here and carry .gpu" >&2
  exit 3
fi
if [ "$MODE" = gpu ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/romegw-site \
    .gpu/wheels/*.whl || exit 3
  export PYTHONPATH=/tmp/romegw-site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ! -f client/romegw_client/_pb/gateway_pb2.py ]; then
  echo "client/romegw_client/_pb is not generated: run 'make proto' here and carry it" >&2
  exit 3
fi
# the gateway from this tree, as installed it would be: romegw_server is the server/ folder
PKG=$(mktemp -d)
ln -s "$ROOT/server" "$PKG/romegw_server"
export PYTHONPATH="$ROOT:$ROOT/client:$PKG${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
[ -d .gpu/tokenizer ] && export ROMEGW_TOKENIZER="$ROOT/.gpu/tokenizer"
[ "$MODE" = gpu ] && export ROMEGW_CACHE_DIR=${ROMEGW_CACHE_DIR:-$PKG/cache}

if [ "$MODE" = dry ]; then DEVICE=cpu; DRY=--cpu-dry-run; else DEVICE=cuda; DRY=; fi
"$PY" -c "import torch, transformers, grpc, google.protobuf as pb; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'transformers', \
transformers.__version__, 'grpcio', grpc.__version__, 'protobuf', pb.__version__)" | tee "$OUTDIR/env.log"

# 1. the CUDA paths (on the CPU in the dry run); 2. the measurements, run even if a test failed
ROMEGW_TEST_DEVICE=$DEVICE "$PY" -m pytest -q -m cuda tests/cuda -p no:cacheprovider 2>&1 | tee "$OUTDIR/tests.log"
tests=${PIPESTATUS[0]}
# shellcheck disable=SC2086
"$PY" bench/bench_gpu.py $DRY ${ROMEGW_TOKENIZER:+--tokenizer "$ROMEGW_TOKENIZER"} --out "$OUTDIR" 2>&1 \
  | tee "$OUTDIR/bench.log"
bench=${PIPESTATUS[0]}
rm -rf "$PKG"
echo "gpu.sh ($MODE): tests exit $tests, bench exit $bench; results in $OUTDIR"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
