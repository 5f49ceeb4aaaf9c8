#!/usr/bin/env bash
# On the GPU machine (issue 7): quantized-GEMV kernel tests at real shapes, the GEMV micro-benchmark,
# then decode step time of the llama-3.1-8b preset at batch 1 and 32 in each weight precision.
# Results land in $OUT (or docs/benchmarks). Usage: bash scripts/precision_gpu.sh [tests|gemv|decode ...]
set -uo pipefail
out="${OUT:-docs/benchmarks}"
as() { python3 -c "import sys; from adaptserve.cli import main; sys.exit(main())" "$@"; }
for step in "${@:-tests gemv decode}"; do
  case "$step" in
    tests) timeout 300 python3 -m pytest -q -x -p no:cacheprovider -m cuda tests/kernels/test_triton_quant_gemv.py \
             tests/kernels/test_quant_fp8.py tests/kernels/test_quant_int4.py 2>&1 | tail -15 ;;
    gemv) timeout 300 python3 scripts/quant_gemv_bench.py --out "$out/quant_gemv-h100.json" 2>&1 | tail -60 ;;
    decode)
      for precision in native fp8 int4 adaptive; do
        mkdir -p "$out/decode-$precision"
        timeout 400 python3 -c "import sys; from adaptserve.cli import main; sys.exit(main())" bench decode \
          --model llama-3.1-8b --precision-policy "$precision" --batch-sizes 1,32 --context-len 1024 \
          --steps 64 --baselines none --result-dir "$out/decode-$precision" 2>&1 | grep -v "it/s\]" | tail -6
      done ;;
    *) echo "unknown step $step" ;;
  esac
done
