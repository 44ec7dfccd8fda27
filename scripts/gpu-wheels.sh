#!/usr/bin/env bash
# Wheels for running the GPU tests and benches on a machine that has PyTorch, Triton and transformers but no
# network: everything else understudy and its tests import, for that machine's Python, downloaded here.
#
#   bash scripts/gpu-wheels.sh [DIR] [PYTHON_VERSION]     # default: .whl (from the repository root), 3.12
#   # there:  pip install --no-index --no-deps --target /tmp/site DIR/*.whl
#   #         PYTHONPATH=/tmp/site:$PWD/src:$PWD python -m pytest tests/engine -p tests.helpers.gpu_only -n 8
#
# The requirements are pyproject.toml's (the package's and its `test` extra), less what the machine brings
# and must keep its own of (a wheel on PYTHONPATH would shadow it) and the test extras only CPU suites use;
# plus pytest-xdist (the -n 8 above) and opentelemetry-api (fastapi imports it there). About 15 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
py=${2:-3.12}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# the machine's own, and what only the CPU suites import (etcd, HTTP fuzzing, manifests)
keep='torch numpy safetensors tokenizers transformers aetcd schemathesis kubernetes-validate'
mapfile -t reqs < <("$python" - "$keep" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
keep = set(sys.argv[1].split())
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    if re.match(r"[A-Za-z0-9_.-]+", req)[0].lower() not in keep:
        print(req)
EOF
)
mkdir -p "$dir"
"$python" -m pip download -q -d "$dir" --python-version "$py" --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_31_x86_64 --platform any \
    "${reqs[@]}" pytest-xdist opentelemetry-api
# what those pulled in that the machine has already (accelerate's torch, numpy, the nvidia libraries, ...)
for pkg in torch triton numpy nvidia_ sympy mpmath networkx setuptools safetensors hf_xet huggingface_hub fsspec \
           filelock psutil pyyaml requests urllib3 certifi charset_normalizer idna; do
    rm -f "$dir/$pkg"*.whl
done
du -sh "$dir"
