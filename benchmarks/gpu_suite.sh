#!/usr/bin/env bash
# Every GPU check and figure in one go, for a borrowed GPU with little time: the GPU-only tests, then training and
# decode throughput with transformers rerun in the same process. Output goes to stdout and $OUT/ (a borrowed GPU
# returns at most eight files: parts share them, see FILE_OF; kernel profiles in profiles.txt). Parts run in priority
# order, each under its own time limit, and all within SUITE_SECONDS: a part that no longer fits is skipped (named in
# the summary) rather than cut off.
#   bash benchmarks/gpu_suite.sh                        # everything, about 20 minutes on one H100/H200
#   bash benchmarks/gpu_suite.sh gpu-tests train-float8   # issue 22's FP8 figures first, on a 15-minute loan
#   SUITE_SECONDS=400 bash benchmarks/gpu_suite.sh      # what fits in 400 s
#   bash benchmarks/gpu_suite.sh decode-b16 train-2.0   # only these parts
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-/tmp/argonne-gpu}
SUITE_SECONDS=${SUITE_SECONDS:-600}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
started=$SECONDS
wanted=" $* "
# Result file of each part (default: the part's name); eight files in all with summary.txt and profiles.txt.
declare -A FILE_OF=([train-small]=train [train-documents]=train [train-2.0]=train [train-float8]=train
                    [float8-loss]=train [decode-b1]=decode [decode-accuracy]=decode
                    [decode-long]=decode [decode-b16]=decode [gemv]=decode [serve-load]=eval
                    [prefix-cache]=eval)
run() {  # run LIMIT_S NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    [[ "$wanted" == "  " || "$wanted" == *" $name "* ]] || return 0
    local left=$((SUITE_SECONDS - (SECONDS - started) - 5))
    if ((left < 45)); then
        echo "=== $name skipped: ${left}s left of SUITE_SECONDS" | tee -a "$OUT/summary.txt"
        return 0
    fi
    ((limit > left)) && limit=$left
    local file="$OUT/${FILE_OF[$name]:-$name}.txt"
    echo "=== $name ($(date +%T), limit ${limit}s)" | tee -a "$file"
    timeout "$limit" "$@" > >(tee -a "$file") 2>&1
    echo "=== $name exit $? after $((SECONDS - started))s" | tee -a "$OUT/summary.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/summary.txt"
run 180 gpu-tests $PY -m pytest -p no:cacheprovider -o addopts="" -rfEs tests/test_gpu.py  # one process, xdist or not
run 150 train-small $PY benchmarks/train_throughput.py --preset small --batch 8 --seq-len 4096 --compile \
    --checkpointing none selective --check-syncs --steps 5 --warmup 2 --profile "$OUT/profiles.txt"
# Document attention (flex attention, issue 21) against causal on the same windows: goal at most 10% slower.
run 120 train-documents $PY benchmarks/train_throughput.py --preset small --batch 8 --seq-len 4096 --compile \
    --steps 5 --warmup 2 --document-length 1024 --skip-transformers
run 100 train-2.0 $PY benchmarks/train_throughput.py --preset argonne-2.0 --batch 2 --seq-len 4096 --compile \
    --checkpointing selective --steps 3 --warmup 2
# FP8 (issue 22): Argonne 2.0 with selective checkpointing, bf16 beside each FP8 recipe and transformers in one run
# (goal: FP8 >= 1.3x our bf16 tokens/s); then the tiny recipe's loss curves in bf16 and FP8 (goal: within noise).
run 300 train-float8 $PY benchmarks/train_throughput.py --preset argonne-2.0 --batch 2 --seq-len 4096 --compile \
    --checkpointing selective --steps 3 --warmup 2 --float8 tensorwise rowwise
run 240 float8-loss $PY benchmarks/recipe_ablation.py --variants original float8_tensorwise float8_rowwise \
    --seeds 0 1 --steps 150 --seq-len 128 --micro-batch 8 --eval-every 15 --no-reference
run 270 decode-b1 $PY benchmarks/decode_throughput.py --preset small --batches 1 --repeats 2 \
    --variants torch gemv+attention --profile "$OUT/profiles.txt"
# Logits of each kernel setting against float32 (greedy tokens of two bf16 decoders part early on random weights),
# and a long context: a 3,328-key cache, where the Triton attention splits the keys into ranges. With decode-b1 they
# decide the default kernels, so they come before batch 16.
run 150 decode-accuracy $PY benchmarks/decode_accuracy.py --preset small --prompt-tokens 1024 --new-tokens 256
run 150 decode-long $PY benchmarks/decode_throughput.py --preset small --batches 1 --repeats 1 --prompt-tokens 3072 \
    --new-tokens 128 --skip-transformers --variants torch gemv+attention
run 180 decode-b16 $PY benchmarks/decode_throughput.py --preset small --batches 16 --repeats 2
run 60 gemv $PY benchmarks/gemv_kernels.py
run 200 decode-variants $PY benchmarks/decode_throughput.py --preset small --batches 1 --repeats 2 --skip-transformers \
    --variants gemv+efficient-attention gemv+native-matmul unmerged efficient-attention gemv+max-autotune
# lm-eval (issue 19): Argonne's class against lm-eval's hf backend on the 0.5B shape, bf16, same run.
run 240 eval $PY benchmarks/eval_throughput.py --preset 0.5b --device cuda --dtype bfloat16 --repeat 40
# argonne serve under load: continuous batching against one request at a time (--max-batch 1), the 0.5B shape (serve
# loads bf16 on GPUs), streamed greedy requests of 64 tokens. Its log shares eval.txt (eight files), the numbers go to
# serve-load.json. Most of its time is the servers' start and compiling one decode step per batch size (warm-up).
# The server needs fastapi and uvicorn (and pydantic, starlette), which the H200 image may lack: carry their wheels.
run 300 serve-load $PY benchmarks/serve_load.py --preset small --device cuda --concurrency 1,4,16,64 \
    --output "$OUT/serve-load.json"
# The engine's prefix cache and paged blocks (issue 30), the 0.5B shape in bf16: time to first token with a shared
# 2,048-token system prompt, lm-eval multiple-choice requests/s with and without the cache, and the requests that
# decode at once in the memory two rows of the whole context took before.
run 240 prefix-cache $PY benchmarks/prefix_cache.py --preset small --system-tokens 2048 --questions 200
echo "=== summary"
cat "$OUT/summary.txt"
for file in gpu-tests train decode decode-variants eval; do
    [[ -f "$OUT/$file.txt" ]] || continue
    echo "--- $file"
    grep -v -E "^[WIE][0-9]{4} |[Ww]arn|^ *$|^ *(from|import|File) |^\.+|USDT" "$OUT/$file.txt" | tail -n 24 |
        cut -c1-180
done
