#!/usr/bin/env bash
# Create .venv (if no virtualenv is active) and install nanopipe with the right torch for this machine:
#   - NVIDIA GPU: the CUDA wheel from the PyTorch index (cu130 by default: DGX Spark / GB10 needs CUDA 13;
#     override with NANOPIPE_TORCH_INDEX, e.g. https://download.pytorch.org/whl/cu128)
#   - otherwise: a CPU-only torch (a local wheel if pip can find one offline, else the PyTorch CPU index),
#     never the multi-GB CUDA stack.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
            || { echo "error: nanopipe needs Python >= 3.10 (python3 is $(python3 --version))" >&2; exit 2; }
        python3 -m venv .venv
    fi
    PY=.venv/bin/python
else
    PY=python
fi

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
index="${NANOPIPE_TORCH_INDEX:-https://download.pytorch.org/whl/cu130}"
if ! $PY -c 'import torch' 2>/dev/null; then
    if [ "$gpu" = "1" ]; then
        echo "setup: NVIDIA GPU found; installing torch from $index"
        $PY -m pip install torch --index-url "$index"
    elif [ "$(uname -s)" = "Darwin" ]; then
        $PY -m pip install torch
    else
        echo "setup: no GPU; installing a CPU-only torch"
        # The "+cpu" local version pins the CPU build whichever index serves it: a plain "torch" would let pip
        # pick a newer CUDA wheel from PyPI (or a mirror) and pull the multi-GB CUDA stack. First the
        # configured sources (a local wheel in find-links, dependencies from the usual index), then PyTorch's.
        want="torch==${NANOPIPE_TORCH_VERSION:-2.13.0}+cpu"
        $PY -m pip install -q "$want" 2>/dev/null \
            || $PY -m pip install "$want" \
                   --extra-index-url "${NANOPIPE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
fi

# torch.compile on a GPU needs Triton; aarch64 CUDA wheels (DGX Spark) have not always pulled it in. The version
# torch names in its own requirements (whatever their platform marker), else the newest.
if [ "$gpu" = "1" ] && ! $PY -c 'import triton' 2>/dev/null; then
    triton=$($PY -c 'import importlib.metadata as m, re
reqs = [r.split(";")[0].replace(" ", "") for r in m.requires("torch") or []]
print(next((r for r in reqs if re.match(r"(pytorch-)?triton\b", r)), "triton"))')
    echo "setup: this torch has no Triton; installing $triton"
    $PY -m pip install "$triton" --extra-index-url "$index"
fi

if ! $PY -m pip show -q nanopipe >/dev/null 2>&1 \
    || ! $PY -c 'import pytest, hypothesis, transformers, safetensors, fastapi, uvicorn, playwright' 2>/dev/null; then
    $PY -m pip install -q -e '.[dev]'
fi
if [ "$(uname -s)" = "Linux" ] && ! command -v bwrap >/dev/null 2>&1; then
    echo "setup: note: HumanEval's code sandbox needs bubblewrap: sudo apt-get install bubblewrap" \
         "(without it chat_eval refuses HumanEval unless --unsafe-exec)"
fi
$PY -c 'import platform, torch
print("setup: ok: python", platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available())'
