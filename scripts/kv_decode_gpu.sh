#!/usr/bin/env bash
# On the GPU machine (issue 8): one decode step's time over a plain cache against a compressed one
# (int8, with and without CUDA graphs; the adaptive cache with a hot window while it still writes
# bf16), on the llama-3.1-8b preset (random weights). One JSON per setting under $OUT/decode-<name>.
# Usage: bash scripts/kv_decode_gpu.sh [extra bench decode flags]
set -uo pipefail
out="${OUT:-docs/benchmarks}"
export PYTHONPATH=. PYTHONUNBUFFERED=1
settings=(
  "bf16:"
  "int8:--kv-format int8"
  "int8-eager:--kv-format int8 --no-cuda-graphs"
  "adaptive-hot1:--kv-policy adaptive --kv-hot-window 1"
)
for setting in "${settings[@]}"; do
  name=${setting%%:*}
  read -ra flags <<< "${setting#*:}"
  mkdir -p "$out/decode-$name"
  echo "== $name"
  timeout "${KV_DECODE_TIMEOUT:-150}" python3 -c "import sys; from adaptserve.cli import main; sys.exit(main())" \
    bench decode --model "${KV_DECODE_MODEL:-llama-3.1-8b}" --batch-sizes "${KV_DECODE_BATCHES:-1,16,64}" \
    --context-len 256 --steps 16 --baselines none --max-num-seqs 64 --result-dir "$out/decode-$name" \
    "${flags[@]}" "$@" 2>&1 | grep -v "it/s\]" | grep "|\|Error\|error" | tail -8
done
python3 scripts/kv_decode_combine.py "$out"
