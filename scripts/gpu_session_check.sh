#!/usr/bin/env bash
# On the GPU machine, one call without the SmolLM2 GGUF: the CUDA tests of the runner, speculation and
# compressed-KV kernels (the padded-row fix among them), decode graphs in pieces compared in one
# process, then the KV load ramp on the 8B preset (step clock; plain bf16, adaptive without and with
# the hot window). Compact output; result files in $OUT. Usage: bash scripts/gpu_session_check.sh
set -uo pipefail
out="${OUT:-docs/benchmarks}"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== CUDA tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda tests/runner tests/spec \
  tests/kernels/test_triton_kv_compressed.py tests/kernels/test_triton_norm.py \
  tests/kernels/test_triton_activation.py > "$out/cuda-tests.log" 2>&1
grep -a "passed\|failed\|FAILED\|Error" "$out/cuda-tests.log" | tail -8
echo "== graph pieces (batch 1, preset weights)"
timeout 150 python3 scripts/spec_profile.py --model smollm2-135m --dtype float32 --batch 1 --k 4 \
  --graph-pieces "${PIECES:-1,5}" > "$out/spec-profile.log" 2>&1
sed -n '/== summary/,$p' "$out/spec-profile.log"
if [ -d build/bisect/base/adaptserve ]; then  # the same profile on an older tree (git archive'd there)
  echo "== the same on build/bisect/base"
  (cd build/bisect/base && timeout 150 python3 ../../../scripts/spec_profile.py --model smollm2-135m \
    --dtype float32 --batch 1 --k 4 --graph-pieces "${PIECES:-1,5}") > "$out/spec-profile-base.log" 2>&1
  sed -n '/== summary/,$p' "$out/spec-profile-base.log"
fi
echo "== where a verify step's host time goes (pieces 5, k 4: torch.profiler trace and cProfile, in $out)"
timeout 150 python3 scripts/spec_profile.py --model smollm2-135m --dtype float32 --batch 1 --k 4 \
  --graph-pieces 5 --trace --cprofile 40 > "$out/spec-trace.log" 2>&1
grep -a "^== \|busy\|idle" "$out/spec-trace.log" | head -12
echo "== KV ramp (llama-3.1-8b preset)"
KV_RAMP_TIMEOUT="${KV_RAMP_TIMEOUT:-240}" bash scripts/kv_gpu.sh --ramp-requests 96 --ramp-blocks 128 \
  --ramp-settings bf16,adaptive-hot0,adaptive | grep -a "^ramp\|wrote\|Error"
