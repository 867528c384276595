#!/usr/bin/env bash
# Create .venv and install Argonne: `bash scripts/install.sh` for training, generation and the other commands;
# `bash scripts/install.sh --test` adds the test tools (pytest, pytest-xdist, lm-eval with its `hf` backend, torchao,
# the OpenAI client, and Triton on a CPU machine). On a machine without an NVIDIA GPU, PyTorch is pinned to the 2.13.0
# CPU build first, so that no multi-GB CUDA build is pulled in; with a GPU, pip's default CUDA build is used.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") extras="" ;;
    --test) extras="[test]" ;;
    *) echo "usage: bash scripts/install.sh [--test]" >&2; exit 2 ;;
esac
# Each step that takes more than a few seconds says what it is doing (pip itself is kept quiet).
echo "install: creating .venv"
python3 -m venv .venv
. .venv/bin/activate
# Without a GPU, torch is pinned in the same pip call as Argonne (one resolution), so its CPU build is what comes.
torch=""
if ! python -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
    torch="torch==2.13.0"
fi
# Triton's interpreter runs the GPU decode kernels' tests on the CPU (CUDA builds of PyTorch bring their own Triton).
# Its wheels are for Linux on x86_64 and ARM; without one those tests are skipped.
if [[ -n "$extras" ]] && ! python -c "import triton" 2>/dev/null && [[ "$(uname -s)" == Linux ]]; then
    echo "install: Triton, for the decode kernels' tests"
    python -m pip install --quiet triton==3.9.0 || echo "no Triton for this machine: its tests will be skipped"
fi
echo "install: ${torch:+PyTorch, }Argonne${extras:+ with its test tools} and their dependencies (about two minutes)"
python -m pip install --quiet $torch -e ".$extras"
python -c "import argonne, torch; print(f'argonne {argonne.__version__} installed with torch {torch.__version__}')"
