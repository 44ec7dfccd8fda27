#!/usr/bin/env bash
# Wheels for running the GPU tests and benches on a machine that has PyTorch, Triton and transformers but no
# network: everything else understudy and its tests import, for that machine's Python, downloaded here.
#
#   bash scripts/gpu-wheels.sh [DIR] [PYTHON_VERSION]     # default: .whl, 3.12
#   # there:  pip install --no-index --no-deps --target /tmp/site DIR/*.whl
#   #         PYTHONPATH=/tmp/site:$PWD/src:$PWD python -m pytest tests/engine -p tests.helpers.gpu_only -n 8
#
# torch, triton, numpy and the nvidia-* libraries are left out: the machine's own must stay (a wheel on
# PYTHONPATH would shadow them). About 15 MB.
set -euo pipefail
dir=${1:-.whl}
py=${2:-3.12}
pip=${PIP:-python3 -m pip}
mkdir -p "$dir"
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
           --platform manylinux_2_31_x86_64 --platform any)
# understudy's own requirements (pyproject.toml) and the test extras the GPU runs use, with what they need
$pip download -q -d "$dir" --python-version "$py" --only-binary=:all: "${platforms[@]}" \
    "msgspec>=0.18" "tqdm>=4.66" "prometheus-client>=0.20" "gguf>=0.17.1" "jinja2>=3.1" "fastapi>=0.110" \
    "uvicorn>=0.29" "httpx>=0.27" "llguidance>=1.9" "openai>=1.40" "pytest>=8" "pytest-timeout>=2.3" \
    pytest-xdist "hypothesis>=6.100" "jsonschema>=4.0" opentelemetry-api "accelerate>=1.0"
# what the machine has already, or must keep its own of
for pkg in torch triton numpy nvidia_ sympy mpmath networkx setuptools safetensors hf_xet huggingface_hub fsspec \
           filelock psutil pyyaml requests urllib3 certifi charset_normalizer idna; do
    rm -f "$dir"/"$pkg"*.whl "$dir"/"$pkg"-*.whl
done
du -sh "$dir"
