#!/usr/bin/env bash
# Wheels that let tools/gpu_check.py run `pytest -m gpu` on a bare GPU machine (Python 3.12 + torch, no network):
#   bash tools/gpu_wheels.sh [DIR]        # default DIR: .whl (ignored by git; carry it with the checkout)
# There:  python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && \
#         PYTHONPATH=/tmp/site python3 tools/gpu_check.py --out "$OUT"
# Only pure-Python or manylinux wheels for CPython 3.12 on x86-64, no dependencies resolved: the list below is the
# closed set pytest, pytest-timeout and PyYAML need. torch itself is already on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
mkdir -p "$dir"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dir" \
  pytest pluggy iniconfig packaging pygments pytest-timeout pyyaml
ls -l "$dir"
