#!/usr/bin/env bash
# On the GPU machine (issue 7): quantized-GEMV kernel tests at real shapes, the GEMV micro-benchmark,
# then decode step time of the llama-3.1-8b preset at batch 1 and 32 in each weight precision.
# Logs and JSON land in $OUT (or docs/benchmarks); decode plots are dropped (`adaptserve bench plot`
# redraws them). Usage: bash scripts/precision_gpu.sh [tests] [gemv] [decode] [adaptive] [head]
# (head: fp8 and int4 with the LM head quantized too, --quantize-lm-head)
# (GEMV_ROWS=1,32,64 sets the GEMV's row counts, DECODE_PRECISIONS="native int4" the decode runs)
set -uo pipefail
out="${OUT:-docs/benchmarks}"
export PYTHONPATH=. PYTHONUNBUFFERED=1
decode() {  # precision, timeout in seconds, [a suffix for the result folder, extra flags...]
  local dir="$out/decode-$1${3:-}"
  mkdir -p "$dir"
  timeout "$2" python3 -c "import sys; from adaptserve.cli import main; sys.exit(main())" bench decode \
    --model llama-3.1-8b --precision-policy "$1" --batch-sizes 1,32 --context-len 1024 --steps 32 \
    --baselines none --result-dir "$dir" "${@:4}" 2>&1 | grep -v "it/s" | tail -4
  rm -f "$dir"/*.png
}
steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(tests gemv decode)
for step in "${steps[@]}"; do
  case "$step" in
    tests) timeout 100 python3 -m pytest -q -x -p no:cacheprovider -m cuda tests/kernels/test_triton_quant_gemv.py \
             tests/kernels/test_quant_fp8.py tests/kernels/test_quant_int4.py \
             tests/kernels/test_quant_int4_tinygemm.py tests/runner/test_step_precision.py > "$out/tests.log" 2>&1
           tail -5 "$out/tests.log" ;;
    gemv) timeout 120 python3 scripts/quant_gemv_bench.py --rows "${GEMV_ROWS:-1,32}" --out "$out/quant_gemv.json" > "$out/gemv.log" 2>&1
          grep -v SKIP "$out/gemv.log" | tail -40 ;;
    decode) for precision in ${DECODE_PRECISIONS:-native fp8 int4}; do decode "$precision" 85; done ;;
    adaptive) decode adaptive 85 ;;
    head) for precision in ${DECODE_PRECISIONS:-fp8 int4}; do decode "$precision" 85 -head --quantize-lm-head; done ;;
    *) echo "unknown step $step" ;;
  esac
done
