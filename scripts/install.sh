#!/usr/bin/env bash
# Create .venv and install Argonne with its test tools. On a machine without an NVIDIA GPU, PyTorch is pinned to the
# 2.13.0 CPU build first, so that no multi-GB CUDA build is pulled in; with a GPU, pip's default CUDA build is used.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        python -m pip install --quiet "torch>=2.6"
    else
        python -m pip install --quiet torch==2.13.0
        # Triton too (CUDA builds of PyTorch bring their own): the tests run the GPU decode kernels on the CPU under
        # its interpreter. Its wheels are for Linux on x86_64 and ARM; without one those tests are skipped.
        if [[ "$(uname -s)" == Linux ]]; then
            python -m pip install --quiet triton==3.9.0 || echo "no Triton for this machine: its tests will be skipped"
        fi
    fi
fi
python -m pip install --quiet -e ".[test]"
python -c "import argonne, torch; print(f'argonne {argonne.__version__} installed with torch {torch.__version__}')"
