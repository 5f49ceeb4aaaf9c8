#!/usr/bin/env bash
# Install, then generate with the embedded SmolLM2-135M-Instruct: several chat prompts in one batch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
adaptserve generate --chat --max-tokens 64 \
    "What is the capital of France?" \
    "Write a haiku about the sea." \
    "Give me three tips for learning Python." \
    "Explain what a KV cache is in one paragraph." "$@"
