#!/usr/bin/env bash
# On the GPU machine (issue 8): the compressed-KV Triton kernel tests, then the KV load ramp (static
# bf16 against the adaptive policy) on the llama-3.1-8b preset (random weights). Output in $OUT.
set -uo pipefail
out="${OUT:-docs/benchmarks}"
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_triton_kv_compressed.py > "$out/kv-tests.log" 2>&1
tail -3 "$out/kv-tests.log"
timeout "${KV_RAMP_TIMEOUT:-220}" python3 -c "import sys; from adaptserve.cli import main; sys.exit(main())" bench kv \
  --model llama-3.1-8b --parts ramp --ramp-requests 32 --ramp-max-tokens 64 --ramp-blocks 64 \
  --result-dir "$out" "$@" 2>&1 | grep -v "it/s\]" | tail -12
