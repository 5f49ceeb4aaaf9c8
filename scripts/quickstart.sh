#!/usr/bin/env bash
# Install, then serve the embedded SmolLM2-135M-Instruct with the OpenAI-compatible API on
# http://127.0.0.1:8000 (extra arguments go to `adaptserve serve`, e.g. --host 0.0.0.0 --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec adaptserve serve "$@"
