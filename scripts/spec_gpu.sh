#!/usr/bin/env bash
# On the GPU machine (issue 9): speculative decoding on the real SmolLM2 over a batch sweep. The GGUF
# (98 MB) travels in two halves, build/carry1 and build/carry2 (split -b 50000000), carried on two
# calls to one warm machine; this joins them. Usage: bash scripts/spec_gpu.sh [extra bench spec flags]
set -uo pipefail
out="${OUT:-docs/benchmarks}"
# gguf (the loader's reader) is not in the GPU image: it travels as a wheel in .whl (carry it)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
model=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
cat build/carry1/smol.part.aa build/carry2/smol.part.ab > "$model"
echo "a1231443440b107ff29f02bdb38c9d0a  $model" | md5sum -c - || exit 1
# the CUDA runner tests (graphs, prewarm) first: verify steps replay the decode graphs (SPEC_TESTS=0
# skips them, when the same call's machine already ran them)
if [ "${SPEC_TESTS:-1}" = 1 ]; then
  timeout 90 python3 -m pytest -q -x -p no:cacheprovider -m cuda tests/runner > "$out/runner-tests.log" 2>&1
  tail -3 "$out/runner-tests.log"
fi
# SPEC_LAYER_DRAFTS=24:4 adds a self-speculative setting (slow: its draft passes run eagerly)
timeout "${SPEC_TIMEOUT:-450}" python3 -c "import sys; from adaptserve.cli import main; sys.exit(main())" bench spec \
  --model "$model" --batch-sizes "${SPEC_BATCHES:-1,8,32,64,128}" --draft-lens 2,4,8 --max-tokens 128 \
  --layer-drafts "${SPEC_LAYER_DRAFTS:-}" --repeats "${SPEC_REPEATS:-3}" --warm-passes "${SPEC_WARM_PASSES:-1}" \
  --result-dir "$out" "$@" 2>&1 \
  | grep -v "it/s\]" | tail -40
# KV_RAMP=1: then issue 8's load ramp on the same real SmolLM2 (the CPU ramp's settings), where greedy
# agreement means something (the 8B preset's random weights flip near-tied argmaxes in any format)
if [ "${KV_RAMP:-0}" = 1 ]; then
  timeout "${KV_RAMP_TIMEOUT:-200}" python3 -c "import sys; from adaptserve.cli import main; sys.exit(main())" \
    bench kv --model "$model" --parts ramp --ramp-settings bf16,adaptive-hot0,adaptive \
    --file-stem kv-ramp-smollm2-gpu --result-dir "$out" > "$out/kv-ramp-smollm2.log" 2>&1
  echo "kv ramp rc $?"; grep -a -v "it/s\]" "$out/kv-ramp-smollm2.log" | grep -a "^ramp\|wrote\|Error" | head -8
fi
