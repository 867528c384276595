#!/usr/bin/env bash
# Every GPU check and figure in one go, for a borrowed GPU with little time: the GPU-only tests, then decode and
# training throughput with transformers rerun in the same process. Output goes to stdout and, when set, $OUT/.
# Each part has its own time limit so one stuck part cannot eat the rest.
#   bash benchmarks/gpu_suite.sh            # about 8 minutes on one H100/H200
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/argonne-gpu}
mkdir -p "$OUT"
run() {  # run LIMIT_S NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "=== $name exit ${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
run 150 gpu-tests $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
run 120 decode-small $PY benchmarks/decode_throughput.py --preset small
run 150 train-small $PY benchmarks/train_throughput.py --preset small --batch 8 --seq-len 4096 --compile --check-syncs \
    --steps 6 --warmup 2
run 150 train-2.0-selective $PY benchmarks/train_throughput.py --preset argonne-2.0 --batch 2 --seq-len 4096 --compile \
    --checkpointing selective --steps 4 --warmup 2
