#!/usr/bin/env bash
# On the GPU machine: kernel tests at real shapes, then the fast-path benchmarks into $OUT (or the
# folder given). Usage: bash scripts/gpu_check.sh [tests|decode|prefill|offline|startup|profile ...]
set -uo pipefail
out="${OUT:-docs/benchmarks}"
as() { python3 -c "import sys; from adaptserve.cli import main; sys.exit(main())" "$@"; }
for step in "${@:-tests decode prefill}"; do
  case "$step" in
    tests) timeout 300 python3 -m pytest -q -x -p no:cacheprovider -m cuda tests/kernels 2>&1 | tail -25 ;;
    decode) as bench decode --model llama-3.1-8b --batch-sizes 1,8,64,256 --context-len 1024 --steps 32 \
              --baselines none --result-dir "$out" 2>&1 | grep -v "it/s\]" | tail -12 ;;
    prefill) as bench prefill --model llama-3.1-8b --prompt-lens 1024,4096 --baselines none \
              --max-num-batched-tokens 4096 --result-dir "$out" 2>&1 | tail -4 ;;
    startup) as bench startup --model llama-3.1-8b --repeats 2 --result-dir "$out" 2>&1 | tail -4 ;;
    *) echo "unknown step $step" ;;
  esac
done
