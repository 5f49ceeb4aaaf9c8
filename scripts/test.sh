#!/usr/bin/env bash
# Install with test extras, lint, then run the test suite (CPU; CUDA tests skip themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
ruff check adaptserve tests
ruff format --check adaptserve tests
python -m pytest -q -rs "$@"
