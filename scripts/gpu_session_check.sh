#!/usr/bin/env bash
# On the GPU machine, one call without the SmolLM2 GGUF, most urgent first: the CUDA tests of the
# runner (graph inputs: b343df4's fix), speculation and the fused/compressed kernels; the KV load
# ramp on the 8B preset (it aborted on the H200 before b343df4); where a batch-1 request's time goes
# outside its decode steps (scripts/request_overhead.py), with short prompt chunks as graph rows and
# without; with PIECES=1,5,1,5, decode graphs in pieces, also against an older tree when one was
# git-archive'd into build/bisect/base (carry build/bisect); with PROFILE_BATCH=64, the host phases of
# plain and n-gram steps at that batch (scripts/spec_profile.py).
# Compact output; logs and result files in $OUT. Usage: bash scripts/gpu_session_check.sh
set -uo pipefail
out="${OUT:-docs/benchmarks}"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== CUDA tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda tests/runner tests/spec \
  tests/kernels/test_triton_norm.py tests/kernels/test_triton_activation.py tests/kernels/test_triton_prefill.py > "$out/cuda-tests.log" 2>&1
grep -a "passed\|failed\|FAILED\|Error\|^E  " "$out/cuda-tests.log" | tail -16
# the compressed-KV kernel tests run on the GPU whole (most carry no cuda mark: they take the GPU when
# there is one), e.g. the one-launch prompt chunks of 985c9ad
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_kv_compressed.py \
  > "$out/kv-kernel-tests.log" 2>&1
grep -a "passed\|failed\|FAILED\|Error\|^E  " "$out/kv-kernel-tests.log" | tail -8
echo "== KV ramp (llama-3.1-8b preset)"
ramp="bench kv --model llama-3.1-8b --parts ramp --ramp-requests 96 --ramp-max-tokens 64 --ramp-blocks 128"
timeout "${KV_RAMP_TIMEOUT:-240}" python3 -c "import sys; from adaptserve.cli import main; sys.exit(main())" \
  $ramp --ramp-settings "${RAMP_SETTINGS:-bf16,adaptive-hot0,adaptive}" --result-dir "$out" > "$out/ramp.log" 2>&1
echo "ramp rc $?"
grep -a -v "it/s\]\|Assertion" "$out/ramp.log" | grep -a "^ramp\|wrote\|Error\|terminate" | head -8
if [ -n "${RAMP_PROFILE:-}" ]; then  # RAMP_PROFILE=adaptive: that setting's ramp under cProfile
  echo "== cProfile of the $RAMP_PROFILE ramp"
  timeout 200 python3 -m cProfile -o "$out/ramp.prof" -m adaptserve.cli $ramp --ramp-settings "$RAMP_PROFILE" \
    --result-dir "$out/ramp-profile" > "$out/ramp-profile.log" 2>&1
  python3 -c "import pstats, sys; s = pstats.Stats(sys.argv[1]); s.sort_stats('tottime').print_stats(30); \
s.sort_stats('cumtime').print_stats(45)" "$out/ramp.prof" 2>&1 | grep -a "^ \+[0-9]" | cut -c1-150
fi
if [ "${OVERHEAD:-1}" = 1 ]; then  # OVERHEAD=0 skips it
  echo "== batch-1 requests outside their decode steps (preset weights)"
  # short prompt chunks (prefix-cache hits) as graph rows (default) against eager prompts (0)
  for run in "off:64" "off:0" "ngram:4:64" "ngram:4:0"; do
    spec=${run%:*}; rows=${run##*:}; [ "$spec" = off ] && flags="" || flags="--spec $spec"
    timeout 60 python3 scripts/request_overhead.py --passes 3 $flags --graph-prompt-tokens "$rows" \
      > "$out/overhead-${spec/:/}-$rows.log" 2>&1
    echo "spec $spec, graph prompt tokens $rows:"; grep -a "^pass [0-9]:\|step 0:" "$out/overhead-${spec/:/}-$rows.log" | tail -4
  done
fi
if [ -n "${PROFILE_BATCH:-}" ]; then  # host phases of plain and n-gram steps at a larger batch
  echo "== host phases at batch $PROFILE_BATCH (preset weights)"
  timeout 120 python3 scripts/spec_profile.py --model smollm2-135m --dtype float32 --batch "$PROFILE_BATCH" \
    --max-tokens 64 --k 1,4 > "$out/spec-profile-b$PROFILE_BATCH.log" 2>&1
  grep -a "^== \|ms/call" "$out/spec-profile-b$PROFILE_BATCH.log" | head -40
fi
[ -z "${PIECES:-}" ] && exit 0  # PIECES=1,5,1,5: decode graphs in pieces, timed
echo "== graph pieces (batch 1, preset weights)"
timeout 150 python3 scripts/spec_profile.py --model smollm2-135m --dtype float32 --batch 1 --k 4 \
  --graph-pieces "$PIECES" > "$out/spec-profile.log" 2>&1
sed -n '/== summary/,$p' "$out/spec-profile.log"
if [ -d build/bisect/base/adaptserve ]; then  # the same profile on an older tree (git archive'd there)
  echo "== the same on build/bisect/base"
  (cd build/bisect/base && timeout 150 python3 ../../../scripts/spec_profile.py --model smollm2-135m \
    --dtype float32 --batch 1 --k 4 --graph-pieces "$PIECES") > "$out/spec-profile-base.log" 2>&1
  sed -n '/== summary/,$p' "$out/spec-profile-base.log"
fi
