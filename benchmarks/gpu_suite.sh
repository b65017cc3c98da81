#!/bin/sh
# The GPU suite under the image's own python3 with the repository on PYTHONPATH (see docs/GPU.md).
#   benchmarks/gpu_suite.sh "$OUT"            on the GPU machine (build/gpu carried)
#   benchmarks/gpu_suite.sh /tmp/out --dry-run   here, tiny sizes on the CPU
set -e
cd "$(dirname "$0")/.."
out="${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [--dry-run] [--budget-s N]}"
shift
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" benchmarks/gpu_suite.py run --out "$out" "$@"
